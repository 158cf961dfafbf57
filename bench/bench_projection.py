"""Projection of every adapter of a model: ours vs the paper's per-module loop vs plain batched PyTorch.

One run, side by side, on one GPU (medians of ``triton.testing.do_bench``, which flushes L2 between calls):

* shapes: Llama-2-7B (32 layers x q,k,v,o 4096x4096, gate,up 4096->11008, down 11008->4096: 224 adapters)
  and a 1B Llama (hidden 2048, 16 layers, intermediate 5632: 112 adapters); r in {8, 16, 64}; fp32 and
  bf16 adapters (the baselines project bf16 pairs in float32 and round the results back: torch.linalg's SVD
  and eigh take no bf16 input on the GPU; ``baseline_upcast`` in the JSON);
* providers: ``ours`` (TritonProjectionPlan: grouped Gram + CUDA r x r kernel + grouped rescale, replayed from
  the CUDA graph the plan captures on its second call, as BalancedProjector runs it), ``ours_eager`` (the same
  kernels launched one by one from Python: what the host adds),
  ``ours_torch_eigh`` (the same with the torch.linalg fallback for the r x r step, 7B r=16 fp32 only),
  ``paper_loop`` (the anchors' ref_project per module), ``torch_batched`` (the anchors' batched_project),
  ``floor`` (read both factors twice, write once, at the copy rate measured in this run);
* per-kernel times of ours (gram / eig / rescale / stats, each the replay of a CUDA graph holding that step
  alone: GPU time without the host's launch cost); where ours takes the CUDA Gram / rescale (r <= 16, float32 up
  to r = 64), the
  Triton kernels beside them (``gram_triton_ms``, ``rescale_triton_ms``); for float32 adapters also the
  Triton Gram's other methods;
* one AdamW step of the 1B Llama (transformers LlamaForCausalLM from a config, PEFT LoRA r=16 on all
  linear layers, 8 x 1024 tokens, bf16 autocast, as the anchors' script) and ours on its adapters, through
  ``BalancedProjector.project()`` with its per-call checks (the default) and without them
  (``follow_model=False, check_params=False``).

Timed runs of ``ours`` project adapters that earlier runs already balanced; in training each projection follows an
optimizer step that moves the pairs slightly off balance, which takes longer (``bench/probe/projection_after_steps.py``
times that); the first projection of fresh adapters is timed separately (``first_call_ms``, one sample).
Writes ``bench/results/projection-<gpu>.json`` (or ``$OUT``) and prints a table.
Usage: ``python bench/bench_projection.py [--quick] [--out PATH]``
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def llama_shapes(layers, h, f):
    """(out, in) of every adapted linear: q, k, v, o (h x h), gate, up (h -> f), down (f -> h)."""
    return ([(h, h)] * 4 + [(f, h), (f, h), (h, f)]) * layers


MODELS = {"llama2-7b": dict(layers=32, h=4096, f=11008), "llama-1b": dict(layers=16, h=2048, f=5632)}


def make_adapters(shapes, r, dtype):
    out = []
    for (o, i) in shapes:
        A = torch.randn(r, i, device="cuda") / math.sqrt(i)
        B = torch.randn(o, r, device="cuda") * 1e-2
        out.append((A.to(dtype), B.to(dtype)))
    return out


# ---- the anchors' baselines (the paper's per-module loop, plain batched PyTorch) --------------------
from balora_kernels.baselines import batched_project, paper_project as ref_project  # noqa: E402


def graph_ms(fn, bench):
    """Median time of replaying a CUDA graph that holds ``fn``'s launches (GPU time, no host launch cost)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay)


def events_ms(fn, warm=1, rep=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-step", action="store_true", help="skip the 1B Llama training step")
    args = ap.parse_args()
    import triton
    from triton.testing import do_bench

    import balora_kernels as bk
    from balora_kernels.ops.grouped_projection import FMA_MAX_RANK, TritonProjectionPlan

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    res = {"gpu": dev, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "backend_info": bk.backend_info()["projection"],
           "timing": "median ms, triton.testing.do_bench (L2 flushed); per-kernel: a CUDA graph of that step replayed",
           "cases": []}
    bench = lambda fn, rep=50: do_bench(fn, warmup=10, rep=rep, return_mode="median")  # noqa: E731

    x = torch.empty(1024 ** 3 // 4, device="cuda")
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    res["copy_TBps"] = 2 * x.numel() * 4 / t / 1e9
    del x, y
    print(f"GPU {dev}; copy {res['copy_TBps']:.2f} TB/s; projection backend {res['backend_info']}", flush=True)

    rows = []
    for model, cfg in MODELS.items():
        shapes = llama_shapes(**cfg)
        for r in (8, 16, 64):
            for dtype in (torch.float32, torch.bfloat16):
                ad = make_adapters(shapes, r, dtype)
                nbytes = sum(A.numel() * A.element_size() + B.numel() * B.element_size() for A, B in ad)
                case = {"model": model, "r": r, "dtype": str(dtype).replace("torch.", ""), "adapters": len(ad),
                        "adapter_MB": nbytes / 1e6, "floor_ms": 3 * nbytes / (res["copy_TBps"] * 1e9)}
                plan = TritonProjectionPlan(ad)
                plan.run("nearest")                              # compile
                plan.run("nearest")                              # capture the CUDA graph (when the plan uses one)
                fresh = make_adapters(shapes, r, dtype)
                for (A, B), (A2, B2) in zip(ad, fresh):
                    A.copy_(A2)
                    B.copy_(B2)
                torch.cuda.synchronize()
                case["first_call_ms"] = events_ms(lambda: plan.run("nearest"), warm=0, rep=1)
                case["ours_ms"] = bench(lambda: plan.run("nearest"))
                case["cuda_graph"] = plan.cuda_graph
                eager = TritonProjectionPlan(ad, cuda_graph=False)
                eager.run("nearest")
                case["ours_eager_ms"] = bench(lambda: eager.run("nearest"))
                del eager
                # per-kernel times on the same (nearest-balanced) state as ours_ms: the Jacobi sweeps
                # depend on the data (SVD-aligned pairs have diagonal Grams and converge at once).
                status = torch.zeros(plan.n_pairs, dtype=torch.int32, device="cuda")
                gaps = torch.zeros(plan.n_pairs, 2, dtype=torch.float64, device="cuda")
                case["gram_ms"] = graph_ms(plan.gram, bench)
                case["kernels"] = plan.kernels[r]   # {"gram", "rescale"}: "cuda" (csrc/grouped*.cu) or "triton"
                cuda = {k for k, v in case["kernels"].items() if v == "cuda"}
                tri = plan if not cuda else TritonProjectionPlan(ad, kernels="triton")
                if "gram" in cuda:                         # the Triton kernels beside the CUDA ones
                    case["gram_triton_ms"] = graph_ms(tri.gram, bench)
                if dtype == torch.float32:      # the other float32 Gram methods of the Triton kernel, for the record
                    case["fp32_gram"] = tri.groups[0].fp32_gram
                    for alt in ("dot", "fp16x3", "fma"):
                        if alt != case["fp32_gram"] and (alt != "fma" or r <= FMA_MAX_RANK):
                            case[f"gram_{alt}_ms"] = graph_ms(
                                TritonProjectionPlan(ad, fp32_gram=alt, kernels="triton").gram, bench)
                case["eig_ms"] = graph_ms(lambda: plan.transforms_("nearest", status, gaps), bench)
                case["rescale_ms"] = graph_ms(lambda: plan.rescale(status), bench)
                case["rescale_method"] = tri.groups[0].launches[0].rescale_method
                alts = [("triton", case["rescale_method"])] if "rescale" in cuda else []
                if r <= FMA_MAX_RANK:          # the other Triton rescale method, for the record
                    alts.append((None, "dot" if case["rescale_method"] == "outer" else "outer"))
                for label, method in alts:     # on copies of the adapters, same transforms
                    other = TritonProjectionPlan([(A.clone(), B.clone()) for A, B in ad], rescale=method,
                                                 kernels="triton")
                    for g_o, g in zip(other.groups, plan.groups):
                        g_o.tw.copy_(g.tw)
                    case[f"rescale_{label or method}_ms"] = graph_ms(lambda: other.rescale(status), bench)
                    del other
                del tri
                case["stats_ms"] = graph_ms(lambda: plan.stats(status, gaps), bench)
                case["ours_svd_ms"] = bench(lambda: plan.run("svd"))
                case["ours_over_floor"] = case["ours_ms"] / case["floor_ms"]
                case["backend"] = plan.backend
                if model == "llama2-7b" and r == 16 and dtype == torch.float32:
                    fb = TritonProjectionPlan(ad, transforms="torch")   # on SVD-aligned data (after ours_svd)
                    fb.run("nearest")
                    case["ours_torch_eigh_ms"] = events_ms(lambda: fb.run("nearest"), warm=1, rep=5)
                # (bf16 pairs: baselines.py's paper_project / batched_project work in float32)
                case["baseline_upcast"] = dtype != torch.float32
                case["paper_loop_ms"] = events_ms(lambda: [ref_project(A, B) for A, B in ad], warm=1,
                                                  rep=1 if args.quick else 3)
                by = {}
                for A, B in ad:
                    by.setdefault((A.shape, B.shape), []).append((A, B))
                groups = [(torch.stack([a for a, _ in v]), torch.stack([b for _, b in v])) for v in by.values()]
                case["torch_batched_ms"] = events_ms(lambda: batched_project(groups), warm=1,
                                                     rep=1 if (args.quick or r == 64) else 3)
                case["speedup_vs_paper"] = case["paper_loop_ms"] / case["ours_ms"]
                case["speedup_vs_torch_batched"] = case["torch_batched_ms"] / case["ours_ms"]
                res["cases"].append(case)
                rows.append(case)
                print(json.dumps(case), flush=True)
                del ad, fresh, plan

    if not args.skip_step:
        try:
            from peft import LoraConfig, get_peft_model
            from transformers import LlamaConfig, LlamaForCausalLM
            cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                              num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)
            model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
            lc = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"])
            model = get_peft_model(model, lc)
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            ids = torch.randint(0, 32000, (8, 1024), device="cuda")

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            t_step = events_ms(step, warm=2, rep=5)
            proj = bk.BalancedProjector(model)
            for _, A, B in proj.named_pairs:
                torch.nn.init.normal_(B, std=1e-2)
            proj.project()
            t_proj = bench(proj.project)
            # the same without the per-call checks over the pairs (the modules' lookups, the plan's tables)
            unchecked = bk.BalancedProjector(model, follow_model=False, check_params=False)
            unchecked.project()
            t_unchecked = bench(unchecked.project)
            pairs = [(A, B) for _, A, B in proj.named_pairs]
            t_paper = events_ms(lambda: [ref_project(A.data, B.data) for A, B in pairs], warm=1, rep=1 if args.quick else 2)
            res["llama1b_step"] = {"adapters": len(pairs), "step_ms": t_step, "ours_projection_ms": t_proj,
                                   "ours_over_step": t_proj / t_step, "ours_unchecked_projection_ms": t_unchecked,
                                   "ours_unchecked_over_step": t_unchecked / t_step, "paper_loop_ms": t_paper,
                                   "paper_over_step": t_paper / t_step, "plan": type(proj._plan).__name__,
                                   "backend": getattr(proj._plan, "backend", "torch")}
            print(json.dumps(res["llama1b_step"]), flush=True)
        except Exception as e:  # noqa: BLE001
            res["llama1b_step"] = {"error": f"{type(e).__name__}: {e}"}
            print("1B step failed:", e, flush=True)

    slug = "".join(ch if ch.isalnum() else "-" for ch in dev.lower().replace("nvidia", "")).strip("-")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if os.path.isdir(out) or not out.endswith(".json"):
        out = os.path.join(out, f"projection-{slug}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)

    hdr = (f"{'model':10} {'r':>3} {'dtype':8} {'ours':>8} {'eager':>8} {'gram':>7} {'eig':>7} {'rescale':>7} "
           f"{'floor':>7} {'torch_b':>9} {'paper':>9} {'x_paper':>8}")
    print("\nprojection, median ms (" + dev + ")\n" + hdr)
    for c in rows:
        f = lambda k: f"{c[k]:.3f}" if k in c else "-"  # noqa: E731
        print(f"{c['model']:10} {c['r']:>3} {c['dtype']:8} {f('ours_ms'):>8} {f('ours_eager_ms'):>8} {f('gram_ms'):>7} {f('eig_ms'):>7} "
              f"{f('rescale_ms'):>7} {f('floor_ms'):>7} {f('torch_batched_ms'):>9} {f('paper_loop_ms'):>9} "
              f"{(c['speedup_vs_paper'] if 'speedup_vs_paper' in c else float('nan')):>8.0f}")
    if "step_ms" in res.get("llama1b_step", {}):
        s = res["llama1b_step"]
        print(f"1B Llama AdamW step {s['step_ms']:.1f} ms; ours {s['ours_projection_ms']:.3f} ms = "
              f"{100 * s['ours_over_step']:.2f}% of the step; without the per-call checks "
              f"{s['ours_unchecked_projection_ms']:.3f} ms = {100 * s['ours_unchecked_over_step']:.2f}% "
              f"(paper loop {100 * s['paper_over_step']:.0f}%)")
    print("wrote", out)


if __name__ == "__main__":
    main()
