"""The specification (balora_kernels.reference) against independent float64 oracles.

Oracles (tests/utils.py): a full SVD of ``BA`` in float64 for "svd", the same pair rotated by the
polar factor (from its own eigh) for "nearest", and the paper's callback math for agreement up to
signs. Low-precision results must be the float64 result rounded once (within one ulp).
"""
import pytest
import torch

from balora_kernels import reference as R
from utils import (FLOAT_DTYPES, LOW_PRECISION, assert_bitwise_equal, assert_finite, assert_rel_close,
                   assert_rounded_once, check_live_block, f64, gap64, nearest_pair64, numerical_rank,
                   pair_distance, paper_ref_project, product_rel_err, random_orthogonal, random_pair,
                   rel_err, svd_pair64)

MODES = ("svd", "nearest")
RANKS = (1, 2, 8, 16, 64)
# Issue's thresholds: product kept to 1e-5 (fp32) / 1e-12 (fp64); balanced to 1e-5 (fp32).
PRODUCT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
GAP_TOL = {torch.float64: 1e-11, torch.float32: 1e-5}
# Float64 agreement of the Gram route with the SVD oracle: measured <= 5e-13 at r = 64.
ORACLE_TOL64 = 1e-9


def oracle(A, B, mode):
    return svd_pair64(A, B)[:2] if mode == "svd" else nearest_pair64(A, B)


def check_against_oracle(A, B, A1, B1, mode, what):
    """Per pair of a batch: output == oracle (fp64) or oracle rounded once (other dtypes)."""
    for i in range(A.shape[0]):
        Ao, Bo = oracle(A[i], B[i], mode)
        w = f"{what} pair {i}"
        assert A1.dtype == A.dtype and B1.dtype == B.dtype, f"{w}: dtypes changed"
        if A.dtype == torch.float64:
            assert_rel_close(A1[i], Ao, ORACLE_TOL64, f"{w} A'")
            assert_rel_close(B1[i], Bo, ORACLE_TOL64, f"{w} B'")
        else:
            assert_rounded_once(A1[i], Ao, f"{w} A'", slack_rel=ORACLE_TOL64)
            assert_rounded_once(B1[i], Bo, f"{w} B'", slack_rel=ORACLE_TOL64)
        if A.dtype in PRODUCT_TOL:
            pe = product_rel_err(A[i], B[i], A1[i], B1[i])
            assert pe <= PRODUCT_TOL[A.dtype], f"{w}: product rel. error {pe:.2e} > {PRODUCT_TOL[A.dtype]:.0e}"
            g = gap64(A1[i], B1[i])
            assert g <= GAP_TOL[A.dtype], f"{w}: balance gap {g:.2e} > {GAP_TOL[A.dtype]:.0e}"


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_matches_float64_svd_oracle(mode, dtype, r):
    # Awkward sizes; a batch of three pairs (one tall-B, one wide-A aspect each).
    A, B = random_pair(r, r + 29, r + 13, dtype, batch=(3,))
    A_in, B_in = A.clone(), B.clone()
    A1, B1 = R.balance(A, B, mode)
    assert_bitwise_equal(A, A_in, "input A")          # inputs are not modified
    assert_bitwise_equal(B, B_in, "input B")
    check_against_oracle(A, B, A1, B1, mode, f"{mode} {dtype} r={r}")


@pytest.mark.parametrize("shape", [(16, 16, 16), (64, 64, 64), (5, 5, 8), (3, 40, 3)],
                         ids=lambda s: "r{}_in{}_out{}".format(*s))
@pytest.mark.parametrize("mode", MODES)
def test_square_and_small_factors(mode, shape):
    """Square factors (condition numbers in the hundreds): every product singular value above the
    noise floor max(eps S_1, sqrt(r eps) ||B||_2 ||A||_2) is live (whatever the factors' condition),
    and those pairs are balanced."""
    r, in_f, out_f = shape
    A, B = random_pair(r, in_f, out_f, torch.float64, batch=(6,))
    t = R.balancing_transforms(*R.grams(A, B), mode)
    A1, B1 = R.balance(A, B, mode)
    full = []
    for i in range(6):
        S = torch.linalg.svdvals(B[i] @ A[i])[:r]
        eps = torch.finfo(torch.float64).eps
        norms = torch.linalg.matrix_norm(B[i], 2) * torch.linalg.matrix_norm(A[i], 2)
        k = int((S > max(eps * S[0], (r * eps) ** 0.5 * norms)).sum())
        assert t.rank[i].item() == k, f"pair {i}: rank {t.rank[i].item()} but BA has {k} live singular values"
        if k == r:
            full.append(i)
        else:
            check_live_block(A1[i], B1[i], A[i], B[i], k, 1e-9, f"{mode} {shape} pair {i}")
    assert len(full) >= 4, "the draw should be mostly full-rank"
    check_against_oracle(A[full], B[full], A1[full], B1[full], mode, f"{mode} {shape}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("r", RANKS)
def test_svd_mode_agrees_with_paper_callback_up_to_signs(r, dtype):
    A, B = random_pair(r, r + 21, r + 10, dtype)
    A1, B1 = R.balance(A, B, "svd")
    Ap, Bp = paper_ref_project(A, B)
    tol = ORACLE_TOL64 if dtype == torch.float64 else 1e-5
    for i in range(r):
        s = 1.0 if torch.dot(f64(B1[:, i]), Bp[:, i]) >= 0 else -1.0
        assert_rel_close(B1[:, i], s * Bp[:, i], tol, f"svd r={r} component {i} of B'")
        assert_rel_close(A1[i], s * Ap[i], tol, f"svd r={r} component {i} of A' (same sign as B')")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("r", (2, 8, 64))
@pytest.mark.parametrize("mode", MODES)
def test_idempotent(mode, r, dtype):
    A, B = random_pair(r, r + 17, r + 9, dtype)
    A1, B1 = R.balance(A, B, mode)
    A2, B2 = R.balance(A1, B1, mode)
    change = max(rel_err(A2, A1), rel_err(B2, B1))
    if dtype == torch.float64:
        assert change <= 1e-10, f"{mode} r={r}: second projection moved the pair by {change:.2e}"
        return
    eps = torch.finfo(dtype).eps
    if mode == "nearest":
        # A rounded balanced pair is within ~eps of balanced: the nearest one barely moves it.
        bound = eps
    else:
        # The svd pair's vectors move with the rounding by ~eps * S_1 / (smallest singular gap).
        S = svd_pair64(A1, B1)[2]
        sep = (S[:-1] - S[1:]).min().item() if r > 1 else S[0].item()
        bound = 4 * eps * (1 + S[0].item() / sep)
    assert change <= bound, f"{mode} {dtype} r={r}: second projection moved the pair by {change:.2e} > {bound:.2e}"


@pytest.mark.parametrize("r", (1, 2, 8, 16, 64))
def test_nearest_moves_no_more_than_svd_or_any_rotation(r):
    A, B = random_pair(r, r + 11, r + 23, torch.float64)
    As, Bs = R.balance(A, B, "svd")
    An, Bn = R.balance(A, B, "nearest")
    d_svd, d_near = pair_distance(A, B, As, Bs), pair_distance(A, B, An, Bn)
    assert d_near <= d_svd * (1 + 1e-12), f"nearest moved {d_near:.6e} > svd {d_svd:.6e}"
    for _ in range(8):   # every balanced pair with this product is (B_svd Q, Q^T A_svd)
        Q = random_orthogonal(r)
        d = pair_distance(A, B, Q.T @ As, Bs @ Q)
        assert d_near <= d * (1 + 1e-12), f"a random rotation of the svd pair is nearer ({d:.6e} < {d_near:.6e})"
    # A pair that is already balanced is not moved by "nearest".
    An2, Bn2 = R.balance(An, Bn, "nearest")
    assert pair_distance(An, Bn, An2, Bn2) <= 1e-12 * pair_distance(A, B, 0 * A, 0 * B)


# --------------------------------------------------------------------------------------------
# degenerate pairs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("which", ["B", "A", "both"])
@pytest.mark.parametrize("mode", MODES)
def test_zero_product_left_bit_identical(mode, which, dtype):
    A, B = random_pair(4, 19, 11, dtype, batch=(3,))
    if which in ("B", "both"):
        B[1].zero_()                    # PEFT's initialisation: B = 0
    if which in ("A", "both"):
        A[1].zero_()
    A1, B1 = R.balance(A, B, mode)
    assert_bitwise_equal(A1[1], A[1], f"A of the zero-product pair ({which}=0)")
    assert_bitwise_equal(B1[1], B[1], f"B of the zero-product pair ({which}=0)")
    t = R.balancing_transforms(*R.grams(A, B), mode)
    assert t.zero.tolist() == [False, True, False] and not t.nonfinite.any()
    assert t.rank[1] == 0
    check_against_oracle(A[[0, 2]], B[[0, 2]], A1[[0, 2]], B1[[0, 2]], mode, "other pairs of the batch")


def _rank_deficient(pattern, r, in_f, out_f, dtype):
    """A pair whose product has rank k < r; returns (A, B, k)."""
    A, B = random_pair(r, in_f, out_f, torch.float64)
    if pattern == "zero_cols_B":
        B[:, [1, 4]] = 0
        k = r - 2
    elif pattern == "zero_rows_A":
        A[[0, 5], :] = 0
        k = r - 2
    elif pattern == "both_disjoint":        # components alive in only one factor each
        B[:, [2]] = 0
        A[[3, 6], :] = 0
        k = r - 3
    elif pattern == "both_same":            # a fully dead component as well
        B[:, [1, 2]] = 0
        A[[2, 7], :] = 0
        k = r - 3
    elif pattern == "low_rank_B":           # no zero entries, B of rank 3
        B = torch.randn(out_f, 3, dtype=torch.float64) @ torch.randn(3, r, dtype=torch.float64)
        k = 3
    elif pattern == "low_rank_both":        # rank-5 B, rank-4 A; col(A) meets ker(B) in 2 dims: BA of rank 2
        Q = random_orthogonal(r)
        B = torch.randn(out_f, 5, dtype=torch.float64) @ Q[:, :5].T
        A = torch.cat([Q[:, 5:7], Q[:, :2]], 1) @ torch.randn(4, in_f, dtype=torch.float64)
        k = 2
    else:
        raise AssertionError(pattern)
    return A.to(dtype), B.to(dtype), k


RANK_PATTERNS = ["zero_cols_B", "zero_rows_A", "both_disjoint", "both_same", "low_rank_B", "low_rank_both"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("pattern", RANK_PATTERNS)
@pytest.mark.parametrize("mode", MODES)
def test_rank_deficient_policy(mode, pattern, dtype):
    r, in_f, out_f = 8, 27, 19
    A, B, k = _rank_deficient(pattern, r, in_f, out_f, dtype)
    assert numerical_rank(f64(B) @ f64(A), 1e-6) == k
    t = R.balancing_transforms(*R.grams(A, B), mode)
    assert t.rank.item() == k and not t.zero.item() and not t.nonfinite.item()
    A1, B1 = R.balance(A, B, mode)
    assert_finite(A1, "A'")
    assert_finite(B1, "B'")
    pe = product_rel_err(A, B, A1, B1)
    assert pe <= PRODUCT_TOL[dtype], f"{pattern}: product rel. error {pe:.2e}"
    rank_rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for name, before, after in (("A", A, A1), ("B", B, B1)):
        rb, ra = numerical_rank(before, rank_rtol), numerical_rank(after, rank_rtol)
        assert ra == rb, f"{mode} {pattern}: rank of {name} went from {rb} to {ra} (a live component was killed)"
    check_live_block(A1, B1, A, B, k, 1e-9 if dtype == torch.float64 else 1e-5, f"{mode} {pattern}")
    A2, B2 = R.balance(A1, B1, mode)
    change = max(rel_err(A2, A1), rel_err(B2, B1))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert change <= tol, f"{mode} {pattern}: not idempotent, second projection moved it by {change:.2e}"


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_pair_skipped_others_unaffected(mode):
    A, B = random_pair(6, 20, 14, torch.float32, batch=(5,))
    A[1, 2, 3] = float("nan")
    B[2, 0, 1] = float("inf")
    A[3, 0, 0] = -float("inf")
    B[3, 4, 2] = float("nan")
    A1, B1 = R.balance(A, B, mode)
    for i in (1, 2, 3):
        assert_bitwise_equal(A1[i], A[i], f"A of non-finite pair {i}")
        assert_bitwise_equal(B1[i], B[i], f"B of non-finite pair {i}")
    t = R.balancing_transforms(*R.grams(A, B), mode)
    assert t.nonfinite.tolist() == [False, True, True, True, False]
    assert not t.zero.any()
    assert torch.isfinite(t.gap_after[[0, 4]]).all() and torch.isnan(t.gap_after[[1, 2, 3]]).all()
    check_against_oracle(A[[0, 4]], B[[0, 4]], A1[[0, 4]], B1[[0, 4]], mode, "finite pairs")
    alone = R.balance(A[[0, 4]], B[[0, 4]], mode)
    assert_bitwise_equal(A1[[0, 4]], alone[0], "finite pairs' A batched with non-finite ones vs alone")
    assert_bitwise_equal(B1[[0, 4]], alone[1], "finite pairs' B batched with non-finite ones vs alone")


# Entries from 1e-8 to 1e4 in float32 / float64 / bfloat16 (float32's exponent range); float16 in
# a range whose balanced factors and inputs stay normal (its largest is 65504, smallest normal 6e-5).
SCALES = {
    torch.float64: [(1e-8, 1e4), (1e4, 1e-8), (1e-8, 1e-8), (1e4, 1e4)],
    torch.float32: [(1e-8, 1e4), (1e4, 1e-8), (1e-8, 1e-8), (1e4, 1e4)],
    torch.bfloat16: [(1e-8, 1e4), (1e4, 1e-8), (1e-8, 1e-8), (1e4, 1e4)],
    torch.float16: [(1e-3, 1e2), (1e2, 1e-3), (3e-2, 3e-2), (3e1, 3e1)],
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("scale_idx", range(4))
@pytest.mark.parametrize("mode", MODES)
def test_extreme_scales(mode, scale_idx, dtype):
    sa, sb = SCALES[dtype][scale_idx]
    A, B = random_pair(8, 37, 23, dtype, scale_A=sa, scale_B=sb, batch=(2,))
    assert_finite(A, "input A")
    assert_finite(B, "input B")
    A1, B1 = R.balance(A, B, mode)
    check_against_oracle(A, B, A1, B1, mode, f"{mode} {dtype} scales A~{sa:g} B~{sb:g}")


def test_transform_stats_match_independent_gaps():
    A, B = random_pair(8, 30, 20, torch.float64, scale_A=3.0, scale_B=0.2, batch=(4,))
    t = R.balancing_transforms(*R.grams(A, B), "nearest")
    A1, B1 = R.apply_transforms(A, B, t)
    for i in range(4):
        assert abs(t.gap_before[i].item() - gap64(A[i], B[i])) <= 1e-12
        assert t.gap_after[i].item() <= 1e-12 and gap64(A1[i], B1[i]) <= 1e-12
        assert_rel_close(t.T[i] @ t.T_inv[i], torch.eye(8, dtype=torch.float64), 1e-12, "T T^-1")


def test_bad_mode_is_rejected():
    A, B = random_pair(2, 5, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        R.balance(A, B, "polar")


# --------------------------------------------------------------------------------------------
# the LoRA linear formulas
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True])
def test_lora_linear_backward_formulas_match_autograd(with_mask):
    N, in_f, out_f, r, s = 7, 13, 9, 3, 0.75
    x = torch.randn(N, in_f, dtype=torch.float64, requires_grad=True)
    W = torch.randn(out_f, in_f, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_f, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, in_f, dtype=torch.float64, requires_grad=True)
    B = torch.randn(out_f, r, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(N, in_f, dtype=torch.float64) > 0.3).to(torch.float64) / 0.7 if with_mask else None
    y = R.lora_linear(x, W, b, A, B, s, mask)
    xl = x if mask is None else x * mask
    assert_rel_close(y, x @ W.T + b + s * (xl @ A.T) @ B.T, 1e-14, "forward")
    dy = torch.randn_like(y)
    y.backward(dy)
    g = R.lora_linear_backward(dy, x.detach(), W.detach(), A.detach(), B.detach(), s, mask,
                               need_x_grad=True, need_weight_grad=True, need_bias_grad=True)
    for name, mine, auto in (("x", g.x, x.grad), ("weight", g.weight, W.grad), ("bias", g.bias, b.grad),
                             ("lora_A", g.lora_A, A.grad), ("lora_B", g.lora_B, B.grad)):
        assert_rel_close(mine, auto, 1e-13, f"d{name}")


# --------------------------------------------------------------------------------------------
# pairs whose dead components dwarf the product (found by hypothesis; regressions of the
# noise-floor rank policy)
# --------------------------------------------------------------------------------------------
def _inherent_product_err(A, B, A1, B1) -> float:
    """The product error that a normwise rounding of the input or of the output pair to its dtype
    can cause: ``eps ||B||_F ||A||_F / ||BA||_F``, the larger of the two. When a dead component of A
    dwarfs the product, balancing must grow B (to balance the live part) while A keeps its dead
    part, so the output pair is more sensitive than the input; no algorithm storing it can do better."""
    def sens(A_, B_):
        A64, B64 = f64(A_), f64(B_)
        return (B64.norm() * A64.norm() / (f64(B) @ f64(A)).norm()).item()
    return torch.finfo(A.dtype).eps * max(sens(A, B), sens(A1, B1))


def _dominant_dead_component_pair():
    """r = 5: two B columns zero, A ~ 100 and B ~ 1e-7: the A-only components dwarf the product."""
    g = torch.Generator().manual_seed(0)            # a draw hypothesis found (test_properties)
    A = torch.randn(5, 5, dtype=torch.float64, generator=g)
    B = torch.randn(5, 5, dtype=torch.float64, generator=g)
    B[:, torch.randperm(5, generator=g)[:2]] = 0
    return A * 100, B * 1e-7


def test_dominant_dead_nearest_product_within_inherent_error():
    """nearest rotates the (huge) dead components into the live ones, as the nearest balanced pair
    does in exact arithmetic: the product is then kept to the input pair's own rounding sensitivity."""
    A, B = _dominant_dead_component_pair()
    A1, B1 = R.balance(A, B, "nearest")
    err, inherent = product_rel_err(A, B, A1, B1), _inherent_product_err(A, B, A1, B1)
    assert err <= 4 * inherent, f"product error {err:.2e} > 4 x inherent {inherent:.2e}"


@pytest.mark.parametrize("mode", MODES)
def test_rank_classification_stable_under_projection(mode):
    A, B = _dominant_dead_component_pair()
    A1, B1 = R.balance(A, B, mode)
    k1 = R.balancing_transforms(*R.grams(A, B), mode).rank.item()
    k2 = R.balancing_transforms(*R.grams(A1, B1), mode).rank.item()
    assert k1 == k2 == 3


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_rank_deficient_idempotence(dtype):
    moved = []
    for pattern in RANK_PATTERNS:
        A, B, _ = _rank_deficient(pattern, 8, 27, 19, dtype)
        A1, B1 = R.balance(A, B, "nearest")
        A2, B2 = R.balance(A1, B1, "nearest")
        moved.append(max(rel_err(A2, A1), rel_err(B2, B1)))
    assert max(moved) <= torch.finfo(dtype).eps, f"second projection moved pairs by {moved}"


def test_second_pass_keeps_product_of_dominant_dead_pair():
    from test_properties import _make
    A, B = _make(torch.float64, 2, 2, 2, 100.0, 1e-8, "zero_cols_B", 1)
    A1, B1 = R.balance(A, B, "nearest")
    err, inherent = product_rel_err(A, B, A1, B1), _inherent_product_err(A, B, A1, B1)
    assert err <= 4 * inherent, f"first pass: product error {err:.2e} > 4 x inherent {inherent:.2e}"
    A2, B2 = R.balance(A1, B1, "nearest")
    err, inherent = product_rel_err(A, B, A2, B2), _inherent_product_err(A1, B1, A2, B2)
    assert err <= 4 * inherent, f"second pass: product error {err:.2e} > 4 x inherent {inherent:.2e}"


def test_bf16_rank_deficient_nearest_product_within_inherent_error():
    from test_properties import _make
    A, B = _make(torch.bfloat16, 2, 2, 2, 1.0, 1e-4, "low_rank_B", 2)
    A1, B1 = R.balance(A, B, "nearest")
    err, inherent = product_rel_err(A, B, A1, B1), _inherent_product_err(A, B, A1, B1)
    assert err <= 4 * inherent, f"product error {err:.2e} > 4 x inherent {inherent:.2e}"
