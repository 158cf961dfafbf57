"""Tests of the LoRA linear kernels and op (balora_kernels/ops/lora_linear.py).

Accuracy rule (low precision): the error of our result against a float64 reference, as
||ours - ref64||_F / ||ref64||_F, is at most twice the error of plain PyTorch (the reference math run
in the same dtype). Outputs are poisoned with NaN before a kernel writes them.

* Interpreted kernels (CPU, CI): the tests named ``test_interp_*`` run in a child pytest process
  with ``TRITON_INTERPRET=1`` set before Triton is imported; ``test_triton_kernels_interpreted``
  starts it. Shapes are small and awkward (N=37, in=72, out=40, r in {1, 3, 16}), fp32 and fp16.
* CPU op tests: gradcheck in float64, ``torch.compile(fullgraph=True)``, the dispatcher.
* GPU tests (``-m gpu``): every implementation and every gradient on shapes up to
  8192 x 4096 x 11008; each dtype (bf16, fp16, fp32) with each r in {1, 8, 16, 64, 128}, dW and db
  included, x and dy non-contiguous; under torch.autocast; peak memory, torch.compile and CUDA-graph
  capture. Before an op call every free block of torch's caching allocator is filled with 0xFF (NaN in
  every float dtype), checked on fresh allocations.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import torch

import balora_kernels as bk
from balora_kernels import _ext, functional, reference
from balora_kernels.ops import lora_linear as L

INTERP_CHILD = os.environ.get("BALORA_TEST_INTERPRET_CHILD") == "1"
interp_only = pytest.mark.skipif(not INTERP_CHILD, reason="runs in the TRITON_INTERPRET=1 child process")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GRADS = ("x", "lora_A", "lora_B")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.double()
    ref = ref.double().to(a.device)
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# float32 results: plain PyTorch (cuBLAS) sums in blocked order and lands near 1e-7, so twice its
# error is within rounding noise of any other summation order; a float32 result also passes below
# 32 unit roundoffs (~1.9e-6, a sequential sum over ~1000 terms), far under TF32's 1e-4..1e-3.
FP32_FLOOR = 32 * 2.0**-24


def assert_2x(what: str, ours, plain, ref64):
    """ours' error vs ref64 <= 2x the error of plain PyTorch in the same dtype."""
    e_ours, e_plain = rel_err(ours, ref64), rel_err(plain, ref64)
    floor = FP32_FLOOR if ours.dtype == torch.float32 and plain.dtype == torch.float32 else 0.0
    assert e_ours <= max(2 * e_plain, floor), (
        f"{what}: error {e_ours:.3e} > 2 x plain PyTorch's {e_plain:.3e} "
        f"(shape {tuple(ours.shape)}, dtype {ours.dtype})")


def poisoned(*shape, dtype, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def cpu_lora_op():
    """``torch.ops.balora.lora_linear`` on a CPU build of torch: csrc/lora_linear.cpp compiled once with
    ``torch.utils.cpp_extension`` (cached under the package's cache folder, keyed on the sources) and registered
    under the ``balora`` namespace the package's extension uses (nothing else can register it there without
    CUDA); with ``lora_linear_backward`` beside it."""
    from torch.utils import cpp_extension
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "lora_linear.cpp")
    build = os.path.join(_ext.cache_dir(), f"cpu-test-{_ext._build_tag()}")
    lib = os.path.join(build, "bk_lora_linear_cpu.so")
    if not hasattr(torch.ops.balora, "lora_linear"):
        if os.path.exists(lib):
            torch.ops.load_library(lib)
        else:
            os.makedirs(build, exist_ok=True)
            cpp_extension.load(name="bk_lora_linear_cpu", sources=[csrc], build_directory=build,
                               is_python_module=False, extra_cflags=["-O2"])
    return torch.ops.balora.lora_linear


def operands(N, I, O, r, dtype, device="cpu", adapter_dtype=None, bias=False, dropout=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt)

    adt = adapter_dtype or dtype
    x = rnd(N, I)
    W = rnd(O, I, scale=I ** -0.5)
    b = rnd(O) if bias else None
    A = rnd(r, I, scale=I ** -0.5, dt=adt)
    B = rnd(O, r, scale=0.5, dt=adt)
    m = None
    if dropout:
        m = ((torch.rand(N, I, generator=g) > 0.25).to(dtype) / 0.75).to(device)
    dy = rnd(N, O)
    return x, W, b, A, B, m, dy


def f64(t):
    return None if t is None else t.double()


def references(x, W, b, A, B, m, dy, s, need_w=False):
    """(y, grads) in float64, and (y, grads) of plain PyTorch in the operands' dtype."""
    out = []
    for cast in (f64, lambda t: t):
        xx, WW, bb, AA, BB, mm, dd = map(cast, (x, W, b, A, B, m, dy))
        y = reference.lora_linear(xx, WW, bb, AA, BB, s, mm)
        g = reference.lora_linear_backward(dd, xx, WW, AA, BB, s, mm, need_x_grad=True,
                                           need_weight_grad=need_w, need_bias_grad=bb is not None)
        out.append((y, g))
    return out


# --------------------------------------------------------------------------------------------
# Interpreted Triton kernels (CPU; run in the child process)
# --------------------------------------------------------------------------------------------
SMALL = dict(N=37, I=72, O=40)
DTYPES_INTERP = (torch.float32, torch.float16)
TINY_GEMM = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1)


def _triton_version():
    return tuple(int(p) for p in re.findall(r"\d+", L.triton.__version__)[:2]) if L.triton is not None else None


# Triton's interpreter before 3.9 cannot run these kernels: under triton 3.6 (the GPU machine) it
# raises "TypeError: only 0-dimensional arrays can be converted to Python scalars" in _xa_kernel;
# 3.9 (CI) runs them all. Where the older Triton is installed, its compiled kernels are what runs,
# and `-m gpu` tests those.
OLD_INTERPRETER = L.triton is not None and _triton_version() < (3, 9)


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
@pytest.mark.skipif(L.triton is None, reason="Triton not installed")
@pytest.mark.skipif(OLD_INTERPRETER, reason=f"triton {getattr(L.triton, '__version__', '')}'s interpreter cannot run "
                    "these kernels (TypeError: only 0-dimensional arrays can be converted to Python scalars); "
                    "interpreted runs need triton >= 3.9, the compiled kernels are tested with -m gpu")
def test_triton_kernels_interpreted():
    """Runs this file's test_interp_* tests in a child with TRITON_INTERPRET=1 (set before import)."""
    env = dict(os.environ, TRITON_INTERPRET="1", BALORA_TEST_INTERPRET_CHILD="1")
    env.pop("BALORA_KERNELS_IMPL", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-k", "test_interp_", __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted kernel tests failed:\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    # every interpreted test ran in the child: some passed, none failed, none skipped
    assert re.search(r"\b[1-9]\d* passed", summary) and "failed" not in summary and "skipped" not in summary, tail


@interp_only
@pytest.mark.parametrize("dtype", DTYPES_INTERP)
@pytest.mark.parametrize("r", (1, 3, 16))
@pytest.mark.parametrize("dropout", (False, True))
@pytest.mark.parametrize("splits", (None, 3))
def test_interp_xa_kernel(dtype, r, dropout, splits):
    x, W, b, A, B, m, dy = operands(**SMALL, r=r, dtype=dtype, dropout=dropout, seed=r)
    x = x.T.contiguous().T  # column-major: strides are honoured
    u = L.xa_forward(x, A, m, splits=splits, out=poisoned(SMALL["N"], r, dtype=dtype), block_n=16)
    ref64 = (f64(x) * (f64(m) if dropout else 1)) @ f64(A).T
    plain = (x if m is None else x * m) @ A.to(dtype).T  # what the reference forms as u
    assert_2x("u = x_l A^T", u, plain, ref64)


@interp_only
@pytest.mark.parametrize("dtype", DTYPES_INTERP)
@pytest.mark.parametrize("r", (1, 3, 16))
@pytest.mark.parametrize("with_dB", (True, False))
@pytest.mark.parametrize("groups", (None, 2))
@pytest.mark.parametrize("block_m", (None, 16))
def test_interp_dyb_kernel(dtype, r, with_dB, groups, block_m):
    x, W, b, A, B, m, dy = operands(**SMALL, r=r, dtype=dtype, seed=10 + r)
    u = (x @ A.T).to(dtype)
    s = 0.75
    v, dB = L.dyb_backward(dy, B, u, s, with_dB=with_dB, groups=groups, block_n=16, block_m=block_m,
                           out_v=poisoned(SMALL["N"], r, dtype=dtype),
                           out_dB=poisoned(SMALL["O"], r, dtype=B.dtype))
    assert_2x("v = dy B", v, dy @ B, f64(dy) @ f64(B))
    if with_dB:
        assert_2x("dB = s dy^T u", dB, s * (dy.T @ u), s * f64(dy).T @ f64(u))
    else:
        assert dB is None


@interp_only
@pytest.mark.parametrize("dtype", DTYPES_INTERP)
@pytest.mark.parametrize("r", (1, 3, 16))
@pytest.mark.parametrize("dropout", (False, True))
@pytest.mark.parametrize("splits", (1, 3))
def test_interp_vx_kernel(dtype, r, dropout, splits):
    x, W, b, A, B, m, dy = operands(**SMALL, r=r, dtype=dtype, dropout=dropout, seed=20 + r)
    v = (dy @ B).to(dtype)
    s = 1.5
    dA = L.vx_backward(v, x, s, m, out_dtype=torch.float32, splits=splits, block_k=32,
                       out=poisoned(r, SMALL["I"], dtype=torch.float32))
    xl = x if m is None else x * m
    assert_2x("dA = s v^T x_l", dA, s * (v.T @ xl), s * f64(v).T @ (f64(x) * (f64(m) if dropout else 1)))


@interp_only
@pytest.mark.parametrize("dtype", DTYPES_INTERP)
@pytest.mark.parametrize("r", (1, 3, 16))
@pytest.mark.parametrize("has_base", (True, False))
@pytest.mark.parametrize("dropout", (False, True))
def test_interp_lora_gemm_kernel(dtype, r, has_base, dropout):
    """out [N, I] = dy [N, O] @ W [O, I] + s (p [N, r] @ A [r, I]) * m + bias: the dx pass's shape."""
    N, I, O = SMALL["N"], SMALL["I"], SMALL["O"]
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype=dtype, dropout=dropout, seed=30 + r)
    g = torch.Generator().manual_seed(r)
    p = (torch.randn(N, r, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(I, generator=g)).to(dtype) if r != 3 else None
    s = 2.0
    out = L.lora_gemm(dy if has_base else None, W if has_base else None, p, A, s, mask=m, bias=bias,
                      out=poisoned(N, I, dtype=dtype), config=TINY_GEMM)
    one = 1 if m is None else m
    ref64 = s * (f64(p) @ f64(A)) * (1 if m is None else f64(m))
    plain = (s * (p @ A.to(dtype))) * one
    if has_base:
        ref64, plain = ref64 + f64(dy) @ f64(W), plain + dy @ W
    if bias is not None:
        ref64, plain = ref64 + f64(bias), plain + bias
    assert_2x(f"lora_gemm(base={has_base}, mask={dropout}, bias={bias is not None})", out, plain, ref64)


@interp_only
@pytest.mark.parametrize("r", (1, 3, 8, 16))
@pytest.mark.parametrize("layout", ("forward", "backward"))
@pytest.mark.parametrize("adapters", (torch.float16, torch.float32))
def test_interp_lora_gemm_tma(r, layout, adapters):
    """The TMA kernel (fp16; fp32 is not its dtype) in both layouts the op uses: y = x W^T + s u B^T + b
    (weight and B read transposed) and dx = dy W + s v A (read as they are), ranks whose rows are not
    16-byte aligned (1, 3: copied into padded form) and ones that are (8: the descriptor's zero fill
    pads the rank block), fp16 or fp32 adapters, a bias."""
    dtype = torch.float16
    N, I, O = SMALL["N"], SMALL["I"], SMALL["O"]
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype=dtype, adapter_dtype=adapters, bias=True, seed=50 + r)
    g = torch.Generator().manual_seed(r)
    p = (torch.randn(N, r, generator=g) * 0.5).to(dtype)
    s = 2.0
    if layout == "forward":
        a, wt, q, bias, n_out = x, W.T, B.T, b, O
        ref64 = f64(x) @ f64(W).T + s * f64(p) @ f64(B).T + f64(b)
        plain = x @ W.T + s * (p @ B.to(dtype).T) + b
    else:
        a, wt, q, bias, n_out = dy, W, A, None, I
        ref64 = f64(dy) @ f64(W) + s * f64(p) @ f64(A)
        plain = dy @ W + s * (p @ A.to(dtype))
    out = poisoned(N, n_out, dtype=dtype)
    assert L.tma_gemm_blocker(a, wt, p, q, None, out) is None
    out = L.lora_gemm(a, wt, p, q, s, bias=bias, out=out, config=TINY_GEMM, tma=True)
    assert_2x(f"TMA lora_gemm ({layout}, r={r}, adapters {adapters})", out, plain, ref64)


@interp_only
def test_interp_lora_gemm_tma_relayout_rank16():
    """Rank operands the launcher must copy at a rank whose block needs no padding (r = 16): p read
    column-major and an A that starts 2 bytes into its buffer (a view into a flat parameter buffer)."""
    N, I, O, r = SMALL["N"], SMALL["I"], SMALL["O"], 16
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype=torch.float16, seed=70)
    v = (dy @ B).to(torch.float16).T.contiguous().T          # [N, r], column-major
    flat = torch.zeros(1 + r * I, dtype=torch.float16)
    A_view = flat[1:].view(r, I)
    A_view.copy_(A)
    assert A_view.data_ptr() % 16 != 0 and v.stride(1) != 1
    dx = L.lora_gemm(dy, W, v, A_view, 2.0, out=poisoned(N, I, dtype=torch.float16), config=TINY_GEMM, tma=True)
    assert_2x("TMA dx, relaid-out rank operands", dx, dy @ W + 2.0 * (v @ A), f64(dy) @ f64(W) + 2.0 * f64(v) @ f64(A))


@interp_only
@pytest.mark.parametrize("shape", ((0, 40), (37, 0)))
def test_interp_dyb_kernel_empty(shape):
    """No rows or no columns of dy: v and dB are zero sums (no launch, no division by an empty grid)."""
    r = 3
    dy = torch.randn(*shape, dtype=torch.float16)
    B = torch.randn(shape[1], r, dtype=torch.float32)
    u = torch.randn(shape[0], r, dtype=torch.float16)
    v, dB = L.dyb_backward(dy, B, u, 0.5, out_v=poisoned(shape[0], r, dtype=torch.float16),
                           out_dB=poisoned(shape[1], r, dtype=torch.float32))
    assert v.shape == (shape[0], r) and dB.shape == (shape[1], r)
    assert (v == 0).all() and (dB == 0).all()


@interp_only
@pytest.mark.parametrize("two", (False, True))
def test_interp_reduce_splits(two):
    """The partial-sum launch: one problem, or two in one launch (several 1024-element blocks each, the
    second's blocks offset by the first's), each summed in float32, scaled and cast once."""
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(3, 2500, generator=g)
    p1 = torch.randn(5, 1100, generator=g)
    o0 = poisoned(2500, dtype=torch.float16)
    o1 = poisoned(1100, dtype=torch.float32)
    L._reduce_splits((p0, o0, 0.5), *([(p1, o1, 2.0)] if two else []))
    # the kernel's float32 sums in split order, scaled, cast once: the same bits
    torch.testing.assert_close(o0, (0.5 * ((p0[0] + p0[1]) + p0[2])).half(), rtol=0, atol=0)
    if two:
        torch.testing.assert_close(o1, 2.0 * ((((p1[0] + p1[1]) + p1[2]) + p1[3]) + p1[4]), rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="one or two partial-sum problems"):
            L._reduce_splits((p0, o0, 0.5), (p1, o1, 2.0), (p0, o0, 1.0))


@interp_only
def test_interp_lora_gemm_tma_blockers():
    """What keeps lora_gemm off its TMA kernel is named, and tma=True raises with that reason."""
    N, I, O, r = SMALL["N"], SMALL["I"], SMALL["O"], 3
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype=torch.float16, dropout=True, seed=60)
    v = (dy @ B).to(torch.float16)
    out = poisoned(N, I, dtype=torch.float16)
    assert "dropout mask" in L.tma_gemm_blocker(dy, W, v, A, m, out)
    assert "rank-r-only" in L.tma_gemm_blocker(None, None, v, A, None, out)
    x32, W32 = dy.float(), W.float()
    assert "fp16 / bf16" in L.tma_gemm_blocker(x32, W32, v.float(), A.float(), None, out.float())
    odd = torch.randn(N, 2 * I + 1, dtype=torch.float16)[:, 1:I + 1]   # rows 2-byte aligned only
    wsq = torch.randn(I, I, dtype=torch.float16)
    assert "x (shape" in L.tma_gemm_blocker(odd, wsq, v, A, None, out)
    w_odd = torch.randn(O, 2 * I + 1, dtype=torch.float16)[:, 1:I + 1]   # [out, in], rows 2-byte aligned
    assert "the weight" in L.tma_gemm_blocker(dy, w_odd, v, A, None, out)
    expanded = torch.randn(1, O, dtype=torch.float16).expand(N, O)     # stride 0 between rows
    assert "x (shape" in L.tma_gemm_blocker(expanded, W, v, A, None, out)
    with pytest.raises(ValueError, match="dropout mask"):
        L.lora_gemm(dy, W, v, A, 2.0, mask=m, out=out, config=TINY_GEMM, tma=True)
    # None: the pointer kernel runs for the masked product and writes the same result as forced False
    a = L.lora_gemm(dy, W, v, A, 2.0, mask=m, out=poisoned(N, I, dtype=torch.float16), config=TINY_GEMM)
    b_ = L.lora_gemm(dy, W, v, A, 2.0, mask=m, out=poisoned(N, I, dtype=torch.float16), config=TINY_GEMM,
                     tma=False)
    assert torch.equal(a, b_)


@interp_only
@pytest.mark.parametrize("dtype", DTYPES_INTERP)
@pytest.mark.parametrize("r", (1, 3, 16))
@pytest.mark.parametrize("impl", ("cublas", "triton"))
@pytest.mark.parametrize("dropout", (True, False))
def test_interp_op_paths(dtype, r, impl, dropout, monkeypatch):
    """The whole op through functional.lora_linear (leading dims, non-contiguous x, bias, dropout
    or none: the triton implementation's thin products differ, fp32 adapters), forced to a kernel
    implementation by BALORA_KERNELS_IMPL."""
    monkeypatch.setenv("BALORA_KERNELS_IMPL", {"cublas": "cuda", "triton": "triton"}[impl])
    N, I, O = SMALL["N"], SMALL["I"], SMALL["O"]
    p = 0.25 if dropout else 0.0
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype=dtype, adapter_dtype=torch.float32, bias=True,
                                    seed=40 + r)
    assert functional._lora_linear_impl("forward", N, I, O, r, dtype, x.device) == impl
    xg = x.T.contiguous().T.unsqueeze(0).requires_grad_(True)     # [1, 37, 72], column-major
    assert not xg.reshape(N, I).is_contiguous()
    Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    torch.manual_seed(7)
    y = bk.lora_linear(xg, W, b, Ag, Bg, 0.5, dropout_p=p)
    torch.manual_seed(7)
    mask = torch.empty_like(xg.detach().reshape(N, I)).bernoulli_(1 - p) if dropout else None   # 0/1
    y.backward(dy.reshape(1, N, O))
    (y64, g64), (yp, gp) = references(x, W, b, A, B, mask, dy, 0.5 / (1 - p))   # 1/(1-p) in the scaling
    assert_2x("y", y.reshape(N, O), yp, y64)
    for name, got in (("x", xg.grad.reshape(N, I)), ("lora_A", Ag.grad), ("lora_B", Bg.grad)):
        assert got.dtype == getattr(gp, name).dtype
        assert_2x(f"d{name}", got, getattr(gp, name), getattr(g64, name))


@interp_only
@pytest.mark.parametrize("dtype", DTYPES_INTERP)
@pytest.mark.parametrize("dropout", (True, False))
def test_interp_triton_ext(dtype, dropout, monkeypatch):
    """triton_ext end to end through the op: the Triton forward (interpreted) and the C++ backward (the CPU build
    of csrc/lora_linear.cpp, reading the saved u), bias, fp32 adapters, dropout or none; the 2x-PyTorch-error
    rule on y and every gradient."""
    cpu_lora_op()
    monkeypatch.setattr(functional, "_ext_available", lambda: True)
    functional._PLANS.clear()
    N, I, O, r = SMALL["N"], SMALL["I"], SMALL["O"], 3
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype=dtype, adapter_dtype=torch.float32, bias=True,
                                    dropout=dropout, seed=47)
    xg = x.reshape(1, N, I).clone().requires_grad_(True)
    Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = L.lora_linear(xg.reshape(N, I), W, b, Ag, Bg, 0.5, m, impl="triton_ext")
    assert y.grad_fn.name().endswith("LoRALinearFunctionBackward")
    y.backward(dy)
    functional._PLANS.clear()
    (y64, g64), (yp, gp) = references(x, W, b, A, B, m, dy, 0.5)
    assert_2x("y", y, yp, y64)
    for name, got in (("x", xg.grad.reshape(N, I)), ("lora_A", Ag.grad), ("lora_B", Bg.grad)):
        assert got.dtype == getattr(gp, name).dtype
        assert_2x(f"d{name}", got, getattr(gp, name), getattr(g64, name))


@pytest.mark.skipif(L.triton is None, reason="Triton not installed")
def test_dyb_fits_32bit_offsets():
    """The fused v / dB pass is refused where its partial sums need 64-bit offsets (the backward then
    takes cuBLAS): 8192 x 4096 at r = 16 fits; 135 k tokens of a 128256-wide output at r = 32 does not."""
    assert L.dyb_fits(8192, 4096, 16, groups=132)
    assert L.dyb_fits(8192, 128256, 16, groups=132)
    assert not L.dyb_fits(135_000, 128256, 32, groups=132)


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("dropout", (False, True))
def test_cublas_mm_path_cpu(dtype, dropout):
    """The all-cuBLAS implementation's order of operations (runs on CPU matmuls too)."""
    N, I, O, r = SMALL["N"], SMALL["I"], SMALL["O"], 3
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype=dtype, adapter_dtype=torch.float32, bias=True,
                                    dropout=dropout, seed=50)
    xg, Ag, Bg = (t.clone().requires_grad_(True) for t in (x, A, B))
    y = L.lora_linear(xg, W, b, Ag, Bg, 0.5, m, impl="cublas_mm")
    y.backward(dy)
    (y64, g64), (yp, gp) = references(x, W, b, A, B, m, dy, 0.5)
    assert_2x("y", y, yp, y64)
    for name, got in (("x", xg.grad), ("lora_A", Ag.grad), ("lora_B", Bg.grad)):
        assert got.dtype == getattr(gp, name).dtype
        assert_2x(f"d{name}", got, getattr(gp, name), getattr(g64, name))


# --------------------------------------------------------------------------------------------
# CPU op tests (reference math inside the op)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
@pytest.mark.parametrize("path", ("custom_op", "function"))
def test_op_gradcheck_float64_cpu(path):
    x, W, b, A, B, m, dy = operands(5, 7, 6, 3, torch.float64, bias=True, dropout=True, seed=3)
    ins = [t.clone().requires_grad_(True) for t in (x, W, b, A, B)]

    def f(x, W, b, A, B):
        if path == "custom_op":
            return L.lora_linear_fwd_op(x, W, b, A, B, 0.7, m, "auto")[0]
        return L.LoRALinearFunction.apply(x, W, b, A, B, 0.7, m, "auto")

    assert torch.autograd.gradcheck(f, ins)


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
@pytest.mark.parametrize("path", ("custom_op", "function", "public"))
@pytest.mark.parametrize("impl", ("auto", "torch", "cublas_mm"))
def test_op_double_backward_float64_cpu(path, impl):
    """Second derivatives (create_graph): the backward must be differentiable in every operand, dB's dependence
    on x and A included (the saved u is a constant to autograd: recomputed under create_graph)."""
    if path == "public" and impl != "auto":
        pytest.skip("the public entry point takes the dispatcher's choice")
    x, W, b, A, B, m, dy = operands(5, 7, 6, 3, torch.float64, bias=True, dropout=path != "public", seed=4)
    ins = [t.clone().requires_grad_(True) for t in (x, W, b, A, B)]

    def f(x, W, b, A, B):
        if path == "custom_op":
            return L.lora_linear_fwd_op(x, W, b, A, B, 0.7, m, impl)[0]
        if path == "function":
            return L.LoRALinearFunction.apply(x, W, b, A, B, 0.7, m, impl)
        return bk.lora_linear(x, W, b, A, B, 0.7)

    firsts = torch.autograd.grad(f(*ins), ins, dy, create_graph=True)   # (gradgradcheck skips constants)
    assert all(g.requires_grad for i, g in enumerate(firsts) if i != 2), [g.grad_fn for g in firsts]   # db: sum dy
    assert torch.autograd.gradgradcheck(f, ins)


@interp_only
@pytest.mark.parametrize("impl", ("cublas", "triton"))
def test_interp_double_backward(impl):
    """The kernel implementations under create_graph: their backward runs the reference's differentiable
    products (the kernels' outputs would be constants to autograd: silently wrong second derivatives)."""
    x, W, b, A, B, m, dy = operands(5, 7, 6, 3, torch.float64, bias=True, dropout=True, seed=6)
    ins = [t.clone().requires_grad_(True) for t in (x, W, b, A, B)]

    def f(x, W, b, A, B):
        return L.lora_linear(x, W, b, A, B, 0.7, m, impl=impl)

    # gradgradcheck passes over first derivatives without a graph (constants): each must have one (but db = sum dy)
    firsts = torch.autograd.grad(f(*ins), ins, dy, create_graph=True)
    assert all(g.requires_grad for i, g in enumerate(firsts) if i != 2), [g.grad_fn for g in firsts]
    assert torch.autograd.gradgradcheck(f, ins)


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = bk.BaLoRALinear(24, 20, 4, bias=True, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y_eager = layer(x)
    y_eager.square().sum().backward()
    grads_eager = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, ge in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), grads_eager):
        torch.testing.assert_close(g, ge)


@pytest.fixture
def no_ext(monkeypatch):
    """The dispatcher sees no compiled extension (so these choices are the same on a GPU machine,
    where it loads; tests/test_lora_linear_ext.py covers the choices with it)."""
    monkeypatch.setattr(functional, "_ext_available", lambda: False)
    functional._PLANS.clear()
    yield
    functional._PLANS.clear()


def _two_shape_table():
    """A tuning table with per-direction times at two shapes (8k: triton forward, cublas backward;
    1k: cublas_mm both ways)."""
    return {"entries": [
        {"dtype": "bfloat16", "N": 8192, "in": 4096, "out": 4096, "r": 16,
         "forward_ms": {"cublas": 1.0, "triton": 0.9}, "backward_ms": {"cublas": 1.0, "triton": 1.1},
         "triton_config": {"forward": 2, "backward": 1}},
        {"dtype": "bfloat16", "N": 1024, "in": 4096, "out": 4096, "r": 16,
         "forward_ms": {"cublas_mm": 0.1, "cublas": 0.2}, "backward_ms": {"cublas_mm": 0.1, "torch": 0.3}}]}


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
def test_dispatcher_choice(monkeypatch, tmp_path, no_ext):
    cpu = torch.device("cpu")
    cuda = torch.device("cuda")
    assert functional._lora_linear_impl("forward", 64, 32, 32, 4, torch.float32, cpu) == "torch"
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "triton")
    assert functional._lora_linear_impl("backward", 64, 32, 32, 4, torch.bfloat16, cuda) == "triton"
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "torch")
    assert functional._lora_linear_impl("forward", 64, 32, 32, 4, torch.bfloat16, cuda) == "torch"
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "bogus")
    with pytest.raises(ValueError, match="BALORA_KERNELS_IMPL"):
        functional._lora_linear_impl("forward", 64, 32, 32, 4, torch.bfloat16, cuda)
    monkeypatch.delenv("BALORA_KERNELS_IMPL")
    # The measured table decides per shape and direction (nearest measured shape).
    table = _two_shape_table()
    monkeypatch.setattr(L, "_TUNING", table)
    if L.triton is not None:
        assert functional._lora_linear_impl("forward", 8000, 4096, 4096, 16, torch.bfloat16, cuda) == "triton"
        assert functional._lora_linear_impl("backward", 8000, 4096, 4096, 16, torch.float16, cuda) == "cublas"
        assert functional._lora_linear_impl("forward", 900, 4096, 4096, 8, torch.bfloat16, cuda) == "cublas_mm"
        assert L.measured_choice("forward", 8192, 4096, 4096, 16, torch.bfloat16)[1] == 2
        assert functional._lora_linear_impl("forward", 900, 4096, 4096, 8, torch.float32, cuda) == "cublas_mm"
    # With full-step times, one implementation for both directions (the fastest full step). The
    # table is replaced, not edited in place: the dispatcher's cache is keyed on the table object.
    table = copy.deepcopy(table)
    table["entries"][0]["full_ms"] = {"cublas": 3.0, "triton": 2.5}
    L.use_tuning_table(table)
    if L.triton is not None:
        assert functional._lora_linear_impl("backward", 8000, 4096, 4096, 16, torch.bfloat16, cuda) == "triton"
    with pytest.raises(ValueError, match="unknown implementation"):
        functional._lora_linear_plan(4, 4, 4, 1, torch.float32, cpu, "nope")


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
@pytest.mark.skipif(L.triton is None, reason="the measured choice needs Triton")
def test_dispatcher_never_picks_slower_than_torch_math(monkeypatch, no_ext):
    """An implementation whose full step was measured slower than the plain PyTorch math is not
    chosen, even when its forward and backward are the fastest."""
    cuda = torch.device("cuda")
    monkeypatch.delenv("BALORA_KERNELS_IMPL", raising=False)
    entry = {"dtype": "bfloat16", "N": 1024, "in": 4096, "out": 4096, "r": 16,
             "forward_ms": {"torch": 0.30, "cublas_mm": 0.10, "triton": 0.05},
             "backward_ms": {"torch": 0.30, "cublas_mm": 0.30, "triton": 0.05},
             "full_ms": {"torch": 0.50, "cublas_mm": 0.45, "triton": 0.55}}
    monkeypatch.setattr(L, "_TUNING", {"entries": [entry]})
    assert functional._lora_linear_impl("forward", 1024, 4096, 4096, 16, torch.bfloat16, cuda) == "cublas_mm"
    assert functional._lora_linear_impl("backward", 1024, 4096, 4096, 16, torch.bfloat16, cuda) == "cublas_mm"
    entry = dict(entry, full_ms={"torch": 0.40, "cublas_mm": 0.45, "triton": 0.55})
    monkeypatch.setattr(L, "_TUNING", {"entries": [entry]})
    assert functional._lora_linear_impl("forward", 1024, 4096, 4096, 16, torch.bfloat16, cuda) == "torch"


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
@pytest.mark.skipif(L.triton is None, reason="the measured choice needs Triton")
def test_dispatcher_full_step_for_training_forward_for_inference(monkeypatch, no_ext):
    """With full-step measurements a call that records a backward takes the fastest full step, among the
    implementations no slower than the plain math in any timing (a backward timed alone slower than the
    plain math's rules one out, however fast its full step), and a call that does not the fastest forward."""
    cuda = torch.device("cuda")
    monkeypatch.delenv("BALORA_KERNELS_IMPL", raising=False)
    entry = {"dtype": "bfloat16", "N": 8192, "in": 4096, "out": 4096, "r": 16,
             "forward_ms": {"torch": 0.50, "cublas_mm": 0.44, "cublas": 0.43, "triton": 0.40},
             "backward_ms": {"torch": 0.55, "cublas_mm": 0.50, "cublas": 0.54, "triton": 0.56},
             "full_ms": {"torch": 1.05, "cublas_mm": 0.93, "cublas": 0.86, "triton": 0.80}}
    L.use_tuning_table({"entries": [entry]})
    try:
        plan = functional._lora_linear_plan
        # triton's backward alone (0.56) is slower than the plain math's (0.55): out where a backward follows
        assert plan(8192, 4096, 4096, 16, torch.bfloat16, cuda) == (("cublas", 0), ("cublas", 0))
        assert plan(8192, 4096, 4096, 16, torch.bfloat16, cuda, "auto", False) == (("triton", 0), ("triton", 0))
        entry = dict(entry, backward_ms=dict(entry["backward_ms"], triton=0.52))
        L.use_tuning_table({"entries": [entry]})
        assert plan(8192, 4096, 4096, 16, torch.bfloat16, cuda) == (("triton", 0), ("triton", 0))
        entry = dict(entry, full_ms=dict(entry["full_ms"], triton=0.90))
        L.use_tuning_table({"entries": [entry]})
        assert plan(8192, 4096, 4096, 16, torch.bfloat16, cuda, "auto", True)[0][0] == "cublas"    # full 0.86
        assert plan(8192, 4096, 4096, 16, torch.bfloat16, cuda, "auto", False)[0][0] == "triton"   # forward 0.40
    finally:
        functional._PLANS.clear()
        L.reload_tuning_table()


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
def test_op_tells_the_dispatcher_whether_a_backward_is_recorded(monkeypatch):
    """lora_linear asks for the plan of a call that records a backward exactly when grad mode is on and an
    operand requires grad."""
    seen = []
    real = L._plan

    def spy(impl, x, weight, lora_A, with_backward=True):
        seen.append(with_backward)
        return real(impl, x, weight, lora_A, with_backward)

    monkeypatch.setattr(L, "_plan", spy)
    x, W, b, A, B, m, dy = operands(6, 5, 4, 2, torch.float32, bias=True, seed=4)
    L.lora_linear(x, W, b, A, B, 0.5)                                   # nothing requires grad
    L.lora_linear(x, W, b, A.requires_grad_(True), B, 0.5)              # an adapter does
    with torch.no_grad():
        L.lora_linear(x, W, b, A, B, 0.5)                               # grad mode off
    L.lora_linear(x, W, b.requires_grad_(True), A.detach(), B, 0.5)     # only the bias does
    assert seen == [False, True, False, True]


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
@pytest.mark.skipif(L.triton is None, reason="the measured choice needs Triton")
def test_dispatcher_cache_is_never_stale(monkeypatch, no_ext):
    """Cached choices follow the env override, the shape, the dtype, the device and the table."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("BALORA_KERNELS_IMPL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    table = _two_shape_table()
    monkeypatch.setattr(L, "_TUNING", table)
    impl = functional._lora_linear_impl
    shape = (8192, 4096, 4096, 16)
    assert impl("forward", *shape, torch.bfloat16, cuda) == "triton"            # cached now
    assert functional._lora_linear_plan(*shape, torch.bfloat16, cuda) == (("triton", 2), ("cublas", 0))
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "torch")                           # override changes
    assert impl("forward", *shape, torch.bfloat16, cuda) == "torch"
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "cuda")
    assert impl("forward", *shape, torch.bfloat16, cuda) == "cublas"
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "bogus")                           # errors are not cached
    for _ in range(2):
        with pytest.raises(ValueError, match="BALORA_KERNELS_IMPL"):
            impl("forward", *shape, torch.bfloat16, cuda)
    monkeypatch.delenv("BALORA_KERNELS_IMPL")
    assert impl("forward", *shape, torch.bfloat16, cuda) == "triton"             # back to the table
    assert impl("forward", 1000, 4096, 4096, 16, torch.bfloat16, cuda) == "cublas_mm"   # another shape
    assert impl("forward", *shape, torch.float32, cuda) == "cublas_mm"          # another dtype
    assert impl("forward", *shape, torch.bfloat16, cpu) == "torch"              # another device
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "triton")
    assert impl("forward", *shape, torch.bfloat16, cpu) == "triton"             # interpreter forced
    monkeypatch.delenv("TRITON_INTERPRET")
    assert impl("forward", *shape, torch.bfloat16, cpu) == "torch"
    monkeypatch.delenv("BALORA_KERNELS_IMPL")
    # A new table (same shapes) replaces every cached choice.
    table2 = copy.deepcopy(table)
    table2["entries"][0]["forward_ms"] = {"cublas": 0.5, "triton": 0.9}
    L.use_tuning_table(table2)
    assert impl("forward", *shape, torch.bfloat16, cuda) == "cublas"
    # A forced implementation through the op's plan: the measured GEMM config of the new table.
    assert functional._lora_linear_plan(*shape, torch.bfloat16, cuda, "triton") == (("triton", 2), ("triton", 1))


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
def test_bench_tuning_entry_keeps_one_config_per_gemm_implementation():
    """bench/bench_lora_linear.py's tuning entry: a Triton-GEMM implementation's times and config are those of its
    config with the fastest full step (the dispatcher uses that config both ways, as it was timed); a failed forced
    run is left out."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_lora_linear as bench

    def t(f, b, full, host):
        return {"forward": f, "backward": b, "full": full, "host_forward": host / 4, "host_full": host}

    res = {"shape": {"N": 64, "in_features": 32, "out_features": 48, "r": 4},
           "providers": {"ours:triton@0": t(0.1, 0.5, 0.7, 0.8), "ours:triton@1": t(0.2, 0.3, 0.6, 0.84),
                         "ours:triton_ext@0": {"error": "x"}, "ours:triton_ext@2": t(0.3, 0.3, 0.65, 0.4),
                         "ours:ext_prefill": t(0.25, 0.35, 0.62, 0.2), "ours:torch": t(0.4, 0.4, 0.9, 0.12)}}
    e = bench.tuning_entry(res)
    assert e["gemm_config"] == {"triton": {"forward": 1, "backward": 1}, "triton_ext": {"forward": 2, "backward": 2}}
    assert e["full_ms"] == {"triton": 0.6, "triton_ext": 0.65, "ext_prefill": 0.62, "torch": 0.9}
    assert e["forward_ms"]["triton"] == 0.2 and e["backward_ms"]["triton_ext"] == 0.3
    assert e["host_full_ms"] == {"triton": 0.84, "triton_ext": 0.4, "ext_prefill": 0.2, "torch": 0.12}
    assert e["host_forward_ms"] == {"triton": 0.21, "triton_ext": 0.1, "ext_prefill": 0.05, "torch": 0.03}
    assert (e["N"], e["in"], e["out"], e["r"]) == (64, 32, 48, 4)


@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
def test_backward_uses_the_forward_calls_choice(monkeypatch, no_ext):
    """The eager Function decides both directions once, in forward: an override changed between
    forward and backward does not mix implementations within one call (and costs no lookup)."""
    x, W, b, A, B, m, dy = operands(6, 5, 4, 2, torch.float32, bias=True, seed=4)
    calls = []
    real = L.lora_linear_backward

    def spy(impl, *a, **k):
        calls.append(impl)
        return real(impl, *a, **k)

    monkeypatch.setattr(L, "lora_linear_backward", spy)
    monkeypatch.delenv("BALORA_KERNELS_IMPL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    xg = x.clone().requires_grad_(True)
    y = L.lora_linear(xg, W, b, A, B, 0.5, None)           # 'auto' on CPU: the torch math
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "cuda")      # would be 'cublas' if chosen again
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert functional._lora_linear_impl("backward", 6, 5, 4, 2, torch.float32, x.device) == "cublas"
    y.backward(dy)
    assert calls == ["torch"]
    (_, g64), _ = references(x, W, b, A, B, None, dy, 0.5)
    torch.testing.assert_close(xg.grad.double(), g64.x, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
GPU_IMPLS = ("cublas", "triton", "cublas_mm", "ext", "ext_prefill", "ext_thin", "ext_allthin", "triton_ext",
             "ext_triton", "ext_triton_thin")
# (N, in, out, r, dtype, adapter dtype, bias, dropout, lead dims)
GPU_CASES = {
    "8192x4096->11008_r16_bf16": (8192, 4096, 11008, 16, torch.bfloat16, None, False, False, 1),
    "8192x11008->4096_r64_fp16_fp32adapters": (8192, 11008, 4096, 64, torch.float16, torch.float32, False, False, 1),
    "2053x4096->4096_r128_bf16_bias_dropout": (2053, 4096, 4096, 128, torch.bfloat16, None, True, True, 1),
    "3x333x1000->3000_r1_fp32": (999, 1000, 3000, 1, torch.float32, None, True, False, 3),
    "777x520->1030_r8_fp16_bias": (777, 520, 1030, 8, torch.float16, torch.float32, True, True, 1),
    "1024x4096->4096_r16_bf16": (1024, 4096, 4096, 16, torch.bfloat16, None, False, False, 1),
    "37x72->40_r3_fp16_bias_dropout": (37, 72, 40, 3, torch.float16, None, True, True, 1),
    "2x50x130->70_r127_bf16_fp32adapters": (100, 130, 70, 127, torch.bfloat16, torch.float32, False, True, 2),
}
_REF_CACHE = {}
needs_tma = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                               reason="TMA descriptors need compute capability >= 9")


# The caching allocator keeps freed blocks for reuse, each with what it last held. Poisoning fills every free
# block of every segment it holds with 0xFF bytes (NaN in float32, float16, bfloat16 and float64 alike: a float32
# NaN fill would read as bfloat16 zeros in every other element), after reserving room in both of its pools
# (requests up to 1 MiB come from a small pool of 2 MiB segments, larger ones from a large pool), so that every
# output the op allocates starts as NaN.
SMALL_POOL_BLOCK = 2**20
SMALL_POOL_BLOCKS = 64


class _DeviceBytes:
    """``n`` bytes at a device address, for ``torch.as_tensor`` (the CUDA array interface; nothing is owned)."""

    def __init__(self, ptr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (ptr, False), "strides": None,
                                        "version": 3}


def _poison_allocator(nbytes: int):
    """Every free block of the caching allocator filled with 0xFF (NaN), after freeing one block of ``nbytes`` in its
    large pool and 64 MiB in 1 MiB blocks in its small pool; then checked: a fresh small and a fresh large
    ``torch.empty`` must read NaN as float32 and as bfloat16 (else the poisoning would prove nothing: the test
    fails)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    junk = [torch.empty(nbytes, dtype=torch.uint8, device="cuda")]
    junk += [torch.empty(SMALL_POOL_BLOCK, dtype=torch.uint8, device="cuda") for _ in range(SMALL_POOL_BLOCKS)]
    del junk
    dev = torch.cuda.current_device()
    for seg in torch.cuda.memory_snapshot():
        if seg["device"] != dev:
            continue
        for blk in seg["blocks"]:
            if blk["state"] == "inactive":
                torch.as_tensor(_DeviceBytes(blk["address"], blk["size"]), device="cuda").fill_(0xFF)
    torch.cuda.synchronize()
    for n in (1000, 3 * SMALL_POOL_BLOCK // 4):
        probe = torch.empty(n, device="cuda")
        assert probe.isnan().all() and probe.view(torch.bfloat16).isnan().all(), (
            f"poisoning: a fresh {4 * n}-byte block is not NaN")
        del probe


@pytest.fixture
def no_tf32():
    """float32 matmuls in full precision for the test (torch's flag restored after it)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@gpu
@needs_cuda
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_op_matches_reference(case, impl, no_tf32):
    N, I, O, r, dt, adt, bias, dropout, lead = GPU_CASES[case]
    if case not in _REF_CACHE:
        _REF_CACHE.clear()
        ops = operands(N, I, O, r, dt, "cuda", adt, bias, dropout, seed=N + r)
        _REF_CACHE[case] = (ops, references(*ops, 2.0))
    (x, W, b, A, B, m, dy), ((y64, g64), (yp, gp)) = _REF_CACHE[case]
    xs = x.reshape(lead, N // lead, I) if lead > 1 else x
    xg = xs.detach().clone().requires_grad_(True)
    Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    _poison_allocator(4 * (N * (I + O) * 4 + 2**20))
    y = L.lora_linear(xg.reshape(N, I), W, b, Ag, Bg, 2.0, m, impl=impl)
    y.backward(dy)
    torch.cuda.synchronize()
    assert_2x(f"{case} {impl}: y", y, yp, y64)
    assert_2x(f"{case} {impl}: dx", xg.grad.reshape(N, I), gp.x, g64.x)
    assert_2x(f"{case} {impl}: dA", Ag.grad, gp.lora_A, g64.lora_A)
    assert_2x(f"{case} {impl}: dB", Bg.grad, gp.lora_B, g64.lora_B)
    assert Ag.grad.dtype == A.dtype and Bg.grad.dtype == B.dtype


CROSS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CROSS_RANKS = (1, 8, 16, 64, 128)
_CROSS_REF = {}


def _strided_copy(t: torch.Tensor, pad: int) -> torch.Tensor:
    """``t``'s values in a column slice of a wider buffer (row stride ``width + 2 pad``, first column ``pad``)."""
    wide = torch.randn(t.shape[0], t.shape[1] + 2 * pad, device=t.device, dtype=t.dtype)
    wide[:, pad:pad + t.shape[1]] = t
    return wide[:, pad:pad + t.shape[1]]


def _assert_every_grad_2x(what, grads: dict, plain, ref64):
    """Each of ``grads`` ({name: gradient}, names as in ``reference.LoraLinearGrads``) present and within 2x plain
    PyTorch's error of float64."""
    for name, got in grads.items():
        assert got is not None, f"{what}: no gradient for {name}"
        assert_2x(f"{what}: d{name}", got, getattr(plain, name), getattr(ref64, name))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", CROSS_DTYPES, ids=("bf16", "fp16", "fp32"))
@pytest.mark.parametrize("r", CROSS_RANKS)
@pytest.mark.parametrize("impl", ("auto",) + GPU_IMPLS)
def test_gpu_every_gradient_each_dtype_and_rank(dtype, r, impl, no_tf32):
    """Each dtype with each rank the issue names, on every implementation: y and all five gradients (dW and db
    too: the frozen weight and bias made trainable) against float64 by the 2x-PyTorch-error rule, outputs
    poisoned; x and dy non-contiguous (column slices of wider buffers, 16 elements in), 1531 x 1000 -> 1030
    (no tile divides them), bias; float32 adapters at r = 16 and 128, dropout at r = 8 and 128."""
    N, I, O = 1531, 1000, 1030
    adt = torch.float32 if r in (16, 128) and dtype != torch.float32 else None
    dropout = r in (8, 128)
    key = (dtype, r)
    if key not in _CROSS_REF:
        _CROSS_REF.clear()
        ops = operands(N, I, O, r, dtype, "cuda", adt, True, dropout, seed=100 + r)
        _CROSS_REF[key] = (ops, references(*ops, 2.0, need_w=True))
    (x, W, b, A, B, m, dy), ((y64, g64), (yp, gp)) = _CROSS_REF[key]
    xs, dys = _strided_copy(x, 16), _strided_copy(dy, 16)
    assert not xs.is_contiguous() and not dys.is_contiguous()
    xg = xs.detach().requires_grad_(True)
    Wg, bg, Ag, Bg = (t.clone().requires_grad_(True) for t in (W, b, A, B))
    _poison_allocator(4 * (N * (I + O) * 4 + 2**20))
    y = L.lora_linear(xg, Wg, bg, Ag, Bg, 2.0, m, impl=impl)
    y.backward(dys)
    torch.cuda.synchronize()
    what = f"{impl} {dtype} r={r}"
    assert_2x(f"{what}: y", y, yp, y64)
    _assert_every_grad_2x(what, dict(x=xg.grad, weight=Wg.grad, bias=bg.grad, lora_A=Ag.grad, lora_B=Bg.grad), gp, g64)
    assert (Wg.grad.dtype, bg.grad.dtype, Ag.grad.dtype, Bg.grad.dtype) == (W.dtype, b.dtype, A.dtype, B.dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", CROSS_DTYPES, ids=("bf16", "fp16", "fp32"))
@pytest.mark.parametrize("r", CROSS_RANKS)
def test_gpu_largest_shape_every_gradient(dtype, r, no_tf32):
    """The issue's largest shape, 8192 x 4096 -> 11008, on the dispatcher's choice for each dtype and each r: y and
    all five gradients (dW, db included) against float64 by the 2x-PyTorch-error rule, outputs poisoned; bias;
    float32 adapters with fp16, dropout at r = 128."""
    N, I, O = 8192, 4096, 11008
    adt = torch.float32 if dtype == torch.float16 else None
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype, "cuda", adt, True, r == 128, seed=200 + r)
    (y64, g64), (yp, gp) = references(x, W, b, A, B, m, dy, 2.0, need_w=True)
    xg, Wg, bg, Ag, Bg = (t.clone().requires_grad_(True) for t in (x, W, b, A, B))
    _poison_allocator(4 * (N * (I + O) * 4 + 2**20))
    y = L.lora_linear(xg, Wg, bg, Ag, Bg, 2.0, m)
    y.backward(dy)
    torch.cuda.synchronize()
    what = f"auto {dtype} r={r} {N}x{I}->{O}"
    assert_2x(f"{what}: y", y, yp, y64)
    _assert_every_grad_2x(what, dict(x=xg.grad, weight=Wg.grad, bias=bg.grad, lora_A=Ag.grad, lora_B=Bg.grad), gp, g64)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("family", ("auto", "triton", "cuda"))
def test_gpu_autocast_every_gradient(dtype, family, monkeypatch, no_tf32):
    """The public ``lora_linear`` under ``torch.autocast`` on float32 operands (as a mixed-precision training step
    has them), each implementation family (``BALORA_KERNELS_IMPL``): y in the autocast dtype, every gradient in
    its parameter's float32, each within 2x plain PyTorch's error (the reference math on the operands cast as
    F.linear casts them: x, W, b to the autocast dtype, float32 adapters kept) of float64; x 3-D."""
    if family == "auto":
        monkeypatch.delenv("BALORA_KERNELS_IMPL", raising=False)
    else:
        monkeypatch.setenv("BALORA_KERNELS_IMPL", family)
    N, I, O, r = 1531, 1000, 1030, 16
    x, W, b, A, B, _, dy = operands(N, I, O, r, torch.float32, "cuda", None, True, False, seed=77)
    lo = lambda t: t.to(dtype)  # noqa: E731
    (y64, g64), (yp, gp) = references(lo(x), lo(W), lo(b), A, B, None, lo(dy), 2.0, need_w=True)
    xg = x.reshape(1, N, I).clone().requires_grad_(True)
    Wg, bg, Ag, Bg = (t.clone().requires_grad_(True) for t in (W, b, A, B))
    _poison_allocator(4 * (N * (I + O) * 4 + 2**20))
    with torch.autocast("cuda", dtype):
        y = bk.lora_linear(xg, Wg, bg, Ag, Bg, 2.0)
    assert y.dtype == dtype
    y.backward(lo(dy).reshape(1, N, O))
    torch.cuda.synchronize()
    what = f"autocast {dtype} {family}"
    assert_2x(f"{what}: y", y.reshape(N, O), yp, y64)
    grads = dict(x=xg.grad.reshape(N, I), weight=Wg.grad, bias=bg.grad, lora_A=Ag.grad, lora_B=Bg.grad)
    assert all(g.dtype == torch.float32 for g in grads.values()), f"{what}: {[g.dtype for g in grads.values()]}"
    _assert_every_grad_2x(what, grads, gp, g64)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gpu_kernels_poisoned_outputs(dtype):
    """Each kernel on an awkward shape with NaN-filled outputs and forced splits."""
    N, I, O, r = 4099, 1000, 1030, 24
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype, "cuda", torch.float32, True, True, seed=5)
    u = L.xa_forward(x, A, m, splits=3, out=poisoned(N, r, dtype=dtype, device="cuda"))
    xl64 = f64(x) * f64(m)
    assert_2x("u", u, (x * m) @ A.to(dtype).T, xl64 @ f64(A).T)
    v, dB = L.dyb_backward(dy, B, u, 2.0, with_dB=True, out_v=poisoned(N, r, dtype=dtype, device="cuda"),
                           out_dB=poisoned(O, r, dtype=torch.float32, device="cuda"))
    assert_2x("v", v, dy @ B.to(dtype), f64(dy) @ f64(B))
    assert_2x("dB", dB, 2.0 * (dy.T @ u), 2.0 * f64(dy).T @ f64(u))
    dA = L.vx_backward(v, x, 2.0, m, out_dtype=torch.float32,
                       out=poisoned(r, I, dtype=torch.float32, device="cuda"))
    assert_2x("dA", dA, 2.0 * (v.T @ (x * m)), 2.0 * f64(v).T @ xl64)
    for cfg in range(len(L.GEMM_CONFIGS)):
        dx = L.lora_gemm(dy, W, v, A, 2.0, mask=m, out=poisoned(N, I, dtype=dtype, device="cuda"), config=cfg)
        plain = dy @ W + (2.0 * (v @ A.to(dtype))) * m
        assert_2x(f"dx (gemm config {cfg})", dx, plain, f64(dy) @ f64(W) + 2.0 * (f64(v) @ f64(A)) * f64(m))
        y = L.lora_gemm(x, W.T, u, B.T, 2.0, bias=b, out=poisoned(N, O, dtype=dtype, device="cuda"), config=cfg)
        plain = x @ W.T + b + 2.0 * (u @ B.to(dtype).T)
        assert_2x(f"y (gemm config {cfg})", y, plain, f64(x) @ f64(W).T + f64(b) + 2.0 * f64(u) @ f64(B).T)


@gpu
@needs_cuda
@needs_tma
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("r", (5, 24, 128))
def test_gpu_tma_gemm(dtype, r):
    """lora_gemm's TMA kernel on every GEMM config, outputs poisoned: both layouts of the op, M and N not
    multiples of any tile, r = 5 (rows copied into padded form), 24 (the descriptor pads the rank
    block), 128 (the largest rank block: the launcher drops pipeline stages if the tiles outgrow shared
    memory); fp32 adapters."""
    N, I, O = 4099, 1000, 1032
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype, "cuda", torch.float32, True, False, seed=r)
    u = (x @ A.to(dtype).T).to(dtype)
    v = (dy @ B.to(dtype)).to(dtype)
    assert L.tma_gemm_blocker(x, W.T, u, B.T, None, poisoned(N, O, dtype=dtype, device="cuda")) is None
    ref_y = f64(x) @ f64(W).T + f64(b) + 2.0 * f64(u) @ f64(B).T
    plain_y = x @ W.T + b + 2.0 * (u @ B.to(dtype).T)
    ref_dx = f64(dy) @ f64(W) + 2.0 * f64(v) @ f64(A)
    plain_dx = dy @ W + 2.0 * (v @ A.to(dtype))
    for cfg in range(len(L.GEMM_CONFIGS)):
        y = L.lora_gemm(x, W.T, u, B.T, 2.0, bias=b, out=poisoned(N, O, dtype=dtype, device="cuda"), config=cfg,
                        tma=True)
        assert_2x(f"TMA y (gemm config {cfg}, r={r})", y, plain_y, ref_y)
        dx = L.lora_gemm(dy, W, v, A, 2.0, out=poisoned(N, I, dtype=dtype, device="cuda"), config=cfg, tma=True)
        assert_2x(f"TMA dx (gemm config {cfg}, r={r})", dx, plain_dx, ref_dx)


def _kernel_launches(fn) -> dict:
    """{kernel name: launches} of the GPU kernels running ``fn`` issues (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: e.count for e in prof.key_averages() if e.device_type.name == "CUDA"}


@gpu
@needs_cuda
@needs_tma
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("r", (5, 16, 128))
@pytest.mark.parametrize("bias,dropout", ((False, False), (True, False), (True, True)))
@pytest.mark.parametrize("impl", ("ext_triton", "ext_triton_thin"))
def test_gpu_ext_triton(impl, dtype, r, bias, dropout):
    """ext_triton (the C++ op's mode 4): y and dx each by one launch of the Triton TMA GEMM issued from C++ (dx by
    cuBLAS under dropout, where the mask multiplies its rank-r term), outputs poisoned, sizes no tile divides,
    r = 5 (rows copied into a padded rank block), 128 (the largest block); float32 adapters with float16; at bf16
    r = 16 every GEMM config (forward config c, backward c + 1); the 2x-PyTorch-error rule on y and every gradient;
    then the step captured in a CUDA graph and replayed on new x and dy: y and every gradient equal to the eager
    step's bit for bit. ext_triton_thin (mode 5) the same, with u and v each one launch of csrc/lora_thin.cu's row
    kernel and dB, dA one of its col kernel (dx's rank-r term under dropout its lowrank kernel), no other kernel
    but the two TMA GEMMs (one, and cuBLAS's dy W, under dropout)."""
    if not functional._ext_available():
        pytest.skip(f"the extension is unavailable: {_ext.error() or _ext.how()}")
    N, I, O = 4099, 1000, 1032
    adt = torch.float32 if dtype == torch.float16 else None
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype, "cuda", adt, bias, dropout, seed=r + 7)
    (y64, g64), (yp, gp) = references(x, W, b, A, B, m, dy, 2.0)
    n = len(L.GEMM_CONFIGS)
    configs = [(c, (c + 1) % n) for c in range(n)] if (impl, dtype, r) == ("ext_triton", torch.bfloat16, 16) \
        else [(0, 0)]
    for fc, bc in configs:
        plan = ((impl, fc), (impl, bc))
        xg, Ag, Bg = (t.clone().requires_grad_(True) for t in (x, A, B))

        def step():
            y = L.lora_linear(xg, W, b, Ag, Bg, 2.0, m, impl=plan)
            y.backward(dy)
            return y

        step()   # (compiles and registers the kernels)
        launches = _kernel_launches(step)
        tma = sum(c for k, c in launches.items() if "_lora_gemm_tma_body" in k)
        assert tma == (1 if dropout else 2), f"{impl} configs {fc}/{bc}: not the TMA GEMM: {launches}"
        if impl == "ext_triton_thin":
            thin = {k: sum(c for name, c in launches.items() if k in name) for k in ("row_kernel", "col_kernel",
                                                                                     "lowrank_kernel")}
            assert thin == {"row_kernel": 2, "col_kernel": 1, "lowrank_kernel": 1 if dropout else 0}, launches
            # (besides them: the TMA GEMMs, fp32 adapters' casts, the accumulation into .grad and dropout's dy W)
            others = {k: c for k, c in launches.items() if not any(t in k for t in (*thin, "_lora_gemm_tma_body"))}
            assert sum(c for k, c in others.items() if "gemm" in k.lower() or "nvjet" in k) == (1 if dropout else 0), \
                f"{impl}: a rank-r product left on cuBLAS: {others}"
        xg.grad = Ag.grad = Bg.grad = None
        _poison_allocator(4 * (N * (I + O) * 4 + 2**20))
        y = step()
        what = f"{impl} {dtype} r={r} bias={bias} dropout={dropout} configs {fc}/{bc}"
        assert "LoRALinearFn" in y.grad_fn.name()
        assert_2x(f"{what}: y", y, yp, y64)
        assert_2x(f"{what}: dx", xg.grad, gp.x, g64.x)
        assert_2x(f"{what}: dA", Ag.grad, gp.lora_A, g64.lora_A)
        assert_2x(f"{what}: dB", Bg.grad, gp.lora_B, g64.lora_B)
    if dropout:
        return
    # CUDA graph: the C++ launches (tensor maps encoded at capture) replay on new x and dy in the same buffers; y
    # and every gradient are compared (dx depends on dy only, y on x).
    static_x, static_dy = x.clone().requires_grad_(True), dy.clone()
    Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

    def run(x, dy):
        y = L.lora_linear(x, W, b, Ag, Bg, 2.0, None, impl=plan)
        return (y, *torch.autograd.grad(y, (x, Ag, Bg), dy))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(static_x, static_dy)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x, static_dy)
    new_x, new_dy = torch.randn_like(x), torch.randn_like(dy)
    with torch.no_grad():
        static_x.copy_(new_x)
        static_dy.copy_(new_dy)
    graph.replay()
    torch.cuda.synchronize()
    eager = run(new_x.requires_grad_(True), new_dy)
    for name, a, e in zip(("y", "dx", "dA", "dB"), static_out, eager):
        assert torch.equal(a, e), f"{impl} {dtype} r={r}: {name} replayed from a CUDA graph differs"


@gpu
@needs_cuda
@pytest.mark.parametrize("impl", ("ext_thin", "ext_allthin", "ext_triton_thin"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gpu_thin_kernels_strided_and_misaligned(dtype, impl):
    """ext_thin / ext_allthin / ext_triton_thin (csrc/lora_thin.cu; for the last, y by its thin kernels and cuBLAS:
    x's misaligned rows are no tensor map's) on operands read in place with row strides other than their
    width: x a column slice starting one element in (no 16-byte copies: the element loads), dy a column slice
    eight elements in (16-byte copies, longer rows), a column-major dropout mask (copied first), float32
    adapters, bias; outputs poisoned; the 2x-PyTorch-error rule on y and every gradient."""
    if not L.thin_kernels_apply(torch.empty(1, 1, device="cuda", dtype=dtype), 1):
        pytest.skip(f"the extension's thin kernels are unavailable: {_ext.error() or _ext.how()}")
    N, I, O, r = 1000, 200, 136, 24
    x, W, b, A, B, m, dy = operands(N, I, O, r, dtype, "cuda", torch.float32, True, True, seed=21)
    xbig = torch.randn(N, I + 9, device="cuda", dtype=dtype)
    xbig[:, 1:1 + I] = x
    xbig.requires_grad_(True)
    dybig = torch.randn(N, O + 16, device="cuda", dtype=dtype)
    dybig[:, 8:8 + O] = dy
    mt = m.t().contiguous().t()
    Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    xs, dys = xbig[:, 1:1 + I], dybig[:, 8:8 + O]
    assert xs.data_ptr() % 16 and xs.stride() == (I + 9, 1) and dys.stride() == (O + 16, 1) and mt.stride(1) != 1
    _poison_allocator(4 * (N * (I + O) * 4 + 2**20))
    y = L.lora_linear(xs, W, b, Ag, Bg, 2.0, mt, impl=impl)
    y.backward(dys)
    torch.cuda.synchronize()
    (y64, g64), (yp, gp) = references(x, W, b, A, B, m, dy, 2.0)
    assert_2x("y", y, yp, y64)
    assert_2x("dx", xbig.grad[:, 1:1 + I], gp.x, g64.x)
    assert_2x("dA", Ag.grad, gp.lora_A, g64.lora_A)
    assert_2x("dB", Bg.grad, gp.lora_B, g64.lora_B)
    assert xbig.grad[:, :1].abs().max() == 0 and xbig.grad[:, 1 + I:].abs().max() == 0


@gpu
@needs_cuda
@pytest.mark.parametrize("impl", ("ext_thin", "ext_allthin", "ext_triton_thin"))
def test_gpu_thin_partial_grads_rank1_and_double_backward(impl):
    """ext_thin / ext_allthin / ext_triton_thin with a frozen input (only the adapters' gradients; for the last two
    also only dA or only dB, one problem in the col kernel's launch), at r = 1 in bf16, and under create_graph (their
    backward then runs ext_prefill's differentiable products: the second derivative through dx's rank-r term must
    match ext_prefill's)."""
    if not L.thin_kernels_apply(torch.empty(1, 1, device="cuda", dtype=torch.bfloat16), 1):
        pytest.skip(f"the extension's thin kernels are unavailable: {_ext.error() or _ext.how()}")
    N, I, O, r = 300, 136, 72, 1
    x, W, b, A, B, m, dy = operands(N, I, O, r, torch.bfloat16, "cuda", None, True, True, seed=23)
    (y64, g64), (yp, gp) = references(x, W, b, A, B, m, dy, 2.0)
    trainable = ((("lora_A", "lora_B"), ("lora_A",), ("lora_B",)) if impl != "ext_thin"
                 else (("lora_A", "lora_B"),))
    for wants in trainable:
        Ag, Bg = A.clone().requires_grad_("lora_A" in wants), B.clone().requires_grad_("lora_B" in wants)
        _poison_allocator(4 * (N * (I + O) * 4 + 2**20))
        y = L.lora_linear(x, W, b, Ag, Bg, 2.0, m, impl=impl)
        y.backward(dy)
        assert_2x(f"y (r=1, {wants})", y, yp, y64)
        if "lora_A" in wants:
            assert_2x(f"dA (r=1, x frozen, {wants})", Ag.grad, gp.lora_A, g64.lora_A)
        if "lora_B" in wants:
            assert_2x(f"dB (r=1, x frozen, {wants})", Bg.grad, gp.lora_B, g64.lora_B)
        assert (Ag.grad is None) == ("lora_A" not in wants) and (Bg.grad is None) == ("lora_B" not in wants)
    N, I, O, r = 256, 64, 48, 8
    x, W, b, A, B, m, dy = operands(N, I, O, r, torch.bfloat16, "cuda", torch.float32, False, False, seed=24)
    grads = {}
    for how in ("ext_prefill", impl):
        xg, Ag = x.clone().requires_grad_(True), A.clone().requires_grad_(True)
        gx, = torch.autograd.grad(L.lora_linear(xg, W, None, Ag, B, 2.0, None, impl=how), xg, dy, create_graph=True)
        grads[how] = torch.autograd.grad(gx.float().square().sum(), Ag)[0]
    assert rel_err(grads[impl], grads["ext_prefill"].double()) < 1e-2, "second derivative through dx differs"


def _fwd_bwd_peak(fn, x, params, dy):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = fn(x)
    grads = torch.autograd.grad(y, [x, *params], dy)
    torch.cuda.synchronize()
    del y, grads
    return torch.cuda.max_memory_allocated() - base


@gpu
@needs_cuda
def test_gpu_peak_memory_not_above_unfused():
    N, I, O, r = 8192, 4096, 4096, 16
    x, W, b, A, B, m, dy = operands(N, I, O, r, torch.bfloat16, "cuda", seed=9)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)

    def unfused(x):
        return x @ W.T + 2.0 * ((x @ A.T) @ B.T)

    def ours(x):
        return bk.lora_linear(x, W, None, A, B, 2.0)

    _fwd_bwd_peak(ours, x, (A, B), dy)  # warm-up (kernel compilation, cuBLAS workspace)
    _fwd_bwd_peak(unfused, x, (A, B), dy)
    p_unfused = _fwd_bwd_peak(unfused, x, (A, B), dy)
    p_ours = _fwd_bwd_peak(ours, x, (A, B), dy)
    assert p_ours <= p_unfused, f"peak {p_ours / 2**20:.1f} MiB > unfused {p_unfused / 2**20:.1f} MiB"


def _small_layer():
    torch.manual_seed(0)
    layer = bk.BaLoRALinear(1024, 1536, 16, bias=True, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(4, 300, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4, 300, 1536, device="cuda", dtype=torch.bfloat16)
    return layer, x, dy


@gpu
@needs_cuda
def test_gpu_compile_fullgraph():
    """torch.compile(fullgraph=True) of the layer: output and gradients under the 2x-PyTorch-error rule, like the
    eager call's (not equal to it bit for bit: traced, ext_thin's products run as ext_prefill's cuBLAS calls)."""
    torch._dynamo.reset()
    layer, x, dy = _small_layer()
    params = (x, layer.lora_A, layer.lora_B)
    I, O = layer.lora_A.shape[1], layer.lora_B.shape[0]
    (y64, g64), (yp, gp) = references(x.detach().reshape(-1, I), layer.weight, layer.bias, layer.lora_A.detach(),
                                      layer.lora_B.detach(), None, dy.reshape(-1, O), layer.scaling)
    compiled = torch.compile(layer, fullgraph=True)
    for how, f in (("eager", layer), ("compiled", compiled)):
        y = f(x)
        gx, gA, gB = torch.autograd.grad(y, params, dy)
        assert_2x(f"{how} y", y.reshape(-1, O), yp, y64)
        assert_2x(f"{how} dx", gx.reshape(-1, I), gp.x, g64.x)
        assert_2x(f"{how} dA", gA, gp.lora_A, g64.lora_A)
        assert_2x(f"{how} dB", gB, gp.lora_B, g64.lora_B)


@gpu
@needs_cuda
def test_gpu_cuda_graph_capture():
    """Forward + backward captured in one CUDA graph, replayed on new inputs (no autograd graph
    from an earlier eager step is alive, as torch's whole-network capture recipe requires)."""
    layer, x, dy = _small_layer()
    static_x = x.detach().clone().requires_grad_(True)
    params = (static_x, layer.lora_A, layer.lora_B)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            grads = torch.autograd.grad(layer(static_x), params, dy)
    del grads
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_g = torch.autograd.grad(static_y, params, dy)
    new_x = torch.randn_like(static_x)
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    xe = new_x.clone().requires_grad_(True)
    ye = layer(xe)
    ge = torch.autograd.grad(ye, (xe, layer.lora_A, layer.lora_B), dy)
    torch.testing.assert_close(static_y, ye, rtol=0, atol=0)
    for a, e in zip(static_g, ge):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def _checkpointed_vs_direct(fn, x, params, dy, reentrant: bool):
    """(direct, checkpointed) outputs and gradients of ``fn`` [x, *params] with the same RNG state for both (the
    dropout mask is drawn inside ``fn``): activation checkpointing recomputes the forward in the backward."""
    runs = []
    for ckpt in (False, True):
        xs = x.detach().clone().requires_grad_(True)
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        torch.manual_seed(123)
        y = torch.utils.checkpoint.checkpoint(fn, xs, *ps, use_reentrant=reentrant) if ckpt else fn(xs, *ps)
        y.backward(dy)
        runs.append((y.detach(), xs.grad, *[p.grad for p in ps]))
    return runs


@gpu
@needs_cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("reentrant", (False, True), ids=("non_reentrant", "reentrant"))
def test_gpu_activation_checkpointing(impl, reentrant):
    """torch.utils.checkpoint around the op (dropout drawn inside, bias, bf16): the recomputed forward in the
    backward gives the same mask and u, so output and gradients equal the direct run bit for bit."""
    if impl in L.NEEDS_EXT and not functional._ext_available():
        pytest.skip(f"the extension is unavailable: {_ext.error() or _ext.how()}")
    N, I, O, r = 300, 136, 72, 8
    x, W, b, A, B, _, dy = operands(N, I, O, r, torch.bfloat16, "cuda", None, True, False, seed=31)

    def fn(x, A, B):
        m = torch.empty_like(x).bernoulli_(0.7)
        return L.lora_linear(x, W, b, A, B, 2.0 / 0.7, m, impl=impl)

    direct, ckpt = _checkpointed_vs_direct(fn, x, (A, B), dy, reentrant)
    for name, a, e in zip(("y", "dx", "dA", "dB"), ckpt, direct):
        assert torch.equal(a, e), f"{impl}: {name} differs under activation checkpointing"
