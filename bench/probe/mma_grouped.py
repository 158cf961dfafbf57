"""Probe: csrc/grouped_mma.cu's tensor-core Gram / rescale (float32, ranks 17 to 64) against the Triton kernels.

For the 7B adapters at each --ranks (float32): GPU time of the Gram, the rescale and the whole projection of the
plan with the CUDA kernels ("auto") and of one with the Triton kernels (``kernels="triton"``), CUDA-graph replays
with the L2 flushed (triton.testing.do_bench), side by side in one run; the two Grams' largest difference relative
to the float64 Gram's norm; then the memory floor of each step (bytes / the measured copy rate). Writes
mma-grouped-probe.json to --out.
Usage: python bench/probe/mma_grouped.py [--ranks 32,64] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="32,64")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from triton.testing import do_bench

    from bench_projection import MODELS, graph_ms, llama_shapes, make_adapters
    from balora_kernels.ops.grouped_projection import TritonProjectionPlan

    bench = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_TBps = 2 * x.numel() / (bench(lambda: y.copy_(x)) * 1e-3) / 1e12
    del x, y
    shapes = llama_shapes(**MODELS["llama2-7b"])
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_TBps": copy_TBps, "cases": []}
    for r in (int(v) for v in args.ranks.split(",")):
        ad = make_adapters(shapes, r, torch.float32)
        nbytes = sum(A.numel() * 4 + B.numel() * 4 for A, B in ad)
        ours, tri = TritonProjectionPlan(ad), TritonProjectionPlan(ad, kernels="triton")
        case = {"r": r, "kernels": ours.kernels[r], "gram_floor_ms": nbytes / (copy_TBps * 1e9),
                "rescale_floor_ms": 2 * nbytes / (copy_TBps * 1e9)}
        for name, plan in (("cuda", ours), ("triton", tri)):
            plan.run("nearest")
            plan.run("nearest")
            status = torch.zeros(plan.n_pairs, dtype=torch.int32, device="cuda")
            case[f"gram_{name}_ms"] = graph_ms(plan.gram, bench)
            case[f"rescale_{name}_ms"] = graph_ms(lambda: plan.rescale(status), bench)
            case[f"project_{name}_ms"] = bench(lambda: plan.run("nearest"))
        ours.gram()
        tri.gram()
        worst = 0.0
        for p, (A, B) in enumerate(ad):
            for which, X in ((0, B.double().T), (1, A.double())):
                G64 = X @ X.T
                d = (ours.groups[0].grams[p, which, :r, :r].double() - tri.groups[0].grams[p, which, :r, :r].double())
                worst = max(worst, (d.norm() / G64.norm()).item())
        case["gram_cuda_vs_triton_rel"] = worst
        res["cases"].append(case)
        print(json.dumps(case))
        del ours, tri, ad
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mma-grouped-probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'r':>3} {'gram cuda':>10} {'triton':>8} {'floor':>7} {'rescale cuda':>13} {'triton':>8} {'floor':>7} "
          f"{'project cuda':>13} {'triton':>8}")
    for c in res["cases"]:
        print(f"{c['r']:>3} {c['gram_cuda_ms']:>10.3f} {c['gram_triton_ms']:>8.3f} {c['gram_floor_ms']:>7.3f} "
              f"{c['rescale_cuda_ms']:>13.3f} {c['rescale_triton_ms']:>8.3f} {c['rescale_floor_ms']:>7.3f} "
              f"{c['project_cuda_ms']:>13.3f} {c['project_triton_ms']:>8.3f}")


if __name__ == "__main__":
    main()
