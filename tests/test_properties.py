"""Property-based checks of the balancing invariants (hypothesis): shapes, ranks, scales 1e-8..1e4,
dtypes and degenerate patterns drawn at random; every draw must keep the product, stay finite,
balance what is live, leave zero products bit-identical and be idempotent."""
import os
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from balora_kernels import reference as R
from utils import (assert_bitwise_equal, assert_finite, check_live_block, f64, gap64, nearest_pair64,
                   product_rel_err, rel_err, svd_pair64)

PATTERNS = ["none", "zero_B", "zero_A", "zero_cols_B", "zero_rows_A", "low_rank_B"]
# Exponent ranges of the entries per dtype: 1e-8..1e4 where the format holds it, float16's own range.
EXPONENTS = {torch.float64: (-8, 4), torch.float32: (-8, 4), torch.bfloat16: (-8, 4), torch.float16: (-2, 2)}


@st.composite
def pairs(draw):
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    r = draw(st.sampled_from([1, 2, 3, 5, 8, 16]))
    in_f = r + draw(st.integers(0, 24))
    out_f = r + draw(st.integers(0, 24))
    lo, hi = EXPONENTS[dtype]
    ea = draw(st.floats(lo, hi))
    eb = draw(st.floats(lo, hi))
    pattern = draw(st.sampled_from(PATTERNS if r > 1 else PATTERNS[:3]))
    seed = draw(st.integers(0, 2**31 - 1))
    mode = draw(st.sampled_from(["nearest", "svd"]))
    return dtype, r, in_f, out_f, 10.0**ea, 10.0**eb, pattern, seed, mode


def _make(dtype, r, in_f, out_f, sa, sb, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, in_f, dtype=torch.float64, generator=g)
    B = torch.randn(out_f, r, dtype=torch.float64, generator=g)
    if pattern == "zero_B":
        B.zero_()
    elif pattern == "zero_A":
        A.zero_()
    elif pattern == "zero_cols_B":
        B[:, torch.randperm(r, generator=g)[: max(1, r // 2)]] = 0
    elif pattern == "zero_rows_A":
        A[torch.randperm(r, generator=g)[: max(1, r // 3)]] = 0
    elif pattern == "low_rank_B":
        k = max(1, r // 2)
        B = torch.randn(out_f, k, dtype=torch.float64, generator=g) @ torch.randn(k, r, dtype=torch.float64, generator=g)
    return (A * sa).to(dtype), (B * sb).to(dtype)


# derandomize: the same draws on every run (CI stays deterministic); run with
# --hypothesis-seed=N and derandomize off to explore (seeds 4 and 6 found the dominant-dead-component cases in
# test_reference.py).
@settings(max_examples=120, deadline=None, derandomize=not os.environ.get("BALORA_EXPLORE"), suppress_health_check=[HealthCheck.too_slow])
@given(pairs())
def test_balancing_invariants(case):
    dtype, r, in_f, out_f, sa, sb, pattern, seed, mode = case
    A, B = _make(dtype, r, in_f, out_f, sa, sb, pattern, seed)
    assert_finite(A, "drawn A")
    assert_finite(B, "drawn B")
    A_in, B_in = A.clone(), B.clone()
    A1, B1 = R.balance(A, B, mode)
    assert_bitwise_equal(A, A_in, "input A")
    assert_bitwise_equal(B, B_in, "input B")
    assert A1.dtype == dtype and B1.dtype == dtype
    assert_finite(A1, f"A' ({case})")
    assert_finite(B1, f"B' ({case})")

    P = f64(B) @ f64(A)
    if pattern in ("zero_A", "zero_B") or not P.any():
        assert_bitwise_equal(A1, A, "A of a zero product")
        assert_bitwise_equal(B1, B, "B of a zero product")
        return

    S = torch.linalg.svdvals(P)[:r]
    # the documented noise floor (reference module docstring), from the factors' own SVDs
    eps, eps64 = torch.finfo(dtype).eps, torch.finfo(torch.float64).eps
    norms = (torch.linalg.matrix_norm(f64(B), 2) * torch.linalg.matrix_norm(f64(A), 2)).item()
    floor = max(eps * S[0].item(), (r * eps64) ** 0.5 * norms)
    # a singular value right at the floor may fall either side: not a property of the draw
    ratio = S / floor
    assume(not ((ratio > 1 / 8) & (ratio < 8)).any())
    k = int((ratio > 1).sum())
    t = R.balancing_transforms(*R.grams(A, B), mode, factor_dtypes=(dtype, dtype))
    assert t.rank.item() == k, f"rank {t.rank.item()} but BA has {k} singular values above the noise floor {case}"

    # product kept: as well as rounding the exact balanced pair once (it is the one computation);
    # a floor of the product error of the input rounding itself covers a tiny exact product error.
    Ao, Bo = svd_pair64(A, B)[:2]
    rounded = product_rel_err(A, B, Ao.to(dtype), Bo.to(dtype))
    pe = product_rel_err(A, B, A1, B1)
    limit = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2 * rounded + 4 * eps)
    if k < r:
        # A dead component much larger than the product: balancing grows one factor while the other
        # keeps its dead part, so the output pair's own rounding sensitivity eps ||B'|| ||A'|| / ||BA||
        # bounds the product error (test_reference: *_within_inherent_error). Bound it by that.
        spread = (torch.linalg.matrix_norm(f64(B1), 2) * torch.linalg.matrix_norm(f64(A1), 2)
                  / torch.linalg.matrix_norm(P, 2)).item()
        limit = max(limit, 4 * r * torch.finfo(torch.float64).eps * spread)
    assert pe <= max(limit, 2 * rounded), f"product rel. error {pe:.2e} (rounded oracle {rounded:.2e}) {case}"

    if dtype in (torch.float64, torch.float32):
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        if k == r:
            g = gap64(A1, B1)
            assert g <= tol, f"full-rank pair not balanced: gap {g:.2e} {case}"
            if mode == "nearest" and dtype == torch.float64:
                An, Bn = nearest_pair64(A, B)
                assert rel_err(A1, An) <= 1e-6 and rel_err(B1, Bn) <= 1e-6
        else:
            # A live component far smaller than a dead one is held in the output dtype to a
            # relative eps * sqrt(||G|| / S_k) only: the live subspace is known to that accuracy.
            scale = max(torch.linalg.matrix_norm(f64(B1)).item(), torch.linalg.matrix_norm(f64(A1)).item()) ** 2
            res = 16 * eps * (scale / S[k - 1].item()) ** 0.5
            check_live_block(A1, B1, A, B, k, max(1e-8 if dtype == torch.float64 else 1e-5, res), f"k={k} {case}")
        A2, B2 = R.balance(A1, B1, mode)
        change = max(rel_err(A2, A1), rel_err(B2, B1))
        if mode == "nearest" or k < r:
            idem = 1e-8 if dtype == torch.float64 else 1e-5
            if k < r:   # the live subspace itself is known to eps * sqrt(||G|| / S_k) only (above)
                idem = max(idem, res)
        else:   # the svd pair's vectors move with a perturbation by ~eps * S_1 / (smallest singular gap)
            sep = (S[:-1] - S[1:]).min().item() if r > 1 else S[0].item()
            idem = max(1e-8 if dtype == torch.float64 else 1e-5, 4 * eps * (1 + S[0].item() / sep))
        assert change <= idem, f"not idempotent: second projection moved it by {change:.2e} {case}"
    elif k == r and mode == "nearest":
        A2, B2 = R.balance(A1, B1, mode)
        change = max(rel_err(A2, A1), rel_err(B2, B1))
        assert change <= 4 * eps, f"not idempotent: moved by {change:.2e} {case}"
        g, g_round = gap64(A1, B1), gap64(*[t.to(dtype) for t in nearest_pair64(A, B)])
        assert g <= 2 * g_round + eps, f"balance gap {g:.2e} vs rounded oracle {g_round:.2e} {case}"
