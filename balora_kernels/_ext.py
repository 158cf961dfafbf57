"""The optional compiled extension (``csrc/``): import it, or JIT-build and cache it; keep why it failed.

It holds the ops ``torch.ops.balora.balance_transforms`` (the projection's r x r step, csrc/balance.cu),
``grouped_gram`` / ``grouped_rescale`` (the projection's Gram and rescale for ranks up to 16, and up to 64 for
float32 factors, csrc/grouped.cu and grouped_mma.cu) and
``lora_linear`` (the LoRA linear layer with its autograd node in C++, csrc/lora_linear.cpp; ``lora_linear_backward``
its backward alone; ``lora_gemm_kernel_register`` takes the Triton GEMM that its modes 4 and 5 launch,
csrc/triton_gemm.cu).
Nothing happens at import time. :func:`load` is called by the dispatchers the first time a CUDA projection plan
is built or a LoRA linear call on CUDA tensors picks its implementation:

1. ``balora_kernels._C`` (built by ``setup.py`` on a machine with CUDA torch and nvcc) is imported;
2. otherwise, when CUDA torch and a CUDA toolkit are present, ``csrc/*.cpp|*.cu`` are compiled with
   ``torch.utils.cpp_extension.load`` into ``$BALORA_KERNELS_CACHE_DIR`` (default
   ``~/.cache/balora_kernels``), in a folder named by a hash of the sources, torch and CUDA versions; a
   later process loads the cached library without compiling;
3. otherwise the extension is unavailable and :func:`error` says why; callers fall back. That includes a
   build folder holding the lock file of a build interrupted more than :data:`STALE_BUILD_LOCK_S` ago (torch
   would wait for it forever): delete the file to build again.

``BALORA_KERNELS_DISABLE_EXT=1`` disables the extension (to exercise the fallback).
"""
from __future__ import annotations

import glob
import hashlib
import os
import time
from typing import Optional

import torch

# The CUDA sources: the copy that setup.py ships inside the package (balora_kernels/_csrc, regular
# installs), else the repository's csrc/ (a checkout or an editable install).
_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = next((d for d in (os.path.join(_HERE, "_csrc"), os.path.join(os.path.dirname(_HERE), "csrc"))
              if os.path.isdir(d)), os.path.join(os.path.dirname(_HERE), "csrc"))
_state = {"tried": False, "ok": False, "error": None, "how": None, "generation": 0}


def cache_dir() -> str:
    """Where JIT builds are kept (``BALORA_KERNELS_CACHE_DIR`` or ``~/.cache/balora_kernels``)."""
    root = os.environ.get("BALORA_KERNELS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "balora_kernels")
    return os.path.abspath(root)


def _sources():
    return sorted(glob.glob(os.path.join(_CSRC, "*.cpp")) + glob.glob(os.path.join(_CSRC, "*.cu")))


def _build_tag() -> str:
    h = hashlib.sha256()
    for path in _sources() + sorted(glob.glob(os.path.join(_CSRC, "*.cuh")) + glob.glob(os.path.join(_CSRC, "*.h"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(f"{torch.__version__}|{torch.version.cuda}".encode())
    h.update(" ".join(CXX_FLAGS + CUDA_ARCH_FLAGS).encode())   # flags change the build too
    return h.hexdigest()[:16]


# The op's argument names this package calls it with (csrc/bindings.cpp): an extension built from older
# sources (a leftover prebuilt ``balora_kernels._C``) registers another schema and is not used.
OP_ARGUMENTS = ("grams", "eps_f", "r", "mode", "tw", "status", "gaps")
LORA_LINEAR_ARGUMENTS = ("x", "weight", "bias", "lora_A", "lora_B", "scaling", "dropout_mask", "mode", "gemm")
LORA_LINEAR_BACKWARD_ARGUMENTS = ("grad_y", "x", "u", "weight", "lora_A", "lora_B", "scaling", "dropout_mask",
                                  "need_x", "need_weight", "need_bias", "need_lora_A", "need_lora_B", "mode")
GROUPED_GRAM_ARGUMENTS = ("tiles", "n_b", "n_a", "r", "dtype", "partials", "ranges", "counters", "grams")
GROUPED_RESCALE_ARGUMENTS = ("tiles", "n_b", "n_a", "r", "dtype", "tw", "status", "skip_bits")
GROUPED_MAX_RANK = 16   # csrc/grouped.cu: bk_grouped_max_rank(dtype) of 16-bit factors (the CUDA-core kernels)
GROUPED_FP32_MAX_RANK = 64   # of float32 factors: ranks 17 to 64 on the tensor cores (csrc/grouped_mma.cu)
_fp32_max_rank: dict = {}    # the loaded extension's float32 limit, once asked (grouped_max_rank)


def grouped_max_rank(fp32: bool) -> int:
    """The largest rank the CUDA Gram / rescale take: :data:`GROUPED_MAX_RANK` for 16-bit factors; for float32
    ones :data:`GROUPED_FP32_MAX_RANK` when the loaded extension has csrc/grouped_mma.cu's kernels, else
    :data:`GROUPED_MAX_RANK`: a prebuilt ``balora_kernels._C`` from sources before them (which still serves the
    projection, :func:`how` says so) has the same op schemas but refuses float32 ranks above 16. Asked once per
    process (:func:`_takes_fp32_rank`); without the extension the package's own limit."""
    if not fp32:
        return GROUPED_MAX_RANK
    if "r" not in _fp32_max_rank:
        if not grouped_available():
            return GROUPED_FP32_MAX_RANK
        _fp32_max_rank["r"] = GROUPED_FP32_MAX_RANK if _takes_fp32_rank(GROUPED_FP32_MAX_RANK) else GROUPED_MAX_RANK
    return _fp32_max_rank["r"]


def grouped_wgmma() -> bool:
    """Whether the loaded extension's Gram and rescale of float32 factors of ranks 33 to 64 run csrc/grouped_mma.cu's
    wgmma kernels on the current GPU: an sm_90a image (:data:`CUDA_ARCH_FLAGS`) on a compute capability 9.0 GPU
    (H100, H200), loaded there (not the compute_90 PTX compiled just in time). Elsewhere they run the same file's
    mma.sync kernels (False; also without the extension, for one built before the wgmma kernels, or with the
    environment variable ``BALORA_KERNELS_WGMMA=0``, which the extension reads once per process)."""
    if not grouped_available():
        return False
    try:
        return bool(torch.ops.balora.grouped_mma_wgmma(torch.cuda.current_device()))
    except (AttributeError, RuntimeError):   # an extension without the op
        return False


def _current_cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _takes_fp32_rank(r: int) -> bool:
    """Whether the loaded extension's grouped_rescale takes float32 factors of rank r (r = 64 or a rank block's size:
    the transforms are passed as [0, 2, r, r]): one call on an empty tile table (no launch), whose rank check
    (csrc/bindings.cpp, before the table's size) an extension without the rank refuses."""
    dev = _current_cuda_device()
    try:
        grouped_rescale(torch.zeros(0, 6, dtype=torch.int64, device=dev), 0, 0, r, 0,
                        torch.zeros(0, 2, r, r, device=dev), torch.zeros(0, dtype=torch.int32, device=dev), 0)
    except RuntimeError:
        return False
    return True


def _op_ok(name: str, args) -> bool:
    try:
        op = getattr(torch.ops.balora, name).default
    except (AttributeError, RuntimeError):
        return False
    return tuple(a.name for a in op._schema.arguments) == args


def _have_op() -> bool:
    """The projection's op, with the schema this package calls (what :func:`load` requires)."""
    return _op_ok("balance_transforms", OP_ARGUMENTS)


def _have_lora_op() -> bool:
    """The LoRA linear op, its backward alone and the registration of its Triton GEMM (csrc/lora_linear.cpp), with
    the schemas this package calls."""
    return _op_ok("lora_linear", LORA_LINEAR_ARGUMENTS) and \
        _op_ok("lora_linear_backward", LORA_LINEAR_BACKWARD_ARGUMENTS) and \
        _op_ok("lora_gemm_kernel_register", ("desc",))


def _have_grouped_ops() -> bool:
    return _op_ok("grouped_gram", GROUPED_GRAM_ARGUMENTS) and _op_ok("grouped_rescale", GROUPED_RESCALE_ARGUMENTS)


# The kernels are compiled for sm_80 and sm_90a (compute capability 9.0: H100 / H200, where csrc/grouped_mma.cu's
# wgmma kernels run; BK_SM90A tells its host code that this image exists), with sm_90 PTX that the driver compiles
# for newer GPUs (setup.py and _try_load's flags): GPUs older than compute capability 8.0 have no image to run.
MIN_CAPABILITY = (8, 0)
CUDA_ARCH_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
                   "-gencode=arch=compute_90,code=compute_90", "-DBK_SM90A"]


# Host-compiler flags of the build: BK_WITH_CUDA_THIN lets csrc/lora_linear.cpp call csrc/lora_thin.cu's kernels
# (without it the file is pure ATen, as the CPU test build compiles it).
CXX_FLAGS = ["-O3", "-DBK_WITH_CUDA_THIN"]


def unsupported_gpu() -> Optional[str]:
    """Why the current GPU cannot run the extension's kernels (None when it can, or when there is no GPU)."""
    if not torch.cuda.is_available():
        return None
    cap = torch.cuda.get_device_capability()
    if tuple(cap) < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name()} has compute capability {cap[0]}.{cap[1]}; the extension's kernels "
                f"need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later")
    return None


# torch.utils.cpp_extension builds under a lock file in the build folder, and a process that finds the file waits,
# without limit, for the build that made it; a build killed part-way (a timeout, Ctrl-C) leaves it behind, and every
# later process would hang on it. A lock older than this (a build takes a few minutes) is taken as left behind.
STALE_BUILD_LOCK_S = 30 * 60


def _check_build_lock(build_dir: str) -> None:
    """Raise (the caller falls back and :func:`error` says why) when ``build_dir`` holds a left-behind build lock."""
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return
    if age > STALE_BUILD_LOCK_S:
        raise RuntimeError(f"the JIT build's lock file {lock} is {age / 60:.0f} min old: an earlier build was "
                           "probably interrupted (torch would wait for it forever); delete the file to build again")


def _try_load() -> None:
    if os.environ.get("BALORA_KERNELS_DISABLE_EXT", "0") not in ("", "0"):
        raise RuntimeError("disabled by BALORA_KERNELS_DISABLE_EXT")
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is not a CUDA build")
    why = unsupported_gpu()
    if why is not None:
        raise RuntimeError(why)
    try:
        from . import _C  # noqa: F401  (registers torch.ops.balora.*)
    except ImportError as e:
        prebuilt_error = e
    else:
        # A prebuilt library owns the `balora` namespace: a JIT build could not load beside it. One from older
        # sources (no lora_linear op) still serves the projection; one with another projection schema serves
        # nothing and says how to fix it.
        if not _have_op():
            raise RuntimeError(f"the installed balora_kernels._C has no balance_transforms{OP_ARGUMENTS} (built "
                               "from other sources?); reinstall the package to rebuild it")
        _state["how"] = "prebuilt balora_kernels._C"
        missing = [name for name, ok in (("lora_linear/lora_linear_backward/lora_gemm_kernel_register",
                                          _have_lora_op()),
                                         ("grouped_gram/grouped_rescale", _have_grouped_ops())) if not ok]
        if missing:
            _state["how"] += f" (built from older sources: no {', '.join(missing)}; reinstall to rebuild it)"
        return
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError(f"no prebuilt extension ({prebuilt_error}) and no CUDA toolkit (CUDA_HOME) to JIT-build it")
    build_dir = os.path.join(cache_dir(), _build_tag())
    lib = os.path.join(build_dir, "balora_kernels_C.so")
    if os.path.exists(lib):
        torch.ops.load_library(lib)
        _state["how"] = f"cached JIT build {lib}"
    else:
        os.makedirs(build_dir, exist_ok=True)
        _check_build_lock(build_dir)
        cpp_extension.load(
            name="balora_kernels_C", sources=_sources(), build_directory=build_dir, is_python_module=False,
            extra_cflags=CXX_FLAGS, extra_include_paths=[_CSRC],
            extra_cuda_cflags=["-O3", *CUDA_ARCH_FLAGS],
            verbose=os.environ.get("BALORA_KERNELS_VERBOSE_BUILD", "0") not in ("", "0"))
        _state["how"] = f"JIT build {lib}"
    if not (_have_op() and _have_lora_op() and _have_grouped_ops()):
        raise RuntimeError(f"extension loaded but torch.ops.balora.balance_transforms{OP_ARGUMENTS}, "
                           f"lora_linear{LORA_LINEAR_ARGUMENTS}, lora_linear_backward"
                           f"{LORA_LINEAR_BACKWARD_ARGUMENTS}, lora_gemm_kernel_register(desc), "
                           f"grouped_gram{GROUPED_GRAM_ARGUMENTS} or "
                           f"grouped_rescale{GROUPED_RESCALE_ARGUMENTS} is missing (another schema?)")


def load() -> Optional[object]:
    """``torch.ops.balora`` when the extension is available (building it once if needed), else None."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _try_load()
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001  (any build/import failure means: fall back, and say why)
            _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return torch.ops.balora if _state["ok"] else None


def available() -> bool:
    return load() is not None


def lora_linear_available() -> bool:
    """Whether ``torch.ops.balora.lora_linear`` (and ``lora_linear_backward``) can be used (the extension loaded
    and has them)."""
    return load() is not None and _have_lora_op()


def grouped_available() -> bool:
    """Whether the projection's CUDA Gram and rescale ops (``torch.ops.balora.grouped_gram`` / ``grouped_rescale``,
    csrc/grouped.cu, ranks up to :func:`grouped_max_rank`) can be used."""
    return load() is not None and _have_grouped_ops()


def state_token():
    """Changes whenever the extension's availability may change (:func:`reset`; a first load attempt settles it
    for good, and every dispatch decision that depends on it makes that attempt): dispatch caches key on it."""
    return _state["generation"]


def error() -> Optional[str]:
    """Why the extension is unavailable (None when it loaded or was not tried yet)."""
    return _state["error"]


def how() -> Optional[str]:
    """How the extension was obtained (prebuilt, cached or fresh JIT build)."""
    return _state["how"]


def reset() -> None:
    """Forget the last attempt (tests; after changing BALORA_KERNELS_DISABLE_EXT)."""
    _state.update(tried=False, ok=False, error=None, how=None, generation=_state["generation"] + 1)


def balance_transforms(grams, eps_f, r: int, mode: int, tw, status, gaps) -> None:
    """``torch.ops.balora.balance_transforms``: grams fp32 [P, 2, R, R], eps_f fp64 [P] (each pair's factor
    rounding unit) in; tw fp32 [P, 2, R, R], status int32 [P], gaps fp64 [P, 2] out (csrc/bindings.cpp)."""
    torch.ops.balora.balance_transforms(grams, eps_f, r, mode, tw, status, gaps)


def grouped_gram(tiles, n_b: int, n_a: int, r: int, dtype: int, partials, ranges, counters, grams) -> None:
    """``torch.ops.balora.grouped_gram`` (csrc/grouped.cu): the Grams of every tile of the table into grams fp32
    [P, 2, R, R]; dtype 0 float32, 1 bfloat16, 2 float16; counters int32 [2P] zero (left zero)."""
    torch.ops.balora.grouped_gram(tiles, n_b, n_a, r, dtype, partials, ranges, counters, grams)


def grouped_rescale(tiles, n_b: int, n_a: int, r: int, dtype: int, tw, status, skip_bits: int) -> None:
    """``torch.ops.balora.grouped_rescale`` (csrc/grouped.cu): ``B <- B T``, ``A <- T^-1 A`` in place for every
    tile of the table whose pair has none of ``skip_bits`` in ``status``. The factors are reached through the
    table's addresses, not arguments, so the op's schema does not mark them mutated: eager-only, under no_grad
    (not for torch.compile graphs; autograd version counters are not bumped)."""
    torch.ops.balora.grouped_rescale(tiles, n_b, n_a, r, dtype, tw, status, skip_bits)
