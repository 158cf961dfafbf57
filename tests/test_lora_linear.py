"""The functional LoRA linear op (CPU path): gradcheck, a plain nn.Linear + LoRA oracle, autocast."""
import pytest
import torch
import torch.nn.functional as F

import balora_kernels as bk
from utils import assert_rel_close, assert_within_2x_torch_error, f64


def _operands(N_shape, in_f, out_f, r, dtype=torch.float64, bias=True, grad_base=False):
    x = torch.randn(*N_shape, in_f, dtype=dtype, requires_grad=True)
    W = torch.randn(out_f, in_f, dtype=dtype, requires_grad=grad_base)
    b = torch.randn(out_f, dtype=dtype, requires_grad=grad_base) if bias else None
    A = torch.randn(r, in_f, dtype=dtype, requires_grad=True)
    B = torch.randn(out_f, r, dtype=dtype, requires_grad=True)
    return x, W, b, A, B


def _plain_lora(x, W, b, A, B, s, dropout_mask=None):
    """nn.Linear + LoRA as PEFT computes it (no package code)."""
    xl = x if dropout_mask is None else x * dropout_mask
    return F.linear(x, W, b) + s * F.linear(F.linear(xl, A), B)


@pytest.mark.parametrize("lead", [(5,), (2, 3), (1, 2, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad_base", [False, True])
def test_gradcheck_float64(lead, bias, grad_base):
    x, W, b, A, B = _operands(lead, 7, 6, 3, bias=bias, grad_base=grad_base)
    inputs = (x, W, b, A, B) if bias else (x, W, A, B)

    def f(*t):
        if bias:
            return bk.lora_linear(t[0], t[1], t[2], t[3], t[4], 0.6)
        return bk.lora_linear(t[0], t[1], None, t[2], t[3], 0.6)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_with_dropout_seeded():
    x, W, b, A, B = _operands((4, 3), 9, 5, 2)

    def f(x, A, B):
        torch.manual_seed(1234)        # the same mask on every evaluation
        return bk.lora_linear(x, W, b, A, B, 1.7, dropout_p=0.4, training=True)

    assert torch.autograd.gradcheck(f, (x, A, B), eps=1e-6, atol=1e-8, rtol=1e-6)
    # the mask is really applied: the output differs from the no-dropout output, and eval ignores it
    torch.manual_seed(1234)
    y_drop = bk.lora_linear(x, W, b, A, B, 1.7, dropout_p=0.4, training=True)
    y_eval = bk.lora_linear(x, W, b, A, B, 1.7, dropout_p=0.4, training=False)
    assert (y_drop - y_eval).abs().max() > 1e-3
    assert_rel_close(y_eval, _plain_lora(x, W, b, A, B, 1.7), 1e-14, "eval output")


def test_gradcheck_dropout_with_trainable_base():
    """Seeded dropout mask; weight and bias require grad too (all five gradients checked)."""
    x, W, b, A, B = _operands((5,), 8, 5, 3, grad_base=True)

    def f(x, W, b, A, B):
        torch.manual_seed(99)
        return bk.lora_linear(x, W, b, A, B, 0.9, dropout_p=0.25, training=True)

    assert torch.autograd.gradcheck(f, (x, W, b, A, B), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_plain_linear_plus_lora(dtype, bias):
    x, W, b, A, B = _operands((3, 11), 33, 21, 5, dtype=dtype, bias=bias, grad_base=True)
    s = 2.0
    y = bk.lora_linear(x, W, b, A, B, s)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (x, W, b, A, B) if t is not None], dy)
    leaves = [t.detach().clone().requires_grad_() for t in (x, W, b, A, B) if t is not None]
    if bias:
        xr, Wr, br, Ar, Br = leaves
    else:
        (xr, Wr, Ar, Br), br = leaves, None
    yr = _plain_lora(xr, Wr, br, Ar, Br, s)
    ref = torch.autograd.grad(yr, leaves, dy)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert y.shape == (3, 11, 21) and y.dtype == dtype
    assert_rel_close(y, yr, tol, "output")
    names = ["x", "weight", "bias", "lora_A", "lora_B"] if bias else ["x", "weight", "lora_A", "lora_B"]
    for n, g, gr in zip(names, grads, ref):
        assert g.dtype == gr.dtype, f"d{n} dtype {g.dtype} != {gr.dtype}"
        assert_rel_close(g, gr, tol, f"d{n}")


def test_frozen_base_gets_no_grad():
    x, W, b, A, B = _operands((4,), 6, 5, 2)
    bk.lora_linear(x, W, b, A, B, 1.0).sum().backward()
    assert W.grad is None and b.grad is None
    assert x.grad is not None and A.grad is not None and B.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_within_2x_torch_error(dtype):
    x, W, b, A, B = (t.detach().to(dtype) for t in _operands((64,), 96, 80, 8, dtype=torch.float64))
    y = bk.lora_linear(x, W, b, A, B, 0.5)
    ref = _plain_lora(f64(x), f64(W), f64(b), f64(A), f64(B), 0.5)
    assert y.dtype == dtype
    assert_within_2x_torch_error(y, ref, _plain_lora(x, W, b, A, B, 0.5), f"{dtype} forward")


def test_autocast_cpu_bf16_with_fp32_adapters():
    x, W, b, A, B = _operands((2, 16), 48, 40, 4, dtype=torch.float32)
    W.requires_grad_(False)
    s = 0.25
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bk.lora_linear(x, W, b, A, B, s)
        y_pt = _plain_lora(x, W, b, A, B, s)
    assert y.dtype == torch.bfloat16 and y_pt.dtype == torch.bfloat16
    xb, Wb, bb = (t.detach().to(torch.bfloat16) for t in (x, W, b))
    ref = _plain_lora(f64(xb), f64(Wb), f64(bb), f64(A), f64(B), s)
    assert_within_2x_torch_error(y, ref, y_pt, "autocast forward")
    dy = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), dy)
    assert gA.dtype == torch.float32 and gB.dtype == torch.float32, "adapter grads must come back fp32"
    assert gx.dtype == torch.float32, "x is an fp32 leaf: its grad is fp32"
    gx_pt, gA_pt, gB_pt = torch.autograd.grad(y_pt, (x, A, B), dy)
    # float64 gradients of the same bf16-rounded computation
    xr, Ar, Br = (f64(t).requires_grad_() for t in (xb, A, B))
    gref = torch.autograd.grad(_plain_lora(xr, f64(Wb), f64(bb), Ar, Br, s), (xr, Ar, Br), f64(dy))
    for n, g, gpt, gr in (("x", gx, gx_pt, gref[0]), ("lora_A", gA, gA_pt, gref[1]), ("lora_B", gB, gB_pt, gref[2])):
        assert_within_2x_torch_error(g, gr, gpt, f"autocast d{n}")


def test_autocast_casts_adapters_of_another_16bit_dtype():
    """bfloat16 adapters under float16 autocast: cast like F.linear would (not refused); their gradients come back
    in bfloat16."""
    x, W = torch.randn(6, 8), torch.randn(5, 8)
    A = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        y = bk.lora_linear(x, W, None, A, B, 2.0)
        y_pt = _plain_lora(x, W, None, A, B, 2.0)
    assert y.dtype == torch.float16 == y_pt.dtype
    ref = _plain_lora(f64(x.half()), f64(W.half()), None, f64(A.half()), f64(B.half()), 2.0)
    assert_within_2x_torch_error(y, ref, y_pt, "bf16 adapters under fp16 autocast")
    gA, gB = torch.autograd.grad(y, (A, B), torch.ones_like(y))
    assert gA.dtype == torch.bfloat16 and gB.dtype == torch.bfloat16


def test_zero_dim_x_raises_named_error():
    W, A, B = torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError,
                       match=r"^layer\.0: x must have at least one dim \[\.\.\., in\]\. Got x \(\) float32"):
        bk.lora_linear(torch.tensor(1.0), W, None, A, B, 1.0, name="layer.0")


def test_forced_triton_takes_only_its_dtypes(monkeypatch):
    """BALORA_KERNELS_IMPL=triton / cuda under the interpreter: float64 stays on the reference math (the Triton
    kernels do not take it)."""
    from balora_kernels import functional
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    for req, kernel in (("triton", "triton"), ("cuda", "cublas")):
        monkeypatch.setenv("BALORA_KERNELS_IMPL", req)
        functional._PLANS.clear()
        if functional._lora_ops.triton is not None:
            assert functional._lora_linear_impl("forward", 9, 16, 12, 4, torch.float32, cpu) == kernel
        assert functional._lora_linear_impl("forward", 9, 16, 12, 4, torch.float64, cpu) == "torch"
    functional._PLANS.clear()


@pytest.mark.parametrize("case", ["x_in", "A_in", "B_shape", "bias_shape", "x_dtype", "int_x", "A_dtype"])
def test_bad_operands_raise_named_errors(case):
    x, W, b, A, B = _operands((3,), 10, 7, 2, dtype=torch.float32)
    if case == "x_in":
        x = torch.randn(3, 9)
    elif case == "A_in":
        A = torch.randn(2, 11)
    elif case == "B_shape":
        B = torch.randn(7, 3)
    elif case == "bias_shape":
        b = torch.randn(6)
    elif case == "x_dtype":
        x = x.detach().double()
    elif case == "int_x":
        x = torch.randint(0, 3, (3, 10))
    elif case == "A_dtype":
        x, W, b = (t.detach().half() for t in (x, W, b))
        A = A.detach().double()
    with pytest.raises(ValueError) as e:
        bk.lora_linear(x, W, b, A, B, 1.0, name="layers.3.q_proj")
    msg = str(e.value)
    assert msg.startswith("layers.3.q_proj:"), msg
    assert f"x {tuple(x.shape)}" in msg and f"weight {tuple(W.shape)}" in msg and f"lora_A {tuple(A.shape)}" in msg, msg


@pytest.mark.parametrize("p", [1.0, -0.5, 1.5])
def test_bad_dropout_p_raises_naming_the_op(p):
    x, W = torch.randn(3, 8), torch.randn(5, 8)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"^my_layer: dropout_p must be a number in \[0, 1\), got " + repr(p)):
        bk.lora_linear(x, W, None, A, B, 2.0, dropout_p=p, name="my_layer")


def test_autocast_errors_name_the_callers_tensors():
    """Under autocast the operands are checked before casting: the message shows the caller's dtypes."""
    x, W = torch.randn(3, 8), torch.randn(5, 7)           # in_features mismatch
    A, B = torch.randn(2, 8), torch.randn(5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"lora_linear: .*x's last dim 8 != in_features 7.*x \(3, 8\) float32"):
            bk.lora_linear(x, W, None, A, B, 2.0)


def test_empty_batch_gives_empty_output_and_zero_adapter_grads():
    x = torch.randn(0, 8)
    W = torch.randn(5, 8)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = bk.lora_linear(x, W, None, A, B, 2.0)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))


def test_autocast_stays_on_around_the_op_even_when_it_raises():
    """Eagerly the op switches autocast off by its flag and must switch it back on: after a call,
    and after a call whose second check (after the casts) raises."""
    x, W = torch.randn(3, 8), torch.randn(5, 8)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bk.lora_linear(x, W, None, A, B, 2.0)
        assert y.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        with pytest.raises(ValueError, match="lora_A dtype torch.float64 must be x's dtype"):
            bk.lora_linear(x, W, None, A.detach().double(), B, 2.0)   # fails only after casting x
        assert torch.is_autocast_enabled("cpu")
        assert (x @ W.T).dtype == torch.bfloat16    # and still casts
    assert not torch.is_autocast_enabled("cpu")


def test_dropout_mask_is_exact_and_its_scale_joins_the_scaling(monkeypatch):
    """The mask holds 0 and 1 (exact in every dtype) and 1/(1-p) goes into the scaling, applied in float32: a mask
    holding 1/(1-p) in bfloat16 (1.4297 for p = 0.3) would scale the LoRA branch by its rounding."""
    from balora_kernels.ops import lora_linear as L
    seen = {}
    real = L.lora_linear

    def spy(x, W, b, A, B, s, mask=None, impl="auto"):
        seen.update(s=s, mask=mask)
        return real(x, W, b, A, B, s, mask, impl)

    monkeypatch.setattr(L, "lora_linear", spy)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    W, A, B = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(4, 32), torch.randn(16, 4)
    torch.manual_seed(1)
    y = bk.lora_linear(x, W, None, A, B, 2.0, dropout_p=0.3)
    m = seen["mask"]
    assert m.dtype == torch.bfloat16 and set(m.unique().tolist()) == {0.0, 1.0}
    assert seen["s"] == 2.0 / 0.7
    torch.manual_seed(1)
    assert torch.equal(m, torch.empty_like(x).bernoulli_(0.7))
    assert y.dtype == torch.bfloat16
    bk.lora_linear(x, W, None, A, B, 2.0, dropout_p=0.3, training=False)
    assert seen["mask"] is None and seen["s"] == 2.0


def _func_checks(device, dtype):
    """torch.func over BaLoRALinear: grad of a functional_call equals autograd's gradients; per-sample gradients by
    vmap(grad) equal a loop of single-sample gradients; jvp equals the directional derivative of the reference."""
    from torch.func import functional_call, grad, jvp, vmap
    torch.manual_seed(0)
    layer = bk.BaLoRALinear(12, 10, 3, bias=True, device=device, dtype=dtype)
    torch.nn.init.normal_(layer.lora_B)
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    x = torch.randn(6, 12, device=device, dtype=dtype)

    def loss(p, x):
        return functional_call(layer, p, (x,)).square().sum()

    g = grad(loss)(params, x)
    layer(x).square().sum().backward()
    for k in params:
        torch.testing.assert_close(g[k], getattr(layer, k).grad)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    for i in range(x.shape[0]):
        gi = grad(loss)(params, x[i:i + 1])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], gi[k])
    t = torch.randn_like(x)
    y, dy = jvp(lambda x: layer(x), (x,), (t,))
    torch.testing.assert_close(y, layer(x))
    w = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(dy, t @ w.T)


def test_torch_func_transforms():
    """torch.func's transforms run the reference math (the op's autograd nodes and kernels cannot be transformed)."""
    _func_checks("cpu", torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_torch_func_transforms():
    """As on the CPU, with CUDA float64 operands (autograd's gradients from the dispatcher's implementation). In
    float32 (session 14, H200) the gradients matched autograd's, but vmap's batched products and the loop's
    single ones round differently (3e-6 relative on one element): float64 compares the math, not the rounding."""
    _func_checks("cuda", torch.float64)


def test_torch_func_dropout_autocast_and_bad_impl():
    """Under torch.func: dropout (the mask drawn from the same RNG state) gives autograd's gradients; float32
    adapters on bfloat16 activations under autocast get float32 gradients within 2x plain PyTorch's bfloat16
    error (an unfused LoRA under the same autocast) against float64; an implementation name that is none is
    still refused; compiling inside the transform works."""
    from torch.func import functional_call, grad
    from balora_kernels.ops import lora_linear as L
    torch.manual_seed(0)
    layer = bk.BaLoRALinear(12, 10, 3, dropout=0.3, dtype=torch.float64)
    torch.nn.init.normal_(layer.lora_B)
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.manual_seed(5)
    g = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    torch.manual_seed(5)
    layer(x).square().sum().backward()
    for k in params:
        torch.testing.assert_close(g[k], getattr(layer, k).grad)

    layer = bk.BaLoRALinear(48, 40, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B)
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    x = torch.randn(16, 48, dtype=torch.bfloat16)
    s, W, b = layer.scaling, layer.weight, layer.bias

    def loss(p, lora):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lora(p).float().square().sum()

    g = grad(loss)(params, lambda p: functional_call(layer, p, (x,)))
    plain = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss(plain, lambda p: F.linear(x, W, b) + s * F.linear(F.linear(x, p["lora_A"]), p["lora_B"])).backward()
    p64 = {k: v.double().requires_grad_(True) for k, v in params.items()}
    y64 = F.linear(f64(x), f64(W), f64(b)) + s * F.linear(F.linear(f64(x), p64["lora_A"]), p64["lora_B"])
    y64.square().sum().backward()
    for k in params:
        assert g[k].dtype == torch.float32
        assert_within_2x_torch_error(g[k], p64[k].grad, plain[k].grad, what=f"torch.func grad {k} (autocast)")

    W, A, B = torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2)
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        grad(lambda A: L.lora_linear(torch.randn(3, 5), W, None, A, B, 1.0, impl="nope").sum())(A)
    f = torch.compile(lambda A: L.lora_linear(torch.ones(3, 5), W, None, A, B, 1.0).sum(), backend="aot_eager")
    torch.testing.assert_close(grad(f)(A), B.sum(0)[:, None] * torch.ones(3, 5).sum(0)[None, :])
