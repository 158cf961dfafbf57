"""Host time per cuBLAS call by ATen entry point (mm vs addmm with a 0-dim self, beta=0) on the device.

The 1024-token LoRA step is host-bound there; torch.profiler showed aten::mm costing ~100 us of host time per
call against ~18 us for aten::addmm. This times each entry point alone (perf_counter over many calls, nothing
waits for the GPU except between batches) for the thin and the big products of that step.
    python bench/probe/host_gemm.py
"""
import torch

from lora_profile import host_us  # (bench/probe/, the folder of this script)


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    dt = torch.bfloat16
    N, K, M, r = 1024, 4096, 4096, 16
    x = torch.randn(N, K, device="cuda", dtype=dt)
    dy = torch.randn(N, M, device="cuda", dtype=dt)
    W = torch.randn(M, K, device="cuda", dtype=dt)
    A = torch.randn(r, K, device="cuda", dtype=dt)
    B = torch.randn(M, r, device="cuda", dtype=dt)
    z = torch.empty((), device="cuda", dtype=dt)
    y = torch.empty(N, M, device="cuda", dtype=dt)
    print("backend", torch.backends.cuda.preferred_blas_library())
    cases = {
        "u   mm(x, A^T)": lambda: torch.mm(x, A.T),
        "u   addmm(0d, x, A^T, beta=0)": lambda: torch.addmm(z, x, A.T, beta=0),
        "u   matmul": lambda: x @ A.T,
        "v   mm(dy, B)": lambda: torch.mm(dy, B),
        "v   addmm(0d, dy, B, beta=0)": lambda: torch.addmm(z, dy, B, beta=0),
        "big mm(x, W^T)": lambda: torch.mm(x, W.T),
        "big addmm(0d, x, W^T, beta=0)": lambda: torch.addmm(z, x, W.T, beta=0),
        "big y.addmm_(x, W^T)": lambda: y.addmm_(x, W.T),
        "dB  addmm(0d, dy^T, u, beta=0, alpha=2)": lambda: torch.addmm(z, dy.T, x[:, :r], beta=0, alpha=2),
        "empty(N, M)": lambda: torch.empty(N, M, device="cuda", dtype=dt),
        "add_ (elementwise)": lambda: y.add_(y),
    }
    for name, fn in cases.items():
        print(f"  {name:42s} {host_us(fn, 200, 5):7.1f} us host per call", flush=True)
    for lib in ("cublas", "cublaslt"):
        try:
            torch.backends.cuda.preferred_blas_library(lib)
        except Exception as e:
            print(lib, e)
            continue
        print("backend", torch.backends.cuda.preferred_blas_library())
        for name in ("u   mm(x, A^T)", "u   addmm(0d, x, A^T, beta=0)", "big mm(x, W^T)", "big y.addmm_(x, W^T)"):
            print(f"  {name:42s} {host_us(cases[name], 200, 5):7.1f} us host per call", flush=True)


if __name__ == "__main__":
    main()
