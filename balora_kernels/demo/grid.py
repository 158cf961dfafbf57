"""Many LoRA runs of one model at once: the hyperparameter grid of the convergence study.

A grid point is a (method, learning rate, LoRA scale) triple. Running K points one after another
repeats K times the same frozen forward on the same batch; here every point gets its own slice of
one batch instead: the batch is ``[K * b, T]`` (point-major), the frozen weights run once over all
of it, and each adapted linear adds its point's LoRA term with a batched matmul::

    y[k] = x[k] W^T + s_k (x[k] A_k^T) B_k^T        x[k]: the k-th point's [b*T, in] rows

Points never mix (attention, norms and the loss are per sequence), so each point follows exactly
the run it would have alone: same initial ``A`` (PEFT's kaiming-uniform init, from one seed),
``B = 0``, same batches, AdamW at its own learning rate (:class:`StackedAdamW`, the same update as
``torch.optim.AdamW``), and for BaLoRA points the package's :class:`~balora_kernels.BalancedProjector`
over views of that point's adapters after every step. A point whose training loss turns non-finite
or exceeds twice its initial value is marked diverged, reset to ``A = B = 0`` with its optimizer
state cleared, and frozen (its learning rate set to 0), so it cannot disturb the others.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..projector import BalancedProjector
from .train import METHODS, TokenData


@dataclass(frozen=True)
class GridPoint:
    method: str
    lr: float
    a: float            # the paper's "A_scaling": lora_alpha = 8 a^2 at r = 8, scale s = alpha / r
    rank: int = 8

    @property
    def alpha(self) -> float:
        return 8.0 * self.a ** 2

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with K independent LoRA adapters, one per slice of the batch.

    ``lora_A`` [K, r, in], ``lora_B`` [K, out, r] (PEFT's layout per point), ``scaling`` [K].
    Input ``x`` [K * b, ..., in] with the points' rows contiguous (point-major).
    """

    def __init__(self, base: nn.Linear, A0: torch.Tensor, scaling: torch.Tensor):
        super().__init__()
        self.base = base
        K = scaling.numel()
        r = A0.shape[0]
        self.lora_A = nn.Parameter(A0.detach().to(torch.float32).expand(K, -1, -1).clone())
        self.lora_B = nn.Parameter(torch.zeros(K, base.out_features, r, dtype=torch.float32, device=A0.device))
        self.register_buffer("scaling", scaling.to(torch.float32).view(K, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        K = self.lora_A.shape[0]
        xs = x.reshape(K, -1, x.shape[-1])
        dt = xs.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        u = torch.bmm(xs.to(dt), self.lora_A.to(dt).transpose(1, 2))            # [K, bT, r]
        d = torch.bmm(u, self.lora_B.to(dt).transpose(1, 2)) * self.scaling.to(dt)  # [K, bT, out]
        return y + d.reshape(y.shape).to(y.dtype)


def peft_like_init(linear: nn.Linear, r: int, generator: torch.Generator) -> torch.Tensor:
    """``A`` [r, in] drawn as PEFT draws it: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(linear.in_features)
    A = torch.empty(r, linear.in_features, dtype=torch.float32)
    A.uniform_(-bound, bound, generator=generator)
    return A


def add_multi_lora(model: nn.Module, points: Sequence[GridPoint], target_modules: Sequence[str], seed: int = 0
                   ) -> List[MultiLoRALinear]:
    """Replace each target ``nn.Linear`` by a :class:`MultiLoRALinear` for ``points`` (in place)."""
    ranks = {p.rank for p in points}
    if len(ranks) != 1:
        raise ValueError(f"add_multi_lora: all points must share one rank, got {sorted(ranks)}")
    r = ranks.pop()
    scaling = torch.tensor([p.scaling for p in points], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and child_name in target_modules:
                child.requires_grad_(False)
                A0 = peft_like_init(child, r, gen).to(child.weight.device)
                layer = MultiLoRALinear(child, A0, scaling.to(child.weight.device))
                setattr(mod, child_name, layer)
                layers.append(layer)
    if not layers:
        raise ValueError(f"add_multi_lora: no nn.Linear named one of {list(target_modules)}")
    return layers


class StackedAdamW:
    """AdamW over parameters whose dim 0 indexes grid points, with one learning rate per point.

    The update is ``torch.optim.AdamW``'s (non-amsgrad, bias-corrected, decoupled weight decay)::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p *= 1 - lr_k wd;  p -= lr_k / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params: Sequence[torch.Tensor], lrs: torch.Tensor, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.lrs = lrs.to(torch.float32).clone()
        self.betas, self.eps, self.wd = betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self._hooks = []

    def _lr_view(self, p: torch.Tensor) -> torch.Tensor:
        return self.lrs.to(p.device).view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2s = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        ps = [p for p in self.params if p.grad is not None]
        ms = [m for p, m in zip(self.params, self.m) if p.grad is not None]
        vs = [v for p, v in zip(self.params, self.v) if p.grad is not None]
        gs = [p.grad for p in ps]
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        lr = [self._lr_view(p) for p in ps]
        if self.wd:
            torch._foreach_mul_(ps, [1 - l * self.wd for l in lr])
        denom = torch._foreach_div(torch._foreach_sqrt(vs), bc2s)
        torch._foreach_add_(denom, self.eps)
        upd = torch._foreach_div(ms, denom)
        torch._foreach_mul_(upd, [l / bc1 for l in lr])
        torch._foreach_sub_(ps, upd)
        for h in self._hooks:
            h()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def add_step_hook(self, fn) -> None:
        self._hooks.append(fn)

    @torch.no_grad()
    def freeze_point(self, k: int) -> None:
        """Point ``k``: parameters and moments zeroed, learning rate 0."""
        self.lrs[k] = 0.0
        for p, m, v in zip(self.params, self.m, self.v):
            p[k].zero_()
            m[k].zero_()
            v[k].zero_()


def point_losses(hidden: torch.Tensor, lm_head: nn.Module, ids: torch.Tensor, K: int) -> torch.Tensor:
    """Mean next-token cross-entropy of each point [K] (logits formed one point at a time)."""
    b = ids.shape[0] // K
    out = []
    for k in range(K):
        h = hidden[k * b:(k + 1) * b, :-1]
        logits = lm_head(h).float()
        out.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[k * b:(k + 1) * b, 1:].reshape(-1)))
    return torch.stack(out)


class GridRun:
    """Trains every point of a grid together on one model (see the module docstring)."""

    def __init__(self, model: nn.Module, points: Sequence[GridPoint], data: TokenData, target_modules: Sequence[str],
                 device, batch_size: int = 4, seed: int = 0, weight_decay: float = 0.0,
                 eval_batch_size: Optional[int] = None):
        for p in points:
            if p.method not in METHODS:
                raise ValueError(f"GridRun: unknown method {p.method!r}")
        self.device = torch.device(device)
        self.points, self.K = list(points), len(points)
        self.data, self.batch_size = data, batch_size
        self.eval_batch_size = eval_batch_size or len(data.eval)
        model.requires_grad_(False)
        self.model = model
        self.layers = add_multi_lora(model, self.points, target_modules, seed)
        self.model.to(self.device)
        params = [t for l in self.layers for t in (l.lora_A, l.lora_B)]
        self.opt = StackedAdamW(params, torch.tensor([p.lr for p in self.points]), weight_decay=weight_decay)
        self.projectors: Dict[str, BalancedProjector] = {}
        for mode in ("svd", "nearest"):
            ks = [k for k, p in enumerate(self.points) if p.method == mode]
            if ks:
                pairs = [(f"{i}.{k}", l.lora_A[k], l.lora_B[k]) for i, l in enumerate(self.layers) for k in ks]
                self.projectors[mode] = BalancedProjector(pairs, mode=mode)
        self.opt.add_step_hook(self._project)
        self.projection_time_s = 0.0
        self.diverged: Dict[int, int] = {}
        self.initial_loss: Optional[torch.Tensor] = None
        self.step_count = 0
        self.train_time_s = 0.0
        self.history = {"steps": [], "eval_loss": [], "train_time_s": []}
        self.train_loss: List[List[float]] = []

    def _project(self) -> None:
        t0 = time.perf_counter()
        for proj in self.projectors.values():
            proj.project()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.projection_time_s += time.perf_counter() - t0

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _forward_losses(self, ids: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            hidden = self.model.model(input_ids=ids).last_hidden_state
            return point_losses(hidden, self.model.lm_head, ids, self.K)

    def step(self) -> torch.Tensor:
        """One optimizer step of every point; returns the points' training losses [K] (host)."""
        ids = self.data.batch(self.step_count, self.batch_size).to(self.device)
        ids = ids.repeat(self.K, 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        losses = self._forward_losses(ids)
        live = torch.ones(self.K, dtype=torch.bool)
        for k in self.diverged:
            live[k] = False
        losses[live.to(losses.device)].sum().backward()
        self.opt.step()
        self.opt.zero_grad()
        host = losses.detach().float().cpu()
        self.train_time_s += time.perf_counter() - t0
        self.step_count += 1
        if self.initial_loss is None:
            self.initial_loss = host.clone()
        for k in range(self.K):
            if k not in self.diverged and (not math.isfinite(host[k].item()) or host[k] > 2 * self.initial_loss[k]):
                self.diverged[k] = self.step_count
                self.opt.freeze_point(k)
        self.train_loss.append(host.tolist())
        return host

    @torch.no_grad()
    def evaluate(self) -> List[float]:
        """Held-out loss of every point on the fixed evaluation batch (NaN for diverged points)."""
        self.model.eval()
        ev = self.data.eval
        tot = torch.zeros(self.K, dtype=torch.float64)
        for i in range(0, len(ev), self.eval_batch_size):
            ids = ev[i:i + self.eval_batch_size].to(self.device)
            n = ids.shape[0]
            tot += self._forward_losses(ids.repeat(self.K, 1)).double().cpu() * n
        self.model.train()
        out = (tot / len(ev)).tolist()
        for k in self.diverged:
            out[k] = float("nan")
        self.history["steps"].append(self.step_count)
        self.history["eval_loss"].append(out)
        self.history["train_time_s"].append(self.train_time_s)
        return out
