"""What the ``balora`` command runs: the real-model demo, the synthetic experiment, bench and check.

Nothing here is imported by ``balora_kernels`` itself; the heavy or optional dependencies
(transformers, peft, gguf, matplotlib, the model and data packages) are imported inside functions,
and a missing one is reported by :class:`MissingDependency` with the command that installs it.
"""
from .assets import MissingDependency

__all__ = ["MissingDependency"]
