"""The C++ LoRA linear op (csrc/lora_linear.cpp, ``torch.ops.balora.lora_linear``) on CPU tensors.

The file is pure ATen, so it builds against a CPU build of torch too: on such a machine (CI) these
tests compile it once with ``torch.utils.cpp_extension`` (cached under the package's cache folder)
and register the op under the same ``balora`` namespace the package's extension uses (nothing else
can register it there without CUDA). On a CUDA build of torch they use the package's extension.
Checks: values and every gradient against float64 (gradcheck) in both GEMM orders, with and without
bias and dropout mask; only the gradients asked for; 16-bit activations with float32 adapters under
the 2x-PyTorch-error rule; errors that name the shapes; the dispatcher's use of it.
GPU: tests/test_lora_linear_kernels.py runs the 'ext' implementations with the other ones.
"""
from __future__ import annotations

import copy

import pytest
import torch

from balora_kernels import _ext, functional
from balora_kernels.ops import lora_linear as L

from test_lora_linear_kernels import assert_2x, cpu_lora_op, operands, references


@pytest.fixture(scope="module")
def op():
    if torch.version.cuda is not None:
        if _ext.load() is None:
            pytest.skip(f"the package's extension is unavailable: {_ext.error()}")
        return torch.ops.balora.lora_linear
    return cpu_lora_op()


# ext, ext_prefill, ext_thin, ext_allthin, ext_triton, ext_triton_thin (on CPU tensors and float64 neither the thin
# kernels nor the Triton GEMM apply: mode 1's products)
MODES = (0, 1, 2, 3, 4, 5)
BACKWARD_MODES = MODES[:4]   # lora_linear_backward's (the Triton GEMM is the op's own backward's only)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("dropout", (False, True))
def test_gradcheck_float64(op, mode, bias, dropout):
    x, W, b, A, B, m, _ = operands(6, 7, 5, 3, torch.float64, bias=bias, dropout=dropout, seed=11)
    ins = [t.clone().requires_grad_(True) for t in (x, W, A, B)] + ([b.clone().requires_grad_(True)] if bias else [])

    def f(x, W, A, B, b=None):
        return op(x, W, b, A, B, 0.7, m, mode)

    assert torch.autograd.gradcheck(f, ins)
    y = f(*ins)
    ref = x @ W.T + (b if bias else 0) + 0.7 * ((x * m if dropout else x) @ A.T) @ B.T
    torch.testing.assert_close(y.detach(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dropout", (False, True))
def test_double_backward_float64(op, mode, dropout):
    """Second derivatives through the C++ node (create_graph): dB's graph must reach x and A (the saved u is a
    constant to autograd; the backward recomputes it under grad mode)."""
    x, W, b, A, B, m, _ = operands(6, 7, 5, 3, torch.float64, bias=True, dropout=dropout, seed=16)
    ins = [t.clone().requires_grad_(True) for t in (x, W, b, A, B)]
    assert torch.autograd.gradgradcheck(lambda x, W, b, A, B: op(x, W, b, A, B, 0.7, m, mode), ins)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wants", [("x",), ("lora_A",), ("lora_B", "bias"), ("weight", "lora_A"), ("bias",)])
def test_only_requested_gradients(op, wants, mode):
    """Gradients by the inputs' positions, whatever subset requires grad (the C++ node counts only
    tensor inputs: with no bias, lora_A and lora_B sit one place earlier)."""
    for bias in (False, True):
        if "bias" in wants and not bias:
            continue
        x, W, b, A, B, m, dy = operands(9, 8, 7, 2, torch.float64, bias=bias, seed=12)
        named = {"x": x, "weight": W, "bias": b, "lora_A": A, "lora_B": B}
        leaves = {k: (t.clone().requires_grad_(k in wants) if t is not None else None) for k, t in named.items()}
        y = op(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"], 1.5, None, mode)
        y.backward(dy)
        ref = {k: (t.clone().requires_grad_(True) if t is not None else None) for k, t in named.items()}
        (ref["x"] @ ref["weight"].T + (ref["bias"] if bias else 0)
         + 1.5 * (ref["x"] @ ref["lora_A"].T) @ ref["lora_B"].T).backward(dy)
        for k, t in leaves.items():
            if t is None:
                continue
            if k in wants:
                torch.testing.assert_close(t.grad, ref[k].grad, rtol=1e-12, atol=1e-12, msg=f"d{k} (bias={bias})")
            else:
                assert t.grad is None, f"d{k} computed but not asked for (bias={bias})"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_low_precision_activations_fp32_adapters(op, dtype, mode):
    """16-bit (or fp32) activations with float32 adapters: the 2x-PyTorch-error rule on the output and
    every gradient; adapter gradients come back in the adapters' dtype."""
    x, W, b, A, B, m, dy = operands(37, 72, 40, 3, dtype, adapter_dtype=torch.float32, bias=True, dropout=True,
                                    seed=13)
    xg, Ag, Bg = (t.clone().requires_grad_(True) for t in (x, A, B))
    y = op(xg, W, b, Ag, Bg, 0.5, m, mode)
    y.backward(dy)
    (y64, g64), (yp, gp) = references(x, W, b, A, B, m, dy, 0.5)
    assert y.dtype == dtype and Ag.grad.dtype == torch.float32 and Bg.grad.dtype == torch.float32
    assert_2x("y", y, yp, y64)
    for name, got in (("x", xg.grad), ("lora_A", Ag.grad), ("lora_B", Bg.grad)):
        assert_2x(f"d{name}", got, getattr(gp, name), getattr(g64, name))


def test_errors_name_the_shapes(op):
    x, W, b, A, B, m, _ = operands(4, 6, 5, 2, torch.float32, bias=True, seed=14)
    with pytest.raises(RuntimeError, match=r"shapes do not chain: x \[4, 6\], weight \[5, 6\], lora_A \[2, 7\]"):
        op(x, W, b, torch.randn(2, 7), B, 1.0, None, 0)
    with pytest.raises(RuntimeError, match=r"bias must be \[5\]"):
        op(x, W, torch.randn(4), A, B, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="dropout mask must match x"):
        op(x, W, b, A, B, 1.0, torch.ones(4, 5), 0)
    with pytest.raises(RuntimeError, match="operands must be on x's device cpu, got weight cpu, lora_A meta"):
        op(x, W, b, A.to("meta"), B, 1.0, None, 0)
    with pytest.raises(RuntimeError, match=r"mode must be 0 \(ext\), 1 \(ext_prefill\), 2 \(ext_thin\), 3 "
                                           r"\(ext_allthin\), 4 \(ext_triton\) or 5 \(ext_triton_thin\), got 6"):
        op(x, W, b, A, B, 1.0, None, 6)
    with pytest.raises(RuntimeError, match=r"gemm names at most 3 kernels .*got 4"):
        op(x, W, b, A, B, 1.0, None, 4, [-1, -1, -1, -1])
    with pytest.raises(RuntimeError, match="gemm kernel 100000 was never registered"):
        op(x, W, b, A, B, 1.0, None, 4, [-1, 100000, -1])
    with pytest.raises(RuntimeError, match="lora_gemm_kernel_register: (a description of 26 values|this build has "
                                           "no CUDA sources)"):
        torch.ops.balora.lora_gemm_kernel_register([1, 2, 3])


@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize("bias,dropout", ((False, False), (True, True)))
@pytest.mark.parametrize("wants", [("x", "lora_A", "lora_B"), ("lora_A",), ("lora_B", "weight", "bias"), ("x",)])
def test_backward_op_alone_matches_the_node(op, mode, bias, dropout, wants):
    """torch.ops.balora.lora_linear_backward (the backward's products for a forward run elsewhere: triton_ext) gives
    the op's own autograd node's gradients, and only those asked for (None for the others)."""
    x, W, b, A, B, m, dy = operands(11, 9, 7, 3, torch.float64, bias=bias, dropout=dropout, seed=21)
    named = {"x": x, "weight": W, "bias": b, "lora_A": A, "lora_B": B}
    leaves = {k: (t.clone().requires_grad_(k in wants) if t is not None else None) for k, t in named.items()}
    y = op(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"], 0.6, m, mode)
    y.backward(dy)
    u = (x * m if dropout else x) @ A.T
    args = ("x" in wants, "weight" in wants, bias and "bias" in wants, "lora_A" in wants, "lora_B" in wants, mode)
    with torch.no_grad():   # as inside a backward: the given u is read
        got = torch.ops.balora.lora_linear_backward(dy, x, u, W, A, B, 0.6, m, *args)
    if "lora_B" in wants:   # (a wrong u must show in dB; with grad mode on, u is recomputed from x and A instead)
        with torch.no_grad():
            bad = torch.ops.balora.lora_linear_backward(dy, x, u + 1, W, A, B, 0.6, m, *args)[4]
        assert not torch.allclose(bad, got[4])
        torch.testing.assert_close(torch.ops.balora.lora_linear_backward(dy, x, u + 1, W, A, B, 0.6, m, *args)[4],
                                   got[4], rtol=1e-12, atol=1e-12)
    for k, g in zip(("x", "weight", "bias", "lora_A", "lora_B"), got):
        want = leaves[k].grad if leaves[k] is not None else None
        if want is None:
            assert g is None, f"d{k} formed but not asked for"
        else:
            torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12, msg=f"d{k} (mode {mode})")


def test_backward_op_errors_name_the_shapes(op):
    x, W, b, A, B, m, dy = operands(4, 6, 5, 2, torch.float32, bias=True, seed=22)
    u = x @ A.T
    bwd = torch.ops.balora.lora_linear_backward
    with pytest.raises(RuntimeError, match=r"lora_linear_backward: grad_y must be \[4, 5\] in x's dtype on x's "
                                           r"device, got \[4, 6\] Float on cpu"):
        bwd(torch.ones(4, 6), x, u, W, A, B, 1.0, None, True, False, False, True, True, 1)
    with pytest.raises(RuntimeError, match=r"u must be \[4, 2\] in x's dtype on x's device, got \[4, 3\]"):
        bwd(dy, x, torch.ones(4, 3), W, A, B, 1.0, None, True, False, False, True, True, 1)
    with pytest.raises(RuntimeError, match=r"lora_linear_backward: shapes do not chain: x \[4, 6\], weight \[5, 6\], "
                                           r"lora_A \[2, 7\]"):
        bwd(dy, x, u, W, torch.randn(2, 7), B, 1.0, None, True, False, False, True, True, 1)
    with pytest.raises(RuntimeError, match="lora_linear_backward: dropout mask must match x"):
        bwd(dy, x, u, W, A, B, 1.0, torch.ones(4, 5), True, False, False, True, True, 1)
    with pytest.raises(RuntimeError, match=r"lora_linear_backward: mode must be .* got 7"):
        bwd(dy, x, u, W, A, B, 1.0, None, True, False, False, True, True, 7)


def test_thin_kernels_only_for_16bit_cuda_activations(op):
    """ext_thin's kernels (csrc/lora_thin.cu) take CUDA bf16 / fp16 activations with 1 <= r <= 128; every other call
    runs ext_prefill's products, and lora_linear_thin_kernels says so."""
    thin = torch.ops.balora.lora_linear_thin_kernels
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert not thin(torch.ones(4, 3, dtype=dt), 16), dt          # CPU tensors
    if torch.cuda.is_available():
        cuda = torch.ones(4, 3, dtype=torch.bfloat16, device="cuda")
        assert thin(cuda, 1) and thin(cuda, 128) and thin(cuda.half(), 16)
        assert not thin(cuda, 129) and not thin(cuda.float(), 16) and not thin(cuda[:0], 16)


@pytest.fixture
def ext_offered(monkeypatch, op):
    """The dispatcher sees the extension as loaded (on CPU torch: the test build above)."""
    monkeypatch.setattr(functional, "_ext_available", lambda: True)
    functional._PLANS.clear()
    yield
    functional._PLANS.clear()


@pytest.mark.parametrize("impl", tuple(L.EXT_IMPLS))
def test_forced_through_the_package(ext_offered, impl):
    """lora_linear(impl=...) routes to the C++ op (no Python autograd Function in between) and matches
    the float64 reference."""
    x, W, b, A, B, m, dy = operands(12, 10, 9, 4, torch.float64, bias=True, seed=15)
    xg, Ag, Bg = (t.clone().requires_grad_(True) for t in (x, A, B))
    y = L.lora_linear(xg, W, b, Ag, Bg, 0.25, None, impl=impl)
    assert "LoRALinearFn" in y.grad_fn.name(), y.grad_fn.name()
    y.backward(dy)
    (y64, g64), _ = references(x, W, b, A, B, None, dy, 0.25)
    torch.testing.assert_close(y, y64)
    for name, got in (("x", xg.grad), ("lora_A", Ag.grad), ("lora_B", Bg.grad)):
        torch.testing.assert_close(got, getattr(g64, name))


@pytest.mark.parametrize("dtype", (torch.float64, torch.float16))
@pytest.mark.parametrize("dropout", (False, True))
def test_triton_ext_backward_through_the_package(ext_offered, dtype, dropout):
    """triton_ext's backward is the C++ products in one call (its forward, triton's, is tested with the Triton
    kernels): float64 against the reference, float16 with float32 adapters by the 2x-PyTorch-error rule."""
    adt = torch.float32 if dtype == torch.float16 else None
    x, W, b, A, B, m, dy = operands(23, 18, 13, 5, dtype, adapter_dtype=adt, bias=True, dropout=dropout, seed=23)
    m = m if dropout else None
    u = (x * m if dropout else x) @ A.to(dtype).T
    with torch.no_grad():   # (as inside a backward, where it runs: the given u is read)
        g = L.lora_linear_backward("triton_ext", dy, x, u, W, A, B, 0.4, m, need_x=True, need_weight=True,
                                   need_bias=True)
    (_, g64), (_, gp) = references(x, W, b, A, B, m, dy, 0.4)
    assert g.lora_A.dtype == A.dtype and g.lora_B.dtype == B.dtype
    for name in ("x", "lora_A", "lora_B"):
        if dtype == torch.float64:
            torch.testing.assert_close(getattr(g, name), getattr(g64, name), msg=f"d{name}")
        else:
            assert_2x(f"d{name}", getattr(g, name), getattr(gp, name), getattr(g64, name))
    for got, want in ((g.weight, dy.double().T @ x.double()), (g.bias, dy.double().sum(0))):   # dW, db: one op each
        torch.testing.assert_close(got, want.to(dtype))


@pytest.mark.skipif(L.triton is None, reason="the measured choice needs Triton")
def test_dispatcher_python_issued_needs_a_margin(ext_offered, monkeypatch):
    """An implementation with launches issued from Python (triton; triton_ext's forward) is taken over the
    fastest C++ one (ext_*) only when faster by more than PY_ISSUED_MARGIN and when its host keeps pace
    (HOST_PACE_FRACTION); triton_ext takes its own measured GEMM config, and only with the extension."""
    cuda = torch.device("cuda")
    monkeypatch.delenv("BALORA_KERNELS_IMPL", raising=False)
    k = 1 + L.PY_ISSUED_MARGIN

    def table(triton_full, triton_ext_full):
        return {"entries": [{"dtype": "bfloat16", "N": 8192, "in": 4096, "out": 4096, "r": 16,
                             "forward_ms": {"torch": 0.5, "triton": 0.4, "ext_prefill": 0.43, "triton_ext": 0.4},
                             "backward_ms": {"torch": 0.55, "triton": 0.5, "ext_prefill": 0.49, "triton_ext": 0.49},
                             "full_ms": {"torch": 1.1, "triton": triton_full, "ext_prefill": 1.0,
                                         "triton_ext": triton_ext_full},
                             "gemm_config": {"triton": {"forward": 2, "backward": 1},
                                             "triton_ext": {"forward": 3, "backward": 4}}}]}
    plan = functional._lora_linear_plan
    shape = (8192, 4096, 4096, 16, torch.bfloat16, cuda)
    try:
        for triton, triton_ext, expect in (
                (1.0 / k + 0.002, 2.0, ("ext_prefill", 0, 0)),    # faster, by less than the margin
                (1.0 / k - 0.002, 2.0, ("triton", 2, 1)),         # by more
                (2.0, 1.0 / k + 0.002, ("ext_prefill", 0, 0)),    # triton_ext's forward is issued from Python
                (2.0, 1.0 / k - 0.002, ("triton_ext", 3, 4))):
            L.use_tuning_table(table(triton, triton_ext))
            impl, cf, cb = expect
            assert plan(*shape) == ((impl, cf), (impl, cb)), (triton, triton_ext)
        assert plan(*shape, "triton_ext") == (("triton_ext", 3), ("triton_ext", 4))   # forced: its measured config
        L.use_tuning_table(table(0.95, 0.9))
        assert plan(*shape) == (("triton_ext", 3), ("triton_ext", 4))
        # Host times: a Python-issued candidate whose host needs more than HOST_PACE_FRACTION of its step's time
        # is not taken beside a C++ one (the step then waits on the host): by the full step's host time for a call
        # that records a backward, by the forward's for one that does not.
        f = L.HOST_PACE_FRACTION
        t = table(0.95, 0.9)
        t["entries"][0]["host_full_ms"] = {"triton_ext": 0.9 * f + 0.01, "triton": 0.95 * f - 0.01,
                                           "ext_prefill": 0.9}
        t["entries"][0]["host_forward_ms"] = {"triton_ext": 0.4 * f - 0.01, "triton": 0.4 * f - 0.01}
        L.use_tuning_table(t)
        assert plan(*shape) == (("triton", 2), ("triton", 1))
        # without a backward: triton_ext is triton (its forward), never chosen; triton's forward (0.4 against
        # ext_prefill's 0.43) keeps pace here, and then not
        assert plan(*shape, "auto", False)[0][0] == "triton"
        t = copy.deepcopy(t)
        t["entries"][0]["host_forward_ms"]["triton"] = 0.4 * f + 0.01
        L.use_tuning_table(t)
        assert plan(*shape, "auto", False)[0][0] == "ext_prefill"
        t = copy.deepcopy(t)
        t["entries"][0]["host_full_ms"]["triton"] = 0.95 * f + 0.01
        L.use_tuning_table(t)
        assert plan(*shape) == (("ext_prefill", 0), ("ext_prefill", 0))
        monkeypatch.setattr(functional, "_ext_available", lambda: False)     # no extension: no triton_ext
        functional._PLANS.clear()
        assert plan(*shape) == (("triton", 2), ("triton", 1))
        with pytest.raises(RuntimeError, match="'triton_ext' needs the compiled extension"):
            plan(*shape, "triton_ext")
    finally:
        functional._PLANS.clear()
        L.reload_tuning_table()


@pytest.mark.skipif(L.triton is None, reason="the measured choice needs Triton")
def test_dispatcher_skips_the_cpp_launched_gemm_where_it_cannot_run(ext_offered, monkeypatch):
    """Where ext_gemm_blocker names a reason (not Hopper, ...), ext_triton and ext_triton_thin would run other
    products than the ones measured: the dispatcher does not offer them, and takes the fastest of the rest."""
    cuda = torch.device("cuda")
    monkeypatch.delenv("BALORA_KERNELS_IMPL", raising=False)
    times = {"torch": 1.0, "ext_prefill": 0.6, "ext_allthin": 0.5, "ext_triton": 0.4, "ext_triton_thin": 0.3}
    entry = {"dtype": "bfloat16", "N": 1024, "in": 4096, "out": 4096, "r": 16,
             **{f"{m}_ms": dict(times) for m in ("forward", "backward", "full")}}
    L.use_tuning_table({"entries": [entry]})
    shape = (1024, 4096, 4096, 16, torch.bfloat16, cuda)
    try:
        for blocker, expect in ((None, "ext_triton_thin"), ("compute capability 8.0", "ext_allthin")):
            monkeypatch.setattr(L, "ext_gemm_blocker", lambda dtype, device, b=blocker: b)
            functional._PLANS.clear()
            assert functional._lora_linear_plan(*shape) == ((expect, 0), (expect, 0)), blocker
    finally:
        functional._PLANS.clear()
        L.reload_tuning_table()


def test_dispatcher_offers_ext_only_when_it_loads(monkeypatch):
    cuda = torch.device("cuda")
    entry = {"dtype": "bfloat16", "N": 1024, "in": 4096, "out": 4096, "r": 16,
             "forward_ms": {"torch": 0.3, "cublas_mm": 0.2, "ext": 0.1},
             "backward_ms": {"torch": 0.3, "cublas_mm": 0.2, "ext": 0.1},
             "full_ms": {"torch": 0.5, "cublas_mm": 0.4, "ext": 0.2}}
    L.use_tuning_table({"entries": [entry]})
    monkeypatch.delenv("BALORA_KERNELS_IMPL", raising=False)
    try:
        for available, expect, expect_fp32 in ((True, "ext", "ext"), (False, "cublas_mm", "cublas_mm")):
            monkeypatch.setattr(functional, "_ext_available", lambda a=available: a)
            functional._PLANS.clear()
            plan = functional._lora_linear_plan(1024, 4096, 4096, 16, torch.bfloat16, cuda)
            assert plan == ((expect, 0), (expect, 0))
            assert functional._lora_linear_impl("forward", 64, 64, 64, 4, torch.float32, cuda) == expect_fp32
        with pytest.raises(RuntimeError, match="needs the compiled extension"):
            functional._lora_linear_plan(1024, 4096, 4096, 16, torch.bfloat16, cuda, "ext")
        # Per-direction measurements (no full-step times): a forward choice of 'ext' takes both directions
        # (the C++ node runs its own backward); a backward-only 'ext' stays per direction. (Without Triton
        # the dispatcher takes 'ext' for everything, measurements aside.)
        monkeypatch.setattr(functional, "_ext_available", lambda: True)
        if L.triton is None:
            return
        per_dir = {"dtype": "bfloat16", "N": 1024, "in": 4096, "out": 4096, "r": 16,
                   "forward_ms": {"ext": 0.1, "cublas_mm": 0.2}, "backward_ms": {"ext": 0.3, "cublas_mm": 0.2}}
        L.use_tuning_table({"entries": [per_dir]})
        assert functional._lora_linear_plan(1024, 4096, 4096, 16, torch.bfloat16, cuda) == (("ext", 0), ("ext", 0))
        per_dir = dict(per_dir, forward_ms={"ext": 0.3, "cublas_mm": 0.2}, backward_ms={"ext": 0.1, "cublas_mm": 0.2})
        L.use_tuning_table({"entries": [per_dir]})
        assert functional._lora_linear_plan(1024, 4096, 4096, 16, torch.bfloat16, cuda) == \
            (("cublas_mm", 0), ("ext", 0))
    finally:
        functional._PLANS.clear()
        L.reload_tuning_table()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reentrant", (False, True), ids=("non_reentrant", "reentrant"))
def test_activation_checkpointing(op, mode, reentrant):
    """torch.utils.checkpoint around the op: the C++ node's saved tensors go through checkpoint's hooks
    (non-reentrant) or the forward reruns inside the backward (reentrant); the dropout mask drawn inside the
    checkpointed function is drawn again identically. Output and gradients equal the direct run's."""
    from test_lora_linear_kernels import _checkpointed_vs_direct
    x, W, b, A, B, _, dy = operands(9, 12, 7, 3, torch.float32, bias=True, seed=17)

    def fn(x, A, B):
        m = torch.empty_like(x).bernoulli_(0.6)
        return op(x, W, b, A, B, 0.7 / 0.6, m, mode)

    direct, ckpt = _checkpointed_vs_direct(fn, x, (A, B), dy, reentrant)
    for name, a, e in zip(("y", "dx", "dA", "dB"), ckpt, direct):
        assert torch.equal(a, e), f"mode {mode}: {name} differs under activation checkpointing"


def _compiled_tma_gemm(has_bias: bool, backward: bool):
    """``_lora_gemm_tma_kernel_fixed`` compiled for sm_90 without a GPU (Triton's own ptxas) from a signature written
    here the way registration's ``warmup`` types its arguments (descriptors, the sizes as plain i32 with no
    specialisation, the bias a pointer or a constant None), with small tiles: the parameter list does not depend on
    the tiles. (It cannot see whether ``do_not_specialize`` names the right arguments: a size specialised on its
    divisibility keeps its parameter; one equal to 1 would lose it, which the GPU tests' sizes never are.)"""
    triton = pytest.importorskip("triton")
    if L.TensorDescriptor is None:
        pytest.skip("Triton without host tensor descriptors")
    from triton.backends.compiler import GPUTarget
    BM, BN, BK, BR = 64, 64, 32, 16

    def d(rows, cols):
        return f"tensordesc<fp16[{rows}, {cols}]>"

    consts = dict(W_KN=backward, Q_KN=backward, HAS_BIAS=has_bias, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8,
                  WS=False, **({} if has_bias else {"bias_ptr": None}))
    sig = {"x_desc": d(BM, BK), "w_desc": d(BK, BN) if backward else d(BN, BK), "p_desc": d(BM, BR),
           "q_desc": d(BR, BN) if backward else d(BN, BR), "out_desc": d(BM, BN), "bias_ptr": "*fp16",
           "M": "i32", "N": "i32", "K": "i32", "scaling": "fp32", **{k: "constexpr" for k in consts}}
    src = triton.compiler.ASTSource(fn=L._lora_gemm_tma_kernel_fixed, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})


@pytest.mark.parametrize("has_bias", (False, True))
def test_tma_gemm_parameter_codes(has_bias):
    """The parameter list the C++ launch packs (csrc/triton_gemm.h's codes) for the TMA GEMM as this Triton compiles
    it: per descriptor its map, shape and strides, then the bias pointer (only with a bias), M, N, K, the scaling and
    null scratch pointers; a kernel that would need scratch memory, or another parameter list, is refused."""
    k = _compiled_tma_gemm(has_bias, backward=has_bias)
    ptx = k.asm["ptx"]
    codes = L.tg_param_codes(ptx, has_bias, scratch_free=True)
    descs = [c for i in range(5) for c in (L._TG_MAP + i, L._TG_DIM + 2 * i, L._TG_DIM + 2 * i + 1,
                                           L._TG_STRIDE + 2 * i, L._TG_STRIDE + 2 * i + 1)]
    tail = [L._TG_M, L._TG_N, L._TG_K, L._TG_SCALING]
    n_null = len(codes) - len(descs) - len(tail) - has_bias
    assert codes == descs + ([L._TG_BIAS] if has_bias else []) + tail + [L._TG_NULL] * n_null
    assert len(L.ptx_params(ptx)) == len(codes) and 0 <= n_null <= 2
    if n_null:
        with pytest.raises(ValueError, match="null scratch pointers"):
            L.tg_param_codes(ptx, has_bias, scratch_free=False)
    with pytest.raises(ValueError, match="are not"):   # the bias pointer expected where there is none, or the reverse
        L.tg_param_codes(ptx, not has_bias, scratch_free=True)


def test_ptx_params_kinds():
    ptx = """.visible .entry k(
        .param .align 64 .b8 k_param_0[128],
        .param .u32 k_param_1,
        .param .u64 k_param_2,
        .param .u64 .ptr .global .align 1 k_param_3,
        .param .f32 k_param_4
    )
    {"""
    assert L.ptx_params(ptx) == ["map", "b32", "b64", "ptr", "f32"]
    with pytest.raises(ValueError, match="unexpected kernel parameter"):
        L.ptx_params(".entry k(.param .f64 k_param_0)")


def test_ext_gemm_failure_is_warned_and_falls_back(monkeypatch):
    """A failure to compile, load or check the Triton GEMM for ext_triton is warned once with its cause, kept for
    backend_info, and the op then gets no kernels (it runs ext_prefill's cuBLAS products) instead of raising on
    every call."""
    monkeypatch.setattr(L, "_EXT_GEMM", {})
    monkeypatch.setattr(L, "_EXT_GEMM_ERRORS", {})
    monkeypatch.setattr(L, "ext_gemm_blocker", lambda dtype, device: None)
    calls = []

    def fail(*args):
        calls.append(args)
        raise RuntimeError("no tensor maps in this Triton")
    monkeypatch.setattr(L, "_registered_gemm", fail)
    if L.triton is None:
        pytest.skip("needs Triton (the rank block)")
    dev = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="ext_triton cannot launch the Triton GEMM.*no tensor maps in this Triton"):
        assert L.ext_gemm_kernels(torch.bfloat16, dev, 16, 0, 1) == []
    assert L.ext_gemm_kernels(torch.bfloat16, dev, 16, 0, 1) == [] and len(calls) == 1   # (once per key)
    assert len(L.ext_gemm_errors()) == 1 and "configs 0/1" in L.ext_gemm_errors()[0]
    assert functional.backend_info()["lora_linear"]["ext_triton_errors"] == L.ext_gemm_errors()


def test_plan_under_torch_func(ext_offered):
    """A plan (the benchmark's forced configs) as ``impl`` under torch.func's transforms runs the reference math,
    as a name does."""
    x, W, b, A, B, _, _ = operands(5, 6, 4, 2, torch.float64, bias=True, seed=29)
    plan = (("ext_triton", 1), ("ext_triton", 2))
    g = torch.func.grad(lambda A: L.lora_linear(x, W, b, A, B, 0.5, None, impl=plan).sum())(A)
    torch.testing.assert_close(g, 0.5 * (B.sum(0)[:, None] * x.sum(0)[None, :]))


def test_fewer_stages_until_it_fits():
    """The TMA GEMM's launch and ext_triton's registration both drop pipeline stages while Triton reports the kernel
    outgrows shared memory, and give up (re-raising) below one stage."""
    triton = pytest.importorskip("triton")
    tried = []

    def run(stages):
        tried.append(stages)
        if stages > 2:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return f"ran with {stages}"
    assert L._fewer_stages(run, 4) == ("ran with 2", 2) and tried == [4, 3, 2]
    tried.clear()
    with pytest.raises(triton.runtime.errors.OutOfResources):
        L._fewer_stages(lambda stages: run(stages + 5), 2)
