"""Probe: host cost per rank-r product of the 1024-token LoRA step, by C++ entry point, on the device.

From C++ (no Python per call): ATen's ``at::mm`` / ``at::addmm`` with a 0-dim self (the op's calls), the
output allocation alone, ATen's cuBLAS handle lookup, ``cublasGemmEx`` issued directly on that handle into a
preallocated output, and an empty kernel launch. Each number is host microseconds per call (median of 5 batches
of ``calls`` calls; nothing waits for the GPU inside a batch).

    python bench/probe/host_blas.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from torch.utils import cpp_extension

CPP = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

void bk_probe_empty_launch(void* stream);

static double per_call_us(const std::function<void()>& f, int64_t calls) {
  std::vector<double> ts;
  for (int b = 0; b < 5; ++b) {
    cudaDeviceSynchronize();
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < calls; ++i) f();
    auto t1 = std::chrono::steady_clock::now();
    ts.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / calls);
    cudaDeviceSynchronize();
  }
  std::sort(ts.begin(), ts.end());
  return ts[2];
}

// c [m, n] row-major = alpha * a [m, k] @ b [k, n], a and b given by data pointer, row stride and whether
// transposed in memory (col-major): one cublasGemmEx (col-major view: c^T = b^T a^T).
static void gemm_rm(cublasHandle_t h, const at::Tensor& a, const at::Tensor& b, at::Tensor& c, float alpha) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const bool a_rm = a.stride(1) == 1, b_rm = b.stride(1) == 1;
  const int64_t lda = a_rm ? a.stride(0) : a.stride(1), ldb = b_rm ? b.stride(0) : b.stride(1);
  const float beta = 0.f;
  const cudaDataType t = a.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  TORCH_CHECK(cublasGemmEx(h, b_rm ? CUBLAS_OP_N : CUBLAS_OP_T, a_rm ? CUBLAS_OP_N : CUBLAS_OP_T, n, m, k, &alpha,
                           b.data_ptr(), t, ldb, a.data_ptr(), t, lda, &beta, c.data_ptr(), t, c.stride(0),
                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS, "cublasGemmEx");
}

std::vector<double> costs(at::Tensor x, at::Tensor A, at::Tensor dy, at::Tensor B, at::Tensor u, at::Tensor v,
                          int64_t calls) {
  std::vector<double> r;
  at::Tensor z = at::empty({}, x.options());
  const int64_t N = x.size(0), rk = A.size(0);
  // 0 at::mm u = x A^T; 1 at::addmm(0d, dy^T, u, beta 0, alpha 2) dB; 2 at::addmm(0d, v^T, x) dA; 3 at::mm v = dy B
  r.push_back(per_call_us([&] { at::mm(x, A.t()); }, calls));
  r.push_back(per_call_us([&] { at::addmm(z, dy.t(), u, 0, 2); }, calls));
  r.push_back(per_call_us([&] { at::addmm(z, v.t(), x, 0, 2); }, calls));
  r.push_back(per_call_us([&] { at::mm(dy, B); }, calls));
  // 4 at::empty [N, r]; 5 the handle lookup; 6 cublasGemmEx u (preallocated); 7 handle + empty + cublasGemmEx dB
  r.push_back(per_call_us([&] { at::empty({N, rk}, x.options()); }, calls));
  r.push_back(per_call_us([&] { at::cuda::getCurrentCUDABlasHandle(); }, calls));
  at::Tensor uo = at::empty({N, rk}, x.options());
  r.push_back(per_call_us([&] { gemm_rm(at::cuda::getCurrentCUDABlasHandle(), x, A.t(), uo, 1.f); }, calls));
  r.push_back(per_call_us([&] {
    at::Tensor o = at::empty({dy.size(1), rk}, x.options());
    gemm_rm(at::cuda::getCurrentCUDABlasHandle(), dy.t(), u, o, 2.f);
  }, calls));
  // 8 handle + empty + cublasGemmEx dA; 9 empty kernel launch; 10 4 x cublasGemmEx (u, v, dB, dA) with allocations
  r.push_back(per_call_us([&] {
    at::Tensor o = at::empty({rk, x.size(1)}, x.options());
    gemm_rm(at::cuda::getCurrentCUDABlasHandle(), v.t(), x, o, 2.f);
  }, calls));
  r.push_back(per_call_us([&] { bk_probe_empty_launch(at::cuda::getCurrentCUDAStream().stream()); }, calls));
  r.push_back(per_call_us([&] {
    auto h = at::cuda::getCurrentCUDABlasHandle();
    at::Tensor o1 = at::empty({N, rk}, x.options()), o2 = at::empty({N, rk}, x.options());
    at::Tensor o3 = at::empty({dy.size(1), rk}, x.options()), o4 = at::empty({rk, x.size(1)}, x.options());
    gemm_rm(h, x, A.t(), o1, 1.f); gemm_rm(h, dy, B, o2, 1.f); gemm_rm(h, dy.t(), u, o3, 2.f);
    gemm_rm(h, v.t(), x, o4, 2.f);
  }, calls));
  // 11 the same four products by ATen
  r.push_back(per_call_us([&] {
    at::mm(x, A.t()); at::mm(dy, B); at::addmm(z, dy.t(), u, 0, 2); at::addmm(z, v.t(), x, 0, 2);
  }, calls));
  return r;
}
"""
CU = r"""
__global__ void bk_probe_empty_kernel() {}
void bk_probe_empty_launch(void* stream) { bk_probe_empty_kernel<<<1, 32, 0, (cudaStream_t)stream>>>(); }
"""
NAMES = ["at::mm u = x A^T", "at::addmm(0d) dB = s dy^T u", "at::addmm(0d) dA = s v^T x", "at::mm v = dy B",
         "at::empty [N, r]", "getCurrentCUDABlasHandle", "cublasGemmEx u (preallocated out)",
         "handle + empty + cublasGemmEx dB", "handle + empty + cublasGemmEx dA", "empty kernel <<<>>>",
         "4 products by cublasGemmEx (+4 empty)", "4 products by ATen"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=1024)
    a = ap.parse_args()
    mod = cpp_extension.load_inline("bk_host_blas_probe", cpp_sources=[CPP], cuda_sources=[CU], functions=["costs"],
                                    extra_ldflags=["-lcublas"], extra_cflags=["-O2"], verbose=False)
    torch.manual_seed(0)
    dt, N, K, M, r = torch.bfloat16, a.tokens, 4096, 4096, 16
    x = torch.randn(N, K, device="cuda", dtype=dt)
    dy = torch.randn(N, M, device="cuda", dtype=dt)
    A = torch.randn(r, K, device="cuda", dtype=dt)
    B = torch.randn(M, r, device="cuda", dtype=dt)
    u, v = x @ A.T, dy @ B
    # (the direct call's results against ATen's, so the probe times the right products)
    rows = {}
    for calls in (20, 60):
        t = mod.costs(x, A, dy, B, u, v, calls)
        for name, us in zip(NAMES, t):
            rows.setdefault(name, []).append(round(us, 2))
    for name, us in rows.items():
        print(f"{name:40s} {us} us host per call (batches of 20, 60)")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"host_blas_{N}.json"), "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
