"""Checkpoints of a BaLoRA run in one safetensors file: adapters, optimizer state, projector state.

Nothing here unpickles: tensors are safetensors entries and everything else (optimizer
hyper-parameters, step counters, projector counters) is JSON in the file's metadata. Resuming with
:func:`load_checkpoint` into a model / optimizer / projector built the same way continues the run
bitwise (the projection is deterministic and its ``every`` phase is restored).

::

    save_checkpoint("ckpt.safetensors", model, optimizer, projector)
    ...
    load_checkpoint("ckpt.safetensors", model, optimizer, projector)

By default only trainable parameters (``requires_grad``) are saved: the frozen base is rebuilt from
its own weights. ``params="all"`` saves the whole ``state_dict``. Sharded (DTensor) state is refused:
use ``torch.distributed.checkpoint`` for FSDP2 runs.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..projector import BalancedProjector
from .distributed import is_dtensor

__all__ = ["load_checkpoint", "save_checkpoint"]

_FORMAT = "balora-checkpoint/1"


def _safetensors():
    try:
        import safetensors.torch as st
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError("balora_kernels.integrations.checkpoint needs safetensors: "
                          "pip install 'balora-kernels[hf]'") from e
    return st, safe_open


def _to_cpu(name: str, t: torch.Tensor) -> torch.Tensor:
    if is_dtensor(t):
        raise ValueError(f"save_checkpoint: {name!r} is a DTensor (sharded); use torch.distributed.checkpoint "
                         f"for FSDP2 state, or save full tensors")
    return t.detach().to("cpu", copy=True).contiguous()


# JSON encoding of nested state with tensors pulled out into the safetensors table.
def _encode(obj, path: str, tensors: Dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        tensors[path] = _to_cpu(path, obj)
        return {"__tensor__": path}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"save_checkpoint: key {k!r} at {path} is neither str nor int")
            items.append([k, _encode(v, f"{path}.{k}", tensors)])
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"save_checkpoint: cannot store {type(obj).__name__} at {path} without pickling")


def _decode(obj, tensors: Dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        raise ValueError(f"load_checkpoint: malformed metadata entry {list(obj)[:3]}")
    return obj


def _model_state(model: nn.Module, params: str) -> Dict[str, torch.Tensor]:
    if params == "trainable":
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params == "all":
        return dict(model.state_dict())
    raise ValueError(f"params must be 'trainable' or 'all', got {params!r}")


def save_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    projector: Optional[BalancedProjector] = None, params: str = "trainable",
                    extra: Optional[dict] = None) -> None:
    """Write ``model``'s parameters (``params``: "trainable" or "all"), ``optimizer.state_dict()``,
    ``projector.state_dict()`` and a JSON-able ``extra`` dict to the safetensors file ``path``
    (written to ``path + ".tmp"`` then renamed, so a crash leaves the old file)."""
    st, _ = _safetensors()
    tensors: Dict[str, torch.Tensor] = {}
    model_keys = []
    for name, t in _model_state(model, params).items():
        tensors[f"model/{name}"] = _to_cpu(name, t)
        model_keys.append(name)
    meta = {"format": _FORMAT, "params": params, "model_keys": model_keys,
            "optimizer": _encode(optimizer.state_dict(), "optim", tensors) if optimizer is not None else None,
            "projector": projector.state_dict() if projector is not None else None,
            "extra": extra}
    tmp = path + ".tmp"
    st.save_file(tensors, tmp, metadata={"balora": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    projector: Optional[BalancedProjector] = None) -> Optional[dict]:
    """Read a :func:`save_checkpoint` file into ``model`` / ``optimizer`` / ``projector``.

    Every saved model tensor must name a parameter (or buffer) of ``model`` with the same shape, and,
    for a "trainable" checkpoint, every trainable parameter of ``model`` must be in the file; the
    check runs before anything is written. Returns the saved ``extra``.
    """
    st, safe_open = _safetensors()
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("balora")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if raw is None:
        raise ValueError(f"load_checkpoint: {path} is not a balora checkpoint (no 'balora' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"load_checkpoint: {path} has format {meta.get('format')!r}, expected {_FORMAT!r}")

    current = dict(model.state_dict())
    saved = {k: tensors[f"model/{k}"] for k in meta["model_keys"]}
    unknown = [k for k in saved if k not in current]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(current[k].shape)}"
             for k, v in saved.items() if k in current and current[k].shape != v.shape]
    # (extra state is optional: checkpoints written before a module had it load without it)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved] \
        if meta["params"] == "trainable" else [k for k in current
                                               if k not in saved and _extra_state_owner(model, k) is None]
    if unknown or wrong or missing:
        raise ValueError(f"load_checkpoint: {path} does not fit {type(model).__name__}: "
                         f"unknown keys {unknown[:3]}, shape mismatches {wrong[:3]}, missing {missing[:3]}")
    if projector is not None and meta["projector"] is None:
        raise ValueError(f"load_checkpoint: {path} holds no projector state")
    if optimizer is not None and meta["optimizer"] is None:
        raise ValueError(f"load_checkpoint: {path} holds no optimizer state")
    if projector is not None and list(meta["projector"].get("names", [])) != projector.names:
        raise ValueError(f"load_checkpoint: projector adapters differ from the checkpoint's "
                         f"({len(meta['projector'].get('names', []))} saved, {len(projector.names)} here)")

    # Write model, optimizer and projector state; if any part refuses (e.g. an optimizer with other
    # parameter groups, a bad projector state), restore all three: nothing is left half-loaded.
    owners = {k: _extra_state_owner(model, k) for k in saved}
    backup_model = {k: (owners[k].get_extra_state() if owners[k] is not None else current[k].detach().clone())
                    for k in saved}
    backup_opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    backup_proj = projector.state_dict() if projector is not None else None
    try:
        _write_model(current, owners, saved)
        if optimizer is not None:
            optimizer.load_state_dict(_decode(meta["optimizer"], tensors))
        if projector is not None:
            projector.load_state_dict(meta["projector"])
    except Exception:
        _write_model(current, owners, backup_model)
        if optimizer is not None:
            optimizer.load_state_dict(backup_opt)
        if projector is not None:
            projector.load_state_dict(backup_proj)
        raise
    return meta.get("extra")


def _extra_state_owner(model: nn.Module, key: str):
    """The module whose extra state ``key`` is (``...._extra_state``; e.g. BaLoRALinear's merged flag), or None."""
    suffix = nn.modules.module._EXTRA_STATE_KEY_SUFFIX
    if not (key == suffix or key.endswith("." + suffix)):
        return None
    name = key[: -len(suffix)].rstrip(".")
    return model.get_submodule(name) if name else model


def _write_model(current: dict, owners: dict, values: dict) -> None:
    """Model tensors in place (``state_dict()``'s tensors are the parameters and buffers), extra state through
    its module (``state_dict()`` holds a copy of it)."""
    with torch.no_grad():
        for k, v in values.items():
            if owners[k] is not None:
                owners[k].set_extra_state(v)
            else:
                current[k].copy_(v)
