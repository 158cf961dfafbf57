"""``BaLoRACallback``: balance the adapters after every real optimizer step of ``transformers.Trainer``.

::

    balora = to_balora(peft_model)                       # balora_kernels.integrations.peft
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[BaLoRACallback(balora.projector)])

Timing: the Trainer calls ``on_optimizer_step`` right after ``optimizer.step()``, once per
optimizer step -- with ``gradient_accumulation_steps = k`` that is once every k micro-batches, never
on the accumulation sub-steps. A step that the mixed-precision scaler skipped (fp16 overflow:
accelerate's ``optimizer.step_was_skipped``) changed no parameter and is not followed by a
projection. The projection phase (``every``) is taken from ``state.global_step``, so it survives
``trainer.train(resume_from_checkpoint=...)`` without extra state.

Mixed precision: with ``bf16=True`` / ``fp16=True`` the Trainer runs under autocast and PEFT keeps
the adapters in float32 (``autocast_adapter_dtype=True``): the projector writes those float32
parameters, the values AdamW updates. DeepSpeed ZeRO keeps separate float32 masters: give the
projector those tensors (``BalancedProjector([(name, A_master, B_master), ...])``).
"""
from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError("balora_kernels.integrations.transformers needs transformers: "
                      "pip install 'balora-kernels[hf]'") from e

from ..projector import BalancedProjector

__all__ = ["BaLoRACallback"]


class BaLoRACallback(TrainerCallback):
    """Projects ``projector``'s adapters after each optimizer step the Trainer takes.

    ``projector``: a :class:`~balora_kernels.BalancedProjector` (e.g. ``to_balora(model).projector``)
    over the parameters the Trainer's optimizer updates; it must not also be attached to the
    optimizer. ``projector.last_stats`` holds the last projection's counters.
    """

    def __init__(self, projector: BalancedProjector):
        if not isinstance(projector, BalancedProjector):
            raise TypeError(f"BaLoRACallback expects a BalancedProjector, got {type(projector).__name__}")
        self.projector = projector

    def on_train_begin(self, args, state, control, **kwargs):
        if self.projector._handle is not None:
            raise RuntimeError("BaLoRACallback: the projector is also attached to an optimizer; it would "
                               "project twice per step. Call projector.detach() or drop the callback.")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and getattr(optimizer, "step_was_skipped", False):
            return
        # global_step counts completed steps; this one is number global_step + 1.
        self.projector.steps = state.global_step + 1
        if self.projector.steps % self.projector.every == 0:
            self.projector.project()
