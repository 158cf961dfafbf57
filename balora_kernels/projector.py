"""``BalancedProjector``: finds every LoRA adapter of a model and balances them all, batched."""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import functional
from ._errors import check_pairs
from .ops.projection import ProjectionStats
from .reference import MODES, check_mode

NamedPair = Tuple[str, torch.Tensor, torch.Tensor]   # (name, lora_A [r, in], lora_B [out, r])


def find_adapters(module: nn.Module, prefix: str = "") -> List[NamedPair]:
    """Every LoRA pair below ``module``: BaLoRALinear layers and PEFT LoRA ``Linear`` layers.

    A PEFT layer contributes one pair per adapter name present in both ``lora_A`` and ``lora_B``
    whose weights are 2-D (linear LoRA; embedding and conv LoRA are not linear pairs). Pairs whose
    factors both have ``requires_grad`` off (frozen or inactive adapters) are left out.
    """
    from .modules import BaLoRALinear
    found, seen = [], set()
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, BaLoRALinear):
            pairs = [(name, m.lora_A, m.lora_B)]
        elif isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and isinstance(getattr(m, "lora_B", None), nn.ModuleDict):
            pairs = []
            for key in m.lora_A.keys():
                a, b = m.lora_A[key], m.lora_B[key] if key in m.lora_B else None
                wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
                if isinstance(wa, torch.Tensor) and isinstance(wb, torch.Tensor) and wa.dim() == 2 and wb.dim() == 2:
                    pairs.append((f"{name}[{key}]" if name else key, wa, wb))
        else:
            continue
        for p in pairs:
            # frozen adapters (requires_grad off: e.g. PEFT's inactive adapters) are not projected
            if id(p[1]) not in seen and (p[1].requires_grad or p[2].requires_grad):
                seen.add(id(p[1]))
                found.append(p)
    return found


def _collect(source) -> List[NamedPair]:
    if isinstance(source, nn.Module):
        return find_adapters(source)
    pairs: List[NamedPair] = []
    for i, item in enumerate(source):
        if isinstance(item, nn.Module):
            pairs.extend(find_adapters(item, prefix=f"[{i}]"))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            pairs.append((f"pair{i}", item[0], item[1]))
        elif isinstance(item, (tuple, list)) and len(item) == 3 and isinstance(item[0], str):
            pairs.append(tuple(item))
        else:
            raise TypeError(f"BalancedProjector: item {i} is neither a module nor an (A, B) pair: {type(item).__name__}")
    return pairs


class BalancedProjector:
    """Balances all adapters of a model after optimizer steps, keeping every product ``B A``.

    ``model_or_modules``: an ``nn.Module`` (its BaLoRALinear and PEFT LoRA layers are found), an
    iterable of modules, or of ``(lora_A, lora_B)`` / ``(name, lora_A, lora_B)`` tuples.
    ``mode``: ``"nearest"`` (default: the balanced pair closest to the current one, which keeps
    Adam's moments aligned) or ``"svd"`` (the paper's SVD-aligned pair). ``every``: project after
    every ``every``-th optimizer step once attached.

    The projector writes the tensors it was given: pass the parameters the optimizer updates. With
    ``torch.autocast`` the adapters are float32 parameters and are projected directly. A framework
    that keeps separate float32 master copies (apex O2, DeepSpeed) must be given those master
    tensors, as ``(name, A, B)`` tuples; its low-precision model copy is refreshed by the framework.
    """

    def __init__(self, model_or_modules: Union[nn.Module, Iterable], mode: str = "nearest", every: int = 1):
        check_mode("BalancedProjector", mode)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"BalancedProjector: every must be a positive integer, got {every!r}")
        self.named_pairs = _collect(model_or_modules)
        if not self.named_pairs:
            raise ValueError("BalancedProjector: no LoRA adapters found (expected BaLoRALinear or PEFT LoRA Linear layers, or (A, B) pairs)")
        check_pairs("BalancedProjector", self.named_pairs)
        self.mode, self.every = mode, every
        self.steps = 0              # optimizer steps seen while attached
        self.projections = 0        # projections run
        self.last_stats: Optional[ProjectionStats] = None
        self._plan = None
        self._handle = None

    @property
    def names(self) -> List[str]:
        return [n for n, _, _ in self.named_pairs]

    def _current_plan(self):
        if self._plan is None or self._plan.is_stale():
            check_pairs("BalancedProjector", self.named_pairs)    # a parameter may have changed shape since __init__
            self._plan = functional.make_projection_plan([(A, B) for _, A, B in self.named_pairs])
        return self._plan

    @property
    def backend(self) -> dict:
        """Which plan runs and why (``{"plan", "backend", "why"}``); builds the plan if needed."""
        plan = self._current_plan()
        return {"plan": type(plan).__name__, "backend": getattr(plan, "backend", "torch"),
                "why": getattr(plan, "why", None)}

    def project(self) -> ProjectionStats:
        """Balance every adapter now (in place). Returns device-side stats; read with ``.as_dict()``."""
        self.last_stats = self._current_plan().run(self.mode)
        self.projections += 1
        return self.last_stats

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.project()

    def attach(self, optimizer: torch.optim.Optimizer) -> "BalancedProjector":
        """Project after every ``every``-th ``optimizer.step()`` (a step post-hook)."""
        if self._handle is not None:
            raise RuntimeError("BalancedProjector: already attached; call detach() first")
        self._handle = optimizer.register_step_post_hook(self._after_step)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def state_dict(self) -> dict:
        return {"mode": self.mode, "every": self.every, "steps": self.steps,
                "projections": self.projections, "names": self.names}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters (so ``every`` keeps its phase on resume); adapter names must match."""
        saved = list(state.get("names", []))
        if saved != self.names:
            i = next((i for i, (a, b) in enumerate(zip(saved, self.names)) if a != b), min(len(saved), len(self.names)))
            first = (f"first difference at index {i}: saved {saved[i] if i < len(saved) else '(none)'!r}, "
                     f"here {self.names[i] if i < len(self.names) else '(none)'!r}")
            raise ValueError(f"BalancedProjector.load_state_dict: adapters differ: {len(saved)} saved, "
                             f"{len(self.names)} here; {first}")
        missing = [k for k in ("mode", "every", "steps", "projections") if k not in state]
        if missing:
            raise ValueError(f"BalancedProjector.load_state_dict: missing keys {missing} in {state!r}")
        counters_ok = all(isinstance(state[k], int) and not isinstance(state[k], bool) and state[k] >= 0
                          for k in ("steps", "projections"))
        if (state["mode"] not in MODES or not isinstance(state["every"], int) or state["every"] < 1
                or not counters_ok):
            raise ValueError(f"BalancedProjector.load_state_dict: bad mode/every/steps/projections in {state!r}")
        # everything checked first: an error leaves the projector as it was
        self.mode, self.every = state["mode"], state["every"]
        self.steps, self.projections = state["steps"], state["projections"]

    def __repr__(self) -> str:
        return f"BalancedProjector({len(self.named_pairs)} adapters, mode={self.mode!r}, every={self.every})"
