"""``BalancedProjector``: finds every LoRA adapter of a model and balances them all, batched."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import functional
from ._errors import check_pairs
from .ops.projection import ProjectionStats
from .reference import MODES, check_mode

NamedPair = Tuple[str, torch.Tensor, torch.Tensor]   # (name, lora_A [r, in], lora_B [out, r])


Slot = Tuple[str, Callable[[], Tuple[torch.Tensor, torch.Tensor]]]


def _adapter_slots(module: nn.Module, prefix: str = "") -> List[Slot]:
    """``(name, get)`` for every linear LoRA pair below ``module``, frozen or not; ``get()`` returns the module's
    current ``(lora_A, lora_B)`` tensors (dictionary lookups: a parameter replaced by a new object is seen)."""
    from .modules import BaLoRALinear
    slots = []
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, BaLoRALinear):
            slots.append((name, lambda params=m._parameters: (params["lora_A"], params["lora_B"])))
        elif isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and isinstance(getattr(m, "lora_B", None), nn.ModuleDict):
            for key in m.lora_A.keys():
                a, b = m.lora_A[key], m.lora_B[key] if key in m.lora_B else None
                wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
                if isinstance(wa, torch.Tensor) and isinstance(wb, torch.Tensor) and wa.dim() == 2 and wb.dim() == 2:
                    slots.append((f"{name}[{key}]" if name else key, _lora_weights(m, key)))
    return slots


def _lora_weights(layer: nn.Module, key: str) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """``() -> (lora_A[key].weight, lora_B[key].weight)`` of a PEFT LoRA layer, looked up by key at each call
    (dictionary lookups: a parameter replaced by a new object is seen, a deleted adapter is a KeyError)."""
    mods_a, mods_b = layer.lora_A._modules, layer.lora_B._modules
    return lambda: (mods_a[key]._parameters["weight"], mods_b[key]._parameters["weight"])


def _trainable(A: torch.Tensor, B: torch.Tensor) -> bool:
    return A.requires_grad or B.requires_grad


def find_adapters(module: nn.Module, prefix: str = "") -> List[NamedPair]:
    """Every LoRA pair below ``module``: BaLoRALinear layers and PEFT LoRA ``Linear`` layers.

    A PEFT layer contributes one pair per adapter name present in both ``lora_A`` and ``lora_B``
    whose weights are 2-D (linear LoRA; embedding and conv LoRA are not linear pairs). Pairs whose
    factors both have ``requires_grad`` off (frozen or inactive adapters) are left out.
    """
    found, seen = [], set()
    for name, get in _adapter_slots(module, prefix):
        A, B = get()
        # frozen adapters (requires_grad off: e.g. PEFT's inactive adapters) are not projected
        if id(A) not in seen and _trainable(A, B):
            seen.add(id(A))
            found.append((name, A, B))
    return found


def _collect(source) -> Tuple[List[NamedPair], list]:
    """``(pairs, slots)``: the pairs to project, and the module slots they were found through (to watch)."""
    if isinstance(source, nn.Module):
        return find_adapters(source), _adapter_slots(source)
    pairs: List[NamedPair] = []
    slots = []
    for i, item in enumerate(source):
        if isinstance(item, nn.Module):
            pairs.extend(find_adapters(item, prefix=f"[{i}]"))
            slots.extend(_adapter_slots(item, prefix=f"[{i}]"))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            pairs.append((f"pair{i}", item[0], item[1]))
        elif isinstance(item, (tuple, list)) and len(item) == 3 and isinstance(item[0], str):
            pairs.append(tuple(item))
        else:
            raise TypeError(f"BalancedProjector: item {i} is neither a module nor an (A, B) pair: {type(item).__name__}")
    return pairs, slots


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

    ``follow_model`` (default True): for the pairs found in modules, before each projection the modules'
    adapters are looked up again (a Python loop of dictionary lookups, about 45 to 150 us for 224 pairs on a
    2-core CPU) and collected anew when a parameter was replaced by another object
    (``load_state_dict(assign=True)``, a new ``nn.Parameter``) or an adapter started or stopped requiring grad
    (PEFT's ``set_adapter``); without it, the modules are not looked up at call time and such changes need
    :meth:`refresh` or a new projector (tensors given as tuples are always projected as given).

    ``check_params`` (default True): before each projection, the plan's device tables are checked against the
    parameters (each factor's address, shape, strides, dtype and device: a Python loop over the pairs, about
    0.17 ms for 224 pairs on a 2-core CPU) and the plan is rebuilt when one was re-allocated (``model.to(...)``,
    ``p.data = ...``). With ``follow_model=False, check_params=False`` a projection does no Python work per pair
    (the plan's CUDA-graph replay and one copy of its counters); then call :meth:`refresh` after anything that
    moves, re-allocates or replaces an adapter: until then the kernels would write the memory the parameters
    held before.
    """

    def __init__(self, model_or_modules: Union[nn.Module, Iterable], mode: str = "nearest", every: int = 1,
                 follow_model: bool = True, check_params: bool = True):
        check_mode("BalancedProjector", mode)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"BalancedProjector: every must be a positive integer, got {every!r}")
        self._source = model_or_modules if isinstance(model_or_modules, nn.Module) else list(model_or_modules)
        self.named_pairs, self._slots = self._recollect()
        if not self.named_pairs:
            raise ValueError("BalancedProjector: no LoRA adapters found (expected BaLoRALinear or PEFT LoRA Linear layers, or (A, B) pairs)")
        check_pairs("BalancedProjector", self.named_pairs)
        self._watched = self._slot_state()
        self.mode, self.every, self.follow_model, self.check_params = mode, every, follow_model, check_params
        self.steps = 0              # optimizer steps seen while attached
        self.projections = 0        # projections run
        self.last_stats: Optional[ProjectionStats] = None
        self._plan = None
        self._handle = None

    @property
    def names(self) -> List[str]:
        """The adapters a projection would balance now (looked up again first, see ``follow_model``)."""
        self._follow()
        return [n for n, _, _ in self.named_pairs]

    def _recollect(self) -> Tuple[List[NamedPair], List[Slot]]:
        """``(pairs to project, slots to watch)`` from the source (subclasses: from their own)."""
        return _collect(self._source)

    # Whether a pair is trained, hence projected (a subclass may ask both factors to require grad).
    _trained = staticmethod(_trainable)

    def _slot_state(self) -> list:
        """For the pairs found in modules: each slot's current tensors and whether it is trained."""
        out = []
        for _, get in self._slots:
            A, B = get()
            out.append((A, B, self._trained(A, B)))
        return out

    def _slots_changed(self) -> bool:
        """Whether a module's adapter was replaced by another tensor object (``load_state_dict(assign=True)``,
        a new ``nn.Parameter``, ``model.to`` with ``torch.__future__`` overwrite) or started / stopped requiring
        grad (PEFT's ``set_adapter``) since the pairs were collected: then they are collected again (a Python
        loop of dictionary lookups over the slots, no device work)."""
        trained = self._trained
        for (_, get), (a0, b0, t0) in zip(self._slots, self._watched):
            try:
                a, b = get()
            except (KeyError, AttributeError):   # the adapter was deleted (PEFT's delete_adapter)
                return True
            if a is not a0 or b is not b0 or trained(a, b) != t0:
                return True
        return False

    def _follow(self) -> None:
        """Collect the pairs again when the modules' adapters changed (see ``follow_model``)."""
        if self.follow_model and self._slots and self._slots_changed():
            pairs, self._slots = self._recollect()
            if not pairs:
                raise ValueError(f"{type(self).__name__}: no trainable LoRA adapter left (the {len(self._slots)} "
                                 "adapter pairs found all have requires_grad off)")
            check_pairs(type(self).__name__, pairs)
            self.named_pairs, self._plan = pairs, None
            self._watched = self._slot_state()

    def refresh(self) -> None:
        """Collect the pairs again and rebuild the plan at the next projection (after ``model.to(...)``, a
        replaced or re-allocated adapter, ``set_adapter``; needed with ``follow_model=False`` /
        ``check_params=False``, harmless otherwise). Raises, changing nothing, if no trainable pair is left."""
        state = dict(self.__dict__)    # (a subclass's _recollect may keep state of its own)
        try:
            pairs, slots = self._recollect()
            if not pairs:
                raise ValueError(f"{type(self).__name__}.refresh: no trainable LoRA adapter left")
            check_pairs(type(self).__name__, pairs)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(state)
            raise
        self.named_pairs, self._slots, self._plan = pairs, slots, None
        self._watched = self._slot_state()

    def _current_plan(self):
        self._follow()
        if self._plan is None or (self.check_params and self._plan.is_stale()):
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
