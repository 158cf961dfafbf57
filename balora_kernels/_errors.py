"""Input validation shared by the public entry points (one place for each check)."""
from __future__ import annotations

import torch


def describe(t) -> str:
    if t is None:
        return "None"
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def check_dropout(where: str, p) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{where}: dropout_p must be a number in [0, 1), got {p!r}")


def check_lora_shapes(where: str, x, weight, bias, lora_A, lora_B, same_dtype: bool = True) -> None:
    """Raise a ValueError naming ``where`` and every shape when the LoRA operands do not fit.

    ``same_dtype=False`` (under autocast, before casting) skips the rules that tie dtypes together."""
    problems = []
    if x.dim() == 0:
        problems.append("x must have at least one dim [..., in]")
    elif weight.dim() != 2:
        problems.append("weight must be 2-D [out, in]")
    elif lora_A.dim() != 2 or lora_B.dim() != 2:
        problems.append("lora_A must be [r, in] and lora_B [out, r]")
    else:
        out_f, in_f = weight.shape
        r = lora_A.shape[0]
        if x.shape[-1] != in_f:
            problems.append(f"x's last dim {x.shape[-1]} != in_features {in_f}")
        if lora_A.shape[1] != in_f:
            problems.append(f"lora_A must be [r, {in_f}]")
        if tuple(lora_B.shape) != (out_f, r):
            problems.append(f"lora_B must be [{out_f}, {r}] (out, r)")
        if bias is not None and tuple(bias.shape) != (out_f,):
            problems.append(f"bias must be [{out_f}]")
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            problems.append(f"{name} must be floating point")
    if not problems and same_dtype and weight.dtype != x.dtype:
        problems.append(f"weight dtype {weight.dtype} != x dtype {x.dtype} (use torch.autocast to mix)")
    if not problems and same_dtype and bias is not None and bias.dtype != x.dtype:
        problems.append(f"bias dtype {bias.dtype} != x dtype {x.dtype}")
    if not problems and same_dtype:
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if t.dtype not in (x.dtype, torch.float32):
                problems.append(f"{name} dtype {t.dtype} must be x's dtype {x.dtype} or float32")
    devices = {t.device for t in (x, weight, lora_A, lora_B, bias) if t is not None}
    if len(devices) > 1:
        problems.append(f"all operands must be on one device, got {sorted(map(str, devices))}")
    if problems:
        raise ValueError(
            f"{where}: " + "; ".join(problems) + f". Got x {describe(x)}, weight {describe(weight)}, "
            f"bias {describe(bias)}, lora_A {describe(lora_A)}, lora_B {describe(lora_B)}."
        )


def check_pairs(where: str, named_pairs) -> None:
    """Every ``(name, lora_A, lora_B)`` must be floating ``[r, in]`` / ``[out, r]`` tensors (r >= 1) on one device,
    each writable in place: no element shared by several indices (an ``expand``-ed tensor) and no inference
    tensor outside inference mode. Checked before anything is written, so a bad pair leaves every pair as it was."""
    for name, A, B in named_pairs:
        ok = (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and A.dim() == 2 and B.dim() == 2
              and A.shape[0] == B.shape[1] and A.shape[0] >= 1 and A.is_floating_point() and B.is_floating_point()
              and A.device == B.device)
        if not ok:
            raise ValueError(f"{where}: adapter {name!r} must have lora_A [r, in] and lora_B [out, r] floating "
                             f"tensors (r >= 1) on one device; got lora_A {describe(A)}, lora_B {describe(B)}")
        for which, t in (("lora_A", A), ("lora_B", B)):
            if t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:   # (2: "too hard", e.g. a column slice)
                raise ValueError(f"{where}: adapter {name!r}: {which} {describe(t)} with strides {tuple(t.stride())} "
                                 "has elements shared by several indices (expanded?); it cannot be written in place")
            if t.is_inference() and not torch.is_inference_mode_enabled():
                raise ValueError(f"{where}: adapter {name!r}: {which} {describe(t)} is an inference tensor (created "
                                 "under torch.inference_mode), which cannot be written in place outside it")
