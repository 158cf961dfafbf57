"""The pure-PyTorch specification of BaLoRA.

This module is both the CPU path and the oracle of every test. It is written to be read:
no kernels, no caching, float64 for all small-matrix math.

Notation (PEFT's layout)::

    x        [N, in]      activations (any leading dims are flattened by callers)
    weight   [out, in]    frozen base weight W
    bias     [out]        frozen base bias b (optional)
    lora_A   [r, in]      A
    lora_B   [out, r]     B
    scaling  float        s = alpha / r  (or alpha / sqrt(r) for rsLoRA)

    y = x W^T + b + s * (x A^T) B^T

Balancing. Any invertible r x r ``T`` maps ``(A, B)`` to ``(T^-1 A, B T)`` with the same product
``BA``. The pair is *balanced* when ``G_B = B^T B`` equals ``G_A = A A^T``. All balancing below is
computed from the two r x r Grams only (never from an SVD of a tall factor or of ``BA``):

1. ``G_B = P diag(d) P^T`` and ``G_A = R diag(e) R^T``; square-root factors ``X = P d^1/2`` and
   ``Y = R e^1/2`` (so ``G_B = X X^T``, ``G_A = Y Y^T``), keeping only eigenvalues above
   ``gram_rtol`` times the largest (see below).
2. ``H = X^T Y`` (r x r) has the singular values of ``BA``: ``H = U S V^T``.
3. ``T = Y V S^-1/2`` and ``T^-1 = S^-1/2 U^T X^T`` give the SVD-aligned balanced pair
   ``B' = B T = U_BA S^1/2``, ``A' = T^-1 A = S^1/2 V_BA^T`` (the paper's projection).
4. ``"nearest"``: the balanced pairs with product ``BA`` are ``(B' Q, Q^T A')`` for orthogonal ``Q``;
   the one closest to ``(B, A)`` in Frobenius norm takes ``Q`` = the orthogonal polar factor of
   ``C = B'^T B + A' A^T = T^T G_B + T^-1 G_A``.
   ``"svd"``: only the sign of each component is chosen, to agree with ``(B, A)``: ``sign(diag C)``.

Degenerate pairs (the policy, identical on every backend):

* non-finite Grams (a NaN/Inf anywhere in ``A`` or ``B``): the pair is left unchanged and counted
  as ``skipped_nonfinite``;
* zero product (``k = 0`` live components, e.g. ``B = 0`` at PEFT initialisation): left unchanged,
  counted as ``skipped_zero``. A projection never makes a trainable adapter untrainable;
* rank-deficient product (``0 < k < r`` singular values of ``BA`` above ``RANK_RTOL`` times the
  largest): the ``k`` live components are balanced exactly as above; the other ``r - k``
  components are kept, not zeroed: ``T = [T_live, N]`` where ``N`` is an orthonormal basis of
  ``ker(T_live^-1)``, and ``T^-1 = [T_live^-1 ; N^T (I - T_live T_live^-1)]``. ``T`` stays
  invertible, so ``BA`` is kept exactly and neither factor loses rank: a component where only one
  factor is non-zero (it still receives gradient through the other) stays alive. Both Grams are
  block-diagonal over (live, rest) and equal on the live block; the rest block is left unbalanced
  because a component with a zero product can only be balanced by zeroing it. ``"nearest"`` then
  rotates live and rest components each among themselves (never into each other, so that rounding
  still cancels dead components in ``BA``): the live ones into the k columns/rows of the pair where
  they weigh most, by the polar factor of that block of ``C``, the rest likewise.

Which components are live is decided against rounding noise, never against an arbitrary cut:

* a Gram eigenvalue counts only above the rounding noise of the Gram's own accumulation,
  ``gram_rtol(dtype)`` of the largest (2^-44 for float64 Grams, 2^-16 = ``RANK_RTOL`` for float32
  Grams, whose accumulation leaves ~1e-7..1e-6 of noise);
* a singular value of ``BA`` counts only above the noise floor ``product_floor``,
  ``max(eps_f * S_1, sqrt(r * eps_g) * ||B||_2 ||A||_2)`` with ``S_1`` the largest singular value of
  ``BA`` and the spectral norms the square roots of the Grams' largest eigenvalues.
  ``eps_f * S_1`` is the noise that rounding a pair to the factors' dtype leaves in its product
  (a bfloat16 pair that is rank-deficient up to its own rounding stays rank-deficient, and the
  cut is invariant under the projection, so a second pass classifies alike);
  ``sqrt(r * eps_g) * ||B||_2 ||A||_2`` is what Gram rounding (``eps_g``, the Grams' dtype) leaves
  in singular values computed from square roots of Grams: float64 Grams resolve products to ~1e-7
  of ``||B||_2 ||A||_2``, float32 Grams to ~1e-3. A component under the floor cannot be told from
  zero, so it is kept, not balanced.

Every pair whose Grams resolve its product is balanced; only components at noise level are left
alone.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

MODES = ("nearest", "svd")

# Gram eigenvalues below gram_rtol(dtype) of the largest are the Gram's own rounding noise:
# float32 accumulation leaves ~1e-7..1e-6 (RANK_RTOL = 2^-16 sits above it), float64 ~r * 1e-16.
RANK_RTOL = 2.0**-16
GRAM_RTOL_FP64 = 2.0**-44


def check_mode(where: str, mode) -> None:
    """Raise a ValueError naming ``where`` unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")


def gram_rtol(gram_dtype: torch.dtype) -> float:
    """The Gram-eigenvalue threshold (relative to the largest) for Grams accumulated in ``gram_dtype``."""
    return GRAM_RTOL_FP64 if gram_dtype == torch.float64 else RANK_RTOL


def factor_eps(lora_A: torch.Tensor, lora_B: torch.Tensor) -> float:
    """The rounding unit ``eps_f`` of a pair: that of its less precise factor."""
    return max(torch.finfo(lora_A.dtype).eps, torch.finfo(lora_B.dtype).eps)


def product_floor(S_1: torch.Tensor, d_max: torch.Tensor, e_max: torch.Tensor, r: int,
                  gram_dtype: torch.dtype, factor_dtypes=(), eps_f=None) -> torch.Tensor:
    """The product singular value [...] under which a component is noise (module docstring):
    ``max(eps_f S_1, sqrt(r eps_g) ||B||_2 ||A||_2)`` from the largest singular value of ``BA`` and
    the Grams' largest eigenvalues. ``eps_f``: per pair [...] or one number; by default the least
    precise of ``factor_dtypes`` (the Grams' dtype when none is given)."""
    eps_g = torch.finfo(gram_dtype).eps
    if eps_f is None:
        eps_f = max(torch.finfo(d).eps for d in (tuple(factor_dtypes) or (gram_dtype,)))
    norms = (d_max.clamp_min(0) * e_max.clamp_min(0)).sqrt()
    return torch.maximum(eps_f * S_1, (r * eps_g) ** 0.5 * norms)


# --------------------------------------------------------------------------------------------
# LoRA linear layer
# --------------------------------------------------------------------------------------------
def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_mask=None):
    """``y = x W^T + b + s ((x * mask) A^T) B^T``.

    x [..., in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r];
    dropout_mask [..., in] or None: the LoRA branch's dropout mask, already scaled by 1/(1-p).
    """
    return lora_linear_and_u(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)[0]


def lora_linear_and_u(x, weight, bias, lora_A, lora_B, scaling: float, dropout_mask=None):
    """``(y, u)``: :func:`lora_linear`'s output and its rank-r intermediate ``u = (x * mask) A^T``
    [..., r] (what the backward needs), both in x's dtype."""
    xl = x if dropout_mask is None else x * dropout_mask
    y = x @ weight.transpose(-1, -2)
    if bias is not None:
        y = y + bias
    u = xl @ lora_A.to(x.dtype).transpose(-1, -2)
    return y + scaling * (u @ lora_B.to(x.dtype).transpose(-1, -2)), u


class LoraLinearGrads(NamedTuple):
    x: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    lora_A: torch.Tensor
    lora_B: torch.Tensor


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, scaling: float, dropout_mask=None,
                         u=None, need_x_grad: bool = True, need_weight_grad: bool = False,
                         need_bias_grad: bool = False):
    """Gradients of :func:`lora_linear` for 2-D ``grad_y`` [N, out] and ``x`` [N, in].

    With ``x_l = x * mask`` (``x`` without dropout), ``u = x_l A^T`` and ``v = dy B`` (both [N, r])::

        dx = dy W + s (v A) * mask     dA = s v^T x_l     dB = s dy^T u
        dW = dy^T x                    db = sum_n dy

    Adapters may be float32 while x is lower precision: the math runs in x's dtype and the adapter
    gradients are returned in the adapters' dtypes. ``u`` may be passed when already computed.
    """
    A = lora_A.to(x.dtype)
    B = lora_B.to(x.dtype)
    xl = x if dropout_mask is None else x * dropout_mask
    if u is None:
        u = xl @ A.T
    v = grad_y @ B
    dx = None
    if need_x_grad:
        dx_lora = scaling * (v @ A)
        dx = grad_y @ weight + (dx_lora if dropout_mask is None else dx_lora * dropout_mask)
    return LoraLinearGrads(
        x=dx,
        weight=grad_y.T @ x if need_weight_grad else None,
        bias=grad_y.sum(0) if need_bias_grad else None,
        lora_A=(scaling * (v.T @ xl)).to(lora_A.dtype),
        lora_B=(scaling * (grad_y.T @ u)).to(lora_B.dtype),
    )


# --------------------------------------------------------------------------------------------
# Balancing
# --------------------------------------------------------------------------------------------
def grams(lora_A: torch.Tensor, lora_B: torch.Tensor, dtype=torch.float64):
    """``(G_B, G_A) = (B^T B, A A^T)``, each [..., r, r], accumulated in ``dtype``."""
    A = lora_A.to(dtype)
    B = lora_B.to(dtype)
    return B.transpose(-1, -2) @ B, A @ A.transpose(-1, -2)


class Transforms(NamedTuple):
    """Per pair: ``T`` and ``T_inv`` [..., r, r]; status counters and gaps [...]."""
    T: torch.Tensor
    T_inv: torch.Tensor
    rank: torch.Tensor            # live components k (int64)
    nonfinite: torch.Tensor       # bool: pair skipped for NaN/Inf
    zero: torch.Tensor            # bool: pair skipped for a zero product
    gap_before: torch.Tensor      # ||G_B - G_A||_F / max(||G_B||_F, ||G_A||_F)
    gap_after: torch.Tensor       # same quantity for (T^T G_B T, T^-1 G_A T^-T)


def balance_gap(G_B: torch.Tensor, G_A: torch.Tensor) -> torch.Tensor:
    """Relative balance gap ``||G_B - G_A||_F / max(||G_B||_F, ||G_A||_F)`` (0 for zero pairs)."""
    num = torch.linalg.matrix_norm(G_B - G_A)
    den = torch.maximum(torch.linalg.matrix_norm(G_B), torch.linalg.matrix_norm(G_A))
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), torch.zeros_like(num))


def _psd_sqrt_factor(G: torch.Tensor, rtol: float):
    """``(X, d_max)``: ``X`` [..., r, r] with ``X X^T = G`` on the eigenvalues above ``rtol`` times
    the largest (others dropped), and that largest eigenvalue [...]."""
    d, P = torch.linalg.eigh(G)
    live = d > rtol * d[..., -1:].clamp_min(0)
    return P * torch.where(live, d, 0).clamp_min(0).sqrt().unsqueeze(-2), d[..., -1]


def _polar(C: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``U V^T`` of ``C = U S V^T`` (any C, singular included)."""
    U, _, Vh = torch.linalg.svd(C)
    return U @ Vh


def balancing_transforms(G_B: torch.Tensor, G_A: torch.Tensor, mode: str = "nearest",
                         factor_dtypes=(), eps_f=None) -> Transforms:
    """Transforms ``T``, ``T^-1`` that balance each pair, from its Grams only.

    G_B, G_A: [..., r, r] symmetric PSD (any float dtype; the math runs in float64).
    factor_dtypes: the dtypes of the factors the Grams came from (they set the product noise
    floor; pass them: without, the Grams' dtype stands for the factors'); or ``eps_f`` [...], the
    rounding unit of each pair's factors (:func:`factor_eps`), for batches of mixed dtypes.
    Returns :class:`Transforms`; ``B' = B T`` and ``A' = T^-1 A``. Skipped pairs get identities.
    """
    check_mode("balancing_transforms", mode)
    gram_dtype = torch.promote_types(G_B.dtype, G_A.dtype)
    G_B = G_B.to(torch.float64)
    G_A = G_A.to(torch.float64)
    r = G_B.shape[-1]
    eye = torch.eye(r, dtype=torch.float64, device=G_B.device).expand_as(G_B)

    nonfinite = ~(torch.isfinite(G_B).flatten(-2).all(-1) & torch.isfinite(G_A).flatten(-2).all(-1))
    G_B = torch.where(nonfinite[..., None, None], eye, G_B)
    G_A = torch.where(nonfinite[..., None, None], eye, G_A)
    G_B = 0.5 * (G_B + G_B.transpose(-1, -2))
    G_A = 0.5 * (G_A + G_A.transpose(-1, -2))

    # 1-2. square-root factors and the r x r core H = X^T Y with the singular values of BA.
    X, d_max = _psd_sqrt_factor(G_B, gram_rtol(gram_dtype))
    Y, e_max = _psd_sqrt_factor(G_A, gram_rtol(gram_dtype))
    U, S, Vh = torch.linalg.svd(X.transpose(-1, -2) @ Y)          # S descending
    live = S > product_floor(S[..., 0], d_max, e_max, r, gram_dtype, factor_dtypes, eps_f).unsqueeze(-1)
    rank = live.sum(-1)
    zero = (rank == 0) & ~nonfinite

    # 3. the live block: T_live = Y V S^-1/2, T_live^-1 = S^-1/2 U^T X^T (dead columns zeroed).
    isq = torch.where(live, S, 1).rsqrt() * live
    T_live = (Y @ Vh.transpose(-1, -2)) * isq.unsqueeze(-2)
    W_live = isq.unsqueeze(-1) * (U.transpose(-1, -2) @ X.transpose(-1, -2))

    # The rest: N spans ker(W_live) = (X U_live)^perp, the smallest eigenvalues of Z Z^T.
    Z = X @ (U * live.unsqueeze(-2))
    ZZ = Z @ Z.transpose(-1, -2)
    _, E = torch.linalg.eigh(0.5 * (ZZ + ZZ.transpose(-1, -2)))   # ascending: kernel first
    # Column j >= k of T takes eigenvector j - k.
    j = torch.arange(r, device=G_B.device)
    src = (j - rank.unsqueeze(-1)).clamp_min(0)                    # [..., r]
    N = torch.gather(E, -1, src.unsqueeze(-2).expand_as(E)) * (~live).unsqueeze(-2)
    proj = eye - T_live @ W_live                                    # oblique projector on the rest
    T = T_live + N
    W = W_live + N.transpose(-1, -2) @ proj

    # 4. choose the member of the balanced orbit: the nearest one, or signs only (svd).
    # C[i, j] = <B'_i, B_j> + <A'_i, A_j>: new component i against the pair's column/row j.
    C = T.transpose(-1, -2) @ G_B + W @ G_A
    if mode == "nearest":
        # Q = polar(C) maximises tr(Q^T C). With a rest block, Q may not mix live and rest
        # components (that would spread dead components, possibly far larger than the product, over
        # every slot, and rounding would no longer cancel them in B A): the live components take
        # the k slots where they have most weight, the rest the others, each block its own polar
        # factor (the polar factor of the block-masked C). Full-rank pairs: plain polar(C).
        w_live = (C * live.unsqueeze(-1)).square().sum(-2)
        w_all = C.square().sum(-2)
        score = torch.where(w_all > 0, w_live / torch.where(w_all > 0, w_all, 1), 0)
        order = torch.argsort(score, dim=-1, descending=True, stable=True)
        slot_live = torch.zeros_like(live).scatter(-1, order, j.expand_as(order) < rank.unsqueeze(-1))
        same = live.unsqueeze(-1) == slot_live.unsqueeze(-2)
        Q = _polar(torch.where(same, C, 0))
        T, W = T @ Q, Q.transpose(-1, -2) @ W
    else:
        # Live components: signs only. Rest block (rank-deficient pairs): its nearest rotation,
        # so that the arbitrary basis N is replaced by a canonical one (idempotence).
        rest2 = (~live).unsqueeze(-1) & (~live).unsqueeze(-2)
        sgn = torch.where(torch.diagonal(C, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(C.dtype)
        D = torch.where(rest2, C, torch.diag_embed(torch.where(live, sgn, 0)))
        Q = _polar(D)
        T, W = T @ Q, Q.transpose(-1, -2) @ W

    skip = (nonfinite | zero)[..., None, None]
    T = torch.where(skip, eye, T)
    W = torch.where(skip, eye, W)
    gap_before = balance_gap(G_B, G_A)
    gap_after = balance_gap(T.transpose(-1, -2) @ G_B @ T, W @ G_A @ W.transpose(-1, -2))
    return Transforms(T, W, rank, nonfinite, zero,
                      torch.where(nonfinite, torch.nan, gap_before),
                      torch.where(nonfinite, torch.nan, gap_after))


def apply_transforms(lora_A, lora_B, t: Transforms):
    """``(T^-1 A, B T)`` in float64, rounded once to the factors' dtypes; skipped pairs untouched."""
    skip = (t.nonfinite | t.zero)[..., None, None]
    A = torch.where(skip, lora_A, (t.T_inv @ lora_A.to(torch.float64)).to(lora_A.dtype))
    B = torch.where(skip, lora_B, (lora_B.to(torch.float64) @ t.T).to(lora_B.dtype))
    return A, B


def balance(lora_A: torch.Tensor, lora_B: torch.Tensor, mode: str = "nearest"):
    """The balanced pair ``(A', B')`` equivalent to ``(A, B)``: ``B' A' = B A``, ``B'^T B' = A' A'^T``.

    lora_A [..., r, in], lora_B [..., out, r]; returns new tensors of the same dtypes (the inputs
    are not modified). Degenerate pairs follow the module docstring's policy.
    """
    G_B, G_A = grams(lora_A, lora_B)
    t = balancing_transforms(G_B, G_A, mode, factor_dtypes=(lora_A.dtype, lora_B.dtype))
    return apply_transforms(lora_A, lora_B, t)
