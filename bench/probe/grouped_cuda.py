"""Probe: the CUDA grouped Gram / rescale (csrc/grouped.cu) against the Triton kernels, and launch-shape variants.

Variants are csrc/grouped.cu compiled with other launch macros into standalone libraries (no torch headers:
``nvcc -shared -Xcompiler -fPIC -arch=sm_90 -O3 -D... csrc/grouped.cu``; bench/probe/build_grouped_variants.sh),
loaded with ctypes and launched on the plan's own tables (no extension needed: it can run beside the extension's
build). For each 7B case (r, dtype): GPU time of the Triton Gram / rescale (a CUDA-graph replay, L2 flushed) and
of every variant, on tiles of each --k-chunks size; each variant's Grams against the Triton plan's (max relative
error) and bitwise equal over two runs; its rescale against the Triton rescale of copies; each kernel's time on
the B tiles alone and on the A tiles alone. Writes grouped-cuda-probe.json to --out. ``--once NAME``: one Gram and
one rescale of that variant (float32, rank --once-rank, default 16; tiles of --once-k-chunk rows), for ncu. Ranks
17 to 64 (float32): the tensor-core kernels of csrc/grouped_mma.cu, which csrc/grouped.cu's entry points call.
Usage: python bench/probe/grouped_cuda.py --variants DIR [--out DIR] [--k-chunks 512,1024]
       [--once NAME [--once-rank R] [--once-k-chunk K]]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=".build/variants")
    ap.add_argument("--out", default=".")
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--k-chunks", default="1024", help="rows per tile of the plans the variants run on")
    ap.add_argument("--lpt", action="store_true",
                    help="also time each variant on tables whose B and A tiles are ordered longest first")
    ap.add_argument("--once", default=None, help="run variant ONCE's Gram and rescale once (float32), for ncu")
    ap.add_argument("--once-rank", type=int, default=16, help="the rank of --once")
    ap.add_argument("--once-k-chunk", type=int, default=None,
                    help="rows per tile of --once (default: the Triton plan's, 1024 up to rank 64)")
    args = ap.parse_args()
    from triton.testing import do_bench

    from bench_projection import MODELS, graph_ms, llama_shapes, make_adapters
    from balora_kernels.ops.grouped_projection import (_DTYPE_CODES, STATUS_NONFINITE, STATUS_ZERO,
                                                       TritonProjectionPlan)

    bench = lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    libs = {}
    for path in sorted(glob.glob(os.path.join(args.variants, "*.so"))):
        lib = ctypes.CDLL(path)
        lib.bk_grouped_gram_launch.restype = ctypes.c_int
        lib.bk_grouped_rescale_launch.restype = ctypes.c_int
        libs[os.path.basename(path)[:-3]] = lib
    P = ctypes.c_void_p
    I = ctypes.c_int

    def plan_of(pairs, **kw):   # tables only (Triton kernels, torch r x r step): no extension needed
        plan = TritonProjectionPlan(pairs, kernels="triton", transforms="torch", **kw)
        for g in plan.groups:
            g.counters = torch.zeros(2 * g.P, dtype=torch.int32, device="cuda")
        return plan

    def tiles_of(lg, part):   # (table address, n_b, n_a): all tiles, the B tiles only or the A tiles only
        if part == "b":
            return lg.tiles.data_ptr(), lg.n_b, 0
        if part == "a":
            return lg.tiles[lg.n_b:].data_ptr(), 0, lg.n_a
        return lg.tiles.data_ptr(), lg.n_b, lg.n_a

    def gram_with(lib, plan, part=None):
        def run():
            s = P(torch.cuda.current_stream().cuda_stream)
            for g in plan.groups:
                for lg in g.launches:
                    tp, nb, na = tiles_of(lg, part)
                    err = lib.bk_grouped_gram_launch(P(tp), I(nb), I(na), I(g.r), I(g.R),
                                                     I(_DTYPE_CODES[lg.dtype]), P(g.partials.data_ptr()),
                                                     I(g.R * g.R), P(g.ranges.data_ptr()), P(g.counters.data_ptr()),
                                                     P(g.grams.data_ptr()), s)
                    assert err == 0, err
        return run

    def rescale_with(lib, plan, status, part=None):
        def run():
            s = P(torch.cuda.current_stream().cuda_stream)
            for g in plan.groups:
                st = status[g.first:g.first + g.P]
                for lg in g.launches:
                    tp, nb, na = tiles_of(lg, part)
                    err = lib.bk_grouped_rescale_launch(P(tp), I(nb), I(na), I(g.r), I(g.R),
                                                        I(_DTYPE_CODES[lg.dtype]), P(g.tw.data_ptr()),
                                                        P(st.data_ptr()), I(STATUS_NONFINITE | STATUS_ZERO), s)
                    assert err == 0, err
        return run

    shapes = llama_shapes(**MODELS["llama2-7b"])
    if args.once:
        r1 = args.once_rank
        ad = make_adapters(shapes, r1, torch.float32)
        plan = plan_of(ad, k_chunk=args.once_k_chunk)
        status = torch.zeros(plan.n_pairs, dtype=torch.int32, device="cuda")
        for g in plan.groups:
            g.tw.zero_()
            g.tw[:, :, :r1, :r1] = torch.eye(r1, device="cuda")
        gram_with(libs[args.once], plan)()
        rescale_with(libs[args.once], plan, status)()
        torch.cuda.synchronize()
        return
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": sorted(libs), "cases": [],
           # which variants launch csrc/grouped_mma.cu's wgmma kernels on this GPU
           "wgmma": {n: int(lib.bk_grouped_mma_wgmma()) for n, lib in libs.items()
                     if hasattr(lib, "bk_grouped_mma_wgmma")}}
    print("wgmma kernels:", res["wgmma"], flush=True)
    k_chunks = [int(x) for x in args.k_chunks.split(",")]
    for r in [int(x) for x in args.ranks.split(",")]:
        for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
            ad = make_adapters(shapes, r, dtype)
            tri = plan_of(ad)
            tri.run("nearest")                  # balanced state, transforms in tri's tw
            status = torch.zeros(tri.n_pairs, dtype=torch.int32, device="cuda")
            gaps = torch.zeros(tri.n_pairs, 2, dtype=torch.float64, device="cuda")
            tri.gram()
            tri.transforms_("nearest", status, gaps)
            case = {"r": r, "dtype": str(dtype).replace("torch.", ""),
                    "triton_gram_ms": graph_ms(tri.gram, bench),
                    "triton_rescale_ms": graph_ms(lambda: tri.rescale(status), bench)}
            # the reference Grams of the factors as the variants see them: the timed rescale above changed them
            # (until session 16 they were taken before it, so "gram err" measured that drift, not the kernels)
            tri.gram()
            ref_grams = [g.grams.clone() for g in tri.groups]
            # accuracy of the variants: Grams against Triton's; rescale of copies against Triton's rescale
            copies_t = [(A.clone(), B.clone()) for A, B in ad]
            ct = plan_of(copies_t)
            for g_c, g in zip(ct.groups, tri.groups):
                g_c.tw.copy_(g.tw)
            ct.rescale(status)
            first_grams = {}   # per tile size: the first variant's Grams (the variants' bits against them)
            first_rescaled = {}   # likewise its rescaled factors
            for name, lib in libs.items():
                for kc in k_chunks:
                    plan = plan_of(ad, k_chunk=kc)
                    run = gram_with(lib, plan)
                    for g in plan.groups:
                        g.grams.fill_(float("nan"))
                    run()
                    first = [g.grams.clone() for g in plan.groups]
                    run()
                    bitwise = all(torch.equal(a, g.grams) for a, g in zip(first, plan.groups))
                    err = max(((g.grams - ref).abs().max() / ref.abs().max()).item()
                              for g, ref in zip(plan.groups, ref_grams))
                    ref0 = first_grams.setdefault(kc, (name, [g.grams.clone() for g in plan.groups]))
                    v = {"gram_ms": graph_ms(run, bench), "gram_rel_err_vs_triton": err,
                         "gram_bitwise_repeat": bitwise, "gram_bits_equal_to": ref0[0],
                         "gram_bits_equal": all(torch.equal(a, g.grams) for a, g in zip(ref0[1], plan.groups)),
                         "counters_zero": all(int(g.counters.abs().sum()) == 0 for g in plan.groups)}
                    copies = [(A.clone(), B.clone()) for A, B in ad]
                    cp = plan_of(copies, k_chunk=kc)
                    for g_c, g in zip(cp.groups, tri.groups):
                        g_c.tw.copy_(g.tw)
                    rescale_with(lib, cp, status)()
                    torch.cuda.synchronize()
                    r0 = first_rescaled.setdefault(kc, (name, [(a.clone(), c.clone()) for a, c in copies]))
                    v["rescale_bits_equal_to"] = r0[0]
                    v["rescale_bits_equal"] = all(torch.equal(a, a0) and torch.equal(c, c0)
                                                  for (a, c), (a0, c0) in zip(copies, r0[1]))
                    v["rescale_rel_err_vs_triton"] = max(
                        max(((a.float() - b.float()).norm() / b.float().norm()).item(),
                            ((c.float() - d.float()).norm() / d.float().norm()).item())
                        for (a, c), (b, d) in zip(copies, copies_t))
                    v["rescale_ms"] = graph_ms(rescale_with(lib, cp, status), bench)
                    if args.lpt:   # B tiles, then A tiles, each longest first (slots unchanged: same sums)
                        for pl in (plan, cp):
                            for g in pl.groups:
                                for lg in g.launches:
                                    for lo, hi in ((0, lg.n_b), (lg.n_b, lg.n_b + lg.n_a)):
                                        sec = lg.tiles[lo:hi]
                                        order = torch.sort(sec[:, 3], descending=True, stable=True).indices
                                        lg.tiles[lo:hi] = sec[order].clone()
                        bits = [g.grams.clone() for g in plan.groups]
                        v["gram_lpt_ms"] = graph_ms(run, bench)
                        v["gram_lpt_bits_equal"] = all(torch.equal(a, g.grams) for a, g in zip(bits, plan.groups))
                        v["rescale_lpt_ms"] = graph_ms(rescale_with(lib, cp, status), bench)
                    for part in "ba":   # where the time goes: rows of B / columns of A alone
                        v[f"gram_{part}_ms"] = graph_ms(gram_with(lib, plan, part), bench)
                        v[f"rescale_{part}_ms"] = graph_ms(rescale_with(lib, cp, status, part), bench)
                    case[name if len(k_chunks) == 1 else f"{name}@k{kc}"] = v
                    del plan, cp, copies
            res["cases"].append(case)
            print(json.dumps(case), flush=True)
            del ad, tri, ct, copies_t
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grouped-cuda-probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\n7B, GPU ms (CUDA-graph replay)")
    print(f"{'r':>3} {'dtype':9} {'what':20} {'gram':>7} {'rescale':>8} {'gram err':>9} {'resc err':>9} "
          f"{'gram B/A':>15} {'rescale B/A':>15}")
    for c in res["cases"]:
        print(f"{c['r']:>3} {c['dtype']:9} {'triton':20} {c['triton_gram_ms']:7.4f} {c['triton_rescale_ms']:8.4f}")
        for name, v in c.items():
            if not isinstance(v, dict):
                continue
            print(f"{c['r']:>3} {c['dtype']:9} {name:20} {v['gram_ms']:7.4f} {v['rescale_ms']:8.4f} "
                  f"{v['gram_rel_err_vs_triton']:9.2e} {v['rescale_rel_err_vs_triton']:9.2e} "
                  f"{v['gram_b_ms']:7.4f}/{v['gram_a_ms']:7.4f} {v['rescale_b_ms']:7.4f}/{v['rescale_a_ms']:7.4f}"
                  f"{'' if v['gram_bitwise_repeat'] and v['counters_zero'] else '  NOT-REPRODUCIBLE'}"
                  f"{'' if v['gram_bits_equal'] else '  BITS-DIFFER-FROM-' + v['gram_bits_equal_to']}"
                  f"{'' if v['rescale_bits_equal'] else '  RESCALE-BITS-DIFFER-FROM-' + v['rescale_bits_equal_to']}"
                  + (f"  lpt {v['gram_lpt_ms']:.4f} / {v['rescale_lpt_ms']:.4f}"
                     f"{'' if v['gram_lpt_bits_equal'] else ' LPT-BITS-DIFFER'}" if 'gram_lpt_ms' in v else ""))


if __name__ == "__main__":
    main()
