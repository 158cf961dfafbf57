"""Probe: one Triton Gram and one Triton rescale of the 7B adapters at a rank and dtype, for ncu.

    ncu -k regex:"_gram_partial_kernel|_rescale_kernel" --launch-skip 2 --launch-count 2 \
        python bench/probe/triton_once.py --rank 64 --dtype float32

Builds the projection plan with the package's launch parameters (the r x r step in torch: no extension needed, so
it can run beside the extension's build), runs the Gram and the rescale twice (the first launches compile), and
exits. The kernels' names in ncu's report are Triton's: _gram_partial_kernel, _rescale_kernel.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    from bench_projection import MODELS, llama_shapes, make_adapters
    from balora_kernels.ops.grouped_projection import TritonProjectionPlan
    torch.manual_seed(0)
    pairs = make_adapters(llama_shapes(**MODELS["llama2-7b"]), a.rank, getattr(torch, a.dtype))
    plan = TritonProjectionPlan(pairs, transforms="torch", cuda_graph=False)
    status = torch.zeros(plan.n_pairs, dtype=torch.int32, device="cuda")
    gaps = torch.zeros(plan.n_pairs, 2, dtype=torch.float64, device="cuda")
    plan.gram()
    plan.transforms_("nearest", status, gaps)
    for _ in range(2):
        plan.gram()
        plan.rescale(status)
    torch.cuda.synchronize()
    print("plan:", {g.r: (g.fp32_gram, [lg.tune for lg in g.launches]) for g in plan.groups})


if __name__ == "__main__":
    main()
