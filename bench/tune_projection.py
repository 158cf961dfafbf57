"""Launch parameters of the grouped Gram and rescale kernels, measured on the GPU (Llama-2-7B adapters).

    python bench/tune_projection.py [--out DIR] [--budget-s 60]   # seconds of search per case
    python bench/tune_projection.py --cases rescale:bfloat16:64,gram:bfloat16:64   # some cases only: written to
                                                        # tune_projection-<gpu>-<cases>.json beside the full run's

For each case (kernel, parameter dtype, rank) a coordinate search over the parameters of
``grouped_projection.TUNE_KEYS`` (and, for float32 Grams, the method of ``FP32_GRAM_METHODS``): one
parameter at a time through its candidates, keeping the best, starting from the shipped ``default_tune``
(which holds the results of earlier runs: "default" in the output is what the package uses now). Each
configuration is timed as the median replay of a CUDA graph holding that one kernel launch
(``triton.testing.do_bench``, L2 flushed), so the numbers are GPU time, without the host's launch
cost. The adapters are balanced first, so the rescale's transforms are near the identity and
repeated replays keep the values in range. Writes ``tune_projection-<gpu>.json`` and prints, per
case, the default's time, the best configuration and its time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_projection import MODELS, graph_ms, llama_shapes, make_adapters  # noqa: E402

CANDIDATES = {
    # the 2026-11-28 run also tried a bfloat16 split, since removed (slower); "fma" (ranks <= 8) has its own
    # rows per step and warps (grouped_projection._fma_rows), which the block_k / warps knobs do not change
    "method": ("dot", "fp16x3", "fma"),
    "k_chunk": (1024, 2048, 4096, 8192),
    "block_k": (32, 64, 128, 256),
    "warps": (2, 4, 8),
    "stages": (1, 2, 3, 4),
    "progs": (2, 4, 8, 16),
}
CASES = [  # (kernel, dtype, r)
    ("gram", torch.float32, 8), ("gram", torch.float32, 16), ("gram", torch.bfloat16, 16), ("gram", torch.float32, 64),
    ("rescale", torch.float32, 8), ("rescale", torch.float32, 16), ("rescale", torch.bfloat16, 16),
    ("rescale", torch.float32, 64), ("gram", torch.bfloat16, 64), ("rescale", torch.bfloat16, 64),
]


def _bench(fn):
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--budget-s", type=float, default=60.0, help="seconds of search per case")
    ap.add_argument("--cases", default="", help="kernel:dtype:r,... (default: every case of CASES)")
    args = ap.parse_args()
    cases = CASES
    if args.cases:
        cases = []
        for c in args.cases.split(","):
            k, d, r = c.strip().split(":")
            if k not in ("gram", "rescale") or d not in ("float32", "bfloat16", "float16"):
                raise SystemExit(f"--cases: {c!r} is not gram|rescale:float32|bfloat16|float16:<rank>")
            cases.append((k, getattr(torch, d), int(r)))
    import triton

    from balora_kernels.ops import grouped_projection as gp

    shapes = llama_shapes(**MODELS["llama2-7b"])
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "shapes": "llama2-7b (224 adapters)", "timing": "median ms of a CUDA graph replay (do_bench, L2 flushed)",
           "cases": []}
    for kernel, dtype, r in cases:
        t_start = time.time()
        torch.manual_seed(0)
        ad = make_adapters(shapes, r, dtype)
        R = gp.padded_rank(r)
        pre = f"{kernel}_"
        cur = dict(gp.default_tune(R, dtype))
        cur_method = gp._fp32_gram_method(R, r, "auto")
        tried = {}

        def time_cfg(tune, method):
            key = json.dumps([tune, method], sort_keys=True)
            if key in tried:
                return tried[key]
            try:
                plan = gp.TritonProjectionPlan(ad, fp32_gram=method, cuda_graph=False, tune=tune, kernels="triton")
                plan.run("nearest")
                plan.run("nearest")
                if kernel == "gram":
                    t = graph_ms(plan.gram, _bench)
                else:
                    st = torch.zeros(plan.n_pairs, dtype=torch.int32, device="cuda")
                    gaps = torch.zeros(plan.n_pairs, 2, dtype=torch.float64, device="cuda")
                    plan.transforms_("nearest", st, gaps)
                    t = graph_ms(lambda: plan.rescale(st), _bench)
            except Exception as e:  # noqa: BLE001  (a config that does not compile is recorded, not fatal)
                t = float("inf")
                print(f"  {kernel} {dtype} r={r} {tune} {method}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            tried[key] = t
            return t

        default_ms = best_ms = time_cfg(cur, cur_method)
        knobs = (["method"] if (kernel == "gram" and dtype == torch.float32) else []) + \
            ["k_chunk", "block_k", "warps", "stages", "progs"]
        for knob in knobs:
            for cand in CANDIDATES[knob]:
                if time.time() - t_start > args.budget_s:
                    break
                tune, method = dict(cur), cur_method
                if knob == "method":
                    method = cand
                elif knob == "k_chunk":
                    tune["k_chunk"] = cand
                else:
                    tune[pre + knob] = cand
                t = time_cfg(tune, method)
                if t < best_ms:
                    best_ms, cur, cur_method = t, tune, method
        case = {"kernel": kernel, "dtype": str(dtype).replace("torch.", ""), "r": r, "R": R,
                "default": gp.default_tune(R, dtype), "default_method": gp._fp32_gram_method(R, r, "auto"),
                "default_ms": default_ms, "best": cur, "best_method": cur_method, "best_ms": best_ms,
                "tried": len(tried), "all": [[json.loads(k), v] for k, v in tried.items()]}
        res["cases"].append(case)
        print(f"{kernel:8} {case['dtype']:9} r={r:<3} default {default_ms:.4f} ms -> best {best_ms:.4f} ms "
              f"({cur_method if kernel == 'gram' else ''} {({k: v for k, v in cur.items() if k == 'k_chunk' or k.startswith(pre)})}) "
              f"[{len(tried)} tried, {time.time() - t_start:.0f} s]", flush=True)
        del ad
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in res["gpu"].lower().replace("nvidia", "")).strip("-")
    tag = "".join(ch if ch.isalnum() else "-" for ch in args.cases)
    path = os.path.join(args.out, f"tune_projection-{slug}{'-' + tag if tag else ''}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
