"""PNG plots of the demo, the study and the benchmark (matplotlib, headless)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional

from .assets import MissingDependency

COLORS = {"lora": "#7f7f7f", "svd": "#1f77b4", "nearest": "#d62728"}
LABELS = {"lora": "LoRA", "svd": "BaLoRA (svd)", "nearest": "BaLoRA (nearest)"}


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("matplotlib (for the plots)", "pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def demo_curves(result: dict, path) -> Path:
    """Held-out loss against steps for each method of a ``balora demo`` run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c in result["curves"]:
        ax.plot(c["steps"], c["eval_loss"], marker="o", ms=3, color=COLORS.get(c["method"]), label=LABELS[c["method"]])
    s = result["settings"]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"{s['model']} on {s['text']}\nr={s['rank']}, alpha={s['alpha']:g}, lr={s['lr']:g}, "
                 f"{s['batch_size']}x{s['seq_len']} tokens/step, {s['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def synthetic_curves(result: dict, path) -> Path:
    """Median and inter-quartile band of the excess loss, one panel per optimizer (paper Fig. 3)."""
    plt = _plt()
    opts = list(result["optimizers"])
    fig, axes = plt.subplots(1, len(opts), figsize=(5.2 * len(opts), 4), squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for m, r in result["optimizers"][opt].items():
            steps = list(range(len(r["median"])))
            ax.plot(steps, r["median"], color=COLORS.get(m), label=f"{LABELS[m]} (lr {r['best_lr']:.2g})")
            ax.fill_between(steps, r["q25"], r["q75"], color=COLORS.get(m), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss - rank-r optimum")
        ax.set_title(f"{opt}: median, IQR over {result['settings']['seeds']} seeds", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _is_bad(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def grid_heatmaps(res: dict, path) -> Path:
    """Final held-out loss over lr x a, one panel per method, one shared colour scale."""
    import numpy as np
    plt = _plt()
    methods, lrs, as_ = res["methods"], res["lrs"], res["as"]
    finite = [p["final_eval_loss"] for p in res["points"] if not _is_bad(p["final_eval_loss"])]
    vmin = min(finite) if finite else 0
    vmax = min(max(finite), vmin + 1.0) if finite else 1
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.6), squeeze=False)
    for ax, m in zip(axes[0], methods):
        Z = np.full((len(as_), len(lrs)), np.nan)
        for p in res["points"]:
            if p["method"] == m and not _is_bad(p["final_eval_loss"]):
                Z[as_.index(p["a"]), lrs.index(p["lr"])] = p["final_eval_loss"]
        ax.set_facecolor("#d9d9d9")               # diverged cells (NaN) show the background
        im = ax.imshow(Z, cmap="viridis_r", vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        for i in range(len(as_)):
            for j in range(len(lrs)):
                nan = math.isnan(Z[i, j])
                ax.text(j, i, "div" if nan else f"{Z[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if nan or Z[i, j] < vmin + 0.5 * (vmax - vmin) else "white")
        ax.set_xticks(range(len(lrs)), [f"{lr:.0e}" for lr in lrs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(as_)), [f"{a:g}" for a in as_], fontsize=8)
        ax.set_xlabel("learning rate")
        if m == methods[0]:
            ax.set_ylabel("a  (lora_alpha = 8 a^2, scale = a^2)")
        ax.set_title(LABELS[m], fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="held-out loss")
    s = res["settings"]
    fig.suptitle(f"SmolLM2-135M on KJV: held-out loss after {s['steps']} steps "
                 f"({res['env'].get('gpu', res['env']['device'])})", fontsize=10, y=1.02)
    return _save(fig, path)


def grid_best_curves(res: dict, path) -> Path:
    """Held-out loss against steps at each method's best grid point."""
    plt = _plt()
    best: Dict[str, dict] = {}
    for p in res["points"]:
        v = p["final_eval_loss"]
        if not _is_bad(v) and (p["method"] not in best or v < best[p["method"]]["final_eval_loss"]):
            best[p["method"]] = p
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, p in best.items():
        ax.plot(res["steps"], p["eval_loss"], marker="o", ms=3, color=COLORS.get(m),
                label=f"{LABELS[m]}: lr {p['lr']:.1e}, a {p['a']:g} -> {p['final_eval_loss']:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss")
    ax.set_title("each method at its best grid point", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def time_curves(res: dict, path) -> Path:
    """Held-out loss against training wall-clock for each method's single run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, c in res["curves"].items():
        ax.plot(c["train_time_s"], c["eval_loss"], marker="o", ms=3, color=COLORS.get(m), label=LABELS[m])
    for row in res.get("targets", []):
        ax.axhline(row["loss"], color="k", lw=0.6, ls="--")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"time to target on {res['env'].get('gpu', res['env']['device'])}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bench_bars(result: dict, path, title: Optional[str] = None) -> Path:
    """Horizontal bars of each benchmark row's median time, grouped by section."""
    plt = _plt()
    rows = [r for r in result["rows"] if r.get("ms") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.2))
    labels = [f"{r['section']}: {r['name']}" for r in rows]
    vals = [r["ms"] for r in rows]
    colors = ["#d62728" if r.get("package") else "#7f7f7f" for r in rows]
    ax.barh(range(len(rows)), vals, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale); red = this package")
    ax.set_title(title or f"balora bench on {result['env'].get('gpu', result['env']['device'])}", fontsize=10)
    ax.grid(alpha=0.3, axis="x", which="both")
    return _save(fig, path)
