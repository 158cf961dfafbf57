"""BalancedProjector: discovery (BaLoRALinear, PEFT), grouping, counters, the optimizer hook,
state_dict round trips and input errors that leave every parameter untouched."""
import copy

import pytest
import torch
import torch.nn as nn

import balora_kernels as bk
from balora_kernels.ops.projection import group_pairs
from utils import (assert_balanced_like_oracle, assert_bitwise_equal, assert_rel_close, gap64,
                   product_rel_err)


def _randomize(model, std=0.3):
    """Fresh random adapters (B is zero at init; a zero B is a case of its own)."""
    with torch.no_grad():
        for _, A, B in bk.find_adapters(model):
            A.normal_()
            B.normal_(std=std)


def _snapshot(model):
    return [(n, A.detach().clone(), B.detach().clone()) for n, A, B in bk.find_adapters(model)]


class Mixed(nn.Module):
    """Layers of mixed shapes, ranks and adapter dtypes (several of each shape)."""

    def __init__(self):
        super().__init__()
        self.a1 = bk.BaLoRALinear(24, 16, r=4, adapter_dtype=torch.float32)
        self.a2 = bk.BaLoRALinear(24, 16, r=4, adapter_dtype=torch.float32)
        self.b1 = bk.BaLoRALinear(24, 16, r=8, adapter_dtype=torch.float32)     # same shape, other r
        self.c1 = bk.BaLoRALinear(16, 40, r=4, adapter_dtype=torch.float64)
        self.c2 = bk.BaLoRALinear(16, 40, r=4, adapter_dtype=torch.float64)
        self.d1 = bk.BaLoRALinear(40, 24, r=2, dtype=torch.bfloat16)
        self.e1 = bk.BaLoRALinear(24, 16, r=4, adapter_dtype=torch.float64)     # a1's shapes, other dtype
        self.frozen = nn.Linear(8, 8)                                           # not an adapter


@pytest.mark.parametrize("mode", ["nearest", "svd"])
def test_grouping_mixed_shapes_ranks_dtypes(mode):
    model = Mixed()
    _randomize(model)
    before = _snapshot(model)
    proj = bk.BalancedProjector(model, mode=mode)
    assert proj.names == ["a1", "a2", "b1", "c1", "c2", "d1", "e1"]
    groups = group_pairs([(A, B) for _, A, B in bk.find_adapters(model)])
    assert groups == [[0, 1], [2], [3, 4], [5], [6]]
    stats = proj.project().as_dict()
    assert stats == {**stats, "pairs": 7, "projected": 7, "skipped_nonfinite": 0, "skipped_zero": 0,
                     "rank_deficient": 0}
    assert stats["gap_before"] > 0.1 and stats["gap_after"] < 1e-12
    for (n, A0, B0), (_, A1, B1) in zip(before, bk.find_adapters(model)):
        assert A1.dtype == A0.dtype and B1.dtype == B0.dtype
        assert_balanced_like_oracle(A0, B0, A1, B1, mode, n)
    assert proj.projections == 1 and proj.last_stats is not None


def test_counters_zero_nonfinite_rank_deficient():
    model = nn.ModuleList([bk.BaLoRALinear(20, 12, r=4) for _ in range(5)])
    _randomize(model)
    with torch.no_grad():
        model[1].lora_B.zero_()                  # PEFT-style fresh adapter: skipped_zero
        model[2].lora_A[1, 3] = float("nan")     # skipped_nonfinite
        model[3].lora_B[:, 2] = 0                # rank 3 of 4: projected, rank_deficient
    before = _snapshot(model)
    stats = bk.BalancedProjector(model).project()
    d = stats.as_dict()
    assert {k: d[k] for k in ("pairs", "projected", "skipped_nonfinite", "skipped_zero", "rank_deficient")} == \
        {"pairs": 5, "projected": 3, "skipped_nonfinite": 1, "skipped_zero": 1, "rank_deficient": 1}
    # gap_after is the largest over projected pairs: the rank-3 pair, whose dead component is kept as is
    assert abs(d["gap_after"] - gap64(model[3].lora_A, model[3].lora_B)) <= 1e-6 * d["gap_after"]
    assert d["gap_before"] == pytest.approx(max(gap64(b[1], b[2]) for b in (before[0], before[3], before[4])), rel=1e-6)
    for i in (1, 2):
        assert_bitwise_equal(model[i].lora_A, before[i][1], f"skipped pair {i} A")
        assert_bitwise_equal(model[i].lora_B, before[i][2], f"skipped pair {i} B")
    for i in (0, 3, 4):
        assert product_rel_err(before[i][1], before[i][2], model[i].lora_A, model[i].lora_B) <= 1e-5
    for i in (0, 4):
        assert gap64(model[i].lora_A, model[i].lora_B) <= 1e-5
    assert "skipped_nonfinite=1" in repr(stats)


def _tiny_peft_model():
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 12)
            self.q = nn.Linear(12, 12)
            self.v = nn.Linear(12, 20)
            self.out = nn.Linear(20, 5)

        def forward(self, ids):
            h = self.emb(ids)
            return self.out(torch.relu(self.v(h + self.q(h))))

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "emb"], init_lora_weights=True)
    model = peft.get_peft_model(Tiny(), cfg)
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v"]))
    return model


def test_peft_model_discovery_and_projection():
    model = _tiny_peft_model()
    # the added adapter "second" is inactive: PEFT froze it, so it is not projected
    assert sorted(n.split(".")[-1] for n, _, _ in bk.find_adapters(model)) == ["q[default]", "v[default]"]
    for name, p in model.named_parameters():
        if ".second." in name:
            p.requires_grad_(True)
    found = bk.find_adapters(model)
    names = [n for n, _, _ in found]
    assert len(names) == 3, names                      # q[default], v[default], v[second]; not the embedding
    assert sum(n.endswith("q[default]") for n in names) == 1
    assert sum(n.endswith("v[default]") for n in names) == 1
    assert sum(n.endswith("v[second]") for n in names) == 1
    shapes = sorted((tuple(A.shape), tuple(B.shape)) for _, A, B in found)
    assert shapes == [((2, 12), (20, 2)), ((4, 12), (12, 4)), ((4, 12), (20, 4))]
    # PEFT initialises B = 0: a fresh model is all zero products, left untouched
    before = _snapshot(model)
    s = bk.BalancedProjector(model).project().as_dict()
    assert s["skipped_zero"] == 3 and s["projected"] == 0
    for (n, A0, B0), (_, A1, B1) in zip(before, bk.find_adapters(model)):
        assert_bitwise_equal(A1, A0, n)
        assert_bitwise_equal(B1, B0, n)
    # trained-looking adapters: projected in place, the model's function is kept
    _randomize(model)
    ids = torch.randint(0, 11, (3, 7))
    y0 = model(ids).detach()
    before = _snapshot(model)
    s = bk.BalancedProjector(model).project().as_dict()
    assert s["projected"] == 3 and s["gap_after"] < 1e-6
    assert_rel_close(model(ids), y0, 1e-5, "PEFT model output after projection")
    for (n, A0, B0), (_, A1, B1) in zip(before, bk.find_adapters(model)):
        assert_balanced_like_oracle(A0, B0, A1, B1, "nearest", n)


def _train(model, proj, steps, seed_offset=0, opt=None):
    opt = opt or torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t in range(steps):
        g = torch.Generator().manual_seed(1000 + seed_offset + t)
        x = torch.randn(8, 16, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _net():
    net = nn.Sequential(bk.BaLoRALinear(16, 12, r=4), nn.Tanh(), bk.BaLoRALinear(12, 16, r=3))
    _randomize(net)
    return net


def test_optimizer_hook_projects_exactly_every_k_steps_and_detach():
    net = _net()
    proj = bk.BalancedProjector(net, every=3)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    assert proj.attach(opt) is proj
    with pytest.raises(RuntimeError, match="already attached"):
        proj.attach(opt)
    balanced_after = []
    for step in range(1, 10):
        _train(net, proj, 1, seed_offset=step, opt=opt)
        gaps = [gap64(A, B) for _, A, B in bk.find_adapters(net)]
        balanced_after.append(max(gaps) < 1e-5)
        assert proj.steps == step and proj.projections == step // 3
    assert balanced_after == [False, False, True] * 3
    proj.detach()
    proj.detach()                                      # a second detach is harmless
    _train(net, proj, 3, seed_offset=50, opt=opt)
    assert proj.steps == 9 and proj.projections == 3
    assert max(gap64(A, B) for _, A, B in bk.find_adapters(net)) > 1e-5


@pytest.mark.parametrize("split", [4, 6])
def test_state_dict_round_trip_resumes_exactly(split):
    torch.manual_seed(7)
    net = _net()
    start = copy.deepcopy(net.state_dict())
    # the uninterrupted run
    proj = bk.BalancedProjector(net, mode="svd", every=3)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    proj.attach(opt)
    _train(net, proj, 10, opt=opt)
    final = copy.deepcopy(net.state_dict())
    assert proj.projections == 3
    # interrupted at `split`, resumed from state_dicts into fresh objects
    net1 = _net()
    net1.load_state_dict(start)
    proj1 = bk.BalancedProjector(net1, mode="svd", every=3)
    opt1 = torch.optim.Adam([p for p in net1.parameters() if p.requires_grad], lr=1e-2)
    proj1.attach(opt1)
    _train(net1, proj1, split, opt=opt1)
    saved = copy.deepcopy((net1.state_dict(), opt1.state_dict(), proj1.state_dict()))
    net2 = _net()
    net2.load_state_dict(saved[0])
    proj2 = bk.BalancedProjector(net2)                 # defaults: mode and every come from the state
    opt2 = torch.optim.Adam([p for p in net2.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(saved[1])
    proj2.load_state_dict(saved[2])
    assert (proj2.mode, proj2.every, proj2.steps, proj2.projections) == ("svd", 3, split, split // 3)
    proj2.attach(opt2)
    _train(net2, proj2, 10 - split, seed_offset=split, opt=opt2)
    assert proj2.steps == 10 and proj2.projections == 3
    for k, v in final.items():
        assert_bitwise_equal(net2.state_dict()[k], v, f"resumed {k}")


# --------------------------------------------------------------------------------------------
# bad inputs: a clear error, nothing modified
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,exc,match", [
    ("mode", ValueError, r"BalancedProjector: mode must be one of \('nearest', 'svd'\), got 'polar'"),
    ("every0", ValueError, r"BalancedProjector: every must be a positive integer, got 0"),
    ("every_float", ValueError, r"every must be a positive integer, got 2.5"),
    ("every_bool", ValueError, r"every must be a positive integer, got True"),
    ("empty", ValueError, r"BalancedProjector: no LoRA adapters found"),
    ("bad_item", TypeError, r"BalancedProjector: item 1 is neither a module nor an \(A, B\) pair: str"),
    ("rank_mismatch", ValueError, r"adapter 'pair0' must have lora_A \[r, in\] and lora_B \[out, r\].*"
                                  r"lora_A \(3, 10\) float32 on cpu, lora_B \(6, 4\) float32 on cpu"),
    ("not_2d", ValueError, r"adapter 'w' must have .*lora_A \(3, 10, 1\)"),
    ("int", ValueError, r"adapter 'pair0' .*floating.*lora_B \(6, 3\) int64"),
    ("device", ValueError, r"adapter 'pair0' .*on one device.*lora_B \(6, 3\) float32 on meta"),
])
def test_constructor_errors(case, exc, match):
    A, B = torch.randn(3, 10), torch.randn(6, 3)
    A0, B0 = A.clone(), B.clone()
    args = {
        "mode": ([(A, B)], {"mode": "polar"}),
        "every0": ([(A, B)], {"every": 0}),
        "every_float": ([(A, B)], {"every": 2.5}),
        "every_bool": ([(A, B)], {"every": True}),
        "empty": (nn.Sequential(nn.Linear(3, 3)), {}),
        "bad_item": ([(A, B), "lora"], {}),
        "rank_mismatch": ([(A, torch.randn(6, 4))], {}),
        "not_2d": ([("w", A[..., None], B)], {}),
        "int": ([(A, torch.ones(6, 3, dtype=torch.int64))], {}),
        "device": ([(A, torch.empty(6, 3, device="meta"))], {}),
    }[case]
    with pytest.raises(exc, match=match):
        bk.BalancedProjector(args[0], **args[1])
    assert_bitwise_equal(A, A0, "A")
    assert_bitwise_equal(B, B0, "B")


def test_parameter_changed_shape_is_a_named_error_and_nothing_is_written():
    net = _net()
    proj = bk.BalancedProjector(net)
    proj.project()
    _randomize(net)                                    # unbalance again
    with torch.no_grad():
        net[2].lora_B.data = torch.randn(16, 5)        # no longer [out, r] for its lora_A
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"adapter '2' must have .*lora_A \(3, 12\).*lora_B \(16, 5\)"):
        proj.project()
    for (n, A0, B0), (_, A1, B1) in zip(before, bk.find_adapters(net)):
        assert_bitwise_equal(A1, A0, n)
        assert_bitwise_equal(B1, B0, n)
    assert proj.projections == 1


@pytest.mark.parametrize("case", ["names", "missing", "mode", "every", "steps"])
def test_load_state_dict_errors_leave_projector_unchanged(case):
    net = _net()
    proj = bk.BalancedProjector(net, every=2)
    good = proj.state_dict()
    bad = {"names": {**good, "names": ["0", "x"]}, "missing": {"names": good["names"], "mode": "svd"},
           "mode": {**good, "mode": "qr"}, "every": {**good, "mode": "svd", "every": 0},
           "steps": {**good, "mode": "svd", "every": 5, "steps": "x"}}[case]
    with pytest.raises(ValueError, match=r"^BalancedProjector.load_state_dict: "):
        proj.load_state_dict(bad)
    assert proj.state_dict() == good


def test_balance_functional_in_place():
    pairs = [(torch.randn(4, 9, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)) for _ in range(3)]
    before = [(A.clone(), B.clone()) for A, B in pairs]
    stats = bk.balance_(pairs, mode="svd").as_dict()
    assert stats["projected"] == 3
    for i, ((A0, B0), (A1, B1)) in enumerate(zip(before, pairs)):
        assert_balanced_like_oracle(A0, B0, A1, B1, "svd", f"pair {i}")
    with pytest.raises(ValueError, match="mode must be one of"):
        bk.balance_(pairs, mode="bad")


def test_frozen_adapters_are_not_projected():
    """A pair whose factors do not require grad (a frozen or inactive adapter) is left out."""
    net = nn.Sequential(bk.BaLoRALinear(12, 10, 3), bk.BaLoRALinear(10, 12, 3))
    for m in net:
        nn.init.normal_(m.lora_B)
    net[1].lora_A.requires_grad_(False)
    net[1].lora_B.requires_grad_(False)
    A1, B1 = net[1].lora_A.detach().clone(), net[1].lora_B.detach().clone()
    proj = bk.BalancedProjector(net)
    assert proj.names == ["0"]
    proj.project()
    assert_bitwise_equal(net[1].lora_A, A1, "frozen A")
    assert_bitwise_equal(net[1].lora_B, B1, "frozen B")


def test_balance_bad_pair_names_it_and_leaves_all_untouched():
    good = (torch.randn(3, 10), torch.randn(7, 3))
    bad = (torch.randn(3, 10), torch.randn(7, 4))          # r mismatch
    before = [t.clone() for t in good + bad]
    with pytest.raises(ValueError, match=r"^balance_: adapter 'pair1' must have lora_A \[r, in\] and lora_B "
                                         r"\[out, r\].*lora_A \(3, 10\) float32 on cpu, lora_B \(7, 4\)"):
        bk.balance_([good, bad])
    for t, b in zip(good + bad, before):
        assert_bitwise_equal(t, b, "pair after a refused balance_")


def test_load_state_dict_names_the_first_differing_adapter():
    net = nn.Sequential(bk.BaLoRALinear(12, 10, 3), bk.BaLoRALinear(10, 12, 3))
    state = bk.BalancedProjector(net).state_dict()
    state["names"] = ["0", "other"]
    with pytest.raises(ValueError, match=r"first difference at index 1: saved 'other', here '1'"):
        bk.BalancedProjector(net).load_state_dict(state)


def test_backend_says_which_plan_runs_and_why():
    net = nn.Sequential(bk.BaLoRALinear(12, 10, 3))
    b = bk.BalancedProjector(net).backend
    assert b == {"plan": "TorchProjectionPlan", "backend": "torch", "why": "cpu tensors take the torch path"}


def test_follows_parameters_replaced_and_adapters_unfrozen():
    """Built from a model, the projector looks its adapters up again before every projection: a parameter replaced
    by a new object (load_state_dict(assign=True), a new nn.Parameter) is projected, not the dead tensor it held,
    and an adapter that starts requiring grad joins (one that stops leaves); none left is a named error."""
    torch.manual_seed(0)
    net = nn.Sequential(bk.BaLoRALinear(12, 10, 3), bk.BaLoRALinear(10, 12, 3))
    _randomize(net)
    proj = bk.BalancedProjector(net)
    other = copy.deepcopy(net)
    _randomize(other, std=2.0)
    net.load_state_dict(other.state_dict(), assign=True)          # new Parameter objects
    net[1].lora_A = nn.Parameter(torch.randn(3, 10))              # and one assigned directly
    assert gap64(net[0].lora_A, net[0].lora_B) > 0.1 and gap64(net[1].lora_A, net[1].lora_B) > 0.1
    proj.project()
    for m in net:
        assert gap64(m.lora_A, m.lora_B) < 1e-5
    net[1].lora_A.requires_grad_(False)
    net[1].lora_B.requires_grad_(False)
    _randomize(net)
    frozen = (net[1].lora_A.detach().clone(), net[1].lora_B.detach().clone())
    proj.project()
    assert proj.names == ["0"] and gap64(net[0].lora_A, net[0].lora_B) < 1e-5
    assert_bitwise_equal(net[1].lora_A, frozen[0], "frozen A")
    net[1].lora_B.requires_grad_(True)                            # trained again
    proj.project()
    assert proj.names == ["0", "1"] and gap64(net[1].lora_A, net[1].lora_B) < 1e-5
    for m in net:
        m.lora_A.requires_grad_(False)
        m.lora_B.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LoRA adapter left"):
        proj.project()


def test_no_per_pair_work_without_checks_and_refresh(monkeypatch):
    """With follow_model=False and check_params=False a projection neither looks the modules up nor checks the
    plan's tables (no Python loop over the pairs: both checks patched to record their calls); a parameter replaced meanwhile
    is not seen until refresh(), which collects the pairs again and rebuilds the plan. Defaults: both checks run.
    refresh() with no trainable pair left is a named error that changes nothing."""
    torch.manual_seed(1)
    net = nn.Sequential(bk.BaLoRALinear(12, 10, 3), bk.BaLoRALinear(10, 12, 3))
    _randomize(net)
    calls = []
    plan_cls = type(bk.BalancedProjector(net)._current_plan())
    monkeypatch.setattr(plan_cls, "is_stale", lambda self: calls.append("is_stale") or False)
    monkeypatch.setattr(bk.BalancedProjector, "_slots_changed", lambda self: calls.append("slots") or False)
    default = bk.BalancedProjector(net)
    default.project()                                             # (builds the plan)
    calls.clear()
    default.project()
    assert calls == ["slots", "is_stale"]                         # the defaults: both checks
    calls.clear()
    proj = bk.BalancedProjector(net, follow_model=False, check_params=False)
    proj.project()
    proj.project()
    assert calls == [] and gap64(net[0].lora_A, net[0].lora_B) < 1e-5
    old_A = net[1].lora_A
    net[1].lora_A = nn.Parameter(torch.randn(3, 10) * 3)          # not seen until refresh()
    proj.project()
    assert gap64(net[1].lora_A, net[1].lora_B) > 0.1 and gap64(old_A, net[1].lora_B) < 1e-5
    proj.refresh()
    proj.project()
    assert calls == [] and gap64(net[1].lora_A, net[1].lora_B) < 1e-5
    for m in net:
        m.lora_A.requires_grad_(False)
        m.lora_B.requires_grad_(False)
    names, plan = proj.names, proj._plan
    with pytest.raises(ValueError, match="refresh: no trainable LoRA adapter left"):
        proj.refresh()
    assert proj.names == names and proj._plan is plan


@pytest.mark.parametrize("case", ["expanded", "inference", "rank0"])
def test_unwritable_or_empty_pairs_are_named_errors_before_any_write(case):
    good = (torch.randn(3, 10), torch.randn(7, 3))
    if case == "expanded":
        bad, match = (torch.randn(3, 6), torch.randn(1, 3).expand(5, 3)), r"lora_B .*strides \(0, 1\).*expanded"
    elif case == "inference":
        with torch.inference_mode():
            bad = (torch.randn(3, 6), torch.randn(5, 3))
        match = r"lora_A .* is an inference tensor"
    else:
        bad, match = (torch.randn(0, 6), torch.randn(5, 0)), r"\(r >= 1\)"
    before = [t.clone() for t in good + bad]
    with pytest.raises(ValueError, match=r"^BalancedProjector: adapter 'pair1'.*" + match):
        bk.BalancedProjector([good, bad]).project()
    for t, b in zip(good + bad, before):
        assert_bitwise_equal(t, b, "pair after a refused projection")


def test_column_slices_and_transposes_are_projected():
    """Views that are not dense but share no element (a column slice, a transpose) are written in place, not
    refused as overlapping."""
    bigA, bigB = torch.randn(3, 32), torch.randn(12, 3)
    A, B = bigA[:, :16], bigB.t().contiguous().t()
    assert torch._debug_has_internal_overlap(A) == 2 and not B.is_contiguous()
    A0, B0, rest = A.clone(), B.clone(), bigA[:, 16:].clone()
    bk.BalancedProjector([(A, B)]).project()
    assert gap64(A, B) < 1e-5 and product_rel_err(A0, B0, A, B) < 1e-5
    assert_bitwise_equal(bigA[:, 16:], rest, "the rest of the sliced tensor")


def test_a_write_that_fails_midway_is_rolled_back(monkeypatch):
    """Should a copy into a parameter fail after others were written, every pair gets its values back."""
    pairs = [(torch.randn(3, 10), torch.randn(7, 3)), (torch.randn(2, 6, dtype=torch.float64),
                                                       torch.randn(5, 2, dtype=torch.float64))]
    before = [t.clone() for p in pairs for t in p]
    real, n = torch._foreach_copy_, []

    def failing(dst, src):
        n.append(1)
        if len(n) == 3:                     # the second group's A
            raise RuntimeError("simulated failure")
        return real(dst, src)

    monkeypatch.setattr(torch, "_foreach_copy_", failing)
    proj = bk.BalancedProjector(pairs)
    assert proj.backend["plan"] == "TorchProjectionPlan"
    with pytest.raises(RuntimeError, match="simulated failure"):
        proj.project()
    for t, b in zip([t for p in pairs for t in p], before):
        assert_bitwise_equal(t, b, "pair after a failed write")
