"""``BaLoRALinear``: a frozen linear layer with a trainable LoRA adapter, on the package's op."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (PEFT's convention)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class BaLoRALinear(nn.Module):
    """``y = x W^T + b + s * (dropout(x) A^T) B^T`` with frozen ``W``, ``b``.

    Parameters (PEFT's layout): ``weight`` [out, in] and ``bias`` [out] frozen; ``lora_A`` [r, in]
    (kaiming-uniform init) and ``lora_B`` [out, r] (zeros) trainable. ``s = alpha / r``, or
    ``alpha / sqrt(r)`` with ``use_rslora``. ``adapter_dtype`` keeps the adapters in another dtype
    than the base weight (e.g. float32 adapters on a bfloat16 model).

    Balance the adapters with :class:`~balora_kernels.BalancedProjector`.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float = 8.0,
                 bias: bool = True, dropout: float = 0.0, use_rslora: bool = False,
                 device=None, dtype=None, adapter_dtype=None, name: Optional[str] = None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, r, alpha, dropout, use_rslora, adapter_dtype, name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float = 8.0, dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype=None, name: Optional[str] = None):
        """Wrap an existing ``nn.Linear``: its weight and bias are shared (and frozen), not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, r, alpha, dropout, use_rslora, adapter_dtype, name)
        return self

    def _setup(self, weight, bias, r, alpha, dropout, use_rslora, adapter_dtype, name):
        out_features, in_features = weight.shape
        label = name or f"BaLoRALinear({in_features}->{out_features})"
        if not isinstance(r, int) or r < 1 or r > min(in_features, out_features):
            raise ValueError(f"{label}: r must be an integer in [1, min(in_features, out_features)] = "
                             f"[1, {min(in_features, out_features)}], got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{label}: dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha, self.use_rslora, self.dropout = alpha, use_rslora, dropout
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.name = label
        self.merged = False
        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)
        adt = adapter_dtype or weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=weight.device, dtype=adt))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=weight.device, dtype=adt))
        self.reset_adapters()

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """``lora_A`` kaiming-uniform, ``lora_B`` zeros (PEFT's init: the adapter starts as a no-op)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter as a fresh layer would: ``weight`` and ``bias`` as ``nn.Linear`` does (for
        a layer built by :meth:`from_linear`, that is the shared Linear's), the adapters by
        :meth:`reset_adapters`; not merged. Called by ``module.to_empty()`` + ``reset_parameters()`` flows
        (meta-device construction)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapters()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return functional.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B,
                                      self.scaling, self.dropout, self.training, name=self.name)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` [out, in] in float32, or float64 when the adapters or the weight are float64."""
        dt = torch.promote_types(torch.promote_types(self.lora_A.dtype, self.weight.dtype), torch.float32)
        return self.scaling * (self.lora_B.to(dt) @ self.lora_A.to(dt))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s B A`` into ``weight`` (rounded once to its dtype); forward then skips the adapter."""
        if self.merged:
            raise RuntimeError(f"{self.name}: already merged")
        delta = self.delta_weight()
        self.weight.copy_(self.weight.to(delta.dtype) + delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``s B A`` from ``weight`` again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            raise RuntimeError(f"{self.name}: not merged")
        delta = self.delta_weight()
        self.weight.copy_(self.weight.to(delta.dtype) - delta)
        self.merged = False

    # Whether s B A is folded into `weight` travels with the weights: the module's extra state (key "_extra_state",
    # a bool tensor: torch.save, safetensors and torch.distributed.checkpoint take it), so loading a merged layer's
    # weights into a fresh layer neither adds s B A twice nor ignores the adapter. A state dict without the flag
    # (saved before it existed) loads as not merged when it holds the weight, and leaves the flag alone when it
    # does not (adapters only).
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.merged)

    def set_extra_state(self, state) -> None:
        self.merged = bool(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + nn.modules.module._EXTRA_STATE_KEY_SUFFIX
        if key not in state_dict:     # (load_state_dict passes a copy of the caller's dict)
            state_dict[key] = torch.tensor(False if prefix + "weight" in state_dict else self.merged)
        merged, n_errors = self.merged, len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) != n_errors:   # a refused load leaves the flag as it was
            self.merged = merged

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, bias={self.bias is not None}, "
                f"dropout={self.dropout}, use_rslora={self.use_rslora}, merged={self.merged}")
