"""balora-kernels: fast, trustworthy Balanced LoRA (BaLoRA) for PyTorch.

Public API:

* :class:`BaLoRALinear` — a frozen linear layer with a LoRA adapter, on the fused op;
* :class:`BalancedProjector` — balances every adapter of a model after optimizer steps;
* :func:`lora_linear`, :func:`balance_` — the functional ops;
* :mod:`balora_kernels.reference` — the pure-PyTorch specification (CPU path and test oracle);
* :func:`backend_info` — which implementation runs here.
"""
from . import reference
from .functional import backend_info, balance_, lora_linear
from .modules import BaLoRALinear, lora_scaling
from .ops.projection import ProjectionStats
from .projector import BalancedProjector, find_adapters

__version__ = "0.1.0"

__all__ = [
    "BaLoRALinear", "BalancedProjector", "ProjectionStats", "backend_info", "balance_",
    "find_adapters", "lora_linear", "lora_scaling", "reference", "__version__",
]
