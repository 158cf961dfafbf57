// Torch-facing side of the balancing-transforms kernel (csrc/balance.cu): input checks, stream, scratch,
// and the op registration `torch.ops.balora.balance_transforms`.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cuda_runtime.h>

#include "messages.h"

extern "C" {
void bk_balance_config(int P, int n, int num_sms, int* threads, int* grid, int* smem_bytes, int* mats_in_smem,
                       long long* scratch_doubles);
int bk_balance_launch(const float* grams, const double* eps_f, int P, int n, int R, int mode, float* tw, int* status, double* gaps,
                      double* scratch, int threads, int grid, int smem_bytes, int mats_in_smem,
                      cudaStream_t stream);
const char* bk_error_string(int err);
}

namespace {

// grams fp32 [P, 2, R, R], eps_f fp64 [P] (each pair's factor rounding unit, reference.factor_eps)
// -> tw fp32 [P, 2, R, R] (T, T^-1), status int32 [P], gaps fp64 [P, 2].
void balance_transforms(const at::Tensor& grams, const at::Tensor& eps_f, int64_t r, int64_t mode,
                        const at::Tensor& tw, const at::Tensor& status, const at::Tensor& gaps) {
  const char* op = "balora::balance_transforms";
  TORCH_CHECK(grams.is_cuda() && eps_f.is_cuda() && tw.is_cuda() && status.is_cuda() && gaps.is_cuda(), bk::msg(op,
              ": all tensors must be CUDA tensors"));
  TORCH_CHECK(grams.device() == eps_f.device() && grams.device() == tw.device() &&
                  grams.device() == status.device() && grams.device() == gaps.device(), bk::msg(op, ": all tensors must be on one device"));
  TORCH_CHECK(grams.dim() == 4 && grams.size(1) == 2 && grams.size(2) == grams.size(3), bk::msg(op,
              ": grams must be [P, 2, R, R], got ", grams.sizes()));
  const int64_t P = grams.size(0), R = grams.size(2);
  TORCH_CHECK(r >= 1 && r <= 128 && r <= R, bk::msg(op, ": rank r=", r, " must be in [1, min(128, R=", R, ")]"));
  TORCH_CHECK(mode == 0 || mode == 1, bk::msg(op, ": mode must be 0 (nearest) or 1 (svd), got ", mode));
  TORCH_CHECK(grams.scalar_type() == at::kFloat && grams.is_contiguous(), bk::msg(op,
              ": grams must be contiguous float32, got ", grams.scalar_type()));
  TORCH_CHECK(eps_f.scalar_type() == at::kDouble && eps_f.is_contiguous() && eps_f.dim() == 1 &&
                  eps_f.size(0) == P, bk::msg(op, ": eps_f must be contiguous float64 [", P, "], got ", eps_f.scalar_type(), " ", eps_f.sizes()));
  TORCH_CHECK(tw.scalar_type() == at::kFloat && tw.is_contiguous() && tw.sizes() == grams.sizes(), bk::msg(op,
              ": tw must be contiguous float32 of grams' shape ", grams.sizes(), ", got ", tw.sizes()));
  TORCH_CHECK(status.scalar_type() == at::kInt && status.is_contiguous() && status.dim() == 1 &&
                  status.size(0) == P, bk::msg(op, ": status must be contiguous int32 [", P, "], got ", status.sizes()));
  TORCH_CHECK(gaps.scalar_type() == at::kDouble && gaps.is_contiguous() && gaps.dim() == 2 &&
                  gaps.size(0) == P && gaps.size(1) == 2, bk::msg(op, ": gaps must be contiguous float64 [", P, ", 2], got ", gaps.sizes()));
  if (P == 0) return;
  c10::cuda::CUDAGuard guard(grams.device());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int threads = 0, grid = 0, smem = 0, in_smem = 0;
  long long scratch_n = 0;
  bk_balance_config((int)P, (int)r, sms, &threads, &grid, &smem, &in_smem, &scratch_n);
  at::Tensor scratch = at::empty({scratch_n}, grams.options().dtype(at::kDouble));
  const int err = bk_balance_launch(grams.data_ptr<float>(), eps_f.data_ptr<double>(), (int)P, (int)r, (int)R, (int)mode,
                                    tw.data_ptr<float>(), status.data_ptr<int>(), gaps.data_ptr<double>(),
                                    scratch.data_ptr<double>(), threads, grid, smem, in_smem,
                                    at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, bk::msg(op, ": launch failed for P=", P, " r=", r, ": ", bk_error_string(err)));
}

}  // namespace

TORCH_LIBRARY(balora, m) {
  m.def("balance_transforms(Tensor grams, Tensor eps_f, int r, int mode, Tensor(a!) tw, Tensor(b!) status, Tensor(c!) gaps) -> ()");
}

TORCH_LIBRARY_IMPL(balora, CUDA, m) { m.impl("balance_transforms", &balance_transforms); }

// Importable as a Python module too (setup.py builds balora_kernels._C); the ops register on load.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "balora_kernels CUDA extension (torch.ops.balora)"; }
