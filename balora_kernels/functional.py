"""Functional entry points and the one place that chooses a backend.

Backends, by ``BALORA_KERNELS_IMPL`` (unset: automatic):

* ``torch``  — :mod:`balora_kernels.reference` math in plain PyTorch; runs everywhere (the CPU path);
* ``triton`` — Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``cuda``   — the compiled ``csrc/`` extension where a kernel family has one.

Automatic choice: CUDA tensors take the fastest available kernels, everything else the torch path.
:func:`backend_info` says which path runs and why any faster one is unavailable.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import _errors, _ext
from .ops import lora_linear as _lora_ops
from .ops import projection as _proj_ops

IMPLS = ("torch", "triton", "cuda")
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
# The activation dtypes the Triton kernels take (float64 and others run cuBLAS or the reference math, even when
# BALORA_KERNELS_IMPL asks for triton / cuda).
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def requested_impl() -> Optional[str]:
    """The backend forced by ``BALORA_KERNELS_IMPL``, or None for automatic."""
    impl = os.environ.get("BALORA_KERNELS_IMPL", "").strip().lower() or None
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"BALORA_KERNELS_IMPL must be one of {IMPLS}, got {impl!r}")
    return impl


def backend_info() -> dict:
    """Which implementation each op uses on this machine, and why faster ones are unavailable."""
    return {
        "requested": requested_impl(),
        "cuda_available": torch.cuda.is_available(),
        "lora_linear": _lora_linear_backend_info(),
        "projection": _projection_backend_info(),
    }


# --------------------------------------------------------------------------------------------
# LoRA linear
# --------------------------------------------------------------------------------------------
def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                training: bool = True, name: str = "lora_linear"):
    """``y = x W^T + b + s (dropout(x) A^T) B^T`` for any leading dims of ``x`` [..., in].

    weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r]. Gradients flow to x,
    lora_A, lora_B, and to weight / bias when they require grad. Under ``torch.autocast`` the
    operands are cast to the autocast dtype as ``F.linear`` would be (adapters keep their own
    dtype; their gradients come back in it). ``name`` appears in error messages.
    """
    _errors.check_dropout(name, dropout_p)
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, name)
    # Checked before casting, so that errors name the caller's tensors; then, like F.linear,
    # float32 / float16 / bfloat16 operands run in the autocast dtype (float64 stays float64).
    _errors.check_lora_shapes(name, x, weight, bias, lora_A, lora_B, same_dtype=False)
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dt) if t is not None and t.dtype in _AUTOCAST_CASTS else t  # noqa: E731
    # Adapters stay float32 or the autocast dtype; another 16-bit dtype (bfloat16 adapters under float16
    # autocast) is cast too, as F.linear would (differentiably: their gradients still come back in their dtype).
    cast_adapter = lambda t: t if t.dtype in (dt, torch.float32) else cast(t)  # noqa: E731
    args = (cast(x), cast(weight), cast(bias), cast_adapter(lora_A), cast_adapter(lora_B), scaling, dropout_p,
            training, name)
    if torch.compiler.is_compiling():
        with torch.autocast(dev, enabled=False):
            return _lora_linear(*args)
    # Eagerly, autocast is switched off around the op by its flag (the context manager's
    # bookkeeping costs more than the rest of the call's Python).
    torch.set_autocast_enabled(dev, False)
    try:
        return _lora_linear(*args)
    finally:
        torch.set_autocast_enabled(dev, True)


def _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, name):
    """:func:`lora_linear` with autocast off: checks, flattening to 2-D, the dropout mask, the op."""
    _errors.check_lora_shapes(name, x, weight, bias, lora_A, lora_B)
    flat = x.dim() != 2
    x2 = x.reshape(-1, x.shape[-1]) if flat else x
    # Dropout (LoRA branch only): a 0/1 mask is drawn here, in x's dtype, and the kernels read it where
    # x * mask is needed (x * mask itself is never materialised on the kernel paths); 1/(1-p) joins the
    # scaling, applied in float32 by the GEMMs and kernels: s ((x * m / (1-p)) A^T) B^T = (s / (1-p)) ((x * m)
    # A^T) B^T with m exact, where a mask holding 1/(1-p) rounded to bfloat16 (1.4297 for 1/0.7) would scale
    # the branch by that rounding.
    mask = None
    if dropout_p > 0.0 and training:
        mask = torch.empty_like(x2).bernoulli_(1.0 - dropout_p)
        scaling = scaling / (1.0 - dropout_p)
    # The implementation is chosen inside the op, per call and per direction, by _lora_linear_plan
    # (so torch.compile sees one opaque op and the choice adds no guard or graph break).
    y = _lora_ops.lora_linear(x2, weight, bias, lora_A, lora_B, float(scaling), mask)
    return y.reshape(*x.shape[:-1], weight.shape[0]) if flat else y


# Cached dispatch decisions: key -> ((forward impl, gemm config), (backward impl, gemm config)),
# valid for the tuning table object in _PLAN_TABLE (use_tuning_table / reload replace that object).
_PLANS: dict = {}
_PLAN_TABLE = None
_PLAN_CACHE_SIZE = 4096


def _lora_linear_plan(N: int, in_f: int, out_f: int, r: int, dtype, device, impl: str = "auto",
                      with_backward: bool = True):
    """``((forward impl, gemm config), (backward impl, gemm config))`` for one 2-D call.

    ``impl`` 'auto': :func:`_lora_linear_impl`'s choice per direction; otherwise that
    implementation (with the Triton GEMM config measured for the nearest shape). ``with_backward``:
    whether the call records a backward (with full-step measurements, such a call takes the fastest
    forward + backward, another the fastest forward). Cached per (impl, N, in, out, r, dtype, device,
    with_backward, ``BALORA_KERNELS_IMPL``, ``TRITON_INTERPRET``, Triton present) for the current tuning
    table: a call costs a dict lookup, the nearest-shape search runs once per key.
    """
    global _PLAN_TABLE
    table = _lora_ops.tuning_table()
    if table is not _PLAN_TABLE or len(_PLANS) >= _PLAN_CACHE_SIZE:
        _PLANS.clear()
        _PLAN_TABLE = table
    env = os.environ
    key = (impl, N, in_f, out_f, r, dtype, device, with_backward, env.get("BALORA_KERNELS_IMPL"),
           env.get("TRITON_INTERPRET"), _lora_ops.triton is not None, _ext.state_token())
    plan = _PLANS.get(key)
    if plan is None:
        plan = tuple(_lora_linear_choice(d, N, in_f, out_f, r, dtype, device, impl, with_backward)
                     for d in ("forward", "backward"))
        if plan[0][0] in _lora_ops.EXT_IMPLS and plan[1][0] != plan[0][0]:
            # The C++ op runs its own backward (with ext_triton's GEMM config for dx). (A backward-only 'ext'
            # choice, possible with per-direction measurements, runs the same cuBLAS products issued from Python.)
            plan = (plan[0], _lora_linear_choice("backward", N, in_f, out_f, r, dtype, device, plan[0][0],
                                                 with_backward))
        _PLANS[key] = plan
    return plan


def _lora_linear_choice(direction, N, in_f, out_f, r, dtype, device, impl, with_backward=True):
    """``(impl, gemm config)`` for one direction, uncached."""
    if impl == "auto":
        impl = _lora_linear_impl_uncached(direction, N, in_f, out_f, r, dtype, device, with_backward)
    elif impl not in _lora_ops.IMPLS:
        raise ValueError(f"lora_linear: unknown implementation {impl!r}; expected 'auto' or one of "
                         f"{_lora_ops.IMPLS}")
    elif impl in _lora_ops.NEEDS_EXT and not _ext_available():
        raise RuntimeError(f"lora_linear: implementation {impl!r} needs the compiled extension, which is "
                           f"unavailable: {_ext.error() or _ext.how()}")
    if impl not in _lora_ops.GEMM_IMPLS:
        return impl, 0
    return impl, _lora_ops.measured_choice(direction, N, in_f, out_f, r, dtype, impl=impl)[1]


def _lora_linear_impl(direction: str, N: int, in_f: int, out_f: int, r: int, dtype, device,
                      with_backward: bool = True) -> str:
    """The one choice of LoRA-linear implementation (one of ``ops.lora_linear.IMPLS``).

    ``direction`` is 'forward' or 'backward'; N tokens, in/out features, rank r, activation dtype.
    ``BALORA_KERNELS_IMPL`` overrides (for the Triton kernels' dtypes, float32 / float16 / bfloat16; float64
    takes cuBLAS, or on CPU the reference math): torch -> reference math; triton -> fused Triton GEMMs;
    cuda -> the csrc op ('ext_thin': csrc/lora_thin.cu's rank-r kernels, cuBLAS big GEMMs, the autograd
    node in C++; 'cublas', cuBLAS GEMMs + Triton rank-r kernels, when the extension is unavailable). Otherwise, on CUDA in
    bf16/fp16: the fastest implementation measured for the nearest benchmarked shape
    (``ops/lora_linear_tuning.json``, written by bench/bench_lora_linear.py: by its forward + backward
    step for a call that records a backward (``with_backward``), by its forward for one that does not; never one
    measured slower than the plain PyTorch math there; the C++ ones only when the extension loads);
    fp32/fp64 take cuBLAS (which applies torch's TF32 setting), from C++ when the extension loads.
    CPU tensors take the reference math (the Triton path runs on CPU only when forced, under
    ``TRITON_INTERPRET=1``). Cached (see :func:`_lora_linear_plan`).
    """
    plan = _lora_linear_plan(N, in_f, out_f, r, dtype, device, "auto", with_backward)
    return plan[0 if direction == "forward" else 1][0]


def _lora_linear_impl_uncached(direction, N, in_f, out_f, r, dtype, device, with_backward=True) -> str:
    req = requested_impl()
    have_triton = _lora_ops.triton is not None
    if N == 0:
        return "torch"                      # an empty batch: nothing to launch
    if device.type != "cuda":
        interp = os.environ.get("TRITON_INTERPRET", "") == "1" and dtype in _TRITON_DTYPES
        return {"triton": "triton", "cuda": "cublas"}.get(req, "torch") if (have_triton and interp) else "torch"
    if req == "torch":
        return "torch"
    if req == "triton" and have_triton and dtype in _TRITON_DTYPES:
        return "triton"
    ext = _ext_available()          # the first CUDA call may JIT-build the extension (cached after)
    all_cublas = "ext" if ext else "cublas_mm"
    if not have_triton:
        return all_cublas
    if req == "cuda":
        return "ext_thin" if ext else ("cublas" if dtype in _TRITON_DTYPES else all_cublas)
    if dtype not in (torch.bfloat16, torch.float16):
        return all_cublas
    allowed = _lora_ops.IMPLS if ext else tuple(i for i in _lora_ops.IMPLS if i not in _lora_ops.NEEDS_EXT)
    if _lora_ops.ext_gemm_blocker(dtype, device) is not None:   # (where it would be ext_prefill, not as measured)
        allowed = tuple(i for i in allowed if _lora_ops.EXT_IMPLS.get(i) not in _lora_ops.EXT_GEMM_MODES)
    return _lora_ops.measured_choice(direction, N, in_f, out_f, r, dtype, allowed, with_backward)[0]


def _ext_available() -> bool:
    """Whether the compiled extension (csrc/) loads here with its LoRA op (tests replace this to pin the choice)."""
    return _ext.lora_linear_available()


def _lora_linear_backend_info() -> dict:
    table = _lora_ops.tuning_table()
    cuda, ext = None, None
    if torch.cuda.is_available():
        ext = _ext.how() if _ext_available() else f"unavailable ({_ext.error() or _ext.how()}): the C++ implementations " \
            f"{_lora_ops.NEEDS_EXT} are not offered"
        cuda = ("per shape and direction from measurements: " + ", ".join(_lora_ops.IMPLS)
                if _lora_ops.triton is not None else "ext or cublas_mm (Triton is not installed)")
    return {"cpu": "torch", "cuda": cuda, "extension": ext, "tuning_file": _lora_ops.TUNING_FILE,
            "measured_on": table.get("gpu"), "measured_shapes": len(table.get("entries", [])),
            "ext_triton_errors": _lora_ops.ext_gemm_errors()}


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------
def make_projection_plan(pairs: Sequence[_proj_ops.Pair]):
    """A reusable plan that balances ``pairs`` in place, on the backend chosen for their device.

    The plan carries ``why``: the reason this backend was chosen (e.g. why CUDA pairs took the
    torch path); :attr:`BalancedProjector.backend` shows it."""
    cls, why = _projection_choice(pairs)
    plan = cls(pairs)
    plan.why = why
    return plan


def _projection_plan_class(pairs):
    """The one choice of projection backend for these pairs."""
    return _projection_choice(pairs)[0]


def _projection_choice(pairs):
    """(plan class, reason)."""
    if torch.distributed.is_available():
        # DTensor factors (FSDP2): Grams of local shards, one all-reduce, local rescale.
        from .integrations import distributed as _dist
        if _dist.has_dtensor(pairs):
            return _dist.ShardedProjectionPlan, "DTensor (FSDP2) factors"
    return _grouped_projection_choice(pairs)


def _grouped_projection_choice(pairs):
    """(plan class, reason): the Triton plan for CUDA pairs (and CPU pairs under BALORA_KERNELS_IMPL=triton
    with TRITON_INTERPRET=1), the torch plan otherwise. The Triton plan picks the CUDA extension for its
    r x r step when it loads, else torch.linalg on the device (see ``_projection_backend_info``)."""
    req = requested_impl()
    if not pairs or req == "torch":
        return _proj_ops.TorchProjectionPlan, "BALORA_KERNELS_IMPL=torch" if req == "torch" else "no pairs"
    try:
        from .ops import grouped_projection as _gp
    except ImportError as e:       # no Triton
        return _proj_ops.TorchProjectionPlan, f"triton unavailable: {e}"
    dev = pairs[0][0].device
    if dev.type != "cuda" and not (req == "triton" and os.environ.get("TRITON_INTERPRET", "") == "1"):
        return _proj_ops.TorchProjectionPlan, f"{dev.type} tensors take the torch path"
    if any(t.device != dev for p in pairs for t in p):
        return _proj_ops.TorchProjectionPlan, "pairs on several devices"
    why = _gp.supports(pairs)
    if why is not None:
        return _proj_ops.TorchProjectionPlan, why
    return _gp.TritonProjectionPlan, "grouped kernels"


def _projection_backend_info() -> dict:
    info = {"cpu": "torch", "cuda": None}
    if not torch.cuda.is_available():
        return info
    try:
        from .ops import grouped_projection  # noqa: F401
    except ImportError as e:
        info.update(cuda="torch", why=f"triton unavailable: {e}")
        return info
    if requested_impl() == "torch":
        info.update(cuda="torch", why="BALORA_KERNELS_IMPL=torch")
        return info
    if _ext.load() is not None:
        info.update(cuda="triton+cuda-ext", extension=_ext.how())
        # which ranks' Gram and rescale take the CUDA kernels (TritonProjectionPlan(kernels="auto"))
        tc = "wgmma" if _ext.grouped_wgmma() else "mma.sync"
        info["gram_rescale"] = (f"cuda Gram and rescale for float32 factors of ranks <= {_ext.grouped_max_rank(True)} "
                                f"(tensor cores above {_ext.GROUPED_MAX_RANK}, {tc} for ranks 33 to 64), cuda rescale "
                                f"for 16-bit ones of ranks <= {_ext.GROUPED_MAX_RANK}, triton otherwise"
                                if _ext.grouped_available()
                                else f"triton (the extension has no grouped_gram/grouped_rescale: {_ext.how()})")
    else:
        info.update(cuda="triton+torch-eigh", why=f"CUDA extension unavailable: {_ext.error()}")
    return info


def balance_(pairs: Sequence[_proj_ops.Pair], mode: str = "nearest") -> _proj_ops.ProjectionStats:
    """Balance every ``(lora_A, lora_B)`` pair in place (batched); returns device-side stats.

    For repeated calls over the same parameters use :class:`~balora_kernels.BalancedProjector`,
    which keeps the plan.
    """
    from .reference import check_mode
    check_mode("balance_", mode)
    pairs = list(pairs)
    _errors.check_pairs("balance_", [(f"pair{i}", A, B) for i, (A, B) in enumerate(pairs)])
    return make_projection_plan(pairs).run(mode)
