"""Tests of the grouped projection kernels (balora_kernels/ops/grouped_projection.py, csrc/).

* Interpreted kernels (CPU, CI): ``test_interp_*`` run in a child pytest process with
  ``TRITON_INTERPRET=1`` set before Triton is imported (``test_triton_projection_interpreted`` starts it):
  Gram and rescale kernels against float64, the whole plan against the reference and TorchProjectionPlan,
  degenerate pairs, determinism, the dispatcher. Tiny mixed shapes, fp32 and fp16.
* The CUDA kernel's math on the CPU: ``csrc/host_emulation.cc`` (the same balance_math.cuh, one thread)
  is compiled with the host C++ compiler and compared with the reference, degenerate pairs included, and
  on pairs built around the reference's rank policy (product floor with each pair's eps_f, Gram cut):
  rank, status, slots and transforms, through the full-rank fast path and the general path.
* GPU tests (``-m gpu``): the whole plan (CUDA extension) against the reference on Llama-like mixed
  shapes for r in {1, 8, 16, 64, 128} and fp32 / bf16 / fp16; the rank policy on the device's Grams;
  the float32 Gram methods; the CUDA Gram and rescale of ranks <= 16 (csrc/grouped.cu: every rank block,
  each dtype, misaligned factors, odd tiles, non-finite pairs, the kernels option, the ops' argument errors) and
  their tensor-core kernels for float32 ranks 17 to 64 (csrc/grouped_mma.cu: both rank blocks, the same cases);
  degenerate pairs; CUDA-graph capture and replay; bitwise determinism; the fallback without the extension.
  (The interpreted-kernel child is skipped where Triton's interpreter cannot run the kernels, triton < 3.9.)
Outputs of kernels are poisoned (NaN) before they are written.
"""
from __future__ import annotations

import copy
import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from balora_kernels import functional, reference
from balora_kernels.ops.projection import TorchProjectionPlan

INTERP_CHILD = os.environ.get("BALORA_TEST_INTERPRET_CHILD") == "1"
interp_only = pytest.mark.skipif(not INTERP_CHILD, reason="runs in the TRITON_INTERPRET=1 child process")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import triton
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def _interpreter_skip_reason():
    """Why the interpreted-kernel child cannot run here (None when it can)."""
    if not HAVE_TRITON:
        return "Triton not installed"
    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if version < (3, 9):
        # e.g. triton 3.6: `for t in range(pid, n, NUM_PROGS)` raises "TypeError: only 0-dimensional arrays
        # can be converted to Python scalars" under TRITON_INTERPRET=1 (program_id is a 1-element array).
        return (f"triton {triton.__version__}'s interpreter cannot run the persistent-grid kernels (needs >= 3.9); "
                "on a GPU machine the compiled kernels are tested instead (-m gpu)")
    return None


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def f64(t):
    return t.detach().to(torch.float64)


def rel(a, b) -> float:
    a, b = f64(a), f64(b).to(a.device)
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def make_pairs(specs, device="cpu", seed=0):
    """specs: (r, in, out, dtype). A ~ N(0, 1/in), B ~ N(0, 1) scaled: finite, full rank, unbalanced."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for r, i, o, dt in specs:
        A = (torch.randn(r, i, generator=g) / i ** 0.5).to(dt).to(device)
        B = (torch.randn(o, r, generator=g) * 0.3).to(dt).to(device)
        pairs.append((A, B))
    return pairs


def clone(pairs):
    return [(A.clone(), B.clone()) for A, B in pairs]


if HAVE_TRITON:
    import triton.language as tl

    from balora_kernels.ops.grouped_projection import _tf32_pair

    @triton.jit
    def _tf32_pair_probe(x_ptr, hi_ptr, lo_ptr, N, BLOCK: tl.constexpr):
        """hi, lo = _tf32_pair(x) of N float32 values (test_interp_tf32_pair_bits)."""
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
        hi, lo = _tf32_pair(x)
        tl.store(hi_ptr + offs, hi, mask=offs < N)
        tl.store(lo_ptr + offs, lo, mask=offs < N)


def invariants(A0, B0, A1, B1, r_live=None):
    """(product rel err, balance gap of the live block, finite) of the projected pair in float64."""
    P0 = f64(B0) @ f64(A0)
    P1 = f64(B1) @ f64(A1)
    GB, GA = f64(B1).T @ f64(B1), f64(A1) @ f64(A1).T
    gap = reference.balance_gap(GB, GA).item()
    return rel(P1, P0), gap, bool(torch.isfinite(A1).all() and torch.isfinite(B1).all())


def designed_pair(a, b, n_in, n_out, seed, dtype=torch.float32):
    """A [r, n_in], B [n_out, r] with ``B A = U diag(a * b) V^T``: component i has factor norms a[i] (A) and
    b[i] (B), mixed by a random well-conditioned (non-orthogonal) r x r M, so that neither Gram is diagonal
    and the two do not commute. Rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    r = len(a)
    U = torch.linalg.qr(torch.randn(n_out, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n_in, r, generator=g, dtype=torch.float64))[0]
    M = torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(r, r, generator=g, dtype=torch.float64) / r ** 0.5
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    B = (U * b) @ M
    A = torch.linalg.solve(M, a[:, None] * V.T)
    return A.to(dtype).contiguous(), B.to(dtype).contiguous()


def rank_policy_pairs(r, seed=0):
    """(name, A, B) pairs whose live/dead components sit on either side of reference.product_floor, most of
    them between it and the earlier relative cut (2^-16 of S_1): near- and exactly rank-deficient products,
    a dominant component with a zero product that raises the floor, a pair entirely under the noise (a zero
    product), bf16 factors whose own rounding floor kills a component that fp32 factors would keep."""
    geo = [10.0 ** (-i / (2 * max(r - 1, 1))) for i in range(r)]    # products from 1 down to 0.1
    mixed = [1.0 if i % 2 else 1e-3 for i in range(1, r)]              # products 1 and 1e-3
    specs = {
        "full": (geo, geo, torch.float32),
        # last product 1e-4 S_1, both factors 1e-2 (above the Gram cut): dead by the product floor only
        "near_deficient": (geo[:-1] + [1e-2], geo[:-1] + [1e-2], torch.float32),
        "live_small": (geo, geo[:-1] + [8e-2 / geo[-1]], torch.float32),        # last product 8e-2 S_1: live
        "exact_deficient": (geo[:-1] + [0.0], [0.0] + geo[1:], torch.float32) if r > 1 else (geo, geo, torch.float32),
        "dominant_dead": ([0.0] + [1.0] * (r - 1), [100.0] + mixed, torch.float32),   # floor ~0.1: 1e-3 dead
        "under_noise": ([0.0] + [0.1] * (r - 1), [1e4] + [0.1] * (r - 1), torch.float32),   # all below the floor
    }
    out = []
    for i, (name, (a, b, dt)) in enumerate(specs.items()):
        A, B = designed_pair(a, b, 3 * r + 5, 2 * r + 7, seed + i, dt)
        out.append((name, A, B))
    # bf16 factors whose last component (product 2^-8 S_1, below bf16's eps S_1 = 2^-7 S_1, above the Gram term)
    # sits in its own row/column block, so that rounding the others to bf16 leaves it exact: dead for these
    # factors, live had they been float32
    if r > 1:
        A1, B1 = designed_pair(geo[:-1], geo[:-1], 3 * r + 4, 2 * r + 6, seed + 50, torch.float64)
        A = torch.zeros(r, 3 * r + 5, dtype=torch.float64)
        B = torch.zeros(2 * r + 7, r, dtype=torch.float64)
        A[:-1, :-1], B[:-1, :-1] = A1, B1
        A[-1, -1] = B[-1, -1] = 2.0 ** -4
        out.append(("bf16_floor", A.to(torch.bfloat16).contiguous(), B.to(torch.bfloat16).contiguous()))
    # full rank, the last product singular value 1.5x the floor: live for the reference, and close enough to the
    # floor that the kernel's full-rank bounds cannot prove it (flat spectrum), so its general path decides
    A, B = designed_pair([1.0] * (r - 1) + [1e-2], [1.0] * (r - 1) + [1e-2], 3 * r + 5, 2 * r + 7, seed + 99)
    d_max, e_max = (torch.linalg.eigvalsh(G)[-1] for G in reference.grams(A, B))
    floor = (r * torch.finfo(torch.float32).eps * d_max * e_max).sqrt().item()
    x = (1.5 * floor) ** 0.5                                            # product x^2 = 1.5 floor
    A, B = designed_pair([1.0] * (r - 1) + [x], [1.0] * (r - 1) + [x], 3 * r + 5, 2 * r + 7, seed + 99)
    out.append(("flat_near_floor", A, B))
    return out


def assert_not_borderline(GB, GA, eps_f, what):
    """The test data's product singular values are at least 20% away from the reference's floor, so that
    the rank decision does not depend on the ~1e-10 differences between two float64 implementations."""
    X, d_max = reference._psd_sqrt_factor(GB.double(), reference.gram_rtol(GB.dtype))
    Y, e_max = reference._psd_sqrt_factor(GA.double(), reference.gram_rtol(GA.dtype))
    S = torch.linalg.svdvals(X.transpose(-1, -2) @ Y)
    floor = reference.product_floor(S[..., 0], d_max, e_max, GB.shape[-1], GB.dtype, eps_f=eps_f)
    ratio = S / floor.clamp_min(1e-300).unsqueeze(-1)
    assert ((ratio < 0.8) | (ratio > 1.25)).all(), (what, ratio)


MIXED_CPU = [(4, 40, 24, torch.float32), (4, 33, 70, torch.float32), (3, 50, 29, torch.float32),
             (16, 72, 40, torch.float32), (1, 20, 17, torch.float32), (4, 45, 30, torch.float16),
             (16, 36, 52, torch.float16)]


# --------------------------------------------------------------------------------------------
# CPU: the interpreted Triton kernels (child process)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(INTERP_CHILD, reason="parent only")
@pytest.mark.skipif(_interpreter_skip_reason() is not None, reason=str(_interpreter_skip_reason()))
def test_triton_projection_interpreted():
    """Runs this file's test_interp_* tests in a child with TRITON_INTERPRET=1 (set before import)."""
    env = dict(os.environ, TRITON_INTERPRET="1", BALORA_TEST_INTERPRET_CHILD="1")
    env.pop("BALORA_KERNELS_IMPL", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-k", "test_interp_", __file__], env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted projection kernel tests failed:\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    # every interpreted test ran in the child: some passed, none failed, none skipped
    assert re.search(r"\b[1-9]\d* passed", summary) and "failed" not in summary and "skipped" not in summary, tail


def _plan(pairs, **kw):
    from balora_kernels.ops.grouped_projection import TritonProjectionPlan
    return TritonProjectionPlan(pairs, **kw)


def wide_range_pair(r=16, n_in=300, n_out=200, seed=0):
    """A pair whose components' norms span 12 orders of magnitude (each Gram entry must keep its own accuracy)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n_in, generator=g) * torch.logspace(0, -6, r)[:, None]
    B = torch.randn(n_out, r, generator=g) * torch.logspace(-3, 3, r)[None, :]
    return A, B


def check_grams(plan, pairs, what):
    """Every Gram of ``plan`` against float64: within 2x the plain fp32 Gram's error, in norm (or 1e-6) and per
    entry relative to sqrt(G_ii G_jj) (or 2 sqrt(k_chunk) 2^-24: the rounding of a sequential float32 sum over
    a tile); the padding is zero."""
    for g in plan.groups:
        assert torch.isfinite(g.grams).all(), what
        for p, i in enumerate(g.pair_ids):
            A, B = pairs[i]
            r = g.r
            GB64, GA64 = reference.grams(A.cpu(), B.cpu())
            for which, G64, X in ((0, GB64, B.float().T), (1, GA64, A.float())):
                ours = g.grams[p, which].cpu()
                plain = (X @ X.T).cpu()                             # plain PyTorch fp32 Gram
                assert rel(ours[:r, :r], G64) <= max(2 * rel(plain, G64), 1e-6), (what, i, which, A.dtype)
                d = G64.diagonal().sqrt()
                scale = (d[:, None] * d[None, :]).clamp_min(1e-300)
                entry, entry_plain = (((f64(x) - G64).abs() / scale).max().item() for x in (ours[:r, :r], plain))
                assert entry <= max(2 * entry_plain, 2 * g.k_chunk ** 0.5 * 2.0 ** -24), \
                    (what, i, which, A.dtype, entry, entry_plain)
                assert (ours[r:] == 0).all() and (ours[:, r:] == 0).all()


@interp_only
@pytest.mark.parametrize("fp32_gram", ["auto", "fp16x3", "dot", "fma"])
def test_interp_gram_kernel(fp32_gram):
    pairs = make_pairs(MIXED_CPU, seed=1) + [wide_range_pair()]
    plan = _plan(pairs, transforms="torch", k_chunk=16, fp32_gram=fp32_gram)   # several tiles per factor
    for g in plan.groups:
        g.grams.fill_(float("nan"))
    plan.gram()
    check_grams(plan, pairs, fp32_gram)


@interp_only
def test_interp_gram_nonfinite_propagates():
    """A NaN or Inf in a float32 factor reaches its Gram (the r x r step then skips the pair), in every method."""
    for fp32_gram in ("fp16x3", "dot", "fma"):
        pairs = make_pairs([(4, 40, 24, torch.float32)] * 3, seed=7)
        pairs[0][0][1, 3] = float("nan")
        pairs[1][1][5, 2] = float("inf")
        plan = _plan(pairs, transforms="torch", k_chunk=16, fp32_gram=fp32_gram)
        plan.gram()
        G = plan.groups[0].grams
        assert not torch.isfinite(G[0, 1]).all() and not torch.isfinite(G[1, 0]).all(), fp32_gram
        assert torch.isfinite(G[2]).all() and torch.isfinite(G[0, 0]).all() and torch.isfinite(G[1, 1]).all()


@interp_only
@pytest.mark.parametrize("method", ["dot", "outer"])
def test_interp_rescale_kernel(method):
    pairs = make_pairs(MIXED_CPU, seed=2)
    plan = _plan(pairs, transforms="torch", k_chunk=24, rescale=method)
    methods = {lg.rescale_method for g in plan.groups for lg in g.launches}
    assert methods == ({method} if method == "dot" else {"outer", "dot"})       # "outer": ranks <= 8 only
    check_rescale(plan, pairs)


@interp_only
def test_interp_rescale_16bit_tf32_pair():
    """16-bit factors above R = 16: the "dot" rescale multiplies by T's tf32 hi / lo split (two products) instead of
    3xTF32; float16 here (the interpreter's bfloat16 arithmetic is not trusted), float32 beside it keeps tf32x3."""
    from balora_kernels.ops import grouped_projection as gp
    pairs = make_pairs([(20, 40, 36, torch.float16), (4, 30, 20, torch.float16), (20, 33, 41, torch.float16),
                        (20, 40, 36, torch.float32)], seed=5)
    plan = _plan(pairs, transforms="torch", k_chunk=16)
    used = {(lg.dtype, gp._tf32_pair_rescale(lg.dtype, g.rescale_precision)) for g in plan.groups for lg in g.launches}
    assert (torch.float16, True) in used and (torch.float32, False) in used, used
    check_rescale(plan, pairs)


@interp_only
def test_interp_tf32_pair_bits():
    """_tf32_pair(x): hi is x with its 13 low mantissa bits cleared (sign and exponent kept: exact in tf32) and
    hi + lo == x exactly, for negative, subnormal, zero and large values. (The interpreter's tl.dot ignores the tf32
    precision, so the rescale tests alone would not see a wrong mask; the GPU test below checks the products.)"""
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(200, generator=g) * torch.logspace(-30, 30, 200),
                   torch.tensor([0.0, -0.0, 1e-40, -3e-39, 3.3e38, -2.5e38, 1.0, -1.0 - 2.0**-23, 2.0**-126])])
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _tf32_pair_probe[(1,)](x, hi, lo, x.numel(), BLOCK=256)
    assert torch.equal(hi.view(torch.int32), x.view(torch.int32) & -8192)
    assert torch.equal(hi + lo, x) and torch.equal((hi + lo).view(torch.int32) & ~(2 ** 31), x.view(torch.int32) & ~(2 ** 31))


def check_rescale(plan, pairs, skip=2):
    """``plan.rescale`` with random well-conditioned T (fp32, T^-1 its float64 inverse) per pair against float64:
    within 2x plain PyTorch's float32 error (or 2e-7); pair ``skip`` (given a NaN and the non-finite status) is
    left bit-identical."""
    before = clone(pairs)
    status = torch.zeros(plan.n_pairs, dtype=torch.int32, device=plan.device)
    for g in plan.groups:                                       # pair `skip` is non-finite: must not be touched
        if skip in g.pair_ids:
            status[g.first + g.pair_ids.index(skip)] = 1
    pairs[skip][0][0, 0] = float("nan")
    before[skip][0][0, 0] = float("nan")
    Ts = {}
    for g in plan.groups:
        g.tw.zero_()
        for p, i in enumerate(g.pair_ids):
            T = torch.randn(g.r, g.r, dtype=torch.float64) + 2 * torch.eye(g.r, dtype=torch.float64)
            g.tw[p, 0, :g.r, :g.r] = T.float()
            g.tw[p, 1, :g.r, :g.r] = torch.linalg.inv(T).float()
            Ts[i] = (g.tw[p, 0, :g.r, :g.r].double(), g.tw[p, 1, :g.r, :g.r].double())
    plan.rescale(status)
    for i, ((A, B), (A0, B0)) in enumerate(zip(pairs, before)):
        if i == skip:
            assert torch.equal(A.isnan(), A0.isnan()) and torch.equal(A.nan_to_num(), A0.nan_to_num())
            assert torch.equal(B, B0)
            continue
        T, W = (t.to(A.device) for t in Ts[i])
        B64, A64 = f64(B0) @ T, W @ f64(A0)
        plainB = (B0.float() @ T.float()).to(B.dtype)
        plainA = (W.float() @ A0.float()).to(A.dtype)
        assert rel(B, B64) <= max(2 * rel(plainB, B64), 2e-7), (i, B.dtype)
        assert rel(A, A64) <= max(2 * rel(plainA, A64), 2e-7), (i, A.dtype)


@interp_only
@pytest.mark.parametrize("mode,fp32_gram", [("nearest", "auto"), ("svd", "auto"), ("nearest", "dot")])
def test_interp_plan_matches_reference(mode, fp32_gram):
    pairs = make_pairs(MIXED_CPU, seed=3)
    before = clone(pairs)
    torch_pairs = clone(pairs)
    stats = _plan(pairs, transforms="torch", k_chunk=32, fp32_gram=fp32_gram).run(mode).as_dict()
    tstats = TorchProjectionPlan(torch_pairs).run(mode).as_dict()
    assert stats["projected"] == tstats["projected"] == len(pairs)
    assert stats["gap_after"] < 1e-6
    for (A, B), (A0, B0), (At, Bt) in zip(pairs, before, torch_pairs):
        A_ref, B_ref = reference.balance(f64(A0), f64(B0), mode)
        tol = 1e-5 if A.dtype == torch.float32 else None
        for ours, theirs, ref in ((A, At, A_ref), (B, Bt, B_ref)):
            if tol is not None:
                assert rel(ours, ref) <= tol
            else:   # low precision: at most 2x the torch plan's (one rounding of the float64 result) error
                assert rel(ours, ref) <= 2 * rel(theirs, ref) + 1e-4
        perr, gap, finite = invariants(A0, B0, A, B)
        assert finite and perr <= (1e-5 if A.dtype == torch.float32 else 2e-3) and gap <= (1e-4 if A.dtype == torch.float32 else 5e-3)


@interp_only
def test_interp_degenerate_pairs():
    specs = [(4, 30, 20, torch.float32)] * 5 + [(4, 30, 20, torch.float16)]
    pairs = make_pairs(specs, seed=4)
    pairs[0][1].zero_()                          # zero product (PEFT init): untouched
    pairs[1][0][2, 5] = float("inf")             # non-finite: untouched, counted
    pairs[2][1][:, 3] = 0                        # rank-deficient: one component with a zero B column
    pairs[3][0][1] = 0                           # rank-deficient: one component with a zero A row
    before = clone(pairs)
    tpairs = clone(pairs)
    stats = _plan(pairs, transforms="torch", k_chunk=8).run("nearest").as_dict()
    tstats = TorchProjectionPlan(tpairs).run("nearest").as_dict()
    for k in ("pairs", "projected", "skipped_nonfinite", "skipped_zero", "rank_deficient"):
        assert stats[k] == tstats[k], (k, stats, tstats)
    assert (stats["skipped_zero"], stats["skipped_nonfinite"], stats["rank_deficient"]) == (1, 1, 2)
    for i in (0, 1):
        for t, t0 in zip(pairs[i], before[i]):
            assert torch.equal(t.nan_to_num(), t0.nan_to_num()) and torch.equal(t.isinf(), t0.isinf())
    for i in (2, 3):
        A, B = pairs[i]
        A0, B0 = before[i]
        perr, _, finite = invariants(A0, B0, A, B)
        assert finite and perr <= 1e-5
        for X, X0 in ((A, A0), (B, B0)):             # ranks kept (fp32 noise is below rtol)
            assert torch.linalg.matrix_rank(f64(X), rtol=1e-4) == torch.linalg.matrix_rank(f64(X0), rtol=1e-4)


@interp_only
def test_interp_deterministic_and_stale():
    pairs = make_pairs(MIXED_CPU, seed=5)
    twin = clone(pairs)
    plan_a, plan_b = _plan(pairs, transforms="torch", k_chunk=16), _plan(twin, transforms="torch", k_chunk=16)
    plan_a.run("nearest")
    plan_b.run("nearest")
    for (A, B), (A2, B2) in zip(pairs, twin):
        assert torch.equal(A, A2) and torch.equal(B, B2)
    assert not plan_a.is_stale()
    pairs[0][0].mul_(2.0)                          # in-place update: plan stays valid
    assert not plan_a.is_stale()
    plan_a.pairs[1] = (pairs[1][0].clone(), pairs[1][1])   # re-allocated parameter
    assert plan_a.is_stale()


@interp_only
def test_interp_dispatcher_and_balance_(monkeypatch):
    from balora_kernels.ops.grouped_projection import TritonProjectionPlan
    pairs = make_pairs(MIXED_CPU[:3], seed=6)
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "triton")
    assert functional._projection_plan_class(pairs) is TritonProjectionPlan
    before = clone(pairs)
    functional.balance_(pairs, "nearest")
    for (A, B), (A0, B0) in zip(pairs, before):
        assert rel(A, reference.balance(f64(A0), f64(B0))[0]) <= 1e-5
    monkeypatch.setenv("BALORA_KERNELS_IMPL", "torch")
    assert functional._projection_plan_class(pairs) is TorchProjectionPlan
    monkeypatch.delenv("BALORA_KERNELS_IMPL")
    assert functional._projection_plan_class(pairs) is TorchProjectionPlan   # CPU tensors: torch path


def test_cuda_graph_option_and_packed_stats():
    """cuda_graph=True needs CUDA pairs and the extension (a clear error otherwise; the default is off there);
    the packed counters read as the dataclass's fields."""
    from balora_kernels.ops.grouped_projection import TritonProjectionPlan
    from balora_kernels.ops.projection import PackedProjectionStats
    pairs = make_pairs([(4, 32, 24, torch.float32)], seed=5)
    assert TritonProjectionPlan(pairs, transforms="torch").cuda_graph is False
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA pairs and the compiled extension"):
        TritonProjectionPlan(pairs, transforms="torch", cuda_graph=True)
    with pytest.raises(ValueError, match="unknown tune keys"):
        TritonProjectionPlan(pairs, transforms="torch", tune={"bogus": 1})
    st = PackedProjectionStats(torch.tensor([5, 3, 1, 1, 2, 0.25, 1e-9], dtype=torch.float64))
    assert st.as_dict() == {"pairs": 5, "projected": 3, "skipped_nonfinite": 1, "skipped_zero": 1,
                            "rank_deficient": 2, "gap_before": 0.25, "gap_after": 1e-9}
    assert st.projected.dtype == torch.int64 and int(st.projected) == 3 and float(st.gap_before) == 0.25
    assert "projected=3" in repr(st)
    with pytest.raises(AttributeError):
        st.bogus


def test_failed_graph_capture_falls_back_with_a_warning(monkeypatch):
    """A capture that fails (here: made to) warns once, leaves cuda_graph False and launches the kernels instead;
    nothing is lost: the call that tried to capture still projects."""
    from contextlib import nullcontext

    from balora_kernels.ops import grouped_projection as gp
    plan = gp.TritonProjectionPlan(make_pairs([(4, 32, 24, torch.float32)], seed=6), transforms="torch")
    plan.cuda_graph = True        # as on a CUDA machine with the extension (the capture itself is faked below)
    runs = []
    monkeypatch.setattr(plan, "_run_kernels", lambda mode: runs.append(mode) or "stats")

    def refuse(*a, **k):
        raise RuntimeError("capture refused")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "device", lambda d: nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", refuse)
    assert plan.run("nearest") == "stats"                      # first call: launched (kernels compiled)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture failed .*capture refused.*one by one"):
        assert plan.run("nearest") == "stats"                  # second: the capture fails, launched instead
    assert plan.cuda_graph is False
    assert plan.run("nearest") == "stats" and runs == ["nearest"] * 3


def test_extension_refused_on_gpus_older_than_its_kernels(monkeypatch):
    """The kernels are built for sm_80 / sm_90a (+ sm_90 PTX for newer GPUs): on a compute capability 7.x GPU
    the extension is not loaded (no kernel image would run there), and the reason names the GPU; newer ones
    (Ampere to Blackwell) are accepted."""
    from balora_kernels import _ext
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    for cap, ok in (((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=cap: c)
        why = _ext.unsupported_gpu()
        assert (why is None) == ok, (cap, why)
        if not ok:
            assert why == f"Tesla T4 has compute capability {cap[0]}.{cap[1]}; the extension's kernels need 8.0 or later"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _ext.unsupported_gpu() is None
    assert "-gencode=arch=compute_90,code=compute_90" in _ext.CUDA_ARCH_FLAGS   # PTX: JIT-compiled on newer GPUs
    assert "-gencode=arch=compute_90a,code=sm_90a" in _ext.CUDA_ARCH_FLAGS and "-DBK_SM90A" in _ext.CUDA_ARCH_FLAGS


def test_extension_from_before_the_tensor_core_kernels_keeps_float32_ranks_above_16_on_triton(monkeypatch):
    """grouped_max_rank asks the loaded extension once whether its grouped_rescale takes float32 rank 64 (a call on an
    empty tile table): a prebuilt library from sources before csrc/grouped_mma.cu (same op schemas, still loaded for
    the projection) refuses it, and float32 ranks above 16 then stay on Triton instead of failing in the op; one that
    takes it gives 64; without the extension the package's own limits, nothing asked. (On the GPU:
    test_gpu_extension_takes_float32_ranks_to_64.)"""
    from balora_kernels import _ext
    monkeypatch.setattr(_ext, "_fp32_max_rank", {})
    monkeypatch.setattr(_ext, "_current_cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(_ext, "grouped_available", lambda: False)
    assert (_ext.grouped_max_rank(True), _ext.grouped_max_rank(False), _ext._fp32_max_rank) == (64, 16, {})
    monkeypatch.setattr(_ext, "grouped_available", lambda: True)
    asked = []

    def rescale_op(refuses):
        def op(tiles, n_b, n_a, r, dtype, tw, status, skip_bits):
            asked.append((tuple(tiles.shape), n_b, n_a, r, dtype, tuple(tw.shape), tuple(status.shape)))
            if refuses:
                raise RuntimeError(f"balora::grouped_rescale: rank r={r} must be in [1, 16]")
        return op

    monkeypatch.setattr(_ext, "grouped_rescale", rescale_op(refuses=True))
    assert _ext.grouped_max_rank(True) == 16 and _ext.grouped_max_rank(True) == 16 and _ext.grouped_max_rank(False) == 16
    assert asked == [((0, 6), 0, 0, 64, 0, (0, 2, 64, 64), (0,))]     # asked once, with nothing to launch
    monkeypatch.setattr(_ext, "_fp32_max_rank", {})
    monkeypatch.setattr(_ext, "grouped_rescale", rescale_op(refuses=False))
    assert _ext.grouped_max_rank(True) == 64 and len(asked) == 2


def test_extension_build_lock_left_behind_is_reported_not_waited_on(monkeypatch, tmp_path):
    """A JIT build killed part-way leaves torch.utils.cpp_extension's lock file in the build folder, and torch waits
    for it without limit: an old one makes the extension unavailable with a reason naming the file (callers fall
    back), a fresh one (another process building now) is left to torch."""
    from torch.utils import cpp_extension
    from balora_kernels import _ext
    monkeypatch.setenv("BALORA_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BALORA_KERNELS_DISABLE_EXT", raising=False)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(_ext, "unsupported_gpu", lambda: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME or "/usr/local/cuda")
    builds = []

    def fake_build(**kw):
        builds.append(kw["build_directory"])
        raise RuntimeError("fake build: not compiled in this test")

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    try:
        import balora_kernels._C  # noqa: F401
        pytest.skip("a prebuilt extension is installed: no JIT build to test")
    except ImportError:
        pass
    lock = tmp_path / _ext._build_tag() / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    old = time.time() - _ext.STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    try:
        _ext.reset()
        assert _ext.load() is None and builds == []
        assert f"the JIT build's lock file {lock} is 31 min old: an earlier build was probably interrupted" in \
            _ext.error(), _ext.error()
        os.utime(lock, None)                                    # fresh: another process is building
        _ext.reset()
        assert _ext.load() is None and builds == [str(lock.parent)]
        assert "fake build" in _ext.error()
    finally:
        _ext.reset()


def test_extension_with_another_schema_is_not_used():
    """A leftover extension built from older sources must not be called with arguments it does not take: another
    balance_transforms schema does not count as the projection's op, and one without the lora_linear op (or
    without lora_linear_backward, which sources before session 26 lack) serves the projection only (the LoRA
    dispatcher then does not offer the C++ implementations; nor without lora_linear's gemm argument and
    lora_gemm_kernel_register, which sources before session 27 lack)."""
    code = """
import torch
from balora_kernels import _ext
assert not _ext._have_op()
lib = torch.library.Library("balora", "DEF")
for schema in SCHEMAS:
    lib.define(schema)
print(_ext._have_op(), _ext._have_lora_op())
"""
    lora_old = ("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
                "Tensor? dropout_mask, int mode) -> Tensor")
    lora = ("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
            "Tensor? dropout_mask, int mode, int[] gemm=[]) -> Tensor")
    register = "lora_gemm_kernel_register(int[] desc) -> int"
    lora_bwd = ("lora_linear_backward(Tensor grad_y, Tensor x, Tensor u, Tensor weight, Tensor lora_A, Tensor lora_B, "
                "float scaling, Tensor? dropout_mask, bool need_x, bool need_weight, bool need_bias, bool need_lora_A, "
                "bool need_lora_B, int mode) -> Tensor[]")
    with open(os.path.join(ROOT, "csrc", "lora_linear.cpp")) as f:
        src = f.read().replace('"\n        "', "").replace(", ", ",")
    for schema in (lora, lora_bwd, register):
        assert schema.replace(", ", ",") in src, \
            f"the test's schema must be the one csrc/lora_linear.cpp registers: {schema}"
    old = "balance_transforms(Tensor grams, int r, int mode, Tensor(a!) tw, Tensor(b!) status, Tensor(c!) gaps) -> ()"
    new = ("balance_transforms(Tensor grams, Tensor eps_f, int r, int mode, Tensor(a!) tw, Tensor(b!) status, "
           "Tensor(c!) gaps) -> ()")
    with open(os.path.join(ROOT, "csrc", "bindings.cpp")) as f:
        assert new in f.read(), "the test's schema must be the one csrc/bindings.cpp registers"
    for schemas, expect in (([old, lora, lora_bwd, register], "False True"), ([new], "True False"),
                            ([new, lora], "True False"), ([new, lora, lora_bwd], "True False"),
                            ([new, lora_old, lora_bwd, register], "True False"),
                            ([new, lora, lora_bwd, register], "True True")):
        r = subprocess.run([sys.executable, "-c", code.replace("SCHEMAS", repr(schemas))], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == expect, (schemas, r.stdout)


# --------------------------------------------------------------------------------------------
# CPU: the CUDA kernel's math, compiled for the host
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def host_lib():
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    out = os.path.join(tempfile.mkdtemp(prefix="bk_host_"), "libbk_host.so")
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-DBK_HOST_EMULATION",
                    os.path.join(ROOT, "csrc", "host_emulation.cc"), "-o", out], check=True, timeout=120)
    return ctypes.CDLL(out)


def _host_transforms(lib, GB, GA, mode, eps_f, pair_eig=True, paths=None):
    """The host-compiled kernel math on fp32 Grams [P, r, r] and eps_f [P]: (T, T^-1, status, gaps). ``paths``
    (an int32 tensor [P], optional) receives per pair which r x r path ran (PATH_* | root steps << 8 | polar
    Newton-Schulz steps << 16)."""
    P, r, _ = GB.shape
    R = max(16, 1 << (r - 1).bit_length())
    g = torch.zeros(P, 2, R, R)
    g[:, 0, :r, :r], g[:, 1, :r, :r] = GB, GA
    tw = torch.full((P, 2, R, R), float("nan"))
    st = torch.full((P,), -1, dtype=torch.int32)
    gaps = torch.full((P, 2), -1.0, dtype=torch.float64)
    eps = torch.as_tensor(eps_f, dtype=torch.float64).expand(P).contiguous()
    vp = ctypes.c_void_p
    lib.bk_host_balance_transforms(vp(g.data_ptr()), vp(eps.data_ptr()), P, r, R, 0 if mode == "nearest" else 1,
                                   int(pair_eig), vp(tw.data_ptr()), vp(st.data_ptr()), vp(gaps.data_ptr()),
                                   vp(paths.data_ptr()) if paths is not None else None)
    assert torch.isfinite(tw).all() and (tw[:, :, r:] == 0).all() and (tw[:, :, :, r:] == 0).all()
    return tw[:, 0, :r, :r].double(), tw[:, 1, :r, :r].double(), st, gaps


def _ref_status(ref, r):
    """The status word the kernels write, from reference Transforms: flag bits, live components << 8."""
    skip = ref.nonfinite | ref.zero
    return (ref.nonfinite.int() * 1 + ref.zero.int() * 2 + ((ref.rank < r) & ~skip).int() * 4
            + torch.where(skip, 0, ref.rank).int() * 256).to(torch.int32)


def _rank_policy_case(r, seed=0):
    """fp32 Grams [P, r, r], eps_f [P] and names of :func:`rank_policy_pairs`, with the test data checked:
    not borderline, and each case classified by the reference as its name says."""
    named = rank_policy_pairs(r, seed)
    names = [n for n, _, _ in named]
    GB, GA = (torch.stack(x) for x in zip(*[reference.grams(A, B, torch.float32) for _, A, B in named]))
    eps_f = torch.tensor([reference.factor_eps(A, B) for _, A, B in named], dtype=torch.float64)
    assert_not_borderline(GB, GA, eps_f, f"r={r}")
    ref = reference.balancing_transforms(GB, GA, "nearest", eps_f=eps_f)
    rank = dict(zip(names, ref.rank.tolist()))
    svals = [torch.linalg.svdvals(f64(B) @ f64(A)) for _, A, B in named]
    old_cut = dict(zip(names, [int((S > reference.RANK_RTOL * S[0]).sum()) for S in svals]))
    assert rank["full"] == rank["live_small"] == rank["flat_near_floor"] == r
    if r > 1:
        assert rank["near_deficient"] == rank["bf16_floor"] == r - 1 and rank["exact_deficient"] == r - 2, rank
        assert rank["dominant_dead"] == r // 2 and rank["under_noise"] == 0, rank
        # the policy matters here: the earlier relative cut keeps components the floor calls noise
        assert old_cut["near_deficient"] == old_cut["bf16_floor"] == r and old_cut["under_noise"] >= r - 1, old_cut
    return names, GB, GA, eps_f


def _compare_with_reference(T, W, st, gaps, ref, r, names, what):
    """Kernel-math outputs (fp32-rounded T, T^-1 [P, r, r] as float64, status, gaps) against the reference."""
    assert torch.equal(st, _ref_status(ref, r)), (what, names, st.tolist(), _ref_status(ref, r).tolist())
    eye = torch.eye(r, dtype=torch.float64)
    for p, name in enumerate(names):
        if ref.zero[p] or ref.nonfinite[p]:
            assert torch.equal(T[p], eye) and torch.equal(W[p], eye), (what, name)
            continue
        assert rel(T[p], ref.T[p]) < 1e-5 and rel(W[p], ref.T_inv[p]) < 1e-5, \
            (what, name, rel(T[p], ref.T[p]), rel(W[p], ref.T_inv[p]))
        assert abs(gaps[p, 0].item() - ref.gap_before[p].item()) < 1e-9, (what, name)
        assert abs(gaps[p, 1].item() - ref.gap_after[p].item()) < 1e-6 + 1e-3 * ref.gap_after[p].item(), (what, name)


@pytest.mark.parametrize("r", [1, 3, 8, 16, 33, 64])
@pytest.mark.parametrize("mode", ["nearest", "svd"])
@pytest.mark.parametrize("pair_eig", [True, False])
def test_cuda_math_on_host_rank_policy(host_lib, r, mode, pair_eig):
    """The kernel decides live components exactly as the reference (product_floor with each pair's eps_f, the
    Gram cut), chooses the same slots for them, and writes the reference's transforms and status (rank incl.)."""
    names, GB, GA, eps_f = _rank_policy_case(r, seed=r)
    T, W, st, gaps = _host_transforms(host_lib, GB, GA, mode, eps_f, pair_eig)
    ref = reference.balancing_transforms(GB, GA, mode, eps_f=eps_f)
    _compare_with_reference(T, W, st, gaps, ref, r, names, f"r={r} {mode} pair_eig={pair_eig}")


PATH_GENERAL, PATH_FAST_EIG, PATH_FAST_NS = 0, 1, 2   # csrc/balance_math.cuh


@pytest.mark.parametrize("r", [3, 8, 16, 64])
@pytest.mark.parametrize("spread", [1.0, 0.3, 0.1])
def test_cuda_math_on_host_newton_schulz_roots(host_lib, r, spread):
    """Full-rank pairs in the nearest mode take the eigendecomposition-free path (the scaled inverse fourth root
    of M = L^T G_A L, bk::inv_fourth_root_ns) and still give the reference's transforms, also when the product's
    singular values spread over a decade (M's over two: about as far as the fast path's full-rank gate lets them
    at r = 64); the svd mode (whose components must be ordered) keeps the Jacobi path. The step counts guard the
    scaling (bk::ns_scale), one step above the counts seen: at spread 0.1 the unscaled iterations take 11-12 root
    steps and 11-14 polar steps (r >= 8: 12-14) here."""
    g = torch.Generator().manual_seed(r)
    s = torch.logspace(0, math.log10(spread), r, dtype=torch.float64)          # product singular values
    U = torch.linalg.qr(torch.randn(96, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(80, r, generator=g, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    Tm = Q * torch.linspace(0.7, 1.4, r, dtype=torch.float64)      # well conditioned: no factor dominates
    B = (U * s.sqrt()) @ Tm                                    # unbalanced: B = U S^1/2 T, A = T^-1 S^1/2 V^T
    A = torch.linalg.solve(Tm, s.sqrt()[:, None] * V.T)
    GB, GA = reference.grams(A[None].float(), B[None].float(), torch.float32)
    eps = torch.finfo(torch.float32).eps
    for mode, path in (("nearest", PATH_FAST_NS), ("svd", PATH_FAST_EIG)):
        paths = torch.full((1,), -1, dtype=torch.int32)
        T, W, st, gaps = _host_transforms(host_lib, GB, GA, mode, eps, paths=paths)
        ref = reference.balancing_transforms(GB, GA, mode)
        assert int(st[0]) == r << 8, (mode, int(st[0]))       # every component live, no flag
        assert int(paths[0]) & 255 == path, (mode, int(paths[0]))
        root_steps, polar_steps = (int(paths[0]) >> 8) & 255, int(paths[0]) >> 16
        if path == PATH_FAST_NS:
            assert 0 < root_steps <= {1.0: 3, 0.3: 9, 0.1: 10}[spread], root_steps    # (r = 64: 2, 7, 9)
            assert 0 < polar_steps <= {1.0: 5, 0.3: 9, 0.1: 11}[spread], polar_steps  # (r = 64: 4, 8, 10)
        assert rel(T[0], ref.T[0]) < 1e-5 and rel(W[0], ref.T_inv[0]) < 1e-5, (mode, rel(T[0], ref.T[0]))
        assert abs(gaps[0, 1].item() - ref.gap_after[0].item()) < 1e-6 + 1e-3 * ref.gap_after[0].item()


def test_cuda_flat_iter_matches_the_loop_it_replaces(host_lib):
    """bk::FlatIter (the Cholesky update's (row, col) per thread, no division per step) visits, in every thread
    of a block, exactly the flat indices tid, tid + nt, ... of the loop it replaces (so each element keeps its
    thread: the same bits): checked for the kernels' block sizes (and the host's one thread) over every width a
    rank <= 128 gives. The host build runs one thread, so this is where the GPU's mapping is checked on the CPU."""
    f = host_lib.bk_host_flat_iter_check
    bad = [(nt, w, rows) for nt in (1, 32, 64, 128, 256) for w in range(1, 131) for rows in (0, 1, 2, w, 131)
           if f(nt, w, rows) != 0]
    assert not bad, bad[:5]


# (per-block opt-in, per-SM) shared memory in bytes and SMs of GPUs CI does not have (CUDA's device attributes).
SMEM_DEVICES = {"H100/H200": (232448, 233472, 132), "A100": (166912, 167936, 108),
                "L4/RTX 4090 (sm_89)": (101376, 102400, 58), "RTX 3090 (sm_86)": (101376, 102400, 82)}
# The blocked kernels' (r >= 33) staged-product tiles in their small workspace (bk::stage_doubles: a 64 x 20 and a
# 16 x 68 float64 tile).
STAGE_BYTES = 8 * (64 * 20 + 16 * 68)


def _host_config(lib, P, n, sms, optin, per_sm):
    out = (ctypes.c_int * 5)()
    scratch = ctypes.c_longlong()
    lib.bk_host_balance_config(P, n, sms, optin, per_sm, out, ctypes.byref(scratch))
    return dict(zip(("threads", "grid", "smem", "mats", "small_limit"), out)), scratch.value


@pytest.mark.parametrize("device", list(SMEM_DEVICES))
def test_cuda_launch_config_fits_the_device(host_lib, device):
    """The r x r kernel's launch configuration (csrc/launch_config.h) on GPUs with less shared memory than an
    H200: every launch within the per-block opt-in limit (sm_86 / sm_89 allow 99 KB: a fixed 100 KB request
    failed there), two blocks per SM only where both stay resident, the rest of the 11 matrices in scratch."""
    optin, per_sm, sms = SMEM_DEVICES[device]
    for n in range(1, 129):
        for P in (1, 50, sms, sms + 1, 224, 1000):
            c, scratch = _host_config(host_lib, P, n, sms, optin, per_sm)
            where = (device, n, P, c)
            assert c["smem"] <= optin and c["small_limit"] <= optin, where
            if n < 33:
                assert c["smem"] <= c["small_limit"], where       # the attribute set on those kernels
            elif c["grid"] > sms:                                 # two blocks per SM: both resident
                assert 2 * (c["smem"] + 1024) <= per_sm, where
            assert 0 <= c["mats"] <= 11 and 1 <= c["grid"] <= P, where
            assert c["smem"] >= c["mats"] * 8 * n * n, where
            assert scratch == c["grid"] * (11 - c["mats"]) * n * n + 1, where


def test_cuda_launch_config_on_h200_is_the_measured_one(host_lib):
    """On an H100 / H200 the configuration from the device's limits is exactly the one every earlier H200
    measurement ran (the rule before csrc/launch_config.h: 100 KB per block where blocks share an SM, the opt-in
    limit where one block has it), for every rank and for pair counts around the SM count, given the kernel's small
    workspace: for ranks >= 33 that workspace includes, since session 15, the 18.5 KB of staged tensor-core product
    operands (STAGE_BYTES), so many ranks from 33 to 118 (r = 48 with 224 pairs: 4 instead of 5; r = 64 unchanged)
    keep fewer matrices in shared memory than those measurements had."""
    optin, per_sm, sms = SMEM_DEVICES["H100/H200"]

    def before(P, n, small):
        threads = {4: 64, 8: 64, 16: 128, 32: 128}.get(n, 64 if n <= 8 else (128 if n <= 32 else 256))
        mat, kmax, mats, per = 8 * n * n, 100 * 1024, 0, (4 if n <= 32 else (2 if n <= 64 else 1))
        if n >= 33:
            one = n > 64 or P <= sms
            per = 1 if one else 2
            mats = max(0, min(11, ((optin if one else kmax) - small) // mat))
        elif small + 11 * mat <= kmax:
            mats = 11
        elif small + 2 * mat <= kmax:
            mats = 2
        grid = max(1, min(sms * per, P))
        return threads, grid, small + mats * mat, mats, grid * (11 - mats) * n * n + 1

    for n in range(1, 129):
        for P in (1, 7, 50, sms - 1, sms, sms + 1, 224, 2 * sms, 2 * sms + 1, 1000):
            c, scratch = _host_config(host_lib, P, n, sms, optin, per_sm)
            small = c["smem"] - c["mats"] * 8 * n * n          # the kernel's small workspace (bk::small_bytes)
            assert 0 < small - (STAGE_BYTES if n >= 33 else 0) < 16 * 1024
            got = (c["threads"], c["grid"], c["smem"], c["mats"], scratch)
            assert got == before(P, n, small), (n, P, got, before(P, n, small))


def test_cuda_launch_config_on_h200_and_smaller_gpus(host_lib):
    """Matrices in shared memory: the H200's configurations as measured (bench/results, 7B shapes: 224 pairs),
    and what an A100 and an L4 get instead. From session 15 the blocked kernels (r >= 33) also keep their staged
    products' tiles (STAGE_BYTES) there: one matrix fewer than before at r = 48 (H200, A100, L4) and r = 64 (A100, L4)."""
    def mats(device, P, n):
        optin, per_sm, sms = SMEM_DEVICES[device]
        return _host_config(host_lib, P, n, sms, optin, per_sm)[0]["mats"]

    h = "H100/H200"
    assert [mats(h, 224, n) for n in (8, 16, 32, 48, 64, 128)] == [11, 11, 11, 4, 2, 1]
    assert [mats(h, 112, n) for n in (48, 64)] == [11, 6]                 # one block per SM: all it may opt in to
    assert [mats("A100", 224, n) for n in (32, 48, 64, 128)] == [11, 3, 1, 1]
    assert [mats("L4/RTX 4090 (sm_89)", 224, n) for n in (16, 32, 48, 64, 128)] == [11, 11, 1, 0, 0]


@pytest.mark.parametrize("r", [1, 3, 8, 16, 33])
@pytest.mark.parametrize("mode", ["nearest", "svd"])
def test_cuda_math_on_host_matches_reference(host_lib, r, mode):
    P = 6
    A = torch.randn(P, r, 50)
    B = torch.randn(P, 40, r) * 0.1
    if r > 1:
        B[1, :, -1] = 0                        # rank-deficient
        A[2, 0] = 0                            # rank-deficient (both factors)
        B[2, :, 1] = 0
    B[3] = 0                                   # zero product
    A[4, 0, 0] = float("nan")                  # non-finite
    GB, GA = reference.grams(A, B, torch.float32)
    T, W, st, gaps = _host_transforms(host_lib, GB, GA, mode, torch.finfo(torch.float32).eps)
    ref = reference.balancing_transforms(GB, GA, mode)          # float32 Grams: the float32 rank threshold
    assert torch.equal(st, _ref_status(ref, r))
    eye = torch.eye(r, dtype=torch.float64)
    for p in range(P):
        if st[p] & 3:
            assert torch.equal(T[p], eye) and torch.equal(W[p], eye)
            continue
        assert (T[p] @ W[p] - eye).abs().max() < 1e-5          # fp32-rounded inverse pair
        Bp, Ap = f64(B[p]) @ T[p], W[p] @ f64(A[p])
        assert rel(Bp @ Ap, f64(B[p]) @ f64(A[p])) < 1e-5
        assert abs(gaps[p, 1].item() - ref.gap_after[p].item()) < 1e-6 + 1e-3 * ref.gap_after[p].item()
        assert abs(gaps[p, 0].item() - ref.gap_before[p].item()) < 1e-9
        if (st[p] & 7) == 0:                                    # full rank: the reference's transforms
            assert rel(T[p], ref.T[p]) < 1e-5 and rel(W[p], ref.T_inv[p]) < 1e-5
            assert reference.balance_gap(Bp.T @ Bp, Ap @ Ap.T) < 1e-5


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
def llama_layer_specs(r, dtype, h=4096, f=11008, layers=1):
    per = [(r, h, h, dtype)] * 4 + [(r, h, f, dtype)] * 2 + [(r, f, h, dtype)]
    return per * layers


def _cuda_plan(pairs, **kw):
    from balora_kernels.ops.grouped_projection import TritonProjectionPlan
    return TritonProjectionPlan(pairs, **kw)


def _check_against_reference(pairs, before, mode, dtype, what):
    worst = {"prod": 0.0, "gap": 0.0, "out": 0.0}
    for (A, B), (A0, B0) in zip(pairs, before):
        A_ref, B_ref = reference.balance(f64(A0), f64(B0), mode)
        perr, gap, finite = invariants(A0, B0, A, B)
        assert finite, what
        if min(A.shape[1], B.shape[0]) < A.shape[0]:
            # rank-deficient by shape (e.g. out=37 < r): invariants only (the rest basis is arbitrary)
            assert perr <= (1e-5 if dtype == torch.float32 else 3e-2), (what, tuple(A.shape), tuple(B.shape), perr)
            worst["prod"] = max(worst["prod"], perr)
            continue
        if dtype == torch.float32:
            assert perr <= 1e-5 and gap <= 1e-4, (what, tuple(A.shape), tuple(B.shape), perr, gap)
            out = max(rel(A, A_ref), rel(B, B_ref))
            assert out <= 1e-4, (what, tuple(A.shape), tuple(B.shape), out)
        else:   # low precision: at most 2x the error of one rounding of the float64 result (torch plan)
            out = max(rel(A, A_ref) / max(rel(A_ref.to(dtype), A_ref), 1e-30),
                      rel(B, B_ref) / max(rel(B_ref.to(dtype), B_ref), 1e-30))
            assert out <= 2.0, (what, tuple(A.shape), tuple(B.shape), out)
        worst = {k: max(worst[k], v) for k, v in (("prod", perr), ("gap", gap), ("out", out))}
    return worst


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [1, 8, 16, 64, 128])
def test_gpu_plan_matches_reference(r, dtype):
    specs = llama_layer_specs(r, dtype) + [(r, 2048, 5632, dtype), (r, 1000, 37, dtype)]
    pairs = make_pairs(specs, device="cuda", seed=r)
    before = clone(pairs)
    plan = _cuda_plan(pairs)
    assert plan.transforms == "cuda", "the CUDA extension must load on the GPU machine"
    stats = plan.run("nearest").as_dict()
    assert stats["projected"] == len(pairs) and stats["skipped_nonfinite"] == 0
    worst = _check_against_reference(pairs, before, "nearest", dtype, f"r={r} {dtype}")
    print(f"r={r} {dtype}: {worst}")


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 5, 8])
@pytest.mark.parametrize("dtype, fp32_gram, rescale", [
    (torch.float32, "fma", "dot"), (torch.float32, "dot", "dot"), (torch.float32, "fma", "outer"),
    (torch.bfloat16, "fma", "dot"), (torch.bfloat16, "fma", "outer")])   # (bf16 Grams: tl.dot whatever fp32_gram)
def test_gpu_plan_small_rank_methods_match_reference(r, dtype, fp32_gram, rescale):
    """The Gram and rescale methods of the small ranks (Gram "fma", the float32 default up to FMA_MAX_RANK:
    CUDA-core outer products over the RC x RC block, or "dot": tl.dot over the padded 16 x 16; rescale "dot" or
    "outer", the 16-bit default there): the whole plan against float64. (Without its barrier the in-place
    "outer" rescale failed here at r = 5, float32: product error 9e-4, bench/results/logs/
    session4-projection-probe2-2026-11-28.txt.)"""
    specs = llama_layer_specs(r, dtype) + [(r, 1000, 37, dtype)]
    pairs = make_pairs(specs, device="cuda", seed=100 + r)
    before = clone(pairs)
    plan = _cuda_plan(pairs, fp32_gram=fp32_gram, rescale=rescale, kernels="triton")
    assert {g.fp32_gram for g in plan.groups} == {fp32_gram} and all(k == TRITON for k in plan.kernels.values())
    assert {lg.rescale_method for g in plan.groups for lg in g.launches} == {rescale}
    stats = plan.run("nearest").as_dict()
    assert stats["projected"] == len(pairs) and stats["skipped_nonfinite"] == 0
    worst = _check_against_reference(pairs, before, "nearest", dtype, f"r={r} {dtype} {fp32_gram} {rescale}")
    print(f"r={r} {dtype} {fp32_gram} {rescale}: {worst}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rescale_16bit_tf32_pair_rounding(dtype):
    """The rescale of 16-bit factors at r = 64 (two tf32 products with T's tf32 hi / lo split): almost every element
    equals the float64 product rounded once to the factors' dtype. The pair's ~2^-22 relative error flips a rounding
    on about 2^-14 (bf16) / 2^-11 (fp16) of the elements; one tf32 product (a wrong split: 2^-11) would flip about a
    tenth (bf16) / most (fp16) of them, which the 2x-error rule of the plan tests need not catch."""
    from balora_kernels.ops import grouped_projection as gp
    pairs = make_pairs([(64, 4096, 4096, dtype), (64, 4096, 11008, dtype), (64, 1000, 37, dtype)], device="cuda",
                       seed=90)
    before = clone(pairs)
    plan = _plan(pairs, transforms="torch")          # the rescale alone (random T below): no extension needed
    assert {gp._tf32_pair_rescale(lg.dtype, g.rescale_precision) for g in plan.groups for lg in g.launches} == {True}
    status = torch.zeros(plan.n_pairs, dtype=torch.int32, device="cuda")
    gen = torch.Generator().manual_seed(91)
    Ts = {}
    for g in plan.groups:
        g.tw.zero_()
        for p, i in enumerate(g.pair_ids):
            T = torch.randn(g.r, g.r, generator=gen, dtype=torch.float64) + 2 * torch.eye(g.r, dtype=torch.float64)
            g.tw[p, 0, :g.r, :g.r] = T.float()
            g.tw[p, 1, :g.r, :g.r] = torch.linalg.inv(T).float()
            Ts[i] = (g.tw[p, 0, :g.r, :g.r].double(), g.tw[p, 1, :g.r, :g.r].double())
    plan.rescale(status)
    for i, ((A, B), (A0, B0)) in enumerate(zip(pairs, before)):
        T, W = Ts[i]
        for name, got, want in (("B", B, (f64(B0) @ T).to(dtype)), ("A", A, (W @ f64(A0)).to(dtype))):
            flipped = (got != want).double().mean().item()
            assert flipped <= 1e-2, (i, name, dtype, flipped)


@pytest.mark.gpu
@pytest.mark.parametrize("r, fp32_gram", [(8, "auto"), (16, "auto"), (64, "auto"), (64, "dot"), (8, "dot"),
                                         (3, "fma")])
def test_gpu_gram_methods(r, fp32_gram):
    """The float32 Gram methods the plan uses (auto: CUDA-core outer products for r <= 8, FMA dots for r <= 16,
    fp16x3 above), FMA dots at r = 8 and 3xTF32 at r = 64, on the device, Llama shapes: float64 accuracy checks.
    (fp16x3 at r <= 16 is not used: on the tensor cores it measured 2e-6 relative error on the 4096-row Grams,
    15x the plain float32 Gram's.)"""
    specs = llama_layer_specs(r, torch.float32) + [(r, 1000, 37, torch.float32)]
    pairs = make_pairs(specs, device="cuda", seed=60 + r)
    plan = _cuda_plan(pairs, fp32_gram=fp32_gram, kernels="triton")
    for g in plan.groups:
        g.grams.fill_(float("nan"))
    plan.gram()
    check_grams(plan, pairs, f"r={r} {fp32_gram}")


TRITON, CUDA = {"gram": "triton", "rescale": "triton"}, {"gram": "cuda", "rescale": "cuda"}


def _grouped_cases(dtype, seed):
    """Every rank the CUDA Gram / rescale take (each of its rank blocks 4, 8, 16, full and partial), Llama-sized
    and awkward shapes (one-tile, multi-tile with a short last tile, out < r), plus factors 16-byte misaligned
    (views at an odd element offset: the kernels' scalar loads) beside aligned ones."""
    specs = []
    for r in (1, 3, 4, 5, 8, 12, 16):
        specs += [(r, 4096, 4096, dtype), (r, 4096, 11008, dtype), (r, 1000, 37, dtype), (r, 37, 2500, dtype)]
    pairs = make_pairs(specs, device="cuda", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for r in (4, 8, 16):
        A = (torch.randn(r * 3001 + 1, generator=g) * 0.02).to(dtype).cuda()[1:].view(r, 3001)
        B = (torch.randn(2049 * r + 1, generator=g) * 0.3).to(dtype).cuda()[1:].view(2049, r)
        assert A.is_contiguous() and B.data_ptr() % 16 != 0
        pairs.append((A, B))
    return pairs


def check_cuda_gram(plan, pairs, what, first_bad):
    """A CUDA Gram plan (csrc/grouped.cu, grouped_mma.cu): check_grams on Grams poisoned before, bitwise equal over two
    launches, the per-Gram counters left zero; then a NaN in A of pair first_bad and an Inf in B of the next pair
    reach those two Grams and no other (nor the pair after them: it stays finite)."""
    for g in plan.groups:
        g.grams.fill_(float("nan"))
    plan.gram()
    check_grams(plan, pairs, what)
    first = [g.grams.clone() for g in plan.groups]
    for g in plan.groups:
        g.grams.fill_(float("nan"))
    plan.gram()
    for g, f in zip(plan.groups, first):
        assert torch.equal(g.grams, f) and int(g.counters.abs().sum()) == 0, what
    a, b = first_bad, first_bad + 1
    pairs[a][0][1, 3] = float("nan")
    pairs[b][1][7, 0] = float("inf")
    plan.gram()
    G = {i: g.grams[p] for g in plan.groups for p, i in enumerate(g.pair_ids)}
    assert not torch.isfinite(G[a][1]).all() and not torch.isfinite(G[b][0]).all(), what
    assert torch.isfinite(G[a][0]).all() and torch.isfinite(G[b][1]).all() and torch.isfinite(G[b + 1]).all(), what


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k_chunk", [None, 999])
def test_gpu_cuda_gram(dtype, k_chunk):
    """csrc/grouped.cu's Gram (the default for ranks <= 16 with the extension): every Gram within 2x the plain
    float32 Gram's error against float64 (norm and per entry), zero padding, bitwise equal over two launches, the
    per-Gram counters left zero; a NaN / Inf reaches its Gram (and no other). k_chunk=999: odd tile starts and
    lengths (a lane's last rows / columns past the tile's end, in every unrolled step)."""
    pairs = _grouped_cases(dtype, seed=80)
    plan = _cuda_plan(pairs, kernels="cuda", k_chunk=k_chunk)   # "auto" keeps 16-bit Grams in Triton
    assert all(k == CUDA for k in plan.kernels.values()) and plan.backend == "cuda-grouped+cuda-ext", plan.backend
    check_cuda_gram(plan, pairs, f"cuda {dtype}", 4)   # rank 3: A [3, 4096], B [11008, 3] (pair 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_cuda_rescale(dtype):
    """csrc/grouped.cu's rescale: B T and T^-1 A within 2x plain PyTorch's error against float64 for every rank
    block and shape of _grouped_cases (misaligned factors included); a skipped pair is left bit-identical."""
    pairs = _grouped_cases(dtype, seed=90)
    plan = _cuda_plan(pairs)
    assert all(k["rescale"] == "cuda" for k in plan.kernels.values())
    check_rescale(plan, pairs, skip=6)


def _mma_cases(seed):
    """Float32 pairs of both rank blocks of the tensor-core Gram / rescale (csrc/grouped_mma.cu: RK = 32 for r = 17
    to 32, 64 for 33 to 64; full and partial), Llama-sized and awkward shapes (one tile, several with a short last
    one, fewer rows than a chunk, A rows not a multiple of 4 long), plus factors 16-byte misaligned (views at an
    odd element offset: the element copies)."""
    f32 = torch.float32
    specs = []
    for r in (17, 32, 33, 64):
        specs += [(r, 4096, 4096, f32), (r, 4096, 11008, f32), (r, 1000, 37, f32), (r, 37, 2500, f32)]
    for r in (24, 40, 63):
        specs += [(r, 1001, 37, f32), (r, 2049, 515, f32)]
    pairs = make_pairs(specs, device="cuda", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for r in (32, 64):
        A = (torch.randn(r * 3001 + 1, generator=g) * 0.02).cuda()[1:].view(r, 3001)
        B = (torch.randn(2049 * r + 1, generator=g) * 0.3).cuda()[1:].view(2049, r)
        assert A.is_contiguous() and B.data_ptr() % 16 != 0
        pairs.append((A, B))
    return pairs


@pytest.mark.gpu
@pytest.mark.parametrize("k_chunk", [None, 999])
def test_gpu_mma_gram(k_chunk):
    """csrc/grouped_mma.cu's Gram (float32, ranks 17 to 64, the default there with the extension; its wgmma kernels
    on a compute capability 9.0 GPU, backend_info says so): every Gram within 2x the plain float32 Gram's error
    against float64 (norm and per entry), zero padding, bitwise equal over two launches, the per-Gram counters left
    zero; a NaN / Inf reaches its Gram (and no other). k_chunk=999: odd tile starts and lengths (chunks past the
    tile's end)."""
    from balora_kernels import _ext, backend_info
    wgmma = torch.cuda.get_device_capability() == (9, 0) and os.environ.get("BALORA_KERNELS_WGMMA") != "0"
    assert _ext.grouped_wgmma() == wgmma   # the wgmma kernels on Hopper, mma.sync elsewhere
    assert ("wgmma" if wgmma else "mma.sync") in backend_info()["projection"]["gram_rescale"]
    pairs = _mma_cases(seed=82)
    plan = _cuda_plan(pairs, k_chunk=k_chunk)
    assert all(k == CUDA for k in plan.kernels.values()), plan.kernels
    check_cuda_gram(plan, pairs, "mma", 0)   # rank 17: A [17, 4096], B [11008, 17] (pair 1)


@pytest.mark.gpu
@pytest.mark.skipif(INTERP_CHILD or os.environ.get("BALORA_KERNELS_WGMMA") == "0", reason="parent only")
def test_gpu_mma_kernels_without_wgmma():
    """On Hopper the wgmma kernels take ranks 33 to 64: test_gpu_mma_gram and test_gpu_mma_rescale again in a child
    with BALORA_KERNELS_WGMMA=0, so that the mma.sync kernels of rank block 64 run there too (elsewhere they are
    the ones the parent's tests ran)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the mma.sync kernels are the only ones here: the parent's tests ran them")
    env = dict(os.environ, BALORA_KERNELS_WGMMA="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "gpu",
                           "-k", "test_gpu_mma_gram or test_gpu_mma_rescale", __file__], env=env,
                          capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"mma.sync kernel tests failed:\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\b4 passed", summary) and "failed" not in summary and "skipped" not in summary, tail


@pytest.mark.gpu
@pytest.mark.parametrize("k_chunk", [None, 999])
def test_gpu_mma_rescale(k_chunk):
    """csrc/grouped_mma.cu's rescale (its wgmma kernel for ranks 33 to 64 on a compute capability 9.0 GPU): B T and
    T^-1 A within 2x plain PyTorch's float32 error against float64 for every case of _mma_cases (misaligned factors
    included); a skipped pair is left bit-identical."""
    pairs = _mma_cases(seed=92)
    plan = _cuda_plan(pairs, k_chunk=k_chunk)
    assert all(k == CUDA for k in plan.kernels.values()), plan.kernels
    check_rescale(plan, pairs, skip=5)


@pytest.mark.gpu
def test_gpu_kernels_option():
    """kernels="triton" keeps the Triton Gram / rescale for every rank; "auto" takes the CUDA rescale up to rank 16
    and the CUDA Gram there for float32 factors only (a mixed plan says so), and both for float32 factors up to
    rank 64; "cuda" takes both for 16-bit factors up to rank 16 too and refuses what it cannot take, by name."""
    f32, bf16 = torch.float32, torch.bfloat16
    pairs = make_pairs([(8, 256, 512, f32), (32, 512, 256, f32), (4, 128, 64, bf16), (24, 128, 64, bf16),
                        (72, 256, 128, f32)], device="cuda", seed=3)
    assert _cuda_plan(pairs, kernels="triton").kernels == {8: TRITON, 32: TRITON, 4: TRITON, 24: TRITON, 72: TRITON}
    auto = _cuda_plan(pairs)
    assert auto.kernels == {8: CUDA, 32: CUDA, 4: {"gram": "triton", "rescale": "cuda"}, 24: TRITON, 72: TRITON}, \
        auto.kernels
    assert auto.backend == "triton+cuda-grouped+cuda-ext"
    assert _cuda_plan(pairs[:3], kernels="cuda").kernels == {8: CUDA, 32: CUDA, 4: CUDA}
    with pytest.raises(ValueError, match="kernels='cuda' takes ranks up to 16 \\(64 for float32 factors\\), got pairs "
                                         "of rank 24 with 16-bit factors"):
        _cuda_plan(pairs[:4], kernels="cuda")
    with pytest.raises(ValueError, match="kernels='cuda' takes ranks up to 16 \\(64 for float32 factors\\), got pairs "
                                         "of rank 72$"):
        _cuda_plan(pairs[4:], kernels="cuda")
    with pytest.raises(ValueError, match="kernels='cuda' is unavailable: the r x r step runs in torch"):
        _cuda_plan(pairs[:1], kernels="cuda", transforms="torch")
    assert _cuda_plan(pairs[:1], transforms="torch").kernels == {8: TRITON}


@pytest.mark.gpu
@pytest.mark.parametrize("r", [8, 64])
def test_gpu_svd_mode_and_mixed_ranks(r):
    specs = llama_layer_specs(r, torch.float32) + [(5, 4096, 4096, torch.float32), (r, 4096, 4096, torch.bfloat16)]
    pairs = make_pairs(specs, device="cuda", seed=10 + r)
    before = clone(pairs)
    _cuda_plan(pairs).run("svd")
    for (A, B), (A0, B0) in zip(pairs, before):
        A_ref, B_ref = reference.balance(f64(A0), f64(B0), "svd")
        tol = 1e-4 if A.dtype == torch.float32 else 2 * rel(A_ref.to(A.dtype), A_ref) + 1e-3
        assert rel(A, A_ref) <= tol and rel(B, B_ref) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("r", [8, 64])
def test_gpu_degenerate_pairs(r):
    specs = llama_layer_specs(r, torch.float32)
    pairs = make_pairs(specs, device="cuda", seed=20 + r)
    pairs[0][1].zero_()
    pairs[1][0][2, 5] = float("nan")
    pairs[2][1][:, 3] = 0
    pairs[3][0][1] = 0
    pairs[3][1][:, 1] = 0
    before = clone(pairs)
    tpairs = clone(pairs)
    stats = _cuda_plan(pairs).run("nearest").as_dict()
    tstats = TorchProjectionPlan(tpairs).run("nearest").as_dict()
    for k in ("pairs", "projected", "skipped_nonfinite", "skipped_zero", "rank_deficient"):
        assert stats[k] == tstats[k], (k, stats, tstats)
    for i in (0, 1):
        for t, t0 in zip(pairs[i], before[i]):
            assert torch.equal(t.nan_to_num(), t0.nan_to_num()) and torch.equal(t.isnan(), t0.isnan())
    for i in (2, 3):
        (A, B), (A0, B0) = pairs[i], before[i]
        perr, _, finite = invariants(A0, B0, A, B)
        assert finite and perr <= 1e-5, (i, perr)
        for X, X0 in ((A, A0), (B, B0)):
            assert torch.linalg.matrix_rank(f64(X), rtol=1e-4) == torch.linalg.matrix_rank(f64(X0), rtol=1e-4)
        # live block balanced: the Grams agree on the span of the product
        GB, GA = f64(B).T @ f64(B), f64(A) @ f64(A).T
        U, S, Vh = torch.linalg.svd(f64(B) @ f64(A))
        k = int((S > reference.RANK_RTOL * S[0]).sum())
        Bp = torch.linalg.pinv(f64(B)) @ U[:, :k]              # live directions in the r-space
        L = torch.linalg.qr(Bp)[0]
        assert reference.balance_gap(L.T @ GB @ L, L.T @ GA @ L) < 1e-4
    for i in range(4, len(pairs)):
        perr, gap, _ = invariants(*before[i], *pairs[i])
        assert perr <= 1e-5 and gap <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("r", [3, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("mode", ["nearest", "svd"])
def test_gpu_rank_policy_matches_reference(r, mode):
    """The CUDA r x r kernel on the device's own Grams: the reference's live components (product floor with
    each pair's eps_f, bf16 factors included), slots, transforms and status (rank included); then the whole
    plan keeps every product and balances it. Ranks 4, 8, 16, 32, 64 run the fixed-rank kernels
    (csrc/balance_fixed.cu), the others the run-time-rank ones."""
    named = rank_policy_pairs(r, seed=100 + r)
    names = [n for n, _, _ in named]
    pairs = [(A.cuda(), B.cuda()) for _, A, B in named]
    before = clone(pairs)
    plan = _cuda_plan(pairs)
    assert plan.transforms == "cuda" and len(plan.groups) == 1
    g = plan.groups[0]
    status = torch.full((plan.n_pairs,), -1, dtype=torch.int32, device="cuda")
    gaps = torch.full((plan.n_pairs, 2), float("nan"), dtype=torch.float64, device="cuda")
    g.tw.fill_(float("nan"))
    plan.gram()
    plan.transforms_(mode, status, gaps)
    tw = g.tw.cpu()
    assert torch.isfinite(tw).all() and (tw[:, :, r:] == 0).all() and (tw[:, :, :, r:] == 0).all()
    GB, GA, eps_f = g.grams[:, 0, :r, :r].cpu(), g.grams[:, 1, :r, :r].cpu(), g.eps_f.cpu()
    assert_not_borderline(GB, GA, eps_f, f"r={r}")
    ref = reference.balancing_transforms(GB, GA, mode, eps_f=eps_f)
    _compare_with_reference(tw[:, 0, :r, :r].double(), tw[:, 1, :r, :r].double(), status.cpu(), gaps.cpu(), ref, r,
                            names, f"GPU r={r} {mode}")
    stats = plan.run(mode).as_dict()
    assert stats["skipped_zero"] == int(ref.zero.sum())
    assert stats["rank_deficient"] == int(((ref.rank < r) & ~ref.zero).sum())
    for name, (A, B), (A0, B0) in zip(names, pairs, before):
        perr, _, finite = invariants(A0, B0, A, B)
        assert finite and perr <= (1e-5 if A.dtype == torch.float32 else 3e-2), (name, perr)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [40, 64, 128])
def test_gpu_transforms_same_bits_for_every_launch_shape(r, monkeypatch):
    """csrc/balance.cu places a rank >= 33 pair's matrices by the number of pairs P: one block per SM with all
    the shared memory it may opt in to when P <= SMs (or r > 64), two blocks per SM with 100 KB each above, the
    rest of the 11 matrices in global memory. Every placement gives the same bits, and the reference's
    decisions: P > SMs pairs (the rank-policy cases of several seeds, every kind of pair) in one launch, then in
    launches of 8 pairs (at r = 128 both take one block per SM: only the grid-stride loop differs; the nearest
    mode only), then in one launch again configured for the shared memory of an A100 and of an L4 / RTX 4090
    (BALORA_KERNELS_SMEM_LIMITS: fewer matrices in shared memory, none at r = 128 on the L4).
    T, T^-1 against the reference for the pairs the reference keeps whole: the rest block
    of a rank-deficient pair is ill-conditioned at some of these seeds (dominant_dead at r = 64: 1.6e-4 from
    the reference, the same in the host build of the kernel of session 11, bitwise equal to that kernel's). Ranks
    >= 33 run their products on the float64 tensor cores (matmul_mma), staged through shared memory wherever the
    operands live: the placements still give the same bits."""
    from balora_kernels import _ext
    assert _ext.load() is not None, _ext.error()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    named = []
    while len(named) <= sms + 20:
        named += rank_policy_pairs(r, seed=1000 + 100 * len(named))
    names = [n for n, _, _ in named]
    GB, GA = (torch.stack(x) for x in zip(*[reference.grams(A, B, torch.float32) for _, A, B in named]))
    eps_f = torch.tensor([reference.factor_eps(A, B) for _, A, B in named], dtype=torch.float64)
    assert_not_borderline(GB, GA, eps_f, f"r={r}")
    P = len(named)
    grams = torch.stack([GB, GA], 1).cuda().contiguous()

    def transforms(g, e):
        tw = torch.full(g.shape, float("nan"), device="cuda")
        status = torch.full((g.shape[0],), -1, dtype=torch.int32, device="cuda")
        gaps = torch.full((g.shape[0], 2), float("nan"), dtype=torch.float64, device="cuda")
        torch.ops.balora.balance_transforms(g, e, r, 0, tw, status, gaps)
        return tw, status, gaps

    whole = transforms(grams, eps_f.cuda())
    parts = [transforms(grams[i:i + 8].contiguous(), eps_f[i:i + 8].cuda()) for i in range(0, P, 8)]
    for got, chunked in zip(whole, (torch.cat(x) for x in zip(*parts))):
        assert torch.equal(got, chunked), f"r={r}: P={P} in one launch differs from launches of 8 pairs"
    for device in ("A100", "L4/RTX 4090 (sm_89)"):
        optin, per_sm, _ = SMEM_DEVICES[device]
        monkeypatch.setenv("BALORA_KERNELS_SMEM_LIMITS", f"{optin},{per_sm}")
        for got, small in zip(whole, transforms(grams, eps_f.cuda())):
            assert torch.equal(got, small), f"r={r}: P={P} configured for an {device} differs"
    monkeypatch.delenv("BALORA_KERNELS_SMEM_LIMITS")
    tw, status, gaps = (t.cpu() for t in whole)
    ref = reference.balancing_transforms(GB, GA, "nearest", eps_f=eps_f)
    whole_rank = [p for p in range(P) if ref.rank[p] == r and not (ref.zero[p] or ref.nonfinite[p])]
    assert len(whole_rank) >= P // 3
    _compare_with_reference(tw[whole_rank, 0].double(), tw[whole_rank, 1].double(), status[whole_rank],
                            gaps[whole_rank], reference.balancing_transforms(GB[whole_rank], GA[whole_rank], "nearest",
                                                                              eps_f=eps_f[whole_rank]),
                            r, [names[p] for p in whole_rank], f"GPU r={r} P={P}")
    assert torch.equal(status, _ref_status(ref, r)), f"GPU r={r} P={P}: status"


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    _graph_capture_and_replay("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("own_capture", [False, True])
def test_gpu_graph_stats_branch_counts(own_capture):
    """In a captured projection the counters run on a side branch beside the rescale: they still see every
    pair's status and gaps of that replay (a NaN pair, a zero product, rank-deficient pairs), in the plan's own
    graph and in a caller's capture, and the rescale still skips the skipped pairs."""
    specs = llama_layer_specs(8, torch.float32) + [(8, 1000, 37, torch.float32)] * 3
    pairs = make_pairs(specs, device="cuda", seed=40)
    plan = _cuda_plan(pairs, cuda_graph=not own_capture)

    def counts(it):
        fresh = make_pairs(specs, device="cuda", seed=41 + it)
        fresh[-3][0][0, 0] = float("nan")            # non-finite pair: skipped, left as it is
        fresh[-2][1].zero_()                          # zero product: skipped
        fresh[-1][1][:, -1] = 0                       # rank-deficient: projected
        for (A, B), (A2, B2) in zip(pairs, fresh):
            A.copy_(A2)
            B.copy_(B2)
        return fresh

    if own_capture:
        plan.run("nearest")
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            stats = plan.run("nearest")
    for it in range(3):
        fresh = counts(it)
        if own_capture:
            g.replay()
        else:
            stats = plan.run("nearest")               # eager, then captured, then replayed
        d = stats.as_dict()
        assert d["pairs"] == len(pairs) and d["projected"] == len(pairs) - 2, d
        assert d["skipped_nonfinite"] == 1 and d["skipped_zero"] == 1 and d["rank_deficient"] == 1, d
        # the largest gap after is the rank-deficient pair's (its dead component cannot be balanced): this
        # replay's value, from the reference
        A, B = fresh[-1]
        ref = reference.balancing_transforms(*reference.grams(A[None].cpu(), B[None].cpu(), torch.float32), "nearest")
        assert abs(d["gap_after"] - ref.gap_after.item()) <= 1e-3 * ref.gap_after.item(), (d, ref.gap_after)
        assert d["gap_before"] > d["gap_after"] > 0.01, d
        for i in (-3, -2):                            # bit for bit (the NaN pair too)
            for X, X0 in zip(pairs[i], fresh[i]):
                assert torch.equal(X.view(torch.int32), X0.view(torch.int32)), i
    if not own_capture:
        assert plan._graphs, "the plan's third run must replay its own graph"


def _graph_capture_and_replay(transforms):
    specs = llama_layer_specs(16, torch.float32) + [(16, 2048, 5632, torch.bfloat16)]
    pairs = make_pairs(specs, device="cuda", seed=30)
    plan = _cuda_plan(pairs, transforms=transforms)
    plan.run("nearest")                                   # warm-up: compile kernels
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            stats = plan.run("nearest")
    except RuntimeError as e:
        if transforms == "torch" and "cannot be captured in a CUDA graph" in str(e):
            return "refused"
        raise
    for it in range(2):
        fresh = make_pairs(specs, device="cuda", seed=31 + it)
        for (A, B), (A2, B2) in zip(pairs, fresh):
            A.copy_(A2)
            B.copy_(B2)
        g.replay()
        torch.cuda.synchronize()
        assert stats.as_dict()["projected"] == len(pairs)
        for (A, B), (A0, B0) in zip(pairs, fresh):
            perr, gap, finite = invariants(A0, B0, A, B)
            tol = (1e-5, 1e-4) if A.dtype == torch.float32 else (3e-2, 3e-2)
            assert finite and perr <= tol[0] and gap <= tol[1], (perr, gap, A.dtype)


@pytest.mark.gpu
def test_gpu_plan_replays_its_own_graph():
    """By default a CUDA plan (extension loaded) runs eagerly once, captures on the second call and replays after:
    results bitwise equal to launching the kernels one by one, each call's stats its own (a later replay does not
    overwrite them), one graph per mode."""
    specs = llama_layer_specs(16, torch.float32) + [(8, 2048, 5632, torch.bfloat16), (16, 1000, 37, torch.float32)]
    pairs = make_pairs(specs, device="cuda", seed=70)
    twin = clone(pairs)
    plan, eager = _cuda_plan(pairs), _cuda_plan(twin, cuda_graph=False)
    assert plan.cuda_graph and not eager.cuda_graph
    seen = []
    for it, mode in enumerate(["nearest"] * 4 + ["svd"] * 3):
        fresh = make_pairs(specs, device="cuda", seed=71 + it)
        for (A, B), (A2, B2), (A3, B3) in zip(pairs, twin, fresh):
            A.copy_(A3), B.copy_(B3), A2.copy_(A3), B2.copy_(B3)
        seen.append((plan.run(mode), eager.run(mode).as_dict()))
        for (A, B), (A2, B2) in zip(pairs, twin):
            assert torch.equal(A, A2) and torch.equal(B, B2), (it, mode)
    assert sorted(plan._graphs) == ["nearest", "svd"]
    for it, (stats, expect) in enumerate(seen):
        assert stats.as_dict() == expect, (it, stats.as_dict(), expect)
    assert len({s.as_dict()["gap_before"] for s, _ in seen}) == len(seen)     # fresh data each time


@pytest.mark.gpu
def test_gpu_extension_takes_float32_ranks_to_64():
    """The built extension's grouped_rescale takes float32 factors up to rank 64 and refuses 65 (the question
    grouped_max_rank asks once per process: test_extension_from_before_the_tensor_core_kernels_...), so the plan
    sends float32 ranks 17 to 64 to csrc/grouped_mma.cu."""
    from balora_kernels import _ext
    assert _ext.load() is not None, _ext.error()
    assert _ext._takes_fp32_rank(64) and not _ext._takes_fp32_rank(65)
    assert _ext.grouped_max_rank(True) == 64 and _ext.grouped_max_rank(False) == 16


@pytest.mark.gpu
def test_gpu_extension_errors_are_exceptions():
    """Bad arguments to the compiled op raise RuntimeError naming the problem (on the H200 machine an integer
    streamed into a message from the extension once crashed the process: csrc/messages.h)."""
    from balora_kernels import _ext
    assert _ext.load() is not None, _ext.error()
    z = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt, device="cuda")  # noqa: E731
    args = (z(1, 2, 16, 16), z(1, dt=torch.float64), 999, 0, z(1, 2, 16, 16), z(1, dt=torch.int32),
            z(1, 2, dt=torch.float64))
    with pytest.raises(RuntimeError, match=r"rank r=999 must be in \[1, min\(128, R=16\)\]"):
        torch.ops.balora.balance_transforms(*args)
    with pytest.raises(RuntimeError, match=r"tw must be contiguous float32 of grams' shape \[1, 2, 16, 16\], got \[3\]"):
        torch.ops.balora.balance_transforms(*args[:2], 8, 0, z(3), *args[5:])
    tiles = torch.zeros(3, 6, dtype=torch.int64, device="cuda")
    gram_args = [tiles, 2, 1, 8, 0, z(3, 16, 16), z(2, 2, dt=torch.int64), z(2, dt=torch.int32), z(1, 2, 16, 16)]
    with pytest.raises(RuntimeError, match=r"grouped_gram: rank r=17 must be in \[1, 16\] for 16-bit factors"):
        torch.ops.balora.grouped_gram(*gram_args[:3], 17, 1, *gram_args[5:])
    with pytest.raises(RuntimeError, match=r"grouped_gram: rank r=65 must be in \[1, 64\] for float32 factors"):
        torch.ops.balora.grouped_gram(*gram_args[:3], 65, *gram_args[4:])
    with pytest.raises(RuntimeError, match=r"grouped_gram: grams must be \[P, 2, R, R\] with R >= 32 for r=17, got "
                                           r"R=20"):
        torch.ops.balora.grouped_gram(*gram_args[:3], 17, *gram_args[4:8], z(1, 2, 20, 20))
    with pytest.raises(RuntimeError, match=r"grouped_rescale: tw must be \[P, 2, R, R\] with R >= 64 for r=40, got "
                                           r"R=48"):
        torch.ops.balora.grouped_rescale(tiles, 2, 1, 40, 0, z(1, 2, 48, 48), z(1, dt=torch.int32), 3)
    with pytest.raises(RuntimeError, match=r"grouped_gram: n_b=2 \+ n_a=2 must be the table's 3 tiles"):
        torch.ops.balora.grouped_gram(tiles, 2, 2, *gram_args[3:])
    with pytest.raises(RuntimeError, match=r"grouped_gram: counters must be contiguous int32 \[2\], got Int \[5\]"):
        torch.ops.balora.grouped_gram(*gram_args[:7], z(5, dt=torch.int32), gram_args[8])
    with pytest.raises(RuntimeError, match=r"grouped_rescale: dtype code must be 0 \(float32\), 1 \(bfloat16\) or 2"):
        torch.ops.balora.grouped_rescale(tiles, 2, 1, 8, 7, z(1, 2, 16, 16), z(1, dt=torch.int32), 3)
    with pytest.raises(RuntimeError, match=r"grouped_rescale: status must be contiguous int32 \[1\], got Int \[4\]"):
        torch.ops.balora.grouped_rescale(tiles, 2, 1, 8, 0, z(1, 2, 16, 16), z(4, dt=torch.int32), 3)


@pytest.mark.gpu
def test_gpu_bitwise_deterministic():
    specs = llama_layer_specs(16, torch.float32) + llama_layer_specs(64, torch.bfloat16)
    pairs = make_pairs(specs, device="cuda", seed=40)
    twin = clone(pairs)
    _cuda_plan(pairs).run("nearest")
    _cuda_plan(twin).run("nearest")
    for (A, B), (A2, B2) in zip(pairs, twin):
        assert torch.equal(A, A2) and torch.equal(B, B2)


@pytest.mark.gpu
def test_gpu_fallback_without_extension(monkeypatch):
    from balora_kernels import _ext
    from balora_kernels.ops.grouped_projection import TritonProjectionPlan
    specs = llama_layer_specs(16, torch.float32)
    pairs = make_pairs(specs, device="cuda", seed=50)
    twin = clone(pairs)
    before = clone(pairs)
    monkeypatch.setenv("BALORA_KERNELS_DISABLE_EXT", "1")
    _ext.reset()
    try:
        info = functional.backend_info()["projection"]
        assert info["cuda"] == "triton+torch-eigh" and "BALORA_KERNELS_DISABLE_EXT" in info["why"], info
        plan = functional.make_projection_plan(pairs)
        assert isinstance(plan, TritonProjectionPlan) and plan.transforms == "torch"
        plan.run("nearest")
    finally:
        monkeypatch.delenv("BALORA_KERNELS_DISABLE_EXT")
        _ext.reset()
    assert functional.backend_info()["projection"]["cuda"] == "triton+cuda-ext"
    _cuda_plan(twin).run("nearest")
    _check_against_reference(pairs, before, "nearest", torch.float32, "fallback")
    for (A, B), (A2, B2) in zip(pairs, twin):
        assert rel(A, A2) < 1e-5 and rel(B, B2) < 1e-5


@pytest.mark.gpu
def test_gpu_projector_uses_grouped_plan():
    import balora_kernels as bk
    net = torch.nn.Sequential(bk.BaLoRALinear(256, 512, 8), bk.BaLoRALinear(512, 256, 16)).cuda()
    for m in net:
        torch.nn.init.normal_(m.lora_B)
    before = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in net]
    proj = bk.BalancedProjector(net)
    stats = proj.project().as_dict()
    assert type(proj._plan).__name__ == "TritonProjectionPlan"
    assert stats["projected"] == 2 and stats["gap_after"] < 1e-5
    for m, (A0, B0) in zip(net, before):
        perr, gap, _ = invariants(A0, B0, m.lora_A.detach(), m.lora_B.detach())
        assert perr <= 1e-5 and gap <= 1e-4


@pytest.mark.gpu
def test_gpu_projector_without_checks_same_bits_no_host_sync():
    """BalancedProjector(follow_model=False, check_params=False) on CUDA: the same bits as the checked projector on
    a copy of the model, a call replaying the plan's graph free of host synchronisation (torch's sync debug mode
    set to raise), and refresh() after the parameters were re-allocated (``p.data = p.data.clone()``: the old
    tables would write the freed memory) projects the new tensors."""
    import balora_kernels as bk
    torch.manual_seed(3)
    net = torch.nn.Sequential(bk.BaLoRALinear(256, 512, 8), bk.BaLoRALinear(512, 256, 16),
                              bk.BaLoRALinear(256, 256, 16)).cuda()
    for m in net:
        torch.nn.init.normal_(m.lora_B)
    twin = copy.deepcopy(net)
    checked, unchecked = bk.BalancedProjector(twin), bk.BalancedProjector(net, follow_model=False, check_params=False)
    for _ in range(3):   # (compile, capture, replay)
        checked.project()
        unchecked.project()
    torch.cuda.synchronize()
    for m, t in zip(net, twin):
        assert torch.equal(m.lora_A, t.lora_A) and torch.equal(m.lora_B, t.lora_B)
    with torch.no_grad():
        for m in net:
            m.lora_B.mul_(torch.linspace(0.5, 2.0, m.lora_B.shape[0], device="cuda")[:, None])
    before = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in net]
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = unchecked.project()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.as_dict()["projected"] == 3
    for m, (A0, B0) in zip(net, before):
        perr, gap, _ = invariants(A0, B0, m.lora_A.detach(), m.lora_B.detach())
        assert perr <= 1e-5 and gap <= 1e-4
    with torch.no_grad():
        for m in net:
            m.lora_A.data = m.lora_A.data.clone()
            m.lora_B.data = (m.lora_B.data * 3.0).clone()
    before = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in net]
    unchecked.refresh()
    unchecked.project()
    for m, (A0, B0) in zip(net, before):
        perr, gap, _ = invariants(A0, B0, m.lora_A.detach(), m.lora_B.detach())
        assert perr <= 1e-5 and gap <= 1e-4


@pytest.mark.gpu
def test_gpu_zz_fallback_graph_capture_refused_cleanly():
    """The torch.linalg fallback refuses a capture before recording anything, with a clear error, and
    the device stays usable (random numbers and a later capture of the extension path work)."""
    assert _graph_capture_and_replay("torch") == "refused"
    torch.randn(8, device="cuda").uniform_()          # the generator's state is intact
    _graph_capture_and_replay("cuda")
