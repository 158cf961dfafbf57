"""The GPU projection plan: grouped Gram (Triton), batched r x r transforms (CUDA ext or torch), grouped rescale.

One projection of every adapter is a handful of launches, all on the current stream, no host sync:

1. ``_gram_partial_kernel`` (one launch per parameter dtype): every factor is cut into *tiles* of at most
   ``K_CHUNK`` rows of ``B`` (or columns of ``A``); a persistent grid walks a device table of tiles and writes
   one fp32 partial Gram ``X X^T`` per tile (``X = B^T`` or ``A``, [r, k]); float32 factors by the method of
   :data:`FP32_GRAM_METHODS` their rank group uses (CUDA-core outer products for r <= 8, tl.dot above). No
   atomics: each tile is owned by one program and the tile split never depends on the GPU, so the result is
   bitwise reproducible;
2. ``_gram_reduce_kernel``: one program per Gram sums its tiles' partials in tile order -> ``grams``
   [P, 2, R, R] (``[p, 0] = G_B``, ``[p, 1] = G_A``, zero-padded to ``R = max(16, next_pow2(r))``);
3. the r x r math of :func:`balora_kernels.reference.balancing_transforms`, per pair (same rank policy: the
   product floor with each pair's ``eps_f``): the compiled ``csrc/`` kernel (float64, one thread block per
   pair) or, when the extension is unavailable, the reference itself in torch on the device. Writes ``tw``
   [P, 2, R, R] (``[p, 0] = T``, ``[p, 1] = T^-1``), per-pair ``status`` (flag bits and the live components
   k) and gaps;
4. ``_rescale_kernel`` (one launch per dtype): ``B <- B T`` and ``A <- T^-1 A`` over the same tiles, fp32 math,
   one rounding; tiles of skipped pairs are not written (bit-identical);
5. ``_stats_kernel``: one program folds the per-pair status into :class:`ProjectionStats` counters.

Ranks up to 16 take CUDA-core kernels for steps 1-2 and 4 when the extension has them (``kernels="auto"``,
:data:`KERNELS`): ``torch.ops.balora.grouped_gram`` (csrc/grouped.cu: one warp per tile, one lane per row, the
tile's partial summed by a fixed butterfly; the last tile of each Gram to finish sums the partials in tile order,
an integer counter per Gram, no float atomics: still bitwise reproducible) and ``grouped_rescale`` (one thread per
row of B / column of A, float32 FMAs, one rounding), on the same tile tables; float32 factors of ranks 17 to 64
take the same two ops' tensor-core kernels (csrc/grouped_mma.cu: one block per tile, 3xTF32 ``mma.m16n8k8``, the
same counters and tile-order sums). Measured on an H200 (bench/results/projection-h200.json, ``gram_triton_ms`` /
``rescale_triton_ms`` beside ours). The Triton kernels above are the path for 16-bit factors above rank 16, ranks
above 64 and wherever the extension is not built (and what CI runs).

Tables (addresses, strides, tile ranges) are built once in :class:`TritonProjectionPlan.__init__`.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import reference
from .projection import PackedProjectionStats, Pair, ProjectionStats

# Per-pair status written by the transform step (same values in csrc/balance_math.cuh): flag bits, and
# the number of live components k in the bits from STATUS_RANK_SHIFT up (0 for skipped pairs).
STATUS_NONFINITE = 1
STATUS_ZERO = 2
STATUS_RANK_DEFICIENT = 4
STATUS_RANK_SHIFT = 8
MODE_CODES = {"nearest": 0, "svd": 1}

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)
TILE_FIELDS = 6   # address, row stride of A (unused for B), k_start, k_len, gram/transform slot, pad


def padded_rank(r: int) -> int:
    """Block size of the r x r matrices in the kernels (tl.dot needs >= 16, powers of two)."""
    return max(16, triton.next_power_of_2(r))


# Rows per tile of the rank groups that take csrc/grouped_mma.cu's Gram (float32, ranks 17 to 64): 2048, measured on
# an H200 against 1024 (7B adapters, bench/results/logs/session16-mma-variants-2026-12-02.json): Gram r = 64 0.448 ->
# 0.402 ms, r = 32 0.226 -> 0.174; rescale r = 64 0.573 -> 0.583, r = 32 0.186 -> 0.190.
MMA_K_CHUNK = 2048


def _block_k(R: int) -> int:
    """Rows (of B) / columns (of A) per inner step: about 4096 elements per [R, BLOCK_K] tile."""
    return max(16, min(256, 4096 // R))


def _k_chunk(R: int) -> int:
    """Rows per tile: large enough that the R x R partial is small against the tile, small enough to balance
    (1024 measured best at R = 16 and 64 on an H200, bench/results/tune_projection-h200.json)."""
    return 1024 if R <= 64 else 32 * R


def _num_warps(R: int) -> int:
    """Enough warps that the R x R fp32 accumulator (or transform) stays in registers."""
    return 4 if R <= 32 else (8 if R <= 64 else 16)


# How float32 factors' Grams are computed: "fma" adds each row's outer product to a [rows, RC, RC] float32
# accumulator on the CUDA cores (RC = max(4, next_pow2(r)): no padding to 16), summed over the tile once at the end;
# "dot" is tl.dot on the float32 values (_dot_precision: FMA dots for R <= 16, 3xTF32 on the tensor cores
# above); "fp16x3" splits each tile, scaled per column by a power of two, into three float16 pieces (hi + mid +
# lo carry all 24 bits of float32) and sums the six significant products on the tensor cores, in four products:
# hi^T mid + mid^T hi and hi^T lo + lo^T hi are X + X^T of X = hi^T mid + hi^T lo (7B fp32 R = 64, the same
# launch parameters side by side, bench/results/tune_projection-h200-r64-head-2026-12-02.json against
# tune_projection-h200-r64-2026-12-02.json: 0.497 ms with six products, 0.479 with four). "auto" (default): "fma"
# for r <= FMA_MAX_RANK, "dot" for R = 16, "fp16x3" above. Measured on an H200, 7B shapes, Triton kernels
# (bench/results/projection-h200.json, 2026-12-02; r = 16 fma: bench/results/logs/session4-projection-probe-
# 2026-11-28.txt): r = 8 0.085 ms with fma against 0.23 with FMA dots and 0.12 with fp16x3; r = 16 fma 0.22 against
# dots 0.23 (not worth its registers); R = 64 0.47 ms with fp16x3 against 0.66 with 3xTF32 (0.57 with the launch
# parameters before R = 64's were re-measured for fp16x3). FMA dots stay the R = 16 default for accuracy: the
# tensor cores' float32 accumulation left 2e-6 relative error on a 4096-row Gram against 1.4e-7 for FMA dots (an
# earlier version of tests/test_projection_kernels.py::test_gpu_gram_methods, bench/results/logs/projection-2026-
# 11-28-rank-policy.txt). (With the extension loaded, float32 Grams of ranks up to 64 take the CUDA Grams of
# csrc/grouped.cu / grouped_mma.cu: KERNELS below.) Also
# measured and not kept: a rescale by tl.sum over a [rows, RC, RC] product took 0.36 ms against 0.10 for tl.dot
# at r = 8 (bench/results/logs/session4-projection-probe-2026-11-28.txt; its 1e-3 product errors at r = 16 there
# were a race, stores before other threads' loads of the same rows, which the "outer" rescale below closes with a
# barrier).
FP32_GRAM_METHODS = ("auto", "fp16x3", "dot", "fma")
FMA_MAX_RANK = 8        # "fma" keeps a [rows, RC, RC] float32 accumulator in registers (RC = next_pow2(r))
# How the rescale multiplies a tile by T / T^-1: "dot" (tl.dot with the R x R padded transform, float32 math) or
# "outer" (r <= FMA_MAX_RANK: RC rank-1 updates of the [rows, RC] tile, one column of B / row of A at a time,
# float32 math). "auto": "outer" for 16-bit factors of rank <= FMA_MAX_RANK, "dot" otherwise. Measured on an
# H200, r = 8 (bench/results/projection-h200.json): 7B bf16 0.059 ms outer against 0.101 dot (1B: 0.043 against
# 0.041); 7B float32 0.128 outer against 0.102 dot.
RESCALE_METHODS = ("auto", "dot", "outer")
# Which kernels compute a rank group's Grams and rescale: "triton" (above) or "cuda" (csrc/grouped.cu, ranks <=
# _ext.grouped_max_rank: 16, or 64 for groups of float32 factors (csrc/grouped_mma.cu above 16), when the r x r step
# runs in the extension and it has the ops); "cuda" takes both there; "auto" takes the CUDA rescale there, and the
# CUDA Gram for groups of float32 factors only. Measured on an H200,
# 7B adapters (bench/results/logs/grouped-cuda-probe-2026-11-28.json, GPU ms Triton -> CUDA): float32 Gram r = 8
# 0.083 -> 0.039, r = 16 0.232 -> 0.083 (0.072 since its lanes prefetch their next rows,
# bench/results/logs/session8-grouped-final-probe-2026-12-01.txt); bf16 Gram r = 8 0.055 -> 0.077, r = 16
# 0.058 -> 0.17 (slower: kept in Triton); rescale float32 r = 8 0.101 -> 0.050, r = 16 0.110 -> 0.103, bf16
# 0.058 -> 0.039, 0.105 -> 0.089; float32 on the tensor cores (bench/results/logs/session16-mma-presplit-probe-
# 2026-12-02.json): Gram r = 32 0.978 -> 0.173, r = 64 0.468 -> 0.404, rescale r = 32 0.277 -> 0.191, r = 64 0.612
# -> 0.582. A plan
# says what each rank group took (``TritonProjectionPlan.kernels``) and why (``kernels_why``).
KERNELS = ("auto", "triton", "cuda")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # csrc/grouped.cu's dtype codes


def _rescale_method(r: int, dtype, requested: str) -> str:
    """The rescale method of the factors of one dtype in a rank group of rank r ("dot" or "outer")."""
    if r > FMA_MAX_RANK or requested == "dot":
        return "dot"
    return "outer" if requested == "outer" or dtype != torch.float32 else "dot"


def _fp32_gram_method(R: int, r: int, requested: str) -> str:
    """The float32 Gram method of a rank group (padded rank R, rank r): "auto" is "fma" for r <= FMA_MAX_RANK,
    "dot" for R = 16 and "fp16x3" above; "fma" requested above FMA_MAX_RANK takes the automatic choice."""
    if requested in ("auto", "fma"):
        if r <= FMA_MAX_RANK:
            return "fma"
        return "dot" if R <= 16 else "fp16x3"
    return requested


def _fma_rows(RC: int) -> int:
    """Rows per step of the "fma" Gram: a [rows, RC, RC] float32 block of about 4096 elements."""
    return max(16, min(128, 4096 // (RC * RC)))


def _fma_rank_block(r: int) -> int:
    """RC: the rank block of the "fma" Gram and "outer" rescale (a power of two >= r, at least 4)."""
    return max(4, triton.next_power_of_2(r))


# The "dot" rescale of 16-bit factors above R = 16 (where float32 factors take 3xTF32): the factors are exact in tf32,
# so X T = X T_hi + X T_lo takes two tf32 products (T split once per tile, _tf32_pair) where tf32x3 takes three.
# 7B bf16 R = 64, the same launch parameters side by side: 0.956 ms with tf32x3, 0.715 with the pair (0.408 with
# the launch parameters then measured for the pair, _MEASURED_TUNE). False: tf32x3 for them too
# (BALORA_KERNELS_RESCALE_TF32_PAIR=0, for comparison; it keeps the pair's launch parameters).
RESCALE_TF32_PAIR = os.environ.get("BALORA_KERNELS_RESCALE_TF32_PAIR", "1") not in ("", "0")


def _tf32_pair_rescale(dtype, precision: str) -> bool:
    return RESCALE_TF32_PAIR and dtype != torch.float32 and precision == "tf32x3"


def _dot_precision(R: int, kernel: str) -> str:
    """fp32 dot precision: exact fp32 FMA dots for r <= 16 (the 7B Grams ran in ~0.27 ms at r = 8 and
    16 on an H200, against 3.7 / 0.44 ms with 3xTF32), 3xTF32 on the tensor cores above (~2^-21
    relative per product; FMA dots do not keep up with memory there)."""
    return "tf32x3" if R > 16 else "ieee"


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _pow2_scales(amax):
    """``(s, 1/s)``: powers of two with ``amax * s`` in [1, 2) (1 where ``amax`` is 0 or not finite)."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.where(amax > 0, tl.minimum(tl.maximum(e, -126), 126), 0)   # NaN > 0 is False
    s = ((127 - e) << 23).to(tl.float32, bitcast=True)
    inv = ((127 + e) << 23).to(tl.float32, bitcast=True)
    return s, inv


@triton.jit
def _split3_fp16(x):
    """``x`` (float32, |x| < 2) as float16 ``hi + mid + lo``: each remainder is exact in float32, so the three
    pieces carry x's 24 bits (up to float16 underflow below 2^-24, under float32's own rounding of |x| ~ 1)."""
    hi = x.to(tl.float16)
    r1 = x - hi.to(tl.float32)
    mid = r1.to(tl.float16)
    lo = (r1 - mid.to(tl.float32)).to(tl.float16)
    return hi, mid, lo


@triton.jit
def _gram_fp16x3(x):
    """``(S, X)`` [N, N] float32 with ``x^T x = S + X + X^T`` for ``x`` float32 [K, N] scaled to |x| < 2: the six
    products of its float16 pieces above float32 rounding in four tensor-core products, ``S = hi^T hi + mid^T mid``
    and ``X = hi^T mid + hi^T lo`` (``mid^T hi``, ``lo^T hi`` are ``X^T``'s terms), each in a fixed order."""
    hi, mid, lo = _split3_fp16(x)
    hit = tl.trans(hi)
    sym = tl.dot(hit, hi)
    sym = tl.dot(tl.trans(mid), mid, sym)
    cross = tl.dot(hit, mid)
    cross = tl.dot(hit, lo, cross)
    return sym, cross


@triton.jit
def _tf32_pair(x):
    """``(hi, lo)`` float32 with ``hi + lo = x`` exactly: ``hi`` is x with its 13 low mantissa bits cleared (exact in
    tf32), ``lo`` the rest, which a tf32 product cuts to its 11 leading significant bits: the pair carries at least
    22 of x's 24."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _gram_fp16x3_add(x, inv, acc, accx):
    """``(acc, accx)`` plus the fp16x3 products of ``x`` (float32 [K, N], scaled by ``1 / inv`` per column), scaled
    back: the tile's Gram so far is ``acc + accx + accx^T`` (exact power-of-two scalings, applied one at a time)."""
    sym, cross = _gram_fp16x3(x)
    return acc + sym * inv[:, None] * inv[None, :], accx + cross * inv[:, None] * inv[None, :]


@triton.jit
def _tile(tiles_ptr, t, FIELDS: tl.constexpr, DTYPE: tl.constexpr):
    """Tile ``t`` of the table: (factor base pointer, row stride of A, k_start, k_len, Gram slot, pair)."""
    row = tiles_ptr + t * FIELDS
    return (tl.load(row).to(tl.pointer_type(DTYPE)), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5))


@triton.jit
def _gram_fma_tiles(tiles_ptr, partial_ptr, n_b, n_a, r, pid, DTYPE: tl.constexpr, R: tl.constexpr,
                    RC: tl.constexpr, BLOCK_K: tl.constexpr, NUM_PROGS: tl.constexpr, FIELDS: tl.constexpr):
    """The "fma" float32 Gram: each row of a tile adds its outer product to a [BLOCK_K, RC, RC] accumulator (fp32
    FMAs, every product exact before its one rounding), summed over the tile's rows once at the end; RC x RC
    partials (r = 8 costs 64 products per row, not the 256 of a 16 x 16 tl.dot)."""
    offs_c = tl.arange(0, RC)
    offs_k = tl.arange(0, BLOCK_K)
    out_offs = offs_c[:, None] * R + offs_c[None, :]
    for t in range(pid, n_b, NUM_PROGS):          # B tiles: G_B += sum over rows b b^T
        base, _, k0, k_len, slot, _ = _tile(tiles_ptr, t, FIELDS, DTYPE)
        acc = tl.zeros((BLOCK_K, RC, RC), dtype=tl.float32)
        for kk in range(0, k_len, BLOCK_K):
            rows = kk + offs_k
            mask = (rows < k_len)[:, None] & (offs_c < r)[None, :]
            b = tl.load(base + (k0 + rows)[:, None] * r + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += b[:, :, None] * b[:, None, :]
        tl.store(partial_ptr + slot * (R * R) + out_offs, tl.sum(acc, axis=0))
    for t in range(n_b + pid, n_b + n_a, NUM_PROGS):   # A tiles: G_A += sum over columns a a^T
        base, stride, k0, k_len, slot, _ = _tile(tiles_ptr, t, FIELDS, DTYPE)
        acc = tl.zeros((RC, RC, BLOCK_K), dtype=tl.float32)
        for kk in range(0, k_len, BLOCK_K):
            cols = kk + offs_k
            mask = (offs_c < r)[:, None] & (cols < k_len)[None, :]
            a = tl.load(base + offs_c[:, None] * stride + (k0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += a[:, None, :] * a[None, :, :]
        tl.store(partial_ptr + slot * (R * R) + out_offs, tl.sum(acc, axis=2))


@triton.jit
def _gram_dot_tiles(tiles_ptr, partial_ptr, n_b, n_a, r, pid, DTYPE: tl.constexpr, R: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, NUM_PROGS: tl.constexpr, FIELDS: tl.constexpr,
                    SPLIT: tl.constexpr):
    """The tl.dot Grams (16-bit factors; float32 by FMA dots, 3xTF32 or the fp16x3 split): R x R partials."""
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    out_offs = offs_r[:, None] * R + offs_r[None, :]
    # B tiles: rows [k0, k0 + k_len) of B [out, r] (row stride r): G_B += B_t^T B_t.
    for t in range(pid, n_b, NUM_PROGS):
        base, _, k0, k_len, slot, _ = _tile(tiles_ptr, t, FIELDS, DTYPE)
        acc = tl.zeros((R, R), dtype=tl.float32)
        accx = tl.zeros((R, R), dtype=tl.float32)     # SPLIT: the tile's Gram is acc + accx + accx^T
        for kk in range(0, k_len, BLOCK_K):
            rows = kk + offs_k
            mask = (rows < k_len)[:, None] & (offs_r < r)[None, :]
            b = tl.load(base + (k0 + rows)[:, None] * r + offs_r[None, :], mask=mask, other=0.0)
            if SPLIT:   # b = b' diag(1/s): G += diag(1/s) (b'^T b') diag(1/s), exact power-of-two scalings
                s, inv = _pow2_scales(tl.max(tl.abs(b), axis=0))
                acc, accx = _gram_fp16x3_add(b * s[None, :], inv, acc, accx)
            else:
                acc = tl.dot(tl.trans(b), b, acc, input_precision=PRECISION)
        if SPLIT:
            acc += accx + tl.trans(accx)
        tl.store(partial_ptr + slot * (R * R) + out_offs, acc)
    # A tiles: columns [k0, k0 + k_len) of A [r, in] (row stride from the table): G_A += A_t A_t^T.
    for t in range(n_b + pid, n_b + n_a, NUM_PROGS):
        base, stride, k0, k_len, slot, _ = _tile(tiles_ptr, t, FIELDS, DTYPE)
        acc = tl.zeros((R, R), dtype=tl.float32)
        accx = tl.zeros((R, R), dtype=tl.float32)
        for kk in range(0, k_len, BLOCK_K):
            cols = kk + offs_k
            mask = (offs_r < r)[:, None] & (cols < k_len)[None, :]
            a = tl.load(base + offs_r[:, None] * stride + (k0 + cols)[None, :], mask=mask, other=0.0)
            if SPLIT:
                s, inv = _pow2_scales(tl.max(tl.abs(a), axis=1))
                acc, accx = _gram_fp16x3_add(tl.trans(a * s[:, None]), inv, acc, accx)
            else:
                acc = tl.dot(a, tl.trans(a), acc, input_precision=PRECISION)
        if SPLIT:
            acc += accx + tl.trans(accx)
        tl.store(partial_ptr + slot * (R * R) + out_offs, acc)


@triton.jit
def _gram_partial_kernel(
    tiles_ptr,          # int64 [n_b + n_a, TILE_FIELDS]: B tiles first, then A tiles
    partial_ptr,        # fp32 [n_slots, R, R]
    n_b, n_a,           # number of B tiles / A tiles in this launch
    r,                  # rank (row stride of B)
    DTYPE: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    NUM_PROGS: tl.constexpr, FIELDS: tl.constexpr,
    SPLIT: tl.constexpr,  # float32 factors: the fp16x3 products (scaled per column of the tile) instead of tl.dot
    FMA: tl.constexpr,    # float32 factors: fp32 outer products on the CUDA cores (RC x RC, no padding to R)
    RC: tl.constexpr,     # FMA: max(4, next_pow2(r)) <= R; the rest of the R x R slot is never written: the
                          # plan zero-fills `partials` once (_RankGroup) and nothing else writes those entries
):
    pid = tl.program_id(0)
    if FMA:
        _gram_fma_tiles(tiles_ptr, partial_ptr, n_b, n_a, r, pid, DTYPE, R, RC, BLOCK_K, NUM_PROGS, FIELDS)
    else:
        _gram_dot_tiles(tiles_ptr, partial_ptr, n_b, n_a, r, pid, DTYPE, R, BLOCK_K, PRECISION, NUM_PROGS, FIELDS,
                        SPLIT)


@triton.jit
def _gram_reduce_kernel(
    partial_ptr,        # fp32 [n_slots, R, R]
    ranges_ptr,         # int64 [P * 2, 2]: (first slot, number of slots) of each Gram, slots in tile order
    grams_ptr,          # fp32 [P * 2, R, R] out
    R: tl.constexpr,
):
    g = tl.program_id(0)
    first = tl.load(ranges_ptr + 2 * g)
    count = tl.load(ranges_ptr + 2 * g + 1)
    offs = tl.arange(0, R)[:, None] * R + tl.arange(0, R)[None, :]
    acc = tl.zeros((R, R), dtype=tl.float32)
    for i in range(0, count):                       # fixed order: deterministic
        acc += tl.load(partial_ptr + (first + i) * (R * R) + offs)
    tl.store(grams_ptr + g * (R * R) + offs, acc)


@triton.jit
def _rescale_kernel(
    tiles_ptr,          # int64 [n_b + n_a, TILE_FIELDS] (same tiles as the Gram)
    tw_ptr,             # fp32 [P, 2, R, R]: T, T^-1 per pair
    status_ptr,         # int32 [P]: pairs with NONFINITE / ZERO bits are not written
    n_b, n_a, r,
    DTYPE: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    NUM_PROGS: tl.constexpr, FIELDS: tl.constexpr, SKIP_BITS: tl.constexpr,
    OUTER: tl.constexpr,  # "outer": RC rank-1 updates of a [BLOCK_K, RC] float32 tile instead of an R x R tl.dot
    RC: tl.constexpr,     # OUTER: max(4, next_pow2(r)) <= R
    TF32_PAIR: tl.constexpr = False,  # "dot" with 16-bit factors (exact in tf32): X T = X T_hi + X T_lo, T_hi = T
                                      # cut to tf32, two tf32 products instead of tf32x3's three (PRECISION unused)
):
    pid = tl.program_id(0)
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, RC)
    offs_k = tl.arange(0, BLOCK_K)
    mat = offs_r[:, None] * R + offs_r[None, :]
    # B <- B T, tile by tile of rows.
    for t in range(pid, n_b, NUM_PROGS):
        base, _, k0, k_len, _, pair = _tile(tiles_ptr, t, FIELDS, DTYPE)
        # Skipped pairs: no iteration, nothing written (bit-identical, and no read either).
        k_len = tl.where((tl.load(status_ptr + pair) & SKIP_BITS) == 0, k_len, 0)
        tp = tw_ptr + pair * (2 * R * R)
        if not OUTER:
            T = tl.load(tp + mat)
            if TF32_PAIR:
                T, T_lo = _tf32_pair(T)
        for kk in range(0, k_len, BLOCK_K):
            rows = kk + offs_k
            if OUTER:   # out = sum_i B[:, i] T[i, :], i ascending
                out = tl.zeros((BLOCK_K, RC), dtype=tl.float32)
                for i in tl.static_range(RC):
                    b_i = tl.load(base + (k0 + rows) * r + i, mask=(rows < k_len) & (rows * 0 + i < r), other=0.0)
                    out += b_i.to(tl.float32)[:, None] * tl.load(tp + i * R + offs_c)[None, :]
                tl.debug_barrier()   # in place: every thread's loads of these rows before any store to them
                mask = (rows < k_len)[:, None] & (offs_c < r)[None, :]
                tl.store(base + (k0 + rows)[:, None] * r + offs_c[None, :], out.to(DTYPE), mask=mask)
            else:
                mask = (rows < k_len)[:, None] & (offs_r < r)[None, :]
                ptrs = base + (k0 + rows)[:, None] * r + offs_r[None, :]
                b = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                if TF32_PAIR:
                    out = tl.dot(b, T_lo, tl.dot(b, T, input_precision="tf32"), input_precision="tf32")
                else:
                    out = tl.dot(b, T, input_precision=PRECISION)
                tl.store(ptrs, out.to(DTYPE), mask=mask)
    # A <- T^-1 A, tile by tile of columns.
    for t in range(n_b + pid, n_b + n_a, NUM_PROGS):
        base, stride, k0, k_len, _, pair = _tile(tiles_ptr, t, FIELDS, DTYPE)
        # Skipped pairs: no iteration, nothing written (bit-identical, and no read either).
        k_len = tl.where((tl.load(status_ptr + pair) & SKIP_BITS) == 0, k_len, 0)
        wp = tw_ptr + pair * (2 * R * R) + R * R
        if not OUTER:
            W = tl.load(wp + mat)
            if TF32_PAIR:
                W, W_lo = _tf32_pair(W)
        for kk in range(0, k_len, BLOCK_K):
            cols = kk + offs_k
            if OUTER:   # out = sum_j W[:, j] A[j, :], j ascending
                out = tl.zeros((RC, BLOCK_K), dtype=tl.float32)
                for j in tl.static_range(RC):
                    a_j = tl.load(base + j * stride + k0 + cols, mask=(cols < k_len) & (cols * 0 + j < r), other=0.0)
                    out += tl.load(wp + offs_c * R + j)[:, None] * a_j.to(tl.float32)[None, :]
                tl.debug_barrier()   # in place: every thread's loads of these columns before any store to them
                mask = (offs_c < r)[:, None] & (cols < k_len)[None, :]
                tl.store(base + offs_c[:, None] * stride + (k0 + cols)[None, :], out.to(DTYPE), mask=mask)
            else:
                mask = (offs_r < r)[:, None] & (cols < k_len)[None, :]
                ptrs = base + offs_r[:, None] * stride + (k0 + cols)[None, :]
                a = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                if TF32_PAIR:
                    out = tl.dot(W_lo, a, tl.dot(W, a, input_precision="tf32"), input_precision="tf32")
                else:
                    out = tl.dot(W, a, input_precision=PRECISION)
                tl.store(ptrs, out.to(DTYPE), mask=mask)


@triton.jit
def _stats_kernel(
    status_ptr,         # int32 [P]
    gaps_ptr,           # fp64 [P, 2]: gap_before, gap_after
    out_ptr,            # fp64 [7] out: pairs, projected, skipped_nonfinite, skipped_zero, rank_deficient (exact
                        # in float64), then the max gap_before / gap_after over projected pairs
    P,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    n_all = tl.zeros((BLOCK,), dtype=tl.int64)
    n_proj = tl.zeros((BLOCK,), dtype=tl.int64)
    n_nf = tl.zeros((BLOCK,), dtype=tl.int64)
    n_zero = tl.zeros((BLOCK,), dtype=tl.int64)
    n_def = tl.zeros((BLOCK,), dtype=tl.int64)
    g0 = tl.zeros((BLOCK,), dtype=tl.float64)
    g1 = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, P, BLOCK):
        idx = start + offs
        m = idx < P
        s = tl.load(status_ptr + idx, mask=m, other=1)
        done = m & ((s & 3) == 0)
        n_all += m.to(tl.int64)
        n_proj += done.to(tl.int64)
        n_nf += (m & ((s & 1) != 0)).to(tl.int64)
        n_zero += (m & ((s & 2) != 0)).to(tl.int64)
        n_def += (done & ((s & 4) != 0)).to(tl.int64)
        b = tl.load(gaps_ptr + 2 * idx, mask=done, other=0.0)
        a = tl.load(gaps_ptr + 2 * idx + 1, mask=done, other=0.0)
        g0 = tl.maximum(g0, tl.where(done, b, 0.0))
        g1 = tl.maximum(g1, tl.where(done, a, 0.0))
    tl.store(out_ptr + 0, tl.sum(n_all).to(tl.float64))
    tl.store(out_ptr + 1, tl.sum(n_proj).to(tl.float64))
    tl.store(out_ptr + 2, tl.sum(n_nf).to(tl.float64))
    tl.store(out_ptr + 3, tl.sum(n_zero).to(tl.float64))
    tl.store(out_ptr + 4, tl.sum(n_def).to(tl.float64))
    tl.store(out_ptr + 5, tl.max(g0))
    tl.store(out_ptr + 6, tl.max(g1))



# --------------------------------------------------------------------------------------------
# Host side: tables and launchers
# --------------------------------------------------------------------------------------------
def _num_programs(n_tiles: int, device: torch.device, per_sm: int = 4) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, per_sm * sms))
    return max(1, min(n_tiles, 4))       # the interpreter runs programs one after another


# Launch parameters of the Gram and rescale kernels (``TritonProjectionPlan(tune=...)`` overrides any of them;
# bench/tune_projection.py measures alternatives): rows per tile, and per kernel the rows (of B) / columns
# (of A) per inner step, warps, software-pipeline stages and programs per multiprocessor.
TUNE_KEYS = ("k_chunk", "gram_block_k", "gram_warps", "gram_stages", "gram_progs",
             "rescale_block_k", "rescale_warps", "rescale_stages", "rescale_progs")


# Measured on an H200 (bench/tune_projection.py -> bench/results/tune_projection-h200.json, Llama-2-7B adapters,
# GPU time of each kernel alone): per (padded rank, float32 or 16-bit parameters), the best configuration found.
# Gram fp32 R=16 0.270 -> 0.232 ms, 16-bit R=16 0.064 -> 0.058, fp32 R=64 0.934 -> 0.498; rescale fp32 R=16
# 0.142 -> 0.101, 16-bit R=16 0.110 -> 0.105, fp32 R=64 0.930 -> 0.612. R=64 again after the four-product fp16x3
# Gram and the two-product 16-bit rescale (bench/results/tune_projection-h200-r64-2026-12-02.json): Gram fp32
# 0.479 -> 0.468, bf16 0.161 -> 0.147; rescale bf16 0.715 -> 0.408 (fp32 unchanged, 0.613). Other ranks keep the
# rules above.
_MEASURED_TUNE = {
    (16, True): dict(gram_block_k=128, gram_warps=2, gram_stages=1, gram_progs=8,
                     rescale_block_k=64, rescale_warps=4, rescale_stages=3, rescale_progs=4),
    (16, False): dict(gram_block_k=256, gram_warps=4, gram_stages=3, gram_progs=16,
                      rescale_block_k=128, rescale_warps=4, rescale_stages=1, rescale_progs=16),
    (64, True): dict(gram_block_k=64, gram_warps=4, gram_stages=3, gram_progs=4,
                     rescale_block_k=64, rescale_warps=4, rescale_stages=3, rescale_progs=16),
    (64, False): dict(gram_block_k=64, gram_warps=4, gram_stages=3, gram_progs=16,
                      rescale_block_k=128, rescale_warps=4, rescale_stages=1, rescale_progs=4),
}


def default_tune(R: int, dtype=torch.float32) -> Dict[str, int]:
    """The launch parameters a rank group of padded rank R uses for parameters of ``dtype``."""
    bk, w = _block_k(R), _num_warps(R)
    tune = dict(k_chunk=_k_chunk(R), gram_block_k=bk, gram_warps=w, gram_stages=3, gram_progs=4,
                rescale_block_k=bk, rescale_warps=w, rescale_stages=3, rescale_progs=4)
    tune.update(_MEASURED_TUNE.get((R, dtype == torch.float32), {}))
    return tune


class _LaunchGroup:
    """Tiles of one parameter dtype inside a rank group: one Gram launch and one rescale launch."""

    def __init__(self, dtype, tiles_b: List[list], tiles_a: List[list], device, R: int, overrides: Dict[str, int]):
        self.dtype = dtype
        self.tune = tune = {**default_tune(R, dtype), **overrides}
        self.n_b, self.n_a = len(tiles_b), len(tiles_a)
        self.tiles = torch.tensor(tiles_b + tiles_a, dtype=torch.int64).reshape(-1, TILE_FIELDS).to(device)
        self.gram_programs = _num_programs(self.n_b + self.n_a, device, tune["gram_progs"])
        self.rescale_programs = _num_programs(self.n_b + self.n_a, device, tune["rescale_progs"])


class _RankGroup:
    """All pairs of one rank r: padded block R, device tables, workspaces.

    ``first`` is the group's offset in the plan-wide per-pair arrays (status, gaps).
    """

    def __init__(self, r: int, pair_ids: List[int], pairs: Sequence[Pair], first: int, device,
                 k_chunk: Optional[int] = None, fp32_gram: str = "auto", tune: Optional[Dict[str, int]] = None,
                 rescale: str = "auto", kernels: Tuple[str, str] = ("triton", "triton")):
        self.r, self.R = r, padded_rank(r)
        self.gram_kernel, self.rescale_kernel = kernels      # each "triton" or "cuda" (decided by the plan)
        self.RC = _fma_rank_block(r)
        self.pair_ids, self.first, self.P = pair_ids, first, len(pair_ids)
        self.overrides = dict(tune or {})
        if k_chunk:
            self.overrides["k_chunk"] = k_chunk
        self.gram_precision, self.rescale_precision = _dot_precision(self.R, "gram"), _dot_precision(self.R, "rescale")
        self.fp32_gram = _fp32_gram_method(self.R, r, fp32_gram)
        # one tile split for every dtype (the tensor-core CUDA kernels: longer tiles, MMA_K_CHUNK)
        from .. import _ext
        mma = kernels[0] == "cuda" and r > _ext.GROUPED_MAX_RANK
        self.k_chunk = self.overrides.get("k_chunk") or (MMA_K_CHUNK if mma else _k_chunk(self.R))
        # each pair's factor rounding unit: the product noise floor of the r x r step
        self.eps_f = torch.tensor([reference.factor_eps(*pairs[i]) for i in pair_ids], dtype=torch.float64,
                                  device=device)
        by_dtype: Dict[torch.dtype, Tuple[list, list]] = {}
        ranges, slot = [], 0
        for p, i in enumerate(pair_ids):
            A, B = pairs[i]
            for which, X in ((0, B), (1, A)):            # Gram slot order: [p, 0] = G_B, [p, 1] = G_A
                k_total = X.shape[0] if which == 0 else X.shape[1]
                n = max(1, -(-k_total // self.k_chunk))
                ranges.append([slot, n])
                lists = by_dtype.setdefault(X.dtype, ([], []))
                for c in range(n):
                    k0 = c * self.k_chunk
                    stride = X.stride(0) if which == 1 else 0
                    lists[which].append([X.data_ptr(), stride, k0, min(self.k_chunk, k_total - k0), slot, p])
                    slot += 1
        self.n_slots = slot
        self.ranges = torch.tensor(ranges, dtype=torch.int64, device=device)
        self.launches = [_LaunchGroup(dt, tb, ta, device, self.R, {**self.overrides, "k_chunk": self.k_chunk})
                         for dt, (tb, ta) in by_dtype.items()]
        for lg in self.launches:
            lg.rescale_method = _rescale_method(r, lg.dtype, rescale)
        # zeros: the "fma" Gram writes only the RC x RC corner of its slots (the CUDA Gram: packed triangles)
        self.partials = torch.zeros((self.n_slots, self.R, self.R), dtype=torch.float32, device=device)
        # the CUDA Gram's per-Gram tile counters: zero, and each launch leaves them zero
        self.counters = torch.zeros(2 * self.P if self.gram_kernel == "cuda" else 0, dtype=torch.int32, device=device)
        self.grams = torch.empty((self.P, 2, self.R, self.R), dtype=torch.float32, device=device)
        self.tw = torch.empty((self.P, 2, self.R, self.R), dtype=torch.float32, device=device)


def _signature(pairs: Sequence[Pair]):
    """What a plan depends on: every parameter's address, shape, strides, dtype and device."""
    return [(A.data_ptr(), A.shape, A.stride(), A.dtype, A.device, B.data_ptr(), B.shape, B.stride(), B.dtype)
            for A, B in pairs]


def supports(pairs: Sequence[Pair]) -> Optional[str]:
    """None when the Triton plan can take ``pairs``; otherwise the reason it cannot."""
    for i, (A, B) in enumerate(pairs):
        if A.dtype not in _TL_DTYPES or B.dtype not in _TL_DTYPES:
            return f"pair {i}: dtype {A.dtype}/{B.dtype} not in {SUPPORTED_DTYPES}"
        if not (A.is_contiguous() and B.is_contiguous()):
            return f"pair {i}: non-contiguous factor"
        if A.shape[0] > 128:
            return f"pair {i}: rank {A.shape[0]} > 128"
    return None


class TritonProjectionPlan:
    """Grouped-kernel projection of a fixed list of pairs (CUDA tensors; CPU under ``TRITON_INTERPRET=1``).

    ``transforms``: ``"cuda"`` (the compiled extension), ``"torch"`` (reference math on the device) or
    None (the extension when it loads, else torch). Pairs are grouped by rank; within a rank group each
    parameter dtype gets its own Gram and rescale launch. ``k_chunk`` (tests) overrides the rows per tile;
    ``fp32_gram`` (tests, benchmark) how float32 factors' Grams are computed (:data:`FP32_GRAM_METHODS`) and
    ``rescale`` the rescale method, both for the Triton kernels; ``kernels`` (:data:`KERNELS`) whether ranks up
    to 16 take the CUDA Gram and rescale (``plan.kernels``: rank -> what its Gram and rescale took;
    ``plan.kernels_why``).
    ``cuda_graph``: replay the projection from a CUDA graph (see :meth:`run`); None (default) does when the
    pairs are on CUDA and the extension loaded, unless ``BALORA_KERNELS_CUDA_GRAPH=0``. The plan's tables
    hold the parameters' addresses either way: re-allocated parameters need a new plan (``is_stale``;
    :class:`~balora_kernels.BalancedProjector` checks before every projection).
    """

    backend = "triton"

    def __init__(self, pairs: Sequence[Pair], transforms: Optional[str] = None, k_chunk: Optional[int] = None,
                 fp32_gram: str = "auto", cuda_graph: Optional[bool] = None, tune: Optional[Dict[str, int]] = None,
                 rescale: str = "auto", kernels: str = "auto"):
        self.pairs = list(pairs)
        reason = supports(self.pairs)
        if reason is not None:
            raise ValueError(f"TritonProjectionPlan: {reason}")
        self.device = self.pairs[0][0].device if self.pairs else torch.device("cpu")
        if transforms is None:
            from .. import _ext
            transforms = "cuda" if (self.device.type == "cuda" and _ext.load() is not None) else "torch"
        if transforms not in ("cuda", "torch"):
            raise ValueError(f"TritonProjectionPlan: transforms must be 'cuda' or 'torch', got {transforms!r}")
        bad = sorted(set(tune or {}) - set(TUNE_KEYS))
        if bad:
            raise ValueError(f"TritonProjectionPlan: unknown tune keys {bad}; expected some of {TUNE_KEYS}")
        if fp32_gram not in FP32_GRAM_METHODS:
            raise ValueError(f"TritonProjectionPlan: fp32_gram must be one of {FP32_GRAM_METHODS}, got {fp32_gram!r}")
        if rescale not in RESCALE_METHODS:
            raise ValueError(f"TritonProjectionPlan: rescale must be one of {RESCALE_METHODS}, got {rescale!r}")
        if kernels not in KERNELS:
            raise ValueError(f"TritonProjectionPlan: kernels must be one of {KERNELS}, got {kernels!r}")
        self.transforms = transforms
        by_rank: Dict[int, List[int]] = {}
        for i, (A, _) in enumerate(self.pairs):
            by_rank.setdefault(int(A.shape[0]), []).append(i)
        cuda_ok, self.kernels_why = self._cuda_kernels_available(kernels)
        self.groups, first = [], 0
        from .. import _ext
        for r, ids in by_rank.items():
            fp32 = all(t.dtype == torch.float32 for i in ids for t in self.pairs[i])
            in_range = cuda_ok and r <= _ext.grouped_max_rank(fp32)   # (kernels="cuda": cuda_ok, or raised above)
            if kernels == "cuda" and not in_range:
                raise ValueError(f"TritonProjectionPlan: kernels='cuda' takes ranks up to {_ext.GROUPED_MAX_RANK} "
                                 f"({_ext.grouped_max_rank(True)} for float32 factors), got pairs of rank {r}"
                                 f"{'' if fp32 else ' with 16-bit factors'}")
            k = ("cuda" if in_range and (fp32 or kernels == "cuda") else "triton", "cuda" if in_range else "triton")
            self.groups.append(_RankGroup(r, ids, self.pairs, first, self.device, k_chunk, fp32_gram, tune, rescale, k))
            first += len(ids)
        # rank -> {"gram": ..., "rescale": ...}, each "cuda" or "triton": the kernels of that rank group
        self.kernels = {g.r: {"gram": g.gram_kernel, "rescale": g.rescale_kernel} for g in self.groups}
        rxr = "cuda-ext" if transforms == "cuda" else "torch-eigh"
        ks = {k for g in self.groups for k in (g.gram_kernel, g.rescale_kernel)}
        self.backend = ("triton+" if ks != {"cuda"} else "") + ("cuda-grouped+" if "cuda" in ks else "") + rxr
        self.n_pairs = first
        self._signature = _signature(self.pairs)
        if cuda_graph not in (None, True, False):
            raise ValueError(f"TritonProjectionPlan: cuda_graph must be None, True or False, got {cuda_graph!r}")
        graphs_possible = self.device.type == "cuda" and self.transforms == "cuda"
        if cuda_graph is None:
            cuda_graph = graphs_possible and os.environ.get("BALORA_KERNELS_CUDA_GRAPH", "1") not in ("", "0")
        if cuda_graph and not graphs_possible:
            raise ValueError("TritonProjectionPlan: cuda_graph=True needs CUDA pairs and the compiled extension "
                             f"(transforms={self.transforms!r}, device {self.device})")
        self.cuda_graph = bool(cuda_graph)
        self._graphs: Dict[str, tuple] = {}     # mode -> (CUDAGraph, packed stats buffer it writes)
        self._warm: set = set()                 # modes run once eagerly (kernels compiled)
        # the stats branch of a captured projection (see _run_kernels); made here, not during a capture
        self._side_stream = torch.cuda.Stream(self.device) if graphs_possible else None

    def _cuda_kernels_available(self, kernels: str) -> Tuple[bool, str]:
        """(whether rank groups up to _ext.grouped_max_rank take the CUDA Gram / rescale, why); raises when
        ``kernels="cuda"`` cannot be honoured."""
        from .. import _ext
        if kernels == "triton":
            return False, "kernels='triton' requested"
        if self.device.type != "cuda":
            why = f"{self.device.type} tensors"
        elif self.transforms != "cuda":
            why = "the r x r step runs in torch (no extension): Gram and rescale in Triton"
        elif not _ext.grouped_available():
            why = f"the extension has no grouped_gram/grouped_rescale ({_ext.how()})"
        else:
            fp32_max = _ext.grouped_max_rank(True)
            above = (f"tensor cores above {_ext.GROUPED_MAX_RANK}" if fp32_max > _ext.GROUPED_MAX_RANK else
                     f"the loaded extension predates the tensor-core kernels of higher ranks: {_ext.how()}")
            return True, (f"CUDA Gram and rescale for float32 factors of ranks <= {fp32_max} ({above}), CUDA rescale "
                          f"{'and Gram (requested) ' if kernels == 'cuda' else ''}for 16-bit ones of ranks <= "
                          f"{_ext.GROUPED_MAX_RANK}; Triton otherwise")
        if kernels == "cuda":
            raise ValueError(f"TritonProjectionPlan: kernels='cuda' is unavailable: {why}")
        return False, why

    def is_stale(self) -> bool:
        """True when any parameter was re-allocated or changed shape, strides, dtype or device.

        Checks every pair's ``data_ptr``, shape, strides, dtype and device against the tables (a Python
        loop over the pairs; no device work). In-place updates (optimizer steps) keep a plan valid.
        """
        return _signature(self.pairs) != self._signature

    # ---- steps (also used by the benchmark's per-kernel timings) ----
    def gram(self) -> None:
        """Grams of every pair into ``group.grams`` [P, 2, R, R] (fp32, deterministic)."""
        for g in self.groups:
            if g.gram_kernel == "cuda":
                from .. import _ext
                for lg in g.launches:
                    _ext.grouped_gram(lg.tiles, lg.n_b, lg.n_a, g.r, _DTYPE_CODES[lg.dtype], g.partials, g.ranges,
                                      g.counters, g.grams)
                continue
            for lg in g.launches:
                t = lg.tune
                fp32 = lg.dtype == torch.float32
                fma = fp32 and g.fp32_gram == "fma"
                _gram_partial_kernel[(lg.gram_programs,)](
                    lg.tiles, g.partials, lg.n_b, lg.n_a, g.r,
                    DTYPE=_TL_DTYPES[lg.dtype], R=g.R, BLOCK_K=_fma_rows(g.RC) if fma else t["gram_block_k"],
                    PRECISION=g.gram_precision, NUM_PROGS=lg.gram_programs, FIELDS=TILE_FIELDS,
                    SPLIT=fp32 and g.fp32_gram == "fp16x3", FMA=fma, RC=g.RC if fma else g.R,
                    num_warps=4 if fma else t["gram_warps"], num_stages=t["gram_stages"])
            _gram_reduce_kernel[(2 * g.P,)](g.partials, g.ranges, g.grams, R=g.R)

    def transforms_(self, mode: str, status: torch.Tensor, gaps: torch.Tensor) -> None:
        """``T``, ``T^-1`` of every pair into ``group.tw``; per-pair status bits and gaps."""
        for g in self.groups:
            st, gp = status[g.first:g.first + g.P], gaps[g.first:g.first + g.P]
            if self.transforms == "cuda":
                from .. import _ext
                _ext.balance_transforms(g.grams, g.eps_f, g.r, MODE_CODES[mode], g.tw, st, gp)
            else:
                torch_transforms(g.grams, g.r, mode, g.tw, st, gp, g.eps_f)

    def rescale(self, status: torch.Tensor) -> None:
        """``B <- B T``, ``A <- T^-1 A`` in place for every pair whose status allows it."""
        for g in self.groups:
            st = status[g.first:g.first + g.P]
            if g.rescale_kernel == "cuda":
                from .. import _ext
                for lg in g.launches:
                    _ext.grouped_rescale(lg.tiles, lg.n_b, lg.n_a, g.r, _DTYPE_CODES[lg.dtype], g.tw, st,
                                         STATUS_NONFINITE | STATUS_ZERO)
                continue
            for lg in g.launches:
                t = lg.tune
                outer = lg.rescale_method == "outer"
                _rescale_kernel[(lg.rescale_programs,)](
                    lg.tiles, g.tw, st, lg.n_b, lg.n_a, g.r,
                    DTYPE=_TL_DTYPES[lg.dtype], R=g.R, BLOCK_K=t["rescale_block_k"], PRECISION=g.rescale_precision,
                    NUM_PROGS=lg.rescale_programs, FIELDS=TILE_FIELDS,
                    SKIP_BITS=STATUS_NONFINITE | STATUS_ZERO, OUTER=outer, RC=g.RC if outer else g.R,
                    TF32_PAIR=_tf32_pair_rescale(lg.dtype, g.rescale_precision),
                    num_warps=t["rescale_warps"], num_stages=t["rescale_stages"])

    def stats(self, status: torch.Tensor, gaps: torch.Tensor, packed: Optional[torch.Tensor] = None) -> ProjectionStats:
        """The counters of the pairs' status and gaps, reduced on the device into ``packed`` (7 float64)."""
        if packed is None:
            packed = torch.empty(7, dtype=torch.float64, device=self.device)
        _stats_kernel[(1,)](status, gaps, packed, self.n_pairs, BLOCK=256)
        return PackedProjectionStats(packed)

    @torch.no_grad()
    def run(self, mode: str = "nearest") -> ProjectionStats:
        """Balance every pair in place; returns device-side counters. No host sync, graph-capturable
        with the compiled extension (the torch.linalg fallback is not: it refuses a capture up front,
        before anything is recorded, so a failed capture never leaves the device's state broken).

        With ``cuda_graph`` (see the class), the first call of a mode runs the kernels (compiling them),
        the second captures them in a CUDA graph (one host synchronisation) and replays it, later calls
        replay it: one launch and one 7-number copy of the counters per call, whatever the number of
        groups. Inside a caller's own capture the kernels are recorded as usual."""
        if mode not in MODE_CODES:
            raise ValueError(f"mode must be one of {tuple(MODE_CODES)}, got {mode!r}")
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if self.transforms == "torch" and capturing:
            raise RuntimeError("TritonProjectionPlan: the torch.linalg fallback for the r x r step cannot be "
                               "captured in a CUDA graph (torch.linalg synchronises with the host); build the "
                               "extension (see balora_kernels.backend_info()) to capture the projection")
        if self.cuda_graph and not capturing and self.n_pairs:
            graph = self._graphs.get(mode)
            if graph is None and mode in self._warm:
                graph = self._graphs[mode] = self._capture(mode)
            if graph is not None:
                with torch.cuda.device(self.device):
                    graph[0].replay()
                    return PackedProjectionStats(graph[1].clone())
            self._warm.add(mode)
        return self._run_kernels(mode)

    def _capture(self, mode: str):
        """``(graph, packed stats buffer)``: :meth:`_run_kernels` recorded once (nothing runs until replay), or
        None when the capture fails: then a warning says why, and this plan launches its kernels one by one
        from now on (``cuda_graph`` becomes False). The capture is thread-local, so other threads' CUDA calls
        (data loaders, communication watchdogs) do not break it; like any ``torch.cuda.graph`` capture it
        synchronises the device and empties the allocator's cache once."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(self.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                packed = self._run_kernels(mode)._packed
        except Exception as e:  # noqa: BLE001  (any capture failure: launch eagerly instead, and say so)
            import warnings
            self.cuda_graph = False
            warnings.warn(f"TritonProjectionPlan: CUDA-graph capture failed ({type(e).__name__}: {e}); this plan "
                          "launches its kernels one by one from now on", RuntimeWarning, stacklevel=3)
            return None
        return graph, packed

    def _run_kernels(self, mode: str) -> ProjectionStats:
        status = torch.empty(self.n_pairs, dtype=torch.int32, device=self.device)
        gaps = torch.empty((self.n_pairs, 2), dtype=torch.float64, device=self.device)
        if self.n_pairs == 0:
            z = torch.zeros((), dtype=torch.int64, device=self.device)
            zf = torch.zeros((), dtype=torch.float64, device=self.device)
            return ProjectionStats(z, z, z, z, z, zf, zf)
        self.gram()
        self.transforms_(mode, status, gaps)
        side = self._side_stream
        if side is None or not torch.cuda.is_current_stream_capturing():
            self.rescale(status)
            return self.stats(status, gaps)
        # In a graph the counters (which need only status and gaps) are a branch beside the rescale: their
        # launch no longer follows it. (Eagerly, the extra stream switches would cost the host more than that.)
        main = torch.cuda.current_stream(self.device)
        packed = torch.empty(7, dtype=torch.float64, device=self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            stats = self.stats(status, gaps, packed)
        self.rescale(status)
        main.wait_stream(side)
        return stats


def torch_transforms(grams: torch.Tensor, r: int, mode: str, tw: torch.Tensor, status: torch.Tensor,
                     gaps: torch.Tensor, eps_f: torch.Tensor) -> None:
    """The fallback r x r step: :func:`reference.balancing_transforms` (float64) on the Grams' device.

    grams [P, 2, R, R] fp32 in (passed as float32, so the reference applies its float32-Gram rank
    threshold, as the CUDA kernel does); eps_f [P] fp64 each pair's factor rounding unit; tw [P, 2, R, R]
    fp32, status int32 [P], gaps fp64 [P, 2] out.
    """
    G = grams[:, :, :r, :r]
    t = reference.balancing_transforms(G[:, 0], G[:, 1], mode, eps_f=eps_f)
    tw.zero_()
    tw[:, 0, :r, :r] = t.T.to(torch.float32)
    tw[:, 1, :r, :r] = t.T_inv.to(torch.float32)
    skip = t.nonfinite | t.zero
    st = (t.nonfinite.to(torch.int32) * STATUS_NONFINITE + t.zero.to(torch.int32) * STATUS_ZERO
          + ((t.rank < r) & ~skip).to(torch.int32) * STATUS_RANK_DEFICIENT
          + torch.where(skip, 0, t.rank).to(torch.int32) * (1 << STATUS_RANK_SHIFT))
    status.copy_(st)
    gaps[:, 0] = t.gap_before
    gaps[:, 1] = t.gap_after
