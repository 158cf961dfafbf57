"""BaLoRALinear: init, from_linear, forward vs nn.Linear + LoRA, merge / unmerge, repr, errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import balora_kernels as bk
from utils import assert_bitwise_equal, assert_rel_close


def test_init_kaiming_A_zero_B_frozen_base():
    m = bk.BaLoRALinear(300, 40, r=16, alpha=32)
    assert m.lora_A.shape == (16, 300) and m.lora_B.shape == (40, 16)
    assert torch.count_nonzero(m.lora_B) == 0
    bound = 1 / math.sqrt(300)              # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound
    assert abs(m.lora_A.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.requires_grad and m.lora_B.requires_grad
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert m.scaling == 2.0
    assert bk.BaLoRALinear(64, 64, r=16, alpha=8, use_rslora=True).scaling == 8 / 4
    # B = 0: the adapted layer starts as the base layer
    x = torch.randn(5, 300)
    assert_rel_close(m(x), F.linear(x, m.weight, m.bias), 1e-6, "initial output")


def test_from_linear_shares_weights():
    lin = nn.Linear(24, 18)
    m = bk.BaLoRALinear.from_linear(lin, r=4, alpha=8)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert not lin.weight.requires_grad
    with torch.no_grad():
        lin.weight.add_(1.0)             # a change through the linear is seen by the layer
    assert torch.equal(m.weight, lin.weight)
    with pytest.raises(TypeError, match="nn.Linear"):
        bk.BaLoRALinear.from_linear(nn.Conv1d(3, 3, 1), r=1)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_plain_lora(bias):
    m = bk.BaLoRALinear(20, 12, r=3, alpha=6, bias=bias, dtype=torch.float64)
    nn.init.normal_(m.lora_B)
    x = torch.randn(2, 4, 20, dtype=torch.float64, requires_grad=True)
    y = m(x)
    ref = F.linear(x, m.weight, m.bias) + 2.0 * F.linear(F.linear(x, m.lora_A), m.lora_B)
    assert_rel_close(y, ref, 1e-13, "forward")
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, m.lora_A, m.lora_B), dy)
    gr = torch.autograd.grad(ref, (x, m.lora_A, m.lora_B), dy)
    for n, a, b in zip(("x", "lora_A", "lora_B"), g, gr):
        assert_rel_close(a, b, 1e-13, f"d{n}")


def test_dropout_only_in_training():
    m = bk.BaLoRALinear(32, 16, r=4, dropout=0.5, dtype=torch.float64)
    nn.init.normal_(m.lora_B)
    x = torch.randn(8, 32, dtype=torch.float64)
    full = F.linear(x, m.weight, m.bias) + m.scaling * F.linear(F.linear(x, m.lora_A), m.lora_B)
    m.eval()
    assert_rel_close(m(x), full, 1e-13, "eval output")
    m.train()
    assert (m(x) - full).abs().max() > 1e-3, "dropout had no effect in training mode"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merge_unmerge_round_trip(dtype):
    m = bk.BaLoRALinear(40, 24, r=6, alpha=12, dtype=dtype)
    nn.init.normal_(m.lora_B, std=0.1)
    w0 = m.weight.detach().clone()
    x = torch.randn(7, 40, dtype=dtype)
    y0 = m(x)
    m.merge()
    assert m.merged
    assert_rel_close(m.weight, w0.double() + m.scaling * m.lora_B.double() @ m.lora_A.double(),
                     1e-6 if dtype == torch.float32 else 1e-14, "merged weight")
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    assert_rel_close(m(x), y0, tol, "merged forward")
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    assert not m.merged
    assert_rel_close(m.weight, w0, 1e-6 if dtype == torch.float32 else 1e-14, "weight after unmerge")
    assert_rel_close(m(x), y0, tol, "forward after unmerge")
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


def test_extra_repr():
    m = bk.BaLoRALinear(16, 8, r=2, alpha=4, dropout=0.1)
    s = repr(m)
    for part in ("in_features=16", "out_features=8", "r=2", "alpha=4", "scaling=2", "bias=True",
                 "dropout=0.1", "use_rslora=False", "merged=False"):
        assert part in s, f"{part!r} not in {s!r}"


@pytest.mark.parametrize("r", [0, -1, 9, 2.0])
def test_bad_rank_raises(r):
    with pytest.raises(ValueError, match=r"^BaLoRALinear\(16->8\): r must be an integer in .*\[1, 8\], got "
                       + repr(r)):
        bk.BaLoRALinear(16, 8, r=r)
    with pytest.raises(ValueError, match=r"r must be an integer"):
        bk.BaLoRALinear.from_linear(nn.Linear(16, 8), r=r)


def test_bad_dropout_raises():
    with pytest.raises(ValueError, match="dropout must be in"):
        bk.BaLoRALinear(16, 8, r=2, dropout=1.0)


@pytest.mark.parametrize("case", ["in_features", "dtype", "int"])
def test_call_time_errors_name_layer_and_shapes(case):
    m = bk.BaLoRALinear(16, 8, r=2, name="model.layers.0.v_proj")
    x = {"in_features": torch.randn(3, 15), "dtype": torch.randn(3, 16, dtype=torch.float64),
         "int": torch.ones(3, 16, dtype=torch.int64)}[case]
    A0, B0 = m.lora_A.detach().clone(), m.lora_B.detach().clone()
    with pytest.raises(ValueError) as e:
        m(x)
    msg = str(e.value)
    assert msg.startswith("model.layers.0.v_proj:"), msg
    assert f"x {tuple(x.shape)}" in msg and "weight (8, 16)" in msg and "lora_A (2, 16)" in msg, msg
    assert_bitwise_equal(m.lora_A, A0, "lora_A after the error")
    assert_bitwise_equal(m.lora_B, B0, "lora_B after the error")


def test_default_name_in_call_error():
    m = bk.BaLoRALinear(16, 8, r=2)
    with pytest.raises(ValueError, match=r"^BaLoRALinear\(16->8\):"):
        m(torch.randn(2, 5))


def test_fp32_adapters_on_bf16_layer():
    m = bk.BaLoRALinear(32, 16, r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
    nn.init.normal_(m.lora_B)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and m.lora_B.grad.dtype == torch.float32


def test_merge_float64_weight_with_float32_adapters_keeps_float64_accuracy():
    """The merged delta is formed in the wider of the weight's and the adapters' dtypes."""
    m = bk.BaLoRALinear(40, 24, r=6, alpha=12, dtype=torch.float64, adapter_dtype=torch.float32)
    nn.init.normal_(m.lora_B, std=0.1)
    w0 = m.weight.detach().clone()
    exact = w0 + m.scaling * m.lora_B.double() @ m.lora_A.double()
    m.merge()
    assert_rel_close(m.weight, exact, 1e-14, "merged float64 weight")
    m.unmerge()
    assert_rel_close(m.weight, w0, 1e-14, "float64 weight after unmerge")


def test_rank_limit_is_min_of_in_and_out_both_ways():
    """r <= min(in, out) whichever of in and out is smaller (8 -> 16 here: in is the limit)."""
    with pytest.raises(ValueError, match=r"^BaLoRALinear\(8->16\): r must be an integer in .*\[1, 8\], got 9"):
        bk.BaLoRALinear(8, 16, r=9)
    assert bk.BaLoRALinear(8, 16, r=8).r == 8


def test_reset_parameters_after_meta_construction():
    """Built on the meta device, materialised with to_empty(), then reset_parameters(): initialised like a fresh
    layer (lora_B zeros, lora_A and the base kaiming-uniform), not left as uninitialised memory."""
    with torch.device("meta"):
        m = bk.BaLoRALinear(64, 32, r=4, bias=True)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    m.merged = True
    m.reset_parameters()
    bound = 1 / math.sqrt(64)
    assert torch.count_nonzero(m.lora_B) == 0 and not m.merged
    for t in (m.weight, m.bias, m.lora_A):
        assert torch.isfinite(t).all() and 0 < t.abs().max() <= bound
    x = torch.randn(3, 64)
    assert_rel_close(m(x), F.linear(x, m.weight, m.bias), 1e-6, "reset layer = base layer")


def test_merged_flag_travels_with_the_state_dict(tmp_path):
    """A merged layer's weights already hold s B A: loading them into a fresh layer must not add it again, and an
    unmerged state loaded into a merged layer must run the adapter again. The flag is the module's extra state
    (a bool tensor: torch.save, safetensors and torch.distributed.checkpoint take it). State dicts without it
    (older checkpoints) load as not merged when they hold the weight, and leave the flag alone when they hold
    only the adapters; a refused load leaves it as it was."""
    torch.manual_seed(0)
    m = bk.BaLoRALinear(16, 12, r=3, alpha=6)
    nn.init.normal_(m.lora_B)
    x = torch.randn(4, 16)
    y = m(x).detach()
    unmerged_sd = {k: v.clone() for k, v in m.state_dict().items()}
    assert not unmerged_sd["_extra_state"]
    m.merge()
    merged_sd = m.state_dict()
    assert merged_sd["_extra_state"]
    fresh = bk.BaLoRALinear(16, 12, r=3, alpha=6)
    fresh.load_state_dict(merged_sd)
    assert fresh.merged
    assert_rel_close(fresh(x), y, 1e-5, "merged weights in a fresh layer")
    m.load_state_dict(unmerged_sd)              # m was merged
    assert not m.merged
    assert_rel_close(m(x), y, 1e-5, "unmerged weights in a merged layer")
    m.merge()
    m.load_state_dict({k: unmerged_sd[k] for k in ("lora_A", "lora_B")}, strict=False)   # adapters only
    assert m.merged
    assert_rel_close(m(x), y, 1e-5, "adapters loaded into a merged layer")
    old = {k: v for k, v in unmerged_sd.items() if k != "_extra_state"}
    m.load_state_dict(old)                      # strict: the missing flag is not an error
    assert not m.merged
    assert_rel_close(m(x), y, 1e-5, "a state dict without the flag")
    with pytest.raises(RuntimeError, match="size mismatch"):
        bk.BaLoRALinear(16, 12, r=2).load_state_dict(merged_sd)
    refused = bk.BaLoRALinear(16, 12, r=2)
    with pytest.raises(RuntimeError):
        refused.load_state_dict(merged_sd)
    assert not refused.merged
    st = pytest.importorskip("safetensors.torch")
    st.save_file(merged_sd, str(tmp_path / "m.safetensors"))
    again = bk.BaLoRALinear(16, 12, r=3, alpha=6)
    again.load_state_dict(st.load_file(str(tmp_path / "m.safetensors")))
    assert again.merged
