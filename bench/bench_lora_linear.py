"""Benchmark of the LoRA linear layer: ours against the frozen layer, unfused LoRA, PEFT, torch.compile.

    python bench/bench_lora_linear.py [--out DIR] [--write-tuning] [--cases 8k_4096x4096_r16,...]

Providers (bf16, one run, side by side):
  frozen     nn.Linear with a frozen weight (grads: x)
  unfused    x W^T + s (x A^T) B^T in plain PyTorch (the math PEFT runs; grads: x, A, B)
  peft       PEFT's LoRA Linear, made with get_peft_model on a one-layer module
  compiled   torch.compile of the unfused LoRA
  ours       balora_kernels.lora_linear, the dispatcher's choice (after the tuning below)
  ours:IMPL  each implementation forced (torch, cublas_mm, cublas, triton@<gemm config>, ...); their
             forward, backward and full medians are the tuning table the dispatcher reads
Modes: forward, backward (autograd.grad of a retained graph), full (both). Speed: median of
triton.testing.do_bench (L2 flushed between runs). Memory: peak allocated above the inputs during
one full step. Ratios are to the frozen layer of the same run. "ours" is timed last, interleaved with
the frozen layer and the unfused LoRA again (ROUNDS rounds of frozen, unfused, ours, the dispatcher's
choice forced; each provider's time the median of its rounds, so clock drift over the run hits all
of them alike); beside it "ours_choice_forced" (what the public entry point adds) and the host time
to issue one forward + backward ("host_us", no synchronisation: the per-call Python, dispatcher and
launch cost).

The forced implementations' forward, backward and full times (ROUNDS interleaved rounds over all of
them, the median of each) are the measurements the dispatcher reads: with --write-tuning they go to
balora_kernels/ops/lora_linear_tuning.json before "ours" is timed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import balora_kernels as bk  # noqa: E402
from balora_kernels import functional  # noqa: E402
from balora_kernels.ops import lora_linear as L  # noqa: E402

CASES = {  # name: (tokens, in, out, r)
    "8k_4096x4096_r16": (8192, 4096, 4096, 16),
    "8k_4096to11008_r16": (8192, 4096, 11008, 16),
    "8k_11008to4096_r16": (8192, 11008, 4096, 16),
    "8k_4096x4096_r64": (8192, 4096, 4096, 64),
    "1k_4096x4096_r16": (1024, 4096, 4096, 16),
    "512_576x576_r16": (512, 576, 576, 16),   # a SmolLM2-135M projection at 4 x 128 tokens
}
GOALS = {"8k_4096x4096_r16": 1.10, "8k_4096to11008_r16": 1.08, "8k_4096x4096_r64": 1.15,
         "1k_4096x4096_r16": 1.5}
SMOKE_CASES = {"smoke_37x72to40_r3": (37, 72, 40, 3), "smoke_64x48to80_r16": (64, 48, 80, 16)}
MODES = ("forward", "backward", "full")
SCALING = 2.0
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: --smoke only (TRITON_INTERPRET=1)


def median_ms(fn, rep=40):
    if DEV == "cpu":  # smoke run of the script's logic: a few host-timed calls
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return sorted(ts)[1]
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def peak_since(base):
    sync()
    return (torch.cuda.max_memory_allocated() - base) if DEV == "cuda" else 0


def measure(f, x, params, gy):
    """{mode: ms} and the peak memory (bytes above what is allocated before) of one full step."""
    inputs = [x, *params]
    out = {}
    out["forward"] = median_ms(lambda: f(x))
    y = f(x)
    out["backward"] = median_ms(lambda: torch.autograd.grad(y, inputs, gy, retain_graph=True))
    del y
    out["full"] = median_ms(lambda: torch.autograd.grad(f(x), inputs, gy))
    base = reset_peak()
    g = torch.autograd.grad(f(x), inputs, gy)
    out["peak_MB"] = peak_since(base) / 2**20
    del g
    return out


ROUNDS = 5
# Host milliseconds to issue one forward / one forward + backward from an idle GPU (measured in each round)
HOST_MODES = ("host_forward", "host_full")


def host_issue_ms(fn, reps=5):
    """Host milliseconds to issue one call of ``fn`` with the GPU idle (synchronised before each call, so the
    launch queue never fills and nothing waits for the GPU; median of ``reps``)."""
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    sync()
    return sorted(ts)[reps // 2]


def measure_interleaved(providers, x, gy):
    """{name: {mode: ms}}: ROUNDS rounds over the providers ``{name: (f, params)}`` in turn (each round
    starting one provider further on, so that no provider always follows the same one), each mode timed
    with a shorter do_bench, and the host time to issue a forward and a full step (HOST_MODES), then per
    provider and mode the median over the rounds. A provider that raises is recorded as ``{"error": ...}``
    and left out of the later rounds."""
    runs = {k: {m: [] for m in MODES + HOST_MODES} for k in providers}
    names, errors = list(providers), {}
    for k in range(ROUNDS):
        for name in names[k % len(names):] + names[:k % len(names)]:
            if name in errors:
                continue
            f, params = providers[name]
            inputs = [x, *params]
            try:
                runs[name]["forward"].append(median_ms(lambda: f(x), rep=15))
                y = f(x)
                runs[name]["backward"].append(median_ms(
                    lambda: torch.autograd.grad(y, inputs, gy, retain_graph=True), rep=15))
                del y
                runs[name]["full"].append(median_ms(lambda: torch.autograd.grad(f(x), inputs, gy), rep=15))
                runs[name]["host_forward"].append(host_issue_ms(lambda: f(x)))
                runs[name]["host_full"].append(host_issue_ms(lambda: torch.autograd.grad(f(x), inputs, gy)))
            except Exception as e:  # recorded, not hidden
                errors[name] = repr(e)
                print(f"  {name} failed: {e!r}", flush=True)
    out = {name: {"error": err} for name, err in errors.items()}
    for name, (f, params) in providers.items():
        if name in errors:
            continue
        out[name] = {m: sorted(v)[len(v) // 2] for m, v in runs[name].items()}
        out[name]["rounds"] = runs[name]
        base = reset_peak()
        g = torch.autograd.grad(f(x), [x, *params], gy)
        out[name]["peak_MB"] = peak_since(base) / 2**20
        del g
    return out


def host_us(f, x, params, gy, calls=20):
    """Microseconds of host time per forward + backward when nothing waits for the GPU: the
    Python, dispatcher and launch cost of one call (median of 5 batches of ``calls`` calls)."""
    inputs = [x, *params]
    ts = []
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(calls):
            torch.autograd.grad(f(x), inputs, gy)
        ts.append((time.perf_counter() - t) / calls * 1e6)
        sync()
    return sorted(ts)[2]


def make_peft(W, A, B, r):
    """PEFT's LoRA Linear (bf16 adapters, like every other provider here) over a copy of W."""
    from balora_kernels.baselines import peft_lora_layer
    out_f, in_f = W.shape
    lin = nn.Linear(in_f, out_f, bias=False, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    layer = peft_lora_layer(lin, A, B, SCALING)
    assert layer.scaling["default"] == SCALING and A.shape[0] == r
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def run_case(name, N, in_f, out_f, r, log):
    dev, dt = DEV, torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(N, in_f, device=dev, dtype=dt, requires_grad=True)
    gy = torch.randn(N, out_f, device=dev, dtype=dt)
    W = torch.randn(out_f, in_f, device=dev, dtype=dt) / in_f ** 0.5
    A = (torch.randn(r, in_f, device=dev, dtype=dt) / in_f ** 0.5).requires_grad_(True)
    B = (torch.randn(out_f, r, device=dev, dtype=dt) * 1e-2).requires_grad_(True)
    base = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dt).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(W)

    def unfused(x):
        return base(x) + SCALING * ((x @ A.T) @ B.T)

    res = {"shape": dict(N=N, in_features=in_f, out_features=out_f, r=r), "providers": {}}
    P = res["providers"]
    t0 = time.time()
    P["frozen"] = measure(base, x, [], gy)
    P["unfused"] = measure(unfused, x, [A, B], gy)
    try:
        layer, pparams = make_peft(W, A.detach(), B.detach(), r)
        P["peft"] = measure(layer, x, pparams, gy)
    except Exception as e:  # recorded, not hidden
        P["peft"] = {"error": repr(e)}
        log(f"  peft failed: {e!r}")
    torch._dynamo.reset()
    P["compiled"] = measure(torch.compile(unfused, backend="inductor" if DEV == "cuda" else "aot_eager"),
                            x, [A, B], gy)
    # The forced implementations, interleaved (ROUNDS rounds over all of them, the median of each): where the
    # host sets the pace (1024 tokens) one do_bench per implementation timed ext_thin 15% apart from the same
    # implementation re-timed later in the run (session 14), and these times choose the dispatcher's
    # implementation. (Interleaving narrows drift over the run; it does not remove the host's noise.)
    forced = {}
    for impl in L.IMPLS:
        for c in (range(len(L.GEMM_CONFIGS)) if impl in L.GEMM_IMPLS else [None]):
            key = f"ours:{impl}" + (f"@{c}" if c is not None else "")

            def ours_forced(x, impl=impl, c=c):
                return _forced(x, W, A, B, impl, c)
            try:
                torch.autograd.grad(ours_forced(x), [x, A, B], gy)
            except Exception as e:  # recorded, not hidden
                P[key] = {"error": repr(e)}
                log(f"  {key} failed: {e!r}")
            else:
                forced[key] = (ours_forced, [A, B])
    P.update(measure_interleaved(forced, x, gy))
    log(f"  {name}: baselines and forced implementations in {time.time() - t0:.1f} s")
    return res, (x, W, A, B, gy, base, unfused)


def _forced(x, W, A, B, impl, config, backward_config=None):
    """Our op with the implementation (and Triton GEMM config, the forward's and the backward's) forced in both
    directions."""
    if impl in L.GEMM_IMPLS:
        plan = ((impl, config), (impl, config if backward_config is None else backward_config))
        return L.lora_linear(x, W, None, A, B, SCALING, None, impl=plan)
    return L.lora_linear(x, W, None, A, B, SCALING, None, impl=impl)


def tuning_entry(res):
    """The tuning table's entry for one case: each implementation's forced forward, backward and full medians and
    its host time to issue a forward / a full step (``host_forward_ms``, ``host_full_ms``); for one that runs the
    Triton GEMM, those of its GEMM config with the fastest full step, the config the dispatcher then uses in both
    directions (as it was timed: a forced run uses one config for both)."""
    s = res["shape"]
    P = res["providers"]
    modes = ("forward", "backward", "full", *HOST_MODES)
    entry = {"dtype": "bfloat16", "N": s["N"], "in": s["in_features"], "out": s["out_features"], "r": s["r"],
             **{f"{d}_ms": {} for d in modes}, "gemm_config": {}}
    for impl in L.IMPLS:
        if impl in L.GEMM_IMPLS:
            runs = {int(k.split("@")[1]): v for k, v in P.items()
                    if k.startswith(f"ours:{impl}@") and all(d in v for d in MODES)}
            if not runs:
                continue
            c = min(runs, key=lambda c: runs[c]["full"])
            times = runs[c]
            entry["gemm_config"][impl] = {"forward": c, "backward": c}
        else:
            times = P.get(f"ours:{impl}", {})
        for d in modes:
            if d in times:
                entry[f"{d}_ms"][impl] = round(times[d], 5)
    return entry


def thin_kernels(log):
    """Times of the rank-r kernels alone at 8192 x 4096 -> 4096, r=16, against their memory floor."""
    dev, dt = DEV, torch.bfloat16
    N, K, M, r = (8192, 4096, 4096, 16) if DEV == "cuda" else (64, 48, 80, 16)
    x = torch.randn(N, K, device=dev, dtype=dt)
    dy = torch.randn(N, M, device=dev, dtype=dt)
    A = torch.randn(r, K, device=dev, dtype=dt)
    B = torch.randn(M, r, device=dev, dtype=dt)
    W = torch.randn(M, K, device=dev, dtype=dt)
    u = L.xa_forward(x, A)
    v, _ = L.dyb_backward(dy, B, u, 1.0)
    src = torch.empty(2 * 1024 ** 3 // 4 if DEV == "cuda" else 1024, device=dev)
    dst = torch.empty_like(src)
    copy_TBps = 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e9
    del src, dst
    mbytes = N * K * 2
    out = {"copy_TBps": copy_TBps, "floor_one_read_of_x_ms": mbytes / copy_TBps / 1e9}
    items = {
        "xa u=xA^T (Triton)": lambda: L.xa_forward(x, A),
        "xa u=xA^T (cuBLAS)": lambda: x @ A.T,
        "dyb v=dyB + dB (Triton, one read of dy)": lambda: L.dyb_backward(dy, B, u, 1.0),
        "dyB + dy^T u (cuBLAS, two reads)": lambda: (dy @ B, dy.T @ u),
        "vx dA=v^T x (Triton)": lambda: L.vx_backward(v, x, 1.0),
        "vx dA=v^T x (cuBLAS)": lambda: v.T @ x,
        "rank-r write s u B^T (Triton)": lambda: L.lora_gemm(None, None, u, B.T, 1.0),
        "x W^T (cuBLAS)": lambda: x @ W.T,
        "x W^T into prefilled C (cuBLAS beta=1)": lambda: torch.empty(N, M, device=dev, dtype=dt).addmm_(x, W.T),
        "x W^T + s u B^T (Triton GEMM cfg 0)": lambda: L.lora_gemm(x, W.T, u, B.T, 1.0, config=0),
        "dy W (cuBLAS)": lambda: dy @ W,
    }
    for k, fn in items.items():
        out[k + " ms"] = median_ms(fn)
    log("  thin kernels: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    ap.add_argument("--write-tuning", action="store_true",
                    help="write the forced implementations' times to balora_kernels/ops/lora_linear_tuning.json")
    ap.add_argument("--cases", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.smoke:
        CASES.clear()
        CASES.update(SMOKE_CASES)
    elif DEV != "cuda":
        raise SystemExit("bench_lora_linear.py needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    args.cases = args.cases or ",".join(CASES)
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu-smoke"
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        import peft
        peft_v = peft.__version__
    except Exception:
        peft_v = None
    meta = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "peft": peft_v, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "dtype": "bfloat16",
            "scaling": SCALING, "timing": "triton.testing.do_bench median (warmup 10 ms; first-pass baselines rep 40 ms; forced "
                      "implementations and the final ours / frozen / unfused: median of "
                      f"{ROUNDS} interleaved rounds of rep 15 ms each)"}
    log(f"{gpu} torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__} peft {peft_v}")
    results = {"meta": meta, "cases": {}}
    tensors = {}
    for name in args.cases.split(","):
        res, t = run_case(name, *CASES[name], log)
        results["cases"][name] = res
        tensors[name] = t
    results["thin_kernels"] = thin_kernels(log)

    tuning = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "date": meta["date"],
              "command": meta["command"],
              "note": "per shape: median ms of each implementation forced (bench_lora_linear.py); for the "
                      "nearest shape the dispatcher takes, for a call that records a backward, the "
                      "implementation with the smallest full time among those no slower than 'torch' (the "
                      "plain PyTorch math) in forward, backward and full time; for one that does not, the "
                      "one with the smallest forward time; one with launches issued from Python only when its "
                      "host time (host_full_ms / host_forward_ms) is at most HOST_PACE_FRACTION of that time "
                      "and it beats the fastest C++ one (ext*) by PY_ISSUED_MARGIN "
                      "(balora_kernels/ops/lora_linear.py)",
              "entries": [tuning_entry(results["cases"][n]) for n in results["cases"]]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lora_linear_tuning.json"), "w") as f:
        json.dump(tuning, f, indent=1)
    if args.write_tuning:
        with open(L.TUNING_FILE, "w") as f:
            json.dump(tuning, f, indent=1)
    L.use_tuning_table(tuning)
    # "ours" is timed last, so the frozen layer and the unfused LoRA are timed again right beside
    # it (the GPU's clocks drift over a run; ratios compare neighbours).
    for name, (x, W, A, B, gy, base, unfused) in tensors.items():
        P = results["cases"][name]["providers"]
        ours = lambda x: bk.lora_linear(x, W, None, A, B, SCALING)  # noqa: E731
        N, in_f, out_f, r = CASES[name]
        (fi, fc), (bi, bc) = functional._lora_linear_plan(N, in_f, out_f, r, torch.bfloat16, x.device)
        final = {"frozen_final": (base, []), "unfused_final": (unfused, [A, B]), "ours": (ours, [A, B])}
        # The dispatcher's choice forced, beside ours: what the public entry point costs on top.
        if fi == bi:
            final["ours_choice_forced"] = (lambda x: _forced(x, W, A, B, fi, fc, bc), [A, B])
        P.update(measure_interleaved(final, x, gy))
        P["ours"]["impl"] = {"forward": fi, "backward": bi}
        # Host time to issue one forward + backward (no synchronisation): the per-call CPU cost.
        P["host_us"] = {k: host_us(f, x, prm, gy) for k, f, prm in
                        (("frozen", base, []), ("unfused", unfused, [A, B]), ("ours", ours, [A, B]))}
    # Ratios to the frozen layer timed beside each provider (first pass, or the final pass).
    for name, res in results["cases"].items():
        P = res["providers"]
        final = ("ours", "frozen_final", "unfused_final")
        final += ("ours_choice_forced",)
        res["ratio_to_frozen"] = {
            k: {m: round(v[m] / P["frozen_final" if k in final else "frozen"][m], 4) for m in MODES if m in v}
            for k, v in P.items() if "full" in v}
        if name in GOALS:
            res["goal_full_ratio"] = GOALS[name]
            res["goal_met"] = res["ratio_to_frozen"]["ours"]["full"] <= GOALS[name]
        res["never_slower_than_unfused"] = all(P["ours"][m] <= P["unfused_final"][m] for m in MODES)
    tag = "".join(c for c in gpu.replace("NVIDIA ", "") if c.isalnum() or c in "-_") or "gpu"
    path = os.path.join(args.out, f"lora_linear-{tag}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)

    # Table (printed last).
    cols = ("frozen", "unfused", "peft", "compiled", "unfused_final", "ours")
    log(f"\nwritten {path}\nratio to frozen nn.Linear (bf16, median); frozen in ms; ours' choice fwd/bwd;\n"
        f"unfused_final and ours: ratio to the frozen layer timed again beside them")
    log(f"{'case':<20}{'mode':<9}{'frozen ms':>10}" + "".join(f"{c:>14}" for c in cols[1:]) +
        f"{'best forced':>22}{'ours impl':>22}{'peak MB frozen/unf/ours':>26}")
    for name, res in results["cases"].items():
        P, R = res["providers"], res["ratio_to_frozen"]
        for m in MODES:
            forced = {k: v for k, v in R.items() if k.startswith("ours:")}
            best = min(forced, key=lambda k: forced[k][m]) if forced else "-"
            row = f"{name:<20}{m:<9}{P['frozen'][m]:>10.4f}"
            row += "".join(f"{R[c][m]:>14.3f}" if c in R else f"{'n/a':>14}" for c in cols[1:])
            row += f"{best + ' ' + format(forced[best][m], '.3f') if forced else '-':>22}"
            if m == "full":
                row += f"{P['ours']['impl']['forward'] + '/' + P['ours']['impl']['backward']:>22}"
                row += f"{P['frozen']['peak_MB']:>10.0f}/{P['unfused']['peak_MB']:.0f}/{P['ours']['peak_MB']:.0f}"
            log(row)
        if "ours_choice_forced" in R:
            log(f"{'':<20}the choice forced beside ours: full {R['ours_choice_forced']['full']:.3f}")
        log(f"{'':<20}host us per fwd+bwd (no sync): " +
            ", ".join(f"{k} {v:.0f}" for k, v in P["host_us"].items()))
        entry = next(e for e in tuning["entries"] if (e["N"], e["in"], e["out"], e["r"]) == tuple(CASES[name]))
        log(f"{'':<20}forced, host ms to issue a full step / its time: " +
            ", ".join(f"{k} {v:.3f}/{entry['full_ms'][k]:.3f}" for k, v in entry["host_full_ms"].items()))
        if "goal_full_ratio" in res:
            log(f"{'':<20}goal full <= {res['goal_full_ratio']}: {'MET' if res['goal_met'] else 'MISSED'}; "
                f"never slower than unfused: {res['never_slower_than_unfused']}")


if __name__ == "__main__":
    main()
