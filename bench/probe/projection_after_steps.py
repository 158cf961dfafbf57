"""The projection's time as training sees it: each projection after an optimizer-like update of every adapter.

bench/bench_projection.py times ``ours`` on pairs that earlier projections balanced exactly (its steady state). In
training each projection follows an optimizer step that moves the pairs slightly off balance, and the first one
meets random adapters. This probe times, for the Llama-2-7B adapters (224 pairs, float32) at r in {8, 16, 64},
on one plan replaying its CUDA graph as ``BalancedProjector`` runs it:

* ``balanced_ms``: projections of exactly balanced pairs (bench_projection's steady state), CUDA events around
  each call, median of ``--reps``;
* ``after_update_ms``: before each timed projection every factor gets an update of relative size ``--step``
  (``X += step * rms(X) * noise``, outside the timed interval; an Adam step moves each entry by about the
  learning rate, 1e-4 to 1e-3 of an adapter's scale), median;
* ``fresh_ms``: projections of newly drawn random adapters (B at 1e-2, as the benchmark's), median of 5;
* accuracy of the timed projections of updated pairs: the largest product error ``||B'A' - BA|| / ||BA||`` and
  balance gap ``||B'^T B' - A' A'^T|| / ||A' A'^T||`` over all 224 pairs (float64).

Usage: ``python bench/probe/projection_after_steps.py [--reps 30] [--step 1e-3] [--out DIR]``
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))                   # bench/ (llama_shapes, make_adapters)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository (balora_kernels)

from bench_projection import MODELS, llama_shapes, make_adapters  # noqa: E402
from balora_kernels.ops.grouped_projection import TritonProjectionPlan  # noqa: E402


def timed(fn) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def accuracy(before, pairs):
    perr = gap = 0.0
    for (A0, B0), (A, B) in zip(before, pairs):
        P0, P = B0.double() @ A0.double(), B.double() @ A.double()
        perr = max(perr, ((P - P0).norm() / P0.norm()).item())
        GA, GB = A.double() @ A.double().T, B.double().T @ B.double()
        gap = max(gap, ((GB - GA).norm() / GA.norm()).item())
    return perr, gap


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--step", type=float, default=1e-3)
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = llama_shapes(**MODELS["llama2-7b"])
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "step": args.step, "reps": args.reps,
           "model": "llama2-7b", "dtype": "float32", "cases": []}
    for r in (int(v) for v in args.ranks.split(",")):
        pairs = make_adapters(shapes, r, torch.float32)
        plan = TritonProjectionPlan(pairs)
        for _ in range(3):                        # compile, capture the graph, replay
            plan.run("nearest")
        torch.cuda.synchronize()
        balanced = [timed(lambda: plan.run("nearest")) for _ in range(args.reps)]
        flat = [t for p in pairs for t in p]
        noise = [torch.empty_like(t) for t in flat]
        after, perr, gap = [], 0.0, 0.0
        for i in range(args.reps):
            with torch.no_grad():
                for t, n in zip(flat, noise):
                    n.normal_().mul_(args.step * t.pow(2).mean().sqrt())
                torch._foreach_add_(flat, noise)
            check = i == args.reps - 1
            before = [(A.clone(), B.clone()) for A, B in pairs] if check else None
            torch.cuda.synchronize()
            after.append(timed(lambda: plan.run("nearest")))
            if check:
                perr, gap = accuracy(before, pairs)
        fresh = []
        for _ in range(5):
            for (A, B), (A2, B2) in zip(pairs, make_adapters(shapes, r, torch.float32)):
                A.copy_(A2)
                B.copy_(B2)
            torch.cuda.synchronize()
            fresh.append(timed(lambda: plan.run("nearest")))
        case = {"r": r, "adapters": len(pairs), "balanced_ms": median(balanced), "after_update_ms": median(after),
                "fresh_ms": median(fresh), "after_update_all_ms": after, "fresh_all_ms": fresh,
                "after_update_max_product_err": perr, "after_update_max_gap": gap, "cuda_graph": plan.cuda_graph}
        res["cases"].append(case)
        print(f"7B fp32 r={r}: balanced {case['balanced_ms']:.3f} ms, after an update of {args.step:g} "
              f"{case['after_update_ms']:.3f} ms, fresh adapters {case['fresh_ms']:.3f} ms; after the update: product "
              f"error {perr:.1e}, gap {gap:.1e}", flush=True)
        del plan, pairs, flat, noise
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "projection_after_steps.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
