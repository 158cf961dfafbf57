"""balora_kernels.integrations.peft and .checkpoint on tiny models built from configs (no downloads)."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import balora_kernels as bk  # noqa: E402
from balora_kernels import functional, reference  # noqa: E402
from balora_kernels.baselines import OneLinear  # noqa: E402
from balora_kernels.integrations.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from balora_kernels.integrations.peft import to_balora, unpatch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB = 128


def tiny_llama(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def tiny_peft(seed=0, dtype=torch.float32, device="cpu", randomize_b=True, **lora):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0, **lora}
    autocast_adapter_dtype = lora.pop("autocast_adapter_dtype", True)
    model = get_peft_model(tiny_llama(seed, dtype, device), LoraConfig(**lora),
                           autocast_adapter_dtype=autocast_adapter_dtype)
    if randomize_b:     # PEFT starts B at zero; random B makes the LoRA branch (and balancing) matter
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g).to(p))
    return model


def tokens(seed, batch=2, seq=16, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g).to(device)


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class CountCalls:
    """Counts calls of functional.lora_linear (proves the fast path ran, not PEFT's fallback)."""

    def __init__(self, monkeypatch):
        self.n, self.depth = 0, 0
        orig = functional.lora_linear

        def counted(*a, **k):           # lora_linear re-enters itself under autocast: count once
            self.n += self.depth == 0
            self.depth += 1
            try:
                return orig(*a, **k)
            finally:
                self.depth -= 1
        monkeypatch.setattr(functional, "lora_linear", counted)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_patch_unpatch_round_trip(device, monkeypatch):
    model = tiny_peft(device=device).eval()
    x = tokens(0, device=device)
    with torch.no_grad():
        ref = model(x).logits
    calls = CountCalls(monkeypatch)
    balora = to_balora(model)
    assert len(balora.report.patched) == 14 and not balora.report.left     # 2 layers x 7 linears
    assert len(balora.report.projected) == 14 and not balora.report.not_projected
    with torch.no_grad():
        out = model(x).logits
    assert calls.n == 14
    if device == "cpu":
        assert torch.equal(out, ref)            # same ops, same order on the CPU path
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already patched"):
        to_balora(model)
    assert balora.undo() == 14
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        again = model(x).logits
    assert calls.n == 14 and torch.equal(again, ref)
    assert unpatch(model) == 0
    balora2 = to_balora(model)                  # patchable again
    assert len(balora2.report.patched) == 14
    balora2.undo()


def test_patched_gradients_match_peft_fp32():
    model = tiny_peft(seed=3)
    twin = copy.deepcopy(model)
    to_balora(model)
    x = tokens(1)
    out = model(x, labels=x)
    out_ref = twin(x, labels=x)
    out.loss.backward()
    out_ref.loss.backward()
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-6, atol=1e-6)
    for (n, p), (_, q) in zip(lora_params(model).items(), lora_params(twin).items()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("case", ["bf16_adapters", "fp32_adapters_autocast"])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_within_2x_of_peft(case, device, monkeypatch):
    """Error vs a float64 copy of the same model <= 2x plain PEFT's error in the same precision."""
    if case == "bf16_adapters":
        model = tiny_peft(seed=5, dtype=torch.bfloat16, device=device, autocast_adapter_dtype=False)
    else:
        model = tiny_peft(seed=5, dtype=torch.bfloat16, device=device)
        assert all(p.dtype == torch.float32 for p in lora_params(model).values())
    model.eval()
    ref_model = copy.deepcopy(model).double()
    x = tokens(2, batch=4, seq=32, device=device)
    with torch.no_grad():
        ref = ref_model(x).logits
        ctx = torch.autocast(device, torch.bfloat16) if case != "bf16_adapters" else torch.enable_grad()
        with ctx:
            peft_out = model(x).logits
        calls = CountCalls(monkeypatch)
        balora = to_balora(model)
        with ctx:
            ours = model(x).logits
    assert calls.n == 14, "the fast path did not run"
    e_ours, e_peft = rel_err(ours, ref), rel_err(peft_out, ref)
    assert e_ours <= 2 * e_peft, (case, e_ours, e_peft)
    balora.undo()


def test_fp32_adapters_on_bf16_without_autocast_stay_on_peft(monkeypatch):
    """PEFT runs a float32 adapter branch in float32 outside autocast; the patch hands it back."""
    model = tiny_peft(seed=6, dtype=torch.bfloat16).eval()
    x = tokens(3)
    with torch.no_grad():
        ref = model(x).logits
        calls = CountCalls(monkeypatch)
        to_balora(model)
        out = model(x).logits
    assert calls.n == 0 and torch.equal(out, ref)


def test_peft_state_is_respected(monkeypatch):
    """disable_adapter, merged adapters, dropout train/eval, a second adapter, lora_bias."""
    model = tiny_peft(seed=7, lora_dropout=0.5).eval()
    x = tokens(4)
    base_model = copy.deepcopy(model.get_base_model())
    for m in base_model.modules():          # PEFT layers with disable_adapters -> base output
        if hasattr(m, "disable_adapters"):
            m._disable_adapters = True
    to_balora(model)
    calls = CountCalls(monkeypatch)
    with torch.no_grad():
        ev = model(x).logits
        assert calls.n == 14
        with model.disable_adapter():
            off = model(x).logits
        assert calls.n == 14
        torch.testing.assert_close(off, base_model(x).logits, rtol=0, atol=0)
        model.train()
        tr1, tr2 = model(x).logits, model(x).logits         # dropout masks differ
        assert calls.n == 42 and not torch.equal(tr1, tr2)
        model.eval()
        model.merge_adapter()
        merged = model(x).logits
        assert calls.n == 42                                 # merged: PEFT's forward
        torch.testing.assert_close(merged, ev, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x).logits, ev, rtol=1e-4, atol=1e-5)

    # A second adapter: both active -> PEFT's forward; one active -> ours, with its own weights.
    model2 = tiny_peft(seed=8)
    model2.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_bias=True))
    with torch.no_grad():
        for n, p in model2.named_parameters():
            if "other" in n:
                p.normal_()
    model2.base_model.set_adapter(["default", "other"])
    ref_both = model2(x).logits
    balora = to_balora(model2)
    assert sum("several active adapters" in v for v in balora.report.left.values()) == 2
    calls2 = CountCalls(monkeypatch)
    torch.testing.assert_close(model2(x).logits, ref_both, rtol=0, atol=0)
    assert calls2.n == 12
    balora.undo()
    model2.base_model.set_adapter("other")                 # lora_bias adapter, q_proj only
    ref_other = model2(x).logits
    balora = to_balora(model2)
    assert len(balora.report.patched) == 2
    assert sum(v == "no active adapter on this layer" for v in balora.report.left.values()) == 12
    torch.testing.assert_close(model2(x).logits, ref_other, rtol=1e-5, atol=1e-6)
    assert calls2.n == 12 + 2
    balora.undo()


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lin1 = nn.Linear(16, 16)
        self.lin2 = nn.Linear(16, 12)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, ids, img):
        h = self.lin2(torch.relu(self.lin1(self.emb(ids))))
        return torch.cat([h.flatten(1), self.conv(img).flatten(1)], 1)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def test_report_and_projection_of_ineligible_layers():
    torch.manual_seed(0)
    ids, img = torch.randint(0, 20, (3, 5)), torch.randn(3, 3, 6, 6)
    model = get_peft_model(Mixed(), LoraConfig(r=3, target_modules=["emb", "lin1", "lin2", "conv"]))
    _randomize(model, 1)
    before = model(ids, img).detach()
    balora = to_balora(model)
    rep = balora.report
    assert sorted(rep.patched) == ["base_model.model.lin1", "base_model.model.lin2"]
    assert rep.left == {"base_model.model.emb": "embedding LoRA", "base_model.model.conv": "conv LoRA"}
    assert len(rep.projected) == 4 and "embedding LoRA" in str(rep)
    stats = balora.projector.project().as_dict()
    assert stats["projected"] == 4 and stats["gap_after"] < 1e-5 < stats["gap_before"]
    torch.testing.assert_close(model(ids, img), before, rtol=1e-5, atol=1e-5)
    conv = model.base_model.model.conv
    A = conv.lora_A["default"].weight.reshape(3, -1)
    B = conv.lora_B["default"].weight.reshape(-1, 3)
    torch.testing.assert_close(B.T @ B, A @ A.T, rtol=1e-4, atol=1e-5)
    # model.to() swaps the storage behind the conv views: the projector follows it.
    model.double()
    _randomize(model, 2)
    balora.projector.project()
    A = conv.lora_A["default"].weight.reshape(3, -1)
    B = conv.lora_B["default"].weight.reshape(-1, 3)
    torch.testing.assert_close(B.T @ B, A @ A.T, rtol=1e-10, atol=1e-12)
    balora.undo()

    # DoRA: left as PEFT's forward, still projected (its output depends on B A only).
    dora = get_peft_model(Mixed(), LoraConfig(r=3, target_modules=["lin1", "lin2"], use_dora=True))
    _randomize(dora, 3)
    before = dora(ids, img).detach()
    balora = to_balora(dora)
    assert balora.report.patched == [] and set(balora.report.left.values()) == {"DoRA"}
    assert balora.projector.project().as_dict()["projected"] == 2
    torch.testing.assert_close(dora(ids, img), before, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="no trainable PEFT LoRA adapter"):
        to_balora(Mixed())


def _train(model, projector, opt, steps, start=0, autocast=None):
    for step in range(start, start + steps):
        x = tokens(100 + step)
        with autocast or torch.enable_grad():
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()          # the projector runs in the optimizer's post-hook
        opt.zero_grad(set_to_none=True)


def test_save_pretrained_loads_in_plain_peft(tmp_path):
    model = tiny_peft(seed=11, randomize_b=False)
    balora = to_balora(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    balora.projector.attach(opt)
    _train(model, balora.projector, opt, 4)
    assert balora.projector.projections == 4
    model.eval()
    x = tokens(50)
    with torch.no_grad():
        ours = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    plain = PeftModel.from_pretrained(tiny_llama(seed=11), tmp_path).eval()
    assert not any("forward" in m.__dict__ for m in plain.modules())
    with torch.no_grad():
        theirs = plain(x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)


def test_master_weights_bf16_model_fp32_adapters_autocast():
    """The projection writes the float32 parameters AdamW owns, balanced to float32 precision."""
    model = tiny_peft(seed=12, dtype=torch.bfloat16)
    balora = to_balora(model)
    params = list(lora_params(model).values())
    assert all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    owned = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(A) in owned and id(B) in owned for _, A, B in balora.projector.named_pairs)
    balora.projector.attach(opt)
    _train(model, balora.projector, opt, 3, autocast=torch.autocast("cpu", torch.bfloat16))
    st = balora.projector.last_stats.as_dict()
    assert st["projected"] == 14 and st["gap_after"] < 1e-5      # float32-level, not bf16 (~1e-2)
    for _, A, B in balora.projector.named_pairs:
        G_B, G_A = reference.grams(A, B)
        assert reference.balance_gap(G_B, G_A) < 1e-5

    # Separate float32 masters for a bf16 model (apex-O2 / DeepSpeed style): project the masters.
    shadow = tiny_peft(seed=13, dtype=torch.bfloat16, autocast_adapter_dtype=False)
    named = lora_params(shadow)
    masters = {n: p.detach().float().clone().requires_grad_(True) for n, p in named.items()}
    pairs = [(n, masters[n], masters[n.replace("lora_A", "lora_B")]) for n in named if "lora_A" in n]
    projector = bk.BalancedProjector(pairs)
    products = [(B @ A).detach().clone() for _, A, B in pairs]
    projector.project()
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(masters[n])           # the framework's master -> model copy
    for (_, A, B), prod in zip(pairs, products):
        torch.testing.assert_close(B @ A, prod, rtol=1e-5, atol=1e-6)
        assert reference.balance_gap(*reference.grams(A, B)) < 1e-5
        assert torch.equal(named[_n(pairs, A)], A.to(torch.bfloat16))


def _n(pairs, A):
    return next(n for n, a, _ in pairs if a is A)


def test_resume_from_checkpoint_is_bitwise(tmp_path):
    def build(seed):
        model = tiny_peft(seed=20, lora_dropout=0.0)
        if seed != 20:          # different adapter values: the checkpoint must overwrite them
            _randomize(model, seed)
        balora = to_balora(model, every=2)
        opt = torch.optim.AdamW(lora_params(model).values(), lr=1e-2, betas=(0.8, 0.95))
        balora.projector.attach(opt)
        return model, opt, balora.projector

    model, opt, proj = build(20)
    _train(model, proj, opt, 3)
    path = os.fspath(tmp_path / "ckpt.safetensors")
    save_checkpoint(path, model, opt, proj, extra={"step": 3})
    _train(model, proj, opt, 4, start=3)
    assert proj.projections == 3                     # steps 2, 4, 6

    model2, opt2, proj2 = build(99)
    assert load_checkpoint(path, model2, opt2, proj2) == {"step": 3}
    assert proj2.steps == 3 and proj2.projections == 1
    _train(model2, proj2, opt2, 4, start=3)
    assert proj2.projections == 3
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name]), (k, name)

    # Nothing is unpickled, and a wrong model is refused before anything is written.
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert "balora" in f.metadata()
    other = tiny_peft(seed=20, r=8)
    snapshot = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(path, other)
    assert all(torch.equal(p, snapshot[n]) for n, p in other.named_parameters())


def test_fan_in_fan_out_layer_left_as_peft_and_inactive_adapter_not_projected():
    """A Conv1D (fan_in_fan_out) LoRA layer keeps PEFT's forward, with the reason in the report, and
    is still balanced; an inactive (frozen) adapter is reported as not projected and left untouched."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Conv1D(12, 10)              # GPT-2 style: weight [in, out]
            self.q = nn.Linear(12, 12)

        def forward(self, x):
            return self.q(self.c(x))                 # c: 10 -> 12, q: 12 -> 12

    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["c", "q"], fan_in_fan_out=True))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    second = {n: p.detach().clone() for n, p in model.named_parameters() if ".second." in n}
    x = torch.randn(3, 10)
    y0 = model(x)
    patch = to_balora(model)
    left = {k.split(".")[-1]: v for k, v in patch.report.left.items()}
    assert "fan_in_fan_out" in left.get("c", ""), patch.report
    assert any(k.endswith("c[default]") for k in patch.report.projected), patch.report
    assert any("second" in k for k in patch.report.not_projected), patch.report
    patch.projector.project()
    torch.testing.assert_close(model(x), y0, rtol=1e-5, atol=1e-6)      # products kept
    for n, p in model.named_parameters():
        if n in second:
            assert torch.equal(p, second[n]), f"inactive adapter {n} was written"
    patch.undo()


class _ClampedLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own (e.g. a quantisation-aware Linear)."""

    def forward(self, x):
        return super().forward(x).clamp(-0.1, 0.1)


def test_bases_that_are_not_plain_linear_forwards_stay_on_peft(monkeypatch):
    """PEFT calls ``self.base_layer(x)``: a base whose forward is not nn.Linear's, or another adapter wrapped around
    the Linear (PEFT's mixed models), must keep PEFT's forward (the fast path computes x W^T + b itself)."""
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(_ClampedLinear(8, 6)), LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = model(x)
        balora = to_balora(model)
        calls = CountCalls(monkeypatch)
        out = model(x)
    assert balora.report.left == {"base_model.model.lin": "base layer _ClampedLinear overrides nn.Linear.forward"}
    assert calls.n == 0 and torch.equal(out, ref)
    balora.undo()
    try:
        from peft import LoHaConfig
    except ImportError:
        return
    mixed = get_peft_model(OneLinear(nn.Linear(8, 6)), LoHaConfig(r=2, alpha=4, target_modules=["lin"],
                                                                  init_weights=False), adapter_name="loha", mixed=True)
    mixed.add_adapter("lora", LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False))
    mixed.set_adapter(["loha", "lora"])
    with torch.no_grad():
        ref = mixed(x)
        balora = to_balora(mixed)
        out = mixed(x)
    assert list(balora.report.left.values()) == ["base layer wrapped by peft.tuners.loha.layer.Linear (another "
                                                 "adapter or wrapper)"]
    assert torch.equal(out, ref)


def test_backward_hooks_keep_pefts_forward(monkeypatch):
    """A backward hook on a LoRA sub-module fires under PEFT's forward: the patched forward then hands the call back
    to PEFT (it would bypass the sub-module's call)."""
    model = tiny_peft(seed=3)
    balora = to_balora(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    fired = []
    h = q.lora_A["default"].register_full_backward_hook(lambda *a: fired.append(1))
    calls = CountCalls(monkeypatch)
    model(tokens(1)).logits.sum().backward()
    assert fired and calls.n == 13                       # the other 13 layers still take the fast path
    h.remove()
    balora.undo()


def test_patched_model_pickles(tmp_path):
    """torch.save(model) of a patched model loads back patched, with the same outputs (the patched forward is a
    picklable partial, not a bound method); deepcopy too."""
    model = tiny_peft(seed=5).eval()
    to_balora(model)
    x = tokens(2)
    with torch.no_grad():
        ref = model(x).logits
    path = tmp_path / "model.pt"
    torch.save(model, path)
    for other in (torch.load(path, weights_only=False), copy.deepcopy(model)):
        patched = [m for m in other.modules() if "forward" in m.__dict__]
        assert len(patched) == 14 and all(m.forward.args[0] is m for m in patched)
        with torch.no_grad():
            assert torch.equal(other(x).logits, ref)
        assert unpatch(other) == 14


def test_projector_follows_set_adapter_and_replaced_parameters():
    """to_balora's projector projects the adapters that require grad at each projection: after PEFT's set_adapter
    the adapter now trained, not the one now frozen; and parameters replaced by load_state_dict(assign=True)."""
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(nn.Linear(8, 6)), LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    _randomize(model, 1)
    balora = to_balora(model)
    assert balora.report.projected == ["base_model.model.lin[default]"]
    layer = model.base_model.model.lin

    def gap(key):
        A, B = layer.lora_A[key].weight.double(), layer.lora_B[key].weight.double()
        return ((B.T @ B - A @ A.T).norm() / (B.T @ B).norm()).item()

    model.set_adapter("other")
    assert balora.projector.names == ["base_model.model.lin[other]"]      # (state_dict / checkpoints see it now)
    frozen = layer.lora_A["default"].weight.detach().clone()
    assert gap("other") > 0.1
    stats = balora.projector.project().as_dict()
    assert stats["projected"] == 1 and gap("other") < 1e-6
    assert torch.equal(layer.lora_A["default"].weight, frozen)
    sd = {k: v + 0.5 for k, v in model.state_dict().items() if "lora_" in k and "other" in k}
    model.load_state_dict(sd, strict=False, assign=True)
    assert gap("other") > 0.1
    balora.projector.project()
    assert gap("other") < 1e-6
    balora.undo()


def test_projectors_follow_added_and_deleted_adapters():
    """After add_adapter + set_adapter the new adapter is projected (to_balora's projector scans the model again),
    and after delete_adapter neither projector fails on the deleted adapter's lookup."""
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(nn.Linear(8, 6)), LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    _randomize(model, 2)
    balora = to_balora(model)
    plain = bk.BalancedProjector(model)
    model.add_adapter("c", LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False))
    model.set_adapter("c")
    layer = model.base_model.model.lin
    for proj in (balora.projector, plain):
        with torch.no_grad():
            layer.lora_B["c"].weight.normal_()
        A, B = layer.lora_A["c"].weight.double(), layer.lora_B["c"].weight.double()
        assert ((B.T @ B - A @ A.T).norm() / (B.T @ B).norm()).item() > 0.1
        proj.project()
        A, B = layer.lora_A["c"].weight.double(), layer.lora_B["c"].weight.double()
        assert ((B.T @ B - A @ A.T).norm() / (B.T @ B).norm()).item() < 1e-6
        assert proj.names == ["base_model.model.lin[c]"]
    model.delete_adapter("default")
    for proj in (balora.projector, plain):
        proj.project()
        assert proj.names == ["base_model.model.lin[c]"]
    balora.undo()


def test_checkpoint_all_params_keeps_the_merged_flag(tmp_path):
    """save_checkpoint(params="all") / load_checkpoint carry BaLoRALinear's merged flag (its extra state) into the
    model, not into a copy; a refused load restores it."""
    torch.manual_seed(0)
    net = nn.Sequential(bk.BaLoRALinear(8, 6, r=2), bk.BaLoRALinear(6, 4, r=2))
    nn.init.normal_(net[0].lora_B)
    net[0].merge()
    x = torch.randn(3, 8)
    y = net(x).detach()
    save_checkpoint(str(tmp_path / "ck.safetensors"), net, params="all")
    fresh = nn.Sequential(bk.BaLoRALinear(8, 6, r=2), bk.BaLoRALinear(6, 4, r=2))
    load_checkpoint(str(tmp_path / "ck.safetensors"), fresh)
    assert fresh[0].merged and not fresh[1].merged
    torch.testing.assert_close(fresh(x), y)
    other = nn.Sequential(bk.BaLoRALinear(8, 6, r=2), bk.BaLoRALinear(6, 4, r=2))
    opt = torch.optim.SGD([p for p in other.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(str(tmp_path / "ck.safetensors"), other, optimizer=opt)
    assert not other[0].merged


def test_all_params_checkpoint_without_extra_state_still_loads(tmp_path):
    """An "all" checkpoint written before BaLoRALinear had extra state (no _extra_state keys) loads, as not merged."""
    torch.manual_seed(0)
    net = nn.Sequential(bk.BaLoRALinear(8, 6, r=2), bk.BaLoRALinear(6, 4, r=2))
    save_checkpoint(str(tmp_path / "ck.safetensors"), net, params="all")
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ck.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("_extra_state")}
    m = json.loads(meta["balora"])
    m["model_keys"] = [k for k in m["model_keys"] if not k.endswith("_extra_state")]
    meta["balora"] = json.dumps(m)
    st.save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    fresh = nn.Sequential(bk.BaLoRALinear(8, 6, r=2), bk.BaLoRALinear(6, 4, r=2))
    fresh[0].merged = True
    load_checkpoint(str(tmp_path / "old.safetensors"), fresh)
    torch.testing.assert_close(fresh[1].lora_A, net[1].lora_A)


@pytest.mark.parametrize("reentrant", (False, True), ids=("non_reentrant", "reentrant"))
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_matches_plain_training(device, reentrant, monkeypatch):
    """transformers' gradient checkpointing on a patched model with LoRA dropout: the decoder layers' forwards
    (with the fast path's dropout masks) run again in the backward and give the same loss and adapter gradients
    as the patched model without checkpointing, bit for bit."""
    model = tiny_peft(seed=5, device=device, lora_dropout=0.2)
    twin = copy.deepcopy(model)
    to_balora(model)
    to_balora(twin)
    if hasattr(model, "activation_checkpointing_enable"):     # (transformers >= 5.24's name)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()    # (the reentrant variant needs an input that requires grad)
    calls = CountCalls(monkeypatch)
    x = tokens(2, device=device)
    losses = []
    for m in (model, twin):
        m.train()
        torch.manual_seed(7)
        out = m(x, labels=x)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert calls.n == 14 * 3      # 14 patched layers: checkpointed forward + its recomputation, then the twin's
    assert torch.equal(losses[0], losses[1])
    for (n, p), (_, q) in zip(lora_params(model).items(), lora_params(twin).items()):
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        assert torch.equal(p.grad, q.grad), f"{n}: gradients differ under gradient checkpointing"


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_over_patched_model(device):
    """torch.func.functional_call + grad over a to_balora model: the patched forwards use the substituted
    parameters (not the module's) and give autograd's gradients."""
    from torch.func import functional_call, grad
    model = tiny_peft(seed=4, device=device)
    to_balora(model)
    x = tokens(3, device=device)
    params = {n: p.detach() for n, p in lora_params(model).items()}
    g = grad(lambda p: functional_call(model, p, (x,), {"labels": x}).loss)(params)
    model(x, labels=x).loss.backward()
    for n, p in lora_params(model).items():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    doubled = {n: 2 * v if "lora_B" in n else v for n, v in params.items()}
    with torch.no_grad():
        subst = functional_call(model, doubled, (x,)).logits
        for n, p in lora_params(model).items():
            if "lora_B" in n:
                p.mul_(2)
        assert torch.equal(subst, model(x).logits)


def test_peft_projector_refresh_without_checks():
    """to_balora's projector with its per-call checks off (``follow_model`` / ``check_params`` set False): an
    adapter frozen meanwhile is still projected until ``refresh()``; a refresh with every adapter frozen raises and
    leaves the projector as it was (its pairs and the sources it scanned)."""
    model = tiny_peft(seed=41)
    proj = to_balora(model).projector
    proj.follow_model = proj.check_params = False
    n0 = len(proj.names)
    for name, p in model.named_parameters():
        if "lora_" in name and ".layers.0." in name:
            p.requires_grad_(False)
    assert len(proj.names) == n0                        # not looked up again
    proj.refresh()
    assert 0 < len(proj.names) < n0
    names, sources, plan = proj.names, list(proj._sources), proj._plan
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    with pytest.raises(ValueError, match="refresh: no trainable LoRA adapter left"):
        proj.refresh()
    assert proj.names == names and proj._sources == sources and proj._plan is plan
    proj.project()                                      # still the pairs it held
