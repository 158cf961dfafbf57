"""PEFT models as BaLoRA models: one call routes PEFT's LoRA ``Linear`` layers through
:func:`balora_kernels.functional.lora_linear` and returns a projector over every trainable adapter.

::

    from balora_kernels.integrations.peft import to_balora
    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    balora = to_balora(model)           # patches forwards, builds the projector
    print(balora.report)                # what was patched, what was left and why
    balora.projector.attach(optimizer)  # or BaLoRACallback(balora.projector) with the Trainer
    ...
    balora.undo()                       # PEFT's own forwards again

Nothing in the model's parameters, buffers or state-dict names changes: ``save_pretrained`` writes a
standard PEFT adapter and plain PEFT loads it. The patched forward follows PEFT's semantics
(``scaling``, the adapter's dropout module and its train/eval mode, ``lora_bias``, merged adapters,
``disable_adapters``, the active adapter) and hands the call back to PEFT's own forward whenever
the fast path does not apply at that moment: adapters disabled or merged, several or no active
adapters, a LoRA variant (DoRA, ...), extra forward arguments (``adapter_names``), DTensor
weights, forward or backward hooks on the sub-modules (or global ones), or dtypes PEFT would mix
differently (a float32 adapter on a bfloat16 layer outside ``torch.autocast``: PEFT runs that branch in
float32).

Layers whose forward is left as PEFT's at patch time, with the reason in the report: DoRA and
other LoRA variants, several active adapters, ``fan_in_fan_out`` (GPT-2's Conv1D), quantised or
non-``nn.Linear`` bases, bases that are not plain ``nn.Linear`` forwards (a subclass overriding ``forward``,
another adapter wrapped around the Linear as in PEFT's mixed models), embedding and conv LoRA, forwards already
wrapped (accelerate hooks).
Their adapters are still balanced where the math applies: DoRA's output depends on ``B A`` only,
embedding LoRA is a plain ``[d, r] x [r, V]`` pair, conv LoRA is ``B[out, r] x A[r, in*k*k]``
(1x1 ``lora_B``, ungrouped), and quantised-base LoRA layers have ordinary float adapters.
Only adapters whose factors require grad are projected (frozen adapters are not trained); the projector
follows changes (``set_adapter``, parameters replaced by new objects) before every projection.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import functional
from ..projector import BalancedProjector, _lora_weights
from .distributed import is_dtensor

__all__ = ["BaLoRAPatch", "PatchReport", "to_balora", "unpatch"]


@dataclass
class PatchReport:
    """What :func:`to_balora` did.

    ``patched``: LoRA layers whose forward now runs :func:`~balora_kernels.lora_linear`;
    ``left``: layer -> why its forward stays PEFT's; ``projected``: adapter pairs in the projector
    (``"<layer>[<adapter>]"``); ``not_projected``: pair or layer -> why it is not balanced.
    """
    patched: List[str] = field(default_factory=list)
    left: Dict[str, str] = field(default_factory=dict)
    projected: List[str] = field(default_factory=list)
    not_projected: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"BaLoRA: {len(self.patched)} LoRA layers patched, {len(self.left)} left as PEFT's; "
                 f"{len(self.projected)} adapters projected, {len(self.not_projected)} not"]
        lines += [f"  left         {k}: {v}" for k, v in self.left.items()]
        lines += [f"  not projected {k}: {v}" for k, v in self.not_projected.items()]
        return "\n".join(lines)


class BaLoRAPatch:
    """The result of :func:`to_balora`: ``projector``, ``report``, and :meth:`undo`."""

    def __init__(self, model: nn.Module, projector: "PeftProjector", report: PatchReport):
        self.model, self.projector, self.report = model, projector, report

    def undo(self) -> int:
        """Restore PEFT's forward on every patched layer; returns how many were restored."""
        self.projector.detach()
        return unpatch(self.model)

    def __repr__(self) -> str:
        return f"BaLoRAPatch({self.projector!r}, {len(self.report.patched)} layers patched)"


Source = Tuple[str, Callable[[], Tuple[torch.Tensor, torch.Tensor]], Optional[Callable]]


def _params(src: Source) -> Tuple[torch.Tensor, torch.Tensor]:
    """The parameters behind a source: its pair, or for a view (conv LoRA) the parameters it views."""
    return (src[2] or src[1])()


class PeftProjector(BalancedProjector):
    """A :class:`BalancedProjector` over PEFT adapters, some of them reshaped views (conv LoRA).

    It follows the model as :class:`BalancedProjector` does (``follow_model``): its slots are every adapter
    pair of the model, trained or not, and when a parameter was replaced by another object
    (``load_state_dict(assign=True)``, ...), an adapter started or stopped requiring grad (PEFT's
    ``set_adapter``) or one was deleted, the model is scanned again (adapters added since are seen): only
    adapters whose two factors require grad are projected. A view of a parameter does not follow
    ``model.to(...)`` (which swaps the parameter's storage): the views are checked against their parameters
    and rebuilt if needed (with ``check_params``; otherwise :meth:`refresh` rebuilds them).
    """

    def __init__(self, sources: List[Source], mode: str = "nearest", every: int = 1,
                 model: Optional[nn.Module] = None, follow_model: bool = True, check_params: bool = True):
        # (name, getter -> (A, B), getter -> the parameters behind the views, or None); the model, scanned again
        # when its adapters change
        self._all_sources, self._model, self._sources = sources, model, None
        super().__init__((), mode=mode, every=every, follow_model=follow_model, check_params=check_params)

    @staticmethod
    def _trained(A: torch.Tensor, B: torch.Tensor) -> bool:
        return A.requires_grad and B.requires_grad

    def _recollect(self):
        if self._model is not None and self._sources is not None:   # (the first call takes to_balora's scan)
            self._all_sources = _scan(self._model)[2]
        self._sources = [src for src in self._all_sources if self._trained(*_params(src))]
        return ([(n, *get()) for n, get, _ in self._sources],
                [(n, params or get) for n, get, params in self._all_sources])

    def _views_stale(self) -> bool:
        for (name, get, params), (_, A, B) in zip(self._sources, self.named_pairs):
            if params is None:
                continue
            pa, pb = params()
            if (A.data_ptr() != pa.data_ptr() or B.data_ptr() != pb.data_ptr() or A.dtype != pa.dtype
                    or B.dtype != pb.dtype):
                return True
        return False

    def _follow(self) -> None:
        super()._follow()
        if self.check_params and self._views_stale():
            self.named_pairs = [(n, *get()) for n, get, _ in self._sources]
            self._plan = None


# --------------------------------------------------------------------------------------------
# Finding and classifying PEFT LoRA layers
# --------------------------------------------------------------------------------------------
def _lora_classes():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError("balora_kernels.integrations.peft needs peft: pip install 'balora-kernels[hf]'") from e
    return lora_layer


def _has_variant(layer, key: str) -> Optional[str]:
    """The LoRA variant of adapter ``key`` ("DoRA", ...) or None for vanilla LoRA."""
    variant = getattr(layer, "lora_variant", {}).get(key)
    if variant is not None:
        name = type(variant).__name__.replace("LinearVariant", "").replace("Variant", "")
        return "DoRA" if name.lower().startswith("dora") else f"LoRA variant {name}"
    if getattr(layer, "use_dora", {}).get(key, False):
        return "DoRA"
    return None


def _active_keys(layer) -> List[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A.keys()]


def _why_not_patched(layer, lora_layer) -> Optional[str]:
    """None when ``layer``'s forward can be patched now, else the reason."""
    if type(layer).forward is not lora_layer.Linear.forward:
        return f"{type(layer).__name__} overrides forward"
    if "forward" in layer.__dict__:
        return "forward already wrapped (e.g. accelerate hooks)"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out base (Conv1D): weight stored [in, out]"
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear) or not base.weight.is_floating_point():
        return f"quantised or unsupported base layer {type(base).__name__}"
    why = _base_not_plain(layer, base)
    if why:
        return why
    keys = _active_keys(layer)
    if len(keys) > 1:
        return f"several active adapters {keys}"
    if not keys:
        return "no active adapter on this layer"
    variant = _has_variant(layer, keys[0])
    if variant:
        return variant
    return None


def _base_not_plain(layer, base) -> Optional[str]:
    """Why PEFT's ``self.base_layer(x)`` is not plain ``x W^T + b`` on ``base`` (the innermost Linear), or None:
    the fast path computes that product itself, so it must be all the base layer does."""
    if layer.base_layer is not base:
        wrapper = type(layer.base_layer)
        return f"base layer wrapped by {wrapper.__module__}.{wrapper.__qualname__} (another adapter or wrapper)"
    if type(base).forward is not _LINEAR_FORWARD:
        return f"base layer {type(base).__name__} overrides nn.Linear.forward"
    return None


_LINEAR_FORWARD = nn.Linear.forward


def _linear_pairs(name: str, layer) -> List[Tuple[str, Callable, tuple]]:
    out = []
    for key in layer.lora_A.keys():
        if key not in layer.lora_B.keys():
            continue
        a, b = layer.lora_A[key], layer.lora_B[key]
        if isinstance(getattr(a, "weight", None), torch.Tensor) and a.weight.dim() == 2 and b.weight.dim() == 2:
            # (dictionary lookups by key: the projector calls it before every projection, and a deleted
            # adapter is a KeyError)
            out.append((f"{name}[{key}]", _lora_weights(layer, key), None))
    return out


def _embedding_pairs(name: str, layer) -> List[Tuple[str, Callable, tuple]]:
    out = []
    for key in layer.lora_embedding_A.keys():
        if key in layer.lora_embedding_B.keys():
            out.append((f"{name}[{key}]",
                        (lambda k=key: (layer.lora_embedding_A[k], layer.lora_embedding_B[k])), None))
    return out


def _conv_pairs(name: str, layer, not_projected: Dict[str, str]) -> List[Tuple[str, Callable, tuple]]:
    out = []
    for key in layer.lora_A.keys():
        if key not in layer.lora_B.keys():
            continue
        a, b = layer.lora_A[key], layer.lora_B[key]
        label = f"{name}[{key}]"
        if any(k != 1 for k in b.weight.shape[2:]) or getattr(a, "groups", 1) != 1 or getattr(b, "groups", 1) != 1:
            not_projected[label] = "conv LoRA with a grouped conv or a lora_B kernel other than 1x1"
            continue
        if not (a.weight.is_contiguous() and b.weight.is_contiguous()):
            not_projected[label] = "conv LoRA weights not contiguous (channels_last): no 2-D view"
            continue

        def get(a=a, b=b):
            r = a.weight.shape[0]
            return a.weight.detach().view(r, -1), b.weight.detach().view(b.weight.shape[0], r)
        out.append((label, get, _lora_weights(layer, key)))
    return out


def _is_quantised_linear_lora(m) -> bool:
    """PEFT's LoRA layers over quantised linear bases (bnb, GPTQ, HQQ, AWQ, torchao, ...): their
    adapters are ordinary ``nn.Linear`` pairs."""
    return (type(m).__module__.startswith("peft.tuners.lora.")
            and type(m).__name__ not in ("MultiheadAttention", "ParamWrapper")
            and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and all(isinstance(x, nn.Linear) for x in m.lora_A.values()))


def _scan(model: nn.Module):
    """``(patchable layers, report, pair sources)`` without changing anything."""
    lora_layer = _lora_classes()
    report = PatchReport()
    to_patch, sources = [], []
    for name, m in model.named_modules():
        if not isinstance(m, lora_layer.LoraLayer):
            continue
        label = name or type(m).__name__
        if isinstance(m, lora_layer.Linear):
            why = _why_not_patched(m, lora_layer)
            if why is None:
                to_patch.append((label, m))
            else:
                report.left[label] = why
            sources += _linear_pairs(label, m)
        elif isinstance(m, lora_layer.Embedding):
            report.left[label] = "embedding LoRA"
            sources += _embedding_pairs(label, m)
        elif isinstance(m, lora_layer._ConvNd):
            report.left[label] = "conv LoRA"
            sources += _conv_pairs(label, m, report.not_projected)
        elif _is_quantised_linear_lora(m):
            report.left[label] = f"quantised base ({type(m).__name__})"
            sources += _linear_pairs(label, m)
        else:
            report.left[label] = f"{type(m).__name__} LoRA is not supported"
            report.not_projected[label] = f"{type(m).__name__}: not a plain B @ A product"
    for src in sources:
        A, B = _params(src)             # a view's parameters say whether it is trained
        if A.requires_grad and B.requires_grad:
            report.projected.append(src[0])
        else:
            report.not_projected[src[0]] = "frozen adapter (requires_grad=False; projected once it requires grad)"
    return to_patch, report, sources


# --------------------------------------------------------------------------------------------
# The patched forward
# --------------------------------------------------------------------------------------------
_FLOAT32 = torch.float32


def _hook_free(mod: nn.Module) -> bool:
    return not (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks
                or "forward" in mod.__dict__)


def _global_hooks() -> bool:
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def _fast_adapter(layer, x: torch.Tensor):
    """``(key, base, lora_A, lora_B, dropout)``: the adapter to run on ``lora_linear`` now and its
    modules (looked up once, the forward reuses them), or None to let PEFT's forward run."""
    if layer.disable_adapters or layer.merged or not x.is_floating_point():
        return None
    keys = _active_keys(layer)
    if len(keys) != 1:
        return None
    key = keys[0]
    if _has_variant(layer, key) or getattr(layer, "fan_in_fan_out", False):
        return None
    base = layer.get_base_layer()
    lin_a, lin_b, drop = layer.lora_A[key], layer.lora_B[key], layer.lora_dropout[key]
    if not isinstance(base, nn.Linear) or not isinstance(drop, (nn.Dropout, nn.Identity)):
        return None
    if lin_a.bias is not None or _base_not_plain(layer, base):
        return None
    if _global_hooks():
        return None
    if not (_hook_free(base) and _hook_free(lin_a) and _hook_free(lin_b) and _hook_free(drop)):
        return None
    w, A, B = base.weight, lin_a.weight, lin_b.weight
    if is_dtensor(w) or is_dtensor(A) or is_dtensor(B):
        return None
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        ok = A.dtype in (dt, _FLOAT32) and B.dtype in (dt, _FLOAT32)
    else:
        # Outside autocast PEFT runs the branch in the adapters' dtype; take over only where
        # that is x's dtype (lora_linear computes in x's dtype).
        xd = x.dtype
        ok = (w.dtype == xd and (base.bias is None or base.bias.dtype == xd) and A.dtype == xd and B.dtype == xd)
    return (key, base, lin_a, lin_b, drop) if ok else None


def _balora_forward(self, x, *args, **kwargs):
    """PEFT LoRA ``Linear.forward`` on :func:`balora_kernels.functional.lora_linear` (see module doc)."""
    fast = None if (args or kwargs) else _fast_adapter(self, x)
    if fast is None:
        return type(self).forward(self, x, *args, **kwargs)
    key, base, lin_a, lin_b, drop = fast
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    s = self.scaling[key]
    y = functional.lora_linear(x, base.weight, base.bias, lin_a.weight, lin_b.weight,
                               s, p, drop.training, name=f"{self._balora_name}[{key}]")
    bias_b = lin_b.bias
    if bias_b is not None:          # lora_bias=True: PEFT adds s * lora_B.bias
        y = y + (bias_b * s).to(y.dtype)
    return y


def _is_patched(m: nn.Module) -> bool:
    fwd = m.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is _balora_forward


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def to_balora(model: nn.Module, *, mode: str = "nearest", every: int = 1, patch: bool = True) -> BaLoRAPatch:
    """Turn a PEFT model into a BaLoRA model.

    Routes the forward of every eligible PEFT LoRA ``Linear`` through
    :func:`balora_kernels.functional.lora_linear` (``patch=False`` leaves every forward as it is)
    and builds a :class:`PeftProjector` over every trainable adapter pair (linear, embedding, conv,
    DoRA, quantised-base). Returns a :class:`BaLoRAPatch` with ``.projector``, ``.report`` and
    ``.undo()``. Raises (changing nothing) when the model holds no trainable PEFT LoRA adapter or a
    layer is already patched. Build it after ``model.to(device)`` or FSDP2 wrapping is fine for the
    forwards, but the projector must see the parameters the optimizer updates: with FSDP2, use
    :func:`balora_kernels.integrations.distributed.fully_shard_lora` (or build the projector after
    ``fully_shard``).
    """
    already = [n for n, m in model.named_modules() if _is_patched(m)]
    if already:
        raise RuntimeError(f"to_balora: {len(already)} layers are already patched (first: {already[0]!r}); "
                           f"call undo() / unpatch(model) first")
    to_patch, report, sources = _scan(model)
    if not report.projected:
        found = len(report.left) + len(to_patch)
        raise ValueError(f"to_balora: no trainable PEFT LoRA adapter found in {type(model).__name__} "
                         f"({found} LoRA layers seen; not projected: {dict(list(report.not_projected.items())[:3])})")
    projector = PeftProjector(sources, mode=mode, every=every, model=model)
    if patch:
        for label, m in to_patch:
            m._balora_name = label
            # (a partial of a module-level function, not a bound method: torch.save(model) pickles it by name)
            m.forward = functools.partial(_balora_forward, m)
            report.patched.append(label)
    else:
        for label, _ in to_patch:
            report.left[label] = "patch=False"
    return BaLoRAPatch(model, projector, report)


def unpatch(model: nn.Module) -> int:
    """Restore PEFT's own forward on every layer :func:`to_balora` patched; returns the count."""
    n = 0
    for _, m in model.named_modules():
        if _is_patched(m):
            del m.__dict__["forward"]
            m.__dict__.pop("_balora_name", None)
            n += 1
    return n
