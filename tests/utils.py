"""Shared test helpers: assertions with useful messages and float64 oracles.

The oracles here are written independently of :mod:`balora_kernels.reference`: they use a full
SVD of the product ``BA`` (or the paper's own callback math), never the Gram / eigh route of the
package, so a shared mistake cannot hide.

Low precision rule (used by every kernel test): a result in dtype ``d`` must be at most 2x as far
from the float64 reference as plain PyTorch's computation in ``d`` (:func:`assert_within_2x_torch_error`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# basic measures (all in float64)
# --------------------------------------------------------------------------------------------
def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def rel_err(actual, expected) -> float:
    """``||actual - expected||_F / ||expected||_F`` in float64 (absolute error when expected = 0)."""
    a, e = f64(actual), f64(expected)
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    return num / den if den > 0 else num


def _where(diff: torch.Tensor) -> str:
    if diff.numel() == 0:
        return "empty"
    flat = int(torch.argmax(diff.reshape(-1)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return f"worst at index {idx}"


def assert_finite(t: torch.Tensor, what: str = "tensor") -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())} of {t.numel()} entries are NaN/Inf "
                             f"(shape {tuple(t.shape)}, {t.dtype})")


def assert_rel_close(actual, expected, tol: float, what: str = "result") -> None:
    """Relative Frobenius error ``<= tol``; the message gives the error, the max abs error and where."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    if not err <= tol:   # also catches NaN
        diff = (f64(actual) - f64(expected)).abs()
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e} (max abs error {diff.max().item():.3e}, "
            f"{_where(diff.nan_to_num(math.inf))}; |expected| max {f64(expected).abs().max().item():.3e}; "
            f"shape {tuple(actual.shape)}, {actual.dtype})")


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Same dtype, shape and bits (NaN payloads included)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a = actual.detach().contiguous().view(ints)
    e = expected.detach().contiguous().view(ints)
    differ = a != e
    if differ.any():
        raise AssertionError(f"{what}: {int(differ.sum())} of {a.numel()} entries changed "
                             f"({_where(differ.to(torch.int8))}); expected bit-identical")


def ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each ``|exact|`` (float64 tensor; subnormal spacing near zero)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(f64(exact).abs())           # |x| = m 2^e, m in [0.5, 1)
    spacing = torch.ldexp(torch.full_like(f64(exact), fi.eps), (e - 1).to(torch.float64))
    return spacing.clamp_min(fi.smallest_normal * fi.eps)


def assert_rounded_once(out: torch.Tensor, exact64: torch.Tensor, what: str = "result",
                        slack_rel: float = 0.0) -> None:
    """``out`` (dtype d) is the float64 ``exact64`` rounded once to d: every entry within one ulp of d.

    ``slack_rel`` (times ``max |exact64|``) covers the float64 computation's own error against the
    oracle; keep it far below d's ulp so the check still sees a second rounding.
    """
    assert out.shape == exact64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact64.shape)}"
    assert_finite(out, what)
    ex = f64(exact64)
    err = (f64(out) - ex).abs()
    allowed = ulp(ex, out.dtype) + slack_rel * ex.abs().max()
    bad = err > allowed
    if bad.any():
        ratio = (err / allowed)
        i = int(torch.argmax(ratio.reshape(-1)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} entries are more than one {out.dtype} ulp from "
            f"the float64 result (worst: {f64(out).reshape(-1)[i].item():.9e} vs exact "
            f"{ex.reshape(-1)[i].item():.9e}, {ratio.reshape(-1)[i].item():.2f} ulps; "
            f"shape {tuple(out.shape)})")


def assert_within_2x_torch_error(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor,
                                 what: str = "output", factor: float = 2.0, atol: float = 0.0) -> None:
    """The flash-attention rule: ``max|out - ref64| <= factor * max|torch_out - ref64| + atol``.

    ``out``: the implementation under test in a low-precision dtype; ``ref64``: the same math in
    float64 on the same (rounded) inputs; ``torch_out``: plain PyTorch's result in the dtype of ``out``.
    Also checks the relative Frobenius errors the same way, and that ``out`` is finite.
    """
    assert out.shape == ref64.shape == torch_out.shape, (
        f"{what}: shapes {tuple(out.shape)}, {tuple(ref64.shape)}, {tuple(torch_out.shape)} differ")
    assert_finite(out, what)
    ref = f64(ref64)
    d_out = (f64(out) - ref).abs()
    d_pt = (f64(torch_out) - ref).abs()
    e_out, e_pt = d_out.max().item(), d_pt.max().item()
    r_out, r_pt = rel_err(out, ref), rel_err(torch_out, ref)
    if not (e_out <= factor * e_pt + atol and r_out <= factor * r_pt + atol / max(ref.abs().max().item(), 1e-300)):
        raise AssertionError(
            f"{what}: error vs float64 reference is {e_out:.3e} max abs / {r_out:.3e} rel, plain PyTorch "
            f"in {torch_out.dtype} gets {e_pt:.3e} / {r_pt:.3e}; allowed {factor}x + {atol:g} "
            f"({_where(d_out)}, shape {tuple(out.shape)})")


# --------------------------------------------------------------------------------------------
# random inputs
# --------------------------------------------------------------------------------------------
def random_pair(r: int, in_f: int, out_f: int, dtype=torch.float64, scale_A: float = 1.0,
                scale_B: float = 1.0, batch: Sequence[int] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian ``(A [*batch, r, in], B [*batch, out, r])`` drawn in float64, then rounded to dtype."""
    A = torch.randn(*batch, r, in_f, dtype=torch.float64) * scale_A
    B = torch.randn(*batch, out_f, r, dtype=torch.float64) * scale_B
    return A.to(dtype), B.to(dtype)


# --------------------------------------------------------------------------------------------
# independent float64 oracles of the balancing
# --------------------------------------------------------------------------------------------
def gap64(A, B) -> float:
    """``||B^T B - A A^T||_F / max(||B^T B||_F, ||A A^T||_F)`` in float64."""
    A, B = f64(A), f64(B)
    GB, GA = B.T @ B, A @ A.T
    den = max(torch.linalg.matrix_norm(GB).item(), torch.linalg.matrix_norm(GA).item())
    return torch.linalg.matrix_norm(GB - GA).item() / den if den > 0 else 0.0


def product_rel_err(A0, B0, A1, B1) -> float:
    """``||B1 A1 - B0 A0||_F / ||B0 A0||_F`` in float64."""
    return rel_err(f64(B1) @ f64(A1), f64(B0) @ f64(A0))


def pair_distance(A0, B0, A1, B1) -> float:
    """``sqrt(||A1 - A0||_F^2 + ||B1 - B0||_F^2)`` in float64."""
    return math.sqrt(torch.linalg.vector_norm(f64(A1) - f64(A0)).item() ** 2
                     + torch.linalg.vector_norm(f64(B1) - f64(B0)).item() ** 2)


def svd_pair64(A, B):
    """The paper's balanced pair from a full SVD of ``BA`` in float64, sign-aligned with ``(A, B)``.

    ``BA = U S V^T`` (top r); ``B' = U S^1/2``, ``A' = S^1/2 V^T``. Component i is negated when
    ``(B'^T B + A' A^T)_ii < 0`` (the package's sign convention). Returns ``(A', B', S)``.
    """
    A, B = f64(A), f64(B)
    r = A.shape[0]
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    Bs, As = U * S.sqrt(), S.sqrt()[:, None] * Vh
    sign = torch.where(torch.diagonal(Bs.T @ B + As @ A.T) < 0, -1.0, 1.0).to(torch.float64)
    return As * sign[:, None], Bs * sign, S


def polar64(C: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor of a nonsingular ``C`` as ``C (C^T C)^-1/2`` (eigh, not SVD)."""
    C = f64(C)
    w, V = torch.linalg.eigh(C.T @ C)
    assert w.min() > 1e-12 * w.max(), "polar64 oracle needs a nonsingular C"
    return C @ (V * w.rsqrt()) @ V.T


def nearest_pair64(A, B):
    """The balanced pair with product ``BA`` nearest to ``(A, B)``: ``(Q^T A_svd, B_svd Q)`` with Q the
    polar factor of ``C = B_svd^T B + A_svd A^T``. Needs ``BA`` of rank r."""
    As, Bs, _ = svd_pair64(A, B)
    Q = polar64(Bs.T @ f64(B) + As @ f64(A).T)
    return Q.T @ As, Bs @ Q


def paper_ref_project(A, B):
    """The paper's reference callback math (anchor_bench.py ``ref_project``), in float64:
    polar parts of the thin SVDs of A and B, then the SVD of the r x r core. Returns ``(A', B')``."""
    from balora_kernels.baselines import paper_project
    return paper_project(f64(A), f64(B))


def random_orthogonal(r: int) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def numerical_rank(M, rtol: float = 1e-10) -> int:
    s = torch.linalg.svdvals(f64(M))
    return int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0


def check_live_block(A1, B1, A0, B0, k: int, tol: float, what: str = "pair") -> None:
    """The rank-k policy on the output ``(A1, B1)`` of ``(A0, B0)``, basis-free.

    With ``BA = U_k S_k V_k^T`` (float64 SVD of the input product), the live subspace of the rank
    space is ``range(B1^T U_k)``; with P its orthogonal projector, both output Grams commute with P
    (block-diagonal over live / rest) and ``P G_B P = P G_A P`` with eigenvalues ``S_k``.
    """
    A1, B1 = f64(A1), f64(B1)
    U, S, _ = torch.linalg.svd(f64(B0) @ f64(A0), full_matrices=False)
    Uk, Sk = U[:, :k], S[:k]
    Z, _ = torch.linalg.qr(B1.T @ Uk)                      # r x k orthonormal basis of the live space
    P = Z @ Z.T
    GB, GA = B1.T @ B1, A1 @ A1.T
    scale = max(torch.linalg.matrix_norm(GB).item(), torch.linalg.matrix_norm(GA).item())
    for name, G in (("B^T B", GB), ("A A^T", GA)):
        comm = torch.linalg.matrix_norm(G @ P - P @ G).item() / scale
        assert comm <= tol, f"{what}: {name} is not block-diagonal over live/rest (rel {comm:.2e} > {tol:.0e})"
    live_gap = torch.linalg.matrix_norm(P @ (GB - GA) @ P).item() / scale
    assert live_gap <= tol, f"{what}: live block not balanced (rel gap {live_gap:.2e} > {tol:.0e}, k={k})"
    ev = torch.linalg.eigvalsh(Z.T @ GB @ Z).flip(0)
    ev_err = (ev - Sk).abs().max().item() / scale
    assert ev_err <= tol, (f"{what}: live Gram eigenvalues {ev.tolist()} vs singular values of BA "
                           f"{Sk.tolist()}: error {ev_err:.2e} of the Grams' norm > {tol:.0e}")


def assert_balanced_like_oracle(A0, B0, A1, B1, mode: str, what: str = "pair", tol64: float = 1e-9) -> None:
    """One full-rank pair: ``(A1, B1)`` is the oracle's balanced pair of ``(A0, B0)`` for ``mode``,
    within ``tol64`` (float64) or rounded once (other dtypes)."""
    Ao, Bo = svd_pair64(A0, B0)[:2] if mode == "svd" else nearest_pair64(A0, B0)
    if A1.dtype == torch.float64:
        assert_rel_close(A1, Ao, tol64, f"{what} A'")
    else:
        assert_rounded_once(A1, Ao, f"{what} A'", slack_rel=tol64)
    if B1.dtype == torch.float64:
        assert_rel_close(B1, Bo, tol64, f"{what} B'")
    else:
        assert_rounded_once(B1, Bo, f"{what} B'", slack_rel=tol64)
