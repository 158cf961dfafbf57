"""Probe: one ext_thin forward + backward at a benchmark shape, for ncu of csrc/lora_thin.cu's kernels.

    ncu -k 'regex:row_kernel|lowrank_kernel' --launch-skip 4 --launch-count 4 \
        python bench/probe/thin_once.py --tokens 8192 --in 4096 --out 4096 --rank 16

Runs the op (implementation forced to ext_thin, bf16, no bias or dropout, as bench/bench_lora_linear.py) twice: the
first call loads the extension and settles cuBLAS's workspace; ncu then sees, per call, the row kernel for u, the
lowrank kernel for y, the row kernel for v and the lowrank kernel for dx. Exits non-zero when ext_thin would not
run its kernels here (extension missing, unsupported dtype or rank).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--in", dest="in_f", type=int, default=4096)
    ap.add_argument("--out", dest="out_f", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    from balora_kernels import _ext
    from balora_kernels.ops import lora_linear as L
    dt, dev = torch.bfloat16, "cuda"
    torch.manual_seed(0)
    x = torch.randn(a.tokens, a.in_f, device=dev, dtype=dt, requires_grad=True)
    W = torch.randn(a.out_f, a.in_f, device=dev, dtype=dt) / a.in_f ** 0.5
    A = (torch.randn(a.rank, a.in_f, device=dev, dtype=dt) / a.in_f ** 0.5).requires_grad_(True)
    B = (torch.randn(a.out_f, a.rank, device=dev, dtype=dt) * 1e-2).requires_grad_(True)
    dy = torch.randn(a.tokens, a.out_f, device=dev, dtype=dt)
    if not L.thin_kernels_apply(x, a.rank):
        raise SystemExit(f"ext_thin would not run its kernels here: {_ext.error() or _ext.how()}")
    for _ in range(2):
        torch.autograd.grad(L.lora_linear(x, W, None, A, B, 2.0, None, impl="ext_thin"), (x, A, B), dy)
    torch.cuda.synchronize()
    print("ok")


if __name__ == "__main__":
    main()
