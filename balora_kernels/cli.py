"""The ``balora`` command: ``demo`` (LoRA vs BaLoRA on a real model), ``bench`` and ``check``.

    balora demo                  # SmolLM2-135M on King James Bible text, LoRA vs BaLoRA, ~2 min on CPU
    balora demo --synthetic      # the paper's synthetic experiment (needs nothing else)
    balora bench --shapes tiny   # projection and fused-linear speed against the baselines
    balora check                 # the ops against the float64 reference on this machine

Every command prints a table; demo and bench write JSON and a PNG under ``--out``, check writes its JSON
report to ``--json`` when given. Counts and sizes must be positive integers.
A missing optional package is reported with the command that installs it (exit status 2).
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

EXIT_MISSING = 2


def _default_mode() -> str:
    from .projector import BalancedProjector
    return inspect.signature(BalancedProjector.__init__).parameters["mode"].default


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar when tqdm is installed and wanted, else a no-op with the same methods."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass
    return _Null()


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, allow_nan=True))
    return path


def _environment(device) -> dict:
    import platform

    import torch

    from . import __version__, backend_info
    env = {"balora_kernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "date": time.strftime("%Y-%m-%d"), "command": "balora " + " ".join(sys.argv[1:]),
           "backend_info": backend_info()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
CPU_DEFAULTS = dict(steps=40, batch_size=4, seq_len=64, eval_every=5, eval_seqs=16,
                    target_modules="q_proj,v_proj", lr=3e-3, alpha=16.0)
GPU_DEFAULTS = dict(steps=200, batch_size=8, seq_len=128, eval_every=10, eval_seqs=64,
                    target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", lr=1e-3, alpha=16.0)


class UsageError(Exception):
    """A bad option value: reported as one line (exit status 2), never a traceback."""


def _positive_int(text: str) -> int:
    """argparse type of counts and sizes: a bad value is argparse's one-line error (exit status 2), before
    anything is loaded."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _device(spec: str):
    """``torch.device(spec)`` for cpu / cuda[:N] only, and only when torch can use it here."""
    import torch
    try:
        d = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {spec!r} is not a device name torch knows (use cpu or cuda)") from None
    if d.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec!r}: only cpu and cuda are supported")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec!r} asked for, but torch sees no CUDA device here")
    return d


def _demo_real(args, out: Path) -> int:
    import torch

    from .demo import assets, train
    if args.seeds is not None:
        raise UsageError("--seeds is an option of --synthetic (the real demo runs one seed: --seed)")
    device = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    modes = args.modes.split(",") if args.modes else ["lora", _default_mode()]
    for m in modes:
        if m not in train.METHODS:
            print(f"balora demo: unknown mode {m!r}; choose from {', '.join(train.METHODS)}", file=sys.stderr)
            return EXIT_MISSING
    assets.check_demo_dependencies()
    import warnings
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")   # transformers 5 via peft
    t0 = time.perf_counter()
    print(f"loading SmolLM2-135M-Instruct and the King James Bible (cache: {assets.cache_dir()}) ...", flush=True)
    model, tok = assets.load_model_and_tokenizer(progress=not args.quiet)
    tokens = assets.kjv_tokens(tok)
    if device.type == "cuda":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    model.to(device)
    data = train.TokenData(tokens, args.seq_len, args.eval_seqs, seed=args.seed)
    targets = tuple(t for t in args.target_modules.split(",") if t)
    print(f"  {len(tokens):,} tokens; {len(data.train):,} train / held-out chunks of {args.seq_len}; "
          f"eval batch {len(data.eval)} x {args.seq_len}; loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"  LoRA r={args.rank}, alpha={args.alpha:g} on {','.join(targets)}; AdamW lr={args.lr:g}; "
          f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens on {device}", flush=True)
    curves = []
    for m in modes:
        cfg = train.RunConfig(method=m, rank=args.rank, alpha=args.alpha, lr=args.lr, steps=args.steps,
                              batch_size=args.batch_size, eval_every=args.eval_every, target_modules=targets,
                              seed=args.seed, eval_batch_size=8)
        bar = _progress(args.steps, train.METHOD_LABELS[m], not args.quiet)

        def on_eval(c, bar=bar):
            bar.set_postfix_str(f"held-out {c.eval_loss[-1]:.4f}")
        c = train.train_run(model, data, cfg, device, progress=bar.update, on_eval=on_eval)
        bar.close()
        msg = f"  {train.METHOD_LABELS[m]:<18} held-out {c.eval_loss[0]:.4f} -> {c.eval_loss[-1]:.4f} in {c.train_time_s[-1]:.1f} s"
        print(msg + (f"  (diverged at step {c.diverged_at})" if c.diverged_at else ""), flush=True)
        curves.append(c)
    result = {"kind": "demo", "env": _environment(device),
              "settings": {"model": "SmolLM2-135M-Instruct", "text": "King James Bible", "rank": args.rank,
                           "alpha": args.alpha, "lr": args.lr, "steps": args.steps, "batch_size": args.batch_size,
                           "seq_len": args.seq_len, "eval_seqs": args.eval_seqs, "target_modules": list(targets),
                           "seed": args.seed, "device": str(device), "optimizer": "AdamW, constant lr, weight_decay 0"},
              "curves": [c.as_dict() for c in curves], "summary": train.summarize(curves)}
    _print_demo_table(result)
    _finish(result, out / "demo.json", out / "demo.png" if not args.no_plot else None, "demo_curves")
    return 0


def _print_demo_table(result: dict) -> None:
    curves = result["curves"]
    names = [c["method"] for c in curves]
    from .demo.train import METHOD_LABELS
    print("\nheld-out loss (fixed evaluation batch)")
    print(f"{'step':>6}  " + "  ".join(f"{METHOD_LABELS[n]:>16}" for n in names))
    steps = sorted({s for c in curves for s in c["steps"]})
    for s in steps:
        cells = []
        for c in curves:
            v = dict(zip(c["steps"], c["eval_loss"])).get(s)
            cells.append(f"{v:16.4f}" if v is not None else f"{'-':>16}")
        print(f"{s:>6}  " + "  ".join(cells))
    best = min(curves, key=lambda c: c["eval_loss"][-1] if c["diverged_at"] is None else math.inf)
    print(f"\nlowest final held-out loss: {METHOD_LABELS[best['method']]}")


def _finish(result: dict, json_path: Path, png_path: Optional[Path], plot_fn: str) -> None:
    print(f"\nwrote {_write_json(json_path, result)}")
    if png_path is not None:
        from .demo import plot
        try:
            print(f"wrote {getattr(plot, plot_fn)(result, png_path)}")
        except Exception as e:   # a missing matplotlib is reported, the JSON is already written
            from .demo import MissingDependency
            if isinstance(e, MissingDependency):
                print(f"no plot: {e}")
            else:
                raise


def _demo_synthetic(args, out: Path) -> int:
    from .demo import synthetic
    ignored = [f"--{k.replace('_', '-')}" for k in ("modes", "lr", "alpha", "target_modules", "device", "batch_size",
                                                     "seq_len", "eval_every", "eval_seqs")
               if getattr(args, k) is not None] + (["--rank"] if args.rank != 8 else [])
    if ignored:
        raise UsageError("--synthetic takes --steps, --seeds, --seed, --out, --no-plot, --quiet; "
                         f"not {', '.join(ignored)}")
    seeds = 16 if args.seeds is None else args.seeds
    bar = _progress(len(synthetic.OPTIMIZERS) * len(synthetic.METHODS), "synthetic", not args.quiet)
    res = synthetic.run_experiment(seeds=seeds, steps=100 if args.steps is None else args.steps,
                                   progress=bar.update, seed=args.seed)
    bar.close()
    res["env"] = _environment(__import__("torch").device("cpu"))
    print(synthetic.format_summary(res))
    _finish(res, out / "synthetic.json", out / "synthetic.png" if not args.no_plot else None, "synthetic_curves")
    return 0


def cmd_demo(args) -> int:
    out = Path(args.out)
    if args.synthetic:
        return _demo_synthetic(args, out)
    return _demo_real(args, out)


# --------------------------------------------------------------------------------------------
# bench / check
# --------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from .demo import bench
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in bench.SHAPES:
            print(f"balora bench: unknown shapes {s!r}; choose from {', '.join(bench.SHAPES)}", file=sys.stderr)
            return EXIT_MISSING
    if args.device:
        _device(args.device)
    res = bench.run_bench(shapes, rank=args.rank, device=args.device, tokens=args.tokens, reps=args.reps,
                          compile_=not args.no_compile, paper_loop=not args.no_paper_loop)
    res["env"]["command"] = "balora " + " ".join(sys.argv[1:])
    print(bench.format_table(res))
    _finish(res, Path(args.out) / "bench.json", Path(args.out) / "bench.png" if not args.no_plot else None, "bench_bars")
    return 0


def cmd_check(args) -> int:
    from .demo import check
    devices = args.device.split(",") if args.device else None
    for dev in devices or ():
        _device(dev)
    rep = check.run_check(devices)
    print(check.format_report(rep))
    if args.json:
        _write_json(Path(args.json), rep)
    return 0 if rep["ok"] else 1


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="balora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="{demo,bench,check}")
    d = sub.add_parser("demo", help="fine-tune SmolLM2-135M on KJV text with LoRA and BaLoRA and compare held-out loss",
                       description="CPU defaults: 40 steps of 4x64 tokens, q_proj,v_proj, lr 3e-3, alpha 16. "
                                   "GPU defaults: 200 steps of 8x128 tokens, all linear layers, lr 1e-3, alpha 16.")
    d.add_argument("--synthetic", action="store_true", help="run the paper's synthetic experiment instead (no model needed)")
    d.add_argument("--steps", type=_positive_int, default=None)
    d.add_argument("--rank", type=_positive_int, default=8)
    d.add_argument("--lr", type=float, default=None)
    d.add_argument("--alpha", type=float, default=None, help="lora_alpha (the scale is alpha / rank)")
    d.add_argument("--modes", default=None, help="comma list of lora,svd,nearest (default: lora and the package's default mode)")
    d.add_argument("--target-modules", default=None, help="comma list of module names (default: q_proj,v_proj on CPU, all linear on GPU)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--batch-size", type=_positive_int, default=None)
    d.add_argument("--seq-len", type=_positive_int, default=None)
    d.add_argument("--eval-every", type=_positive_int, default=None)
    d.add_argument("--eval-seqs", type=_positive_int, default=None)
    d.add_argument("--seeds", type=_positive_int, default=None, help="--synthetic: number of seeds (default 16)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="balora_demo")
    d.add_argument("--no-plot", action="store_true")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser("bench", help="projection overhead and fused-linear speed against the baselines")
    b.add_argument("--shapes", default="llama-1b", help="comma list of llama2-7b, llama-1b, tiny")
    b.add_argument("--rank", type=_positive_int, default=16)
    b.add_argument("--device", default=None)
    b.add_argument("--tokens", type=_positive_int, default=None, help="tokens per linear call (default 8192 on GPU, 256 on CPU)")
    b.add_argument("--reps", type=_positive_int, default=None)
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    b.add_argument("--no-paper-loop", action="store_true", help="skip the paper's per-module SVD loop")
    b.add_argument("--out", default="balora_bench")
    b.add_argument("--no-plot", action="store_true")
    b.set_defaults(fn=cmd_bench)
    c = sub.add_parser("check", help="run the ops against the float64 reference and report the backend")
    c.add_argument("--device", default=None, help="comma list (default: cpu and cuda when available)")
    c.add_argument("--json", default=None, help="also write the report here")
    c.set_defaults(fn=cmd_check)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 0
    from .demo import MissingDependency
    try:
        return args.fn(args)
    except (MissingDependency, UsageError) as e:
        print(f"balora {args.cmd}: {e}", file=sys.stderr)
        return EXIT_MISSING
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
