"""The paper's synthetic experiment (its Fig. 3), runnable anywhere in seconds.

Per seed: a frozen random ``W0`` [20, 20], a random target ``W*`` [20, 20], and a rank-4 LoRA
``(A [4, 20], B [20, 4])`` with the LoRA init ``B = 0``, ``A ~ N(0, 1)``, fitted by

    loss(A, B) = 0.5 * ||W0 + B A - W*||_F^2

for 100 steps. The best possible loss is the rank-4 optimum (Eckart-Young on ``W* - W0``), so the
plotted quantity is the *excess* loss ``loss - optimum``. Two optimizers: sign descent
``p -= lr * g / (|g| + 1e-8)`` (what the paper's synthetic code calls "adam") and
``torch.optim.Adam``. Methods: LoRA, BaLoRA "svd" and BaLoRA "nearest" (the package's
:class:`~balora_kernels.BalancedProjector` after every step). Each method takes its best learning
rate from a grid (lowest median final excess loss over the seeds); the result holds the median
and inter-quartile range over seeds at that learning rate, and the whole grid.

All seeds and learning rates are trained together as one batch of independent pairs.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

from ..projector import BalancedProjector

METHODS = ("lora", "svd", "nearest")
OPTIMIZERS = ("sign", "adam")
DEFAULT_LRS = tuple(10 ** (-4 + 0.25 * i) for i in range(17))   # 1e-4 .. 1, quarter decades


def make_problems(seeds: int, n: int = 20, seed: int = 0):
    """(W0, W*, A0, optimum) for each seed: [S, n, n], [S, n, n], [S, r, n] raw normals, [S]."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(seeds, n, n, generator=g, dtype=torch.float64)
    Wt = torch.randn(seeds, n, n, generator=g, dtype=torch.float64)
    A0 = torch.randn(seeds, n, n, generator=g, dtype=torch.float64)   # first r rows used
    return W0, Wt, A0


def rank_r_optimum(W0: torch.Tensor, Wt: torch.Tensor, r: int) -> torch.Tensor:
    """0.5 * sum of the squared singular values of W* - W0 beyond the r-th (per seed)."""
    s = torch.linalg.svdvals(Wt - W0)
    return 0.5 * (s[..., r:] ** 2).sum(-1)


def run_method(method: str, optimizer: str, lrs: Sequence[float], seeds: int = 16, steps: int = 100, rank: int = 4,
               n: int = 20, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Excess loss [len(lrs), seeds, steps + 1] (NaN once a run diverges)."""
    W0, Wt, A0 = make_problems(seeds, n, seed)
    opt_loss = rank_r_optimum(W0, Wt, rank)
    L = len(lrs)
    W0, Wt = W0.to(dtype), Wt.to(dtype)
    As = [A0[:, :rank, :].to(dtype).clone().requires_grad_() for _ in range(L)]            # [S, r, n] per lr
    Bs = [torch.zeros(seeds, n, rank, dtype=dtype, requires_grad=True) for _ in range(L)]  # [S, n, r] per lr
    params = [p for pair in zip(As, Bs) for p in pair]
    opt = None
    if optimizer == "adam":
        opt = torch.optim.Adam([{"params": [A, B], "lr": lr} for A, B, lr in zip(As, Bs, lrs)])
    elif optimizer != "sign":
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    proj = None
    if method != "lora":
        proj = BalancedProjector([(f"lr{l}.seed{s}", As[l][s], Bs[l][s]) for l in range(L) for s in range(seeds)], mode=method)
    elif method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def losses():
        return torch.stack([0.5 * ((W0 + B @ A - Wt) ** 2).sum((-1, -2)) for A, B in zip(As, Bs)])   # [L, S]

    out = torch.empty(L, seeds, steps + 1, dtype=torch.float64)
    for t in range(steps + 1):
        loss = losses()
        out[:, :, t] = loss.detach().double() - opt_loss
        if t == steps:
            break
        for p in params:
            p.grad = None
        loss.nan_to_num(0.0, 0.0, 0.0).sum().backward()
        with torch.no_grad():
            if opt is not None:
                opt.step()
            else:
                for l, lr in enumerate(lrs):
                    for p in (As[l], Bs[l]):
                        p -= lr * p.grad / (p.grad.abs() + 1e-8)
        if proj is not None:
            proj.project()
    out[~torch.isfinite(out)] = float("nan")
    # once non-finite, a run stays diverged
    bad = torch.isnan(out).cumsum(-1) > 0
    out[bad] = float("nan")
    return out


def _quantiles(x: torch.Tensor) -> Dict[str, list]:
    """Median and quartiles over seeds (dim 0) per step; a diverged seed counts as +inf."""
    y = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x)
    q = torch.quantile(y, torch.tensor([0.25, 0.5, 0.75], dtype=y.dtype), dim=0)
    conv = lambda t: [v if math.isfinite(v) else None for v in t.tolist()]  # noqa: E731
    return {"q25": conv(q[0]), "median": conv(q[1]), "q75": conv(q[2])}


def run_experiment(seeds: int = 16, steps: int = 100, lrs: Sequence[float] = DEFAULT_LRS,
                   optimizers: Sequence[str] = OPTIMIZERS, methods: Sequence[str] = METHODS, seed: int = 0,
                   progress=None) -> dict:
    """The whole experiment; returns a JSON-ready dict (see the module docstring)."""
    res = {"kind": "synthetic", "settings": {"n": 20, "rank": 4, "steps": steps, "seeds": seeds, "lrs": list(lrs),
                                             "init": "B = 0, A ~ N(0, 1)", "loss": "0.5 ||W0 + B A - W*||_F^2",
                                             "sign": "p -= lr * g / (|g| + 1e-8)", "adam": "torch.optim.Adam defaults",
                                             "seed": seed}, "optimizers": {}}
    for opt in optimizers:
        res["optimizers"][opt] = {}
        for m in methods:
            ex = run_method(m, opt, lrs, seeds, steps, seed=seed)          # [L, S, T+1]
            final = torch.where(torch.isnan(ex[:, :, -1]), torch.full_like(ex[:, :, -1], float("inf")), ex[:, :, -1])
            med = final.median(dim=1).values                              # [L]
            best = int(torch.argmin(med))
            q = _quantiles(ex[best])
            res["optimizers"][opt][m] = {
                "best_lr": float(lrs[best]), **q,
                "final_median": q["median"][-1], "final_q25": q["q25"][-1], "final_q75": q["q75"][-1],
                "grid_final_median": [v if math.isfinite(v) else None for v in med.tolist()],
            }
            if progress:
                progress(1)
    return res


def format_summary(res: dict) -> str:
    lines = []
    s = res["settings"]
    for opt, by in res["optimizers"].items():
        lines.append(f"\n{opt}: excess loss over the rank-{s['rank']} optimum after {s['steps']} steps, "
                     f"median [IQR] over {s['seeds']} seeds, best lr per method")
        ref = by.get("lora", {}).get("final_median")
        for m, r in by.items():
            fm = r["final_median"]
            ratio = f"  LoRA / this = {ref / fm:.3g}x" if (ref and fm and m != "lora") else ""
            fmt = lambda v: "inf" if v is None else f"{v:.3e}"  # noqa: E731
            lines.append(f"  {m:<8} lr {r['best_lr']:.3g}  {fmt(fm)} [{fmt(r['final_q25'])}, {fmt(r['final_q75'])}]{ratio}")
    return "\n".join(lines)
