"""One launch each (after warm-up) of cuBLAS's x W^T, the Triton TMA GEMM (config 0) and bench/probe/wgmma_gemm.cu's
variants at 8192 x 4096 -> 4096 r16 bf16, for ncu (see bench/probe/wgmma_gemm.py):

    ncu --metrics ... python3 bench/probe/wgmma_ncu_once.py [variant ...]   # on the device
"""
import sys

import torch

sys.path.insert(0, "bench/probe")
import wgmma_gemm as wg  # noqa: E402
from balora_kernels.ops import lora_linear as ll  # noqa: E402

lib = wg.load(".bkcache/wgmma/wgmma_gemm.so")
M, K, N, R = 8192, 4096, 4096, 16
x, w, u, q, y = wg.operands(M, K, N, R)
variants = [int(v) for v in sys.argv[1:]] or [114, 1104]
for _ in range(2):   # warm-up (Triton compiles), then the launches ncu profiles
    torch.mm(x, w.T, out=y)
    ll.lora_gemm(x, w.T, u, q.T, 2.0, out=y, config=0, tma=True)
    for v in variants:
        wg.ours(lib, v, x, w, u, q, None, y, 2.0)
torch.cuda.synchronize()
