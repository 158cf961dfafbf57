"""The LoRA linear op: ``y = x W^T + b + s ((x * m) A^T) B^T``, forward and backward kernels.

Notation (2-D; callers flatten leading dims): ``x`` [N, in], ``W`` = weight [out, in], ``b`` [out],
``A`` = lora_A [r, in], ``B`` = lora_B [out, r], ``s`` = scaling, ``m`` [N, in] the LoRA branch's
dropout mask already scaled by 1/(1-p) (or none), ``x_l = x * m``, ``u = x_l A^T`` [N, r],
``v = dy B`` [N, r].

Implementations (one is chosen per call and per direction by
:func:`balora_kernels.functional._lora_linear_impl`, from measurements in ``lora_linear_tuning.json``):

* ``"torch"``     — :mod:`balora_kernels.reference`'s math (the CPU path and the oracle);
* ``"cublas"``    — cuBLAS for the two big GEMMs, a Triton kernel for the rank-r term: ``s u B^T + b``
  (``s (v A) * m`` backward) is written by a Triton kernel into the output buffer and cuBLAS
  accumulates ``x W^T`` (``dy W``) into it with beta=1, so the big output is written once by the GEMM
  and never re-read by an elementwise pass;
* ``"cublas_mm"`` — every product one cuBLAS call (fewest launches): the big GEMM written with
  beta=0, the rank-r term added in place by a K=r GEMM (alpha=s); ``v``, ``dB``, ``dA`` by cuBLAS,
  the scaling as alpha (three launches forward, five backward without dropout);
* ``"triton"``    — one Triton GEMM per big product with the rank-r term folded into its accumulator
  (``[x, s u] [W, B]^T``: K grows by r), the output written once from the fp32 accumulator: on Hopper
  (and under the interpreter) ``_lora_gemm_tma_kernel``, every operand through a TMA descriptor, the
  rank-r step first; else, or with a dropout mask on dx's rank-r term, ``_lora_gemm_kernel``
  (:func:`tma_gemm_blocker` says why a product does not take the TMA kernel);
* ``"ext"`` / ``"ext_prefill"`` — the ``cublas_mm`` products issued from C++ with the autograd node in
  C++ (``csrc/lora_linear.cpp``, ``torch.ops.balora.lora_linear``): one Python -> C++ call per forward
  and none per backward, for when the host sets the pace (short sequences, small layers). ``ext``
  writes the big GEMM first and adds the rank-r term by a K=r GEMM; ``ext_prefill`` writes the rank-r
  term (and bias) first and lets the big GEMM accumulate onto it (beta=1);
* ``"ext_thin"`` — ``ext_prefill``'s order with the rank-r terms of y and dx on the tensor-core kernels
  of ``csrc/lora_thin.cu`` (each one launch that writes its output once), u too under dropout (its kernel
  reads the mask); the two big GEMMs, v, dB, dA (dW) and u without dropout stay on cuBLAS (faster there
  than the row kernel at every measured size). For CUDA bf16 / fp16 activations, 1 <= r <= 128 and up to 65535 x 64
  tokens (:func:`thin_kernels_apply` says whether a call runs them); other calls, and a backward with
  ``create_graph`` (the kernels are not differentiable), run ``ext_prefill``'s products;
* ``"ext_allthin"`` — ``ext_thin`` with dB and dA also on ``csrc/lora_thin.cu`` (one launch for both,
  each column strip's sum over the tokens inside one block, where ``ext_thin`` makes two cuBLAS calls —
  less host time, for few tokens): the two big GEMMs, v and u without dropout on cuBLAS. Same conditions;
* ``"triton_ext"`` — ``triton``'s forward (the fused GEMM, issued from Python) and ``ext_prefill``'s
  backward issued from C++ in one call (``torch.ops.balora.lora_linear_backward``): the fused forward's
  GPU time without the Python-issued backward's host time (its five launches), for long sequences;
* ``"ext_triton"`` — the C++ op's mode 4: ``ext_prefill``'s products with y and dx each by one launch of the TMA
  GEMM (``_lora_gemm_tma_kernel_fixed``, ``triton``'s kernel without value specialisation) issued from C++: Python
  compiles it once per dtype, rank block, GEMM config and direction and registers the loaded function
  (:func:`ext_gemm_kernels`), ``csrc/triton_gemm.cu`` encodes the tensor maps and launches it per call. Hopper, CUDA
  bf16 / fp16 (:func:`ext_gemm_blocker`); elsewhere, for dx under dropout and for operands a tensor map cannot
  address, ``ext_prefill``'s cuBLAS calls;
* ``"ext_triton_thin"`` — the C++ op's mode 5: ``ext_triton``'s two GEMMs with every rank-r product one launch of
  ``csrc/lora_thin.cu``'s kernels (u and v by the row kernel, dB and dA by ``ext_allthin``'s col kernel) where
  ``ext_triton`` makes four cuBLAS calls: slower on the GPU, but each cuBLAS call costs the host 15-50 us on the H200
  machine against ~5 for a launch, so for few tokens, where the host sets the pace. Under ``ext_thin``'s
  conditions (else ``ext_triton``'s products); dx under dropout as ``ext_allthin``.
The C++ ones (and ``triton_ext``) need the compiled extension (:mod:`balora_kernels._ext`); the dispatcher
offers them only when it loads. Under ``torch.compile`` (the custom ops below) their cuBLAS products are issued from
Python (``ext_thin``, ``ext_allthin``, ``ext_triton``, ``ext_triton_thin``: ``ext_prefill``'s).

The kernel paths ("cublas", "triton") form ``v`` and ``dB`` from one pass over ``dy`` (``_dyb_kernel``)
up to rank :data:`FUSED_DYB_MAX_RANK`, by two cuBLAS calls above it; ``u`` and ``dA`` by cuBLAS without
dropout, and with dropout by the Triton thin kernels below, which read the mask (so ``x * m`` is
never materialised).

Kernels (Triton; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):

* ``_xa_kernel``        u = x_l A^T, split over ``in`` when N alone does not fill the GPU;
* ``_dyb_kernel``       v = dy B and dB = s dy^T u from one read of ``dy`` (dB optional), over a grid of
  column chunks x row groups;
* ``_vx_kernel``        dA = s v^T x_l, split over N;
* ``_lora_gemm_kernel`` out = X Wt + s (P Q) * m + b; with ``HAS_BASE=False`` only the rank-r term;
* ``_lora_gemm_tma_kernel`` out = X Wt + s P Q + b through TMA descriptors (no mask); ``_lora_gemm_tma_kernel_fixed``
  the same kernel compiled for C++ launches;
* ``_sum_splits_kernel`` the fp32 partials of the split kernels, summed, scaled and cast once (one or two
  problems per launch).

Dropout: the mask is a tensor drawn by :func:`balora_kernels.functional.lora_linear` (0/1 in x's
dtype, with 1/(1-p) folded into ``s``; the op takes any mask values); the kernels read it where ``x_l``
is needed (``u``, ``dA``) and multiply the rank-r term of ``dx`` by it, so ``x_l`` is never
materialised. It is saved for backward.

Autograd: eagerly :class:`LoRALinearFunction` (lowest Python overhead: the dispatcher's cached
choice for both directions is looked up once, in forward); under ``torch.compile`` the
``torch.library`` ops ``balora_kernels::lora_linear_fwd`` / ``lora_linear_bwd`` with fake
implementations and registered autograd, so ``fullgraph=True`` traces without breaks. Both call the
same :func:`lora_linear_forward` / :func:`lora_linear_backward`.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import warnings
from typing import Optional, Tuple

import torch

from .. import reference

try:  # Triton is optional: without it only the "torch" and "cublas_mm" implementations exist.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
try:  # host-side TMA tensor descriptors (Triton >= 3.3); without them lora_gemm's pointer kernel runs
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older or no Triton
    TensorDescriptor = None

IMPLS = ("torch", "cublas_mm", "cublas", "triton", "ext", "ext_prefill", "ext_thin", "ext_allthin", "triton_ext",
         "ext_triton", "ext_triton_thin")
# The C++ implementations, and whether each writes the rank-r term first (csrc/lora_linear.cpp).
# name -> the C++ op's mode
EXT_IMPLS = {"ext": 0, "ext_prefill": 1, "ext_thin": 2, "ext_allthin": 3, "ext_triton": 4, "ext_triton_thin": 5}
# The modes that launch the Triton TMA GEMM registered by ext_gemm_kernels (the op's ``gemm`` argument).
EXT_GEMM_MODES = (4, 5)
# Implementations whose backward is the C++ op's products in a mode (torch.ops.balora.lora_linear_backward),
# their forward that of another implementation.
EXT_BACKWARD = {"triton_ext": 1}
_FORWARD_OF = {"triton_ext": "triton"}
# What needs the compiled extension; and what runs the Triton fused GEMM (its config measured per shape).
NEEDS_EXT = (*EXT_IMPLS, *EXT_BACKWARD)
GEMM_IMPLS = ("triton", "triton_ext", "ext_triton", "ext_triton_thin")
TUNING_FILE = os.path.join(os.path.dirname(__file__), "lora_linear_tuning.json")

# Triton GEMM configurations tried by bench/bench_lora_linear.py for the "triton" implementation
# (Hopper-sized tiles; the bench records the fastest index per shape in the tuning file).
# ``WS``: the TMA kernel's K loop warp-specialized (Triton's ``tl.range(warp_specialize=True)``: loads
# and products in separate warps); the pointer kernel has no such loop and ignores it.
GEMM_CONFIGS = (
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, WS=True),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, WS=True),
)
# Tiles of the rank-r-only kernel (memory-bound: writes the output once).
LOWRANK_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=1)


# ============================================================================================
# Triton kernels
# ============================================================================================
if triton is not None:

    @triton.jit
    def _xa_kernel(
        # pointers
        x_ptr, m_ptr, a_ptr, out_ptr,
        # sizes: x [N, K], A [R, K], out [S, N, R] (S = splits of K)
        N, K, R, k_per_split,
        # strides
        stride_xn, stride_xk, stride_mn, stride_mk, stride_ar, stride_ak,
        stride_os, stride_on, stride_or,
        # meta
        HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """out[s] = (x * m)[:, ks] A[:, ks]^T over the s-th slice ks of K, fp32 accumulation."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        rows = offs_n.to(tl.int64)
        row_ok = offs_n < N
        k_start = pid_s * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_MASK:
                mt = tl.load(m_ptr + rows[:, None] * stride_mn + offs_k[None, :] * stride_mk,
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                xt = (xt.to(tl.float32) * mt.to(tl.float32)).to(xt.dtype)
            at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                         mask=(offs_r[None, :] < R) & k_ok[:, None], other=0.0)      # [BLOCK_K, BLOCK_R]
            acc = tl.dot(xt, at.to(xt.dtype), acc, input_precision=DOT_PRECISION)
        o = out_ptr + pid_s * stride_os + rows[:, None] * stride_on + offs_r[None, :] * stride_or
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_r[None, :] < R))

    @triton.jit
    def _dyb_kernel(
        # pointers
        dy_ptr, b_ptr, u_ptr, v_ptr, db_ptr,
        # sizes: dy [N, M], B [M, R], u [N, R]; v out [C, N, R] (C = column chunks of BLOCK_M);
        # dB out [G, M, R] (G = row groups of n_per_group rows)
        N, M, R, n_per_group, scaling,
        # strides
        stride_dyn, stride_dym, stride_bm, stride_br, stride_un, stride_ur,
        stride_vs, stride_vn, stride_vr, stride_dbg, stride_dbm, stride_dbr,
        # meta
        WITH_DB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One read of dy's [group rows, BLOCK_M columns] block: per BLOCK_N rows, v's partial sum over
        the block's columns (stored as it is formed), and s * dy^T u summed over the group's rows
        (dB's partial, kept in registers, stored once)."""
        pid_c = tl.program_id(0)
        pid_g = tl.program_id(1)
        offs_m = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        m_ok = offs_m < M
        r_ok = offs_r < R
        bt = tl.load(b_ptr + offs_m[:, None].to(tl.int64) * stride_bm + offs_r[None, :] * stride_br,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(dy_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_R]
        db_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        n_start = pid_g * n_per_group
        n_end = tl.minimum(N, n_start + n_per_group)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rows = offs_n.to(tl.int64)
            n_ok = offs_n < n_end
            dyt = tl.load(dy_ptr + rows[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                          mask=n_ok[:, None] & m_ok[None, :], other=0.0)              # [BLOCK_N, BLOCK_M]
            vp = tl.dot(dyt, bt, input_precision=DOT_PRECISION)
            o = v_ptr + pid_c * stride_vs + rows[:, None] * stride_vn + offs_r[None, :] * stride_vr
            tl.store(o, vp.to(v_ptr.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])
            if WITH_DB:
                ut = tl.load(u_ptr + rows[:, None] * stride_un + offs_r[None, :] * stride_ur,
                             mask=n_ok[:, None] & r_ok[None, :], other=0.0)           # [BLOCK_N, BLOCK_R]
                db_acc = tl.dot(tl.trans(dyt), ut.to(dyt.dtype), db_acc, input_precision=DOT_PRECISION)
        if WITH_DB:
            d = db_ptr + pid_g * stride_dbg + offs_m[:, None] * stride_dbm + offs_r[None, :] * stride_dbr
            tl.store(d, (db_acc * scaling).to(db_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _vx_kernel(
        # pointers
        v_ptr, x_ptr, m_ptr, out_ptr,
        # sizes: v [N, R], x [N, K]; out [S, R, K] (S = splits of N)
        N, K, R, n_per_split, scaling,
        # strides
        stride_vn, stride_vr, stride_xn, stride_xk, stride_mn, stride_mk,
        stride_os, stride_or, stride_ok,
        # meta
        HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """out[s] = s * v[ns]^T (x * m)[ns] over the s-th slice ns of N, fp32 accumulation."""
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        k_ok = offs_k < K
        r_ok = offs_r < R
        n_start = pid_s * n_per_split
        n_end = tl.minimum(N, n_start + n_per_split)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rows = offs_n.to(tl.int64)
            n_ok = offs_n < n_end
            vt = tl.load(v_ptr + offs_r[:, None] * stride_vr + rows[None, :] * stride_vn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)               # [BLOCK_R, BLOCK_N]
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)               # [BLOCK_N, BLOCK_K]
            if HAS_MASK:
                mt = tl.load(m_ptr + rows[:, None] * stride_mn + offs_k[None, :] * stride_mk,
                             mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                xt = (xt.to(tl.float32) * mt.to(tl.float32)).to(xt.dtype)
            acc = tl.dot(vt.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)
        o = out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_k[None, :] * stride_ok
        tl.store(o, (acc * scaling).to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _tile_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column block) of this program: grouped order (GROUP_M row blocks share their
        column blocks while those stay in L2)."""
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_pid_m, GROUP_M)
        return first_pid_m + (pid % num_pid_in_group) % group_size_m, (pid % num_pid_in_group) // group_size_m

    @triton.jit
    def _lora_gemm_kernel(
        # pointers
        x_ptr, w_ptr, p_ptr, q_ptr, m_ptr, bias_ptr, out_ptr,
        # sizes: out [M, N] = x [M, K] @ w [K, N] + s * (p [M, R] @ q [R, N]) * m [M, N] + bias [N]
        M, N, K, R, scaling,
        # strides
        stride_xm, stride_xk, stride_wk, stride_wn, stride_pm, stride_pr, stride_qr, stride_qn,
        stride_mm, stride_mn, stride_om, stride_on,
        # meta
        HAS_BASE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One output tile, accumulated in fp32 and written once (grouped tile order for L2 reuse)."""
        pid_m, pid_n = _tile_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        # Loads wrap around (always in bounds, no row/column masks in the main loop); stores are masked.
        rm = (offs_m % M).to(tl.int64)
        rn = (offs_n % N).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_BASE:
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                             mask=offs_k[None, :] < K, other=0.0)
                wt = tl.load(w_ptr + offs_k[:, None] * stride_wk + rn[None, :] * stride_wn,
                             mask=offs_k[:, None] < K, other=0.0)
                acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        pt = tl.load(p_ptr + rm[:, None] * stride_pm + offs_r[None, :] * stride_pr,
                     mask=offs_r[None, :] < R, other=0.0)                               # [BLOCK_M, BLOCK_R]
        qt = tl.load(q_ptr + offs_r[:, None] * stride_qr + rn[None, :] * stride_qn,
                     mask=offs_r[:, None] < R, other=0.0).to(pt.dtype)                  # [BLOCK_R, BLOCK_N]
        out_ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_MASK:
            lora = tl.dot(pt, qt, input_precision=DOT_PRECISION)
            mt = tl.load(m_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn,
                         mask=out_ok, other=0.0)
            acc += (scaling * lora) * mt.to(tl.float32)
        else:
            # The concatenation [x, s p] [w; q]: one more K-step of width R into the same accumulator.
            ps = (pt.to(tl.float32) * scaling).to(pt.dtype)
            acc = tl.dot(ps, qt, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        o = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=out_ok)

    def _lora_gemm_tma_body(
        x_desc, w_desc, p_desc, q_desc, out_desc, bias_ptr, M, N, K, scaling,
        W_KN: tl.constexpr, Q_KN: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        WS: tl.constexpr,
    ):
        """``_lora_gemm_kernel``'s product without a dropout mask, every operand through a TMA tensor
        descriptor (tiles past the edges read as zeros, stores clipped): the weight is ``w`` [K, N]
        (``W_KN``) or ``w`` [N, K] read transposed, ``q`` likewise [R, N] or [N, R]. The rank-r K-step
        runs first and starts the accumulator (measured on the H200: the same step after the K loop,
        as ``_lora_gemm_kernel`` does it, cost 18-27% of the GEMM in this kernel; first, 0-4%)."""
        pid_m, pid_n = _tile_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        pt = p_desc.load([off_m, 0])
        ps = (pt.to(tl.float32) * scaling).to(pt.dtype)
        if Q_KN:
            qt = q_desc.load([0, off_n])
        else:
            qt = q_desc.load([off_n, 0]).T
        acc = tl.dot(ps, qt)
        for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WS):
            xt = x_desc.load([off_m, k0])
            if W_KN:
                wt = w_desc.load([k0, off_n])
            else:
                wt = w_desc.load([off_n, k0]).T
            acc = tl.dot(xt, wt, acc)
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))

    _lora_gemm_tma_kernel = triton.jit(_lora_gemm_tma_body)
    # The same kernel for launches from C++ (the op's ext_triton mode, :func:`ext_gemm_kernels`): one compiled
    # binary per config must serve every call, so the sizes and the bias pointer are not specialised on their
    # values (Triton otherwise compiles M == 1 away as a constant and assumes the divisibility it saw).
    _lora_gemm_tma_kernel_fixed = triton.jit(do_not_specialize=["bias_ptr", "M", "N", "K"])(_lora_gemm_tma_body)

    @triton.jit
    def _sum_splits_block(part_ptr, out_ptr, S, numel, scaling, blk, BLOCK: tl.constexpr):
        offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, S):
            acc += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, (acc * scaling).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _sum_splits_kernel(part0_ptr, out0_ptr, S0, numel0, scaling0, blocks0,
                           part1_ptr, out1_ptr, S1, numel1, scaling1, BLOCK: tl.constexpr):
        """out_k[i] = scaling_k * sum_s part_k[s, i] (part_k fp32 contiguous [S_k, numel_k], out_k
        contiguous) for one or two problems in one launch: programs below ``blocks0`` sum problem 0, the
        rest problem 1 (a one-problem launch has no program past ``blocks0``)."""
        pid = tl.program_id(0)
        if pid < blocks0:
            _sum_splits_block(part0_ptr, out0_ptr, S0, numel0, scaling0, pid, BLOCK)
        else:
            _sum_splits_block(part1_ptr, out1_ptr, S1, numel1, scaling1, pid - blocks0, BLOCK)


# ============================================================================================
# Launchers (2-D operands; any strides; outputs may be passed in, e.g. poisoned by tests)
# ============================================================================================
def _need_triton(what: str):
    if triton is None:
        raise RuntimeError(f"{what}: Triton is not installed; use BALORA_KERNELS_IMPL=torch")


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _dot_precision(dtype) -> str:
    """fp32 products use TF32 only when torch allows it for matmuls (torch's own rule)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_PROPS: dict = {}


def _cuda_props(device):
    """The CUDA device's properties, queried once (a query per launch costs microseconds of host time)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PROPS:
        _PROPS[idx] = torch.cuda.get_device_properties(idx)
    return _PROPS[idx]


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the split paths run in CPU tests too
    return _cuda_props(device).multi_processor_count


def _mask_args(mask):
    return (mask, mask.stride(0), mask.stride(1)) if mask is not None else (None, 0, 0)


def _reduce_splits(*problems) -> None:
    """For each ``(part, out, scaling)`` of one or two problems, in one launch: out = scaling *
    part.sum(0), summed in float32 in split order and cast once (part fp32 [S, ...], out contiguous)."""
    if not 1 <= len(problems) <= 2:
        raise ValueError(f"lora_linear: one or two partial-sum problems per launch, got {len(problems)}")
    for _, o, _ in problems:
        if not o.is_contiguous():
            raise ValueError(f"lora_linear: split outputs must be contiguous, got strides {o.stride()}")
    BLOCK = 1024
    (p0, o0, s0), (p1, o1, s1) = problems[0], problems[-1]   # (one problem: the second slot is never read)
    blocks0 = triton.cdiv(o0.numel(), BLOCK)
    blocks1 = triton.cdiv(o1.numel(), BLOCK) if len(problems) == 2 else 0
    _sum_splits_kernel[(blocks0 + blocks1,)](
        p0, o0, p0.shape[0], o0.numel(), s0, blocks0, p1, o1, p1.shape[0], o1.numel(), s1, BLOCK=BLOCK)


def xa_forward(x, lora_A, mask=None, splits: Optional[int] = None, out=None, block_n: int = 64):
    """``u = (x * mask) A^T`` [N, r] in x's dtype, fp32 accumulation. x [N, in], lora_A [r, in].

    ``splits`` of ``in`` (default: enough programs to fill the GPU); ``out`` [N, r] may be given;
    ``block_n`` rows per program (tests make it small to run several blocks on tiny shapes)."""
    _need_triton("xa_forward")
    N, K = x.shape
    R = lora_A.shape[0]
    BLOCK_N, BLOCK_K, BLOCK_R = block_n, 128 if R <= 32 else 64, _block_r(R)
    row_blocks = triton.cdiv(N, BLOCK_N)
    if splits is None:
        splits = max(1, min(triton.cdiv(K, 4 * BLOCK_K), (2 * _sm_count(x.device)) // row_blocks))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(K, k_per_split)
    if out is None:
        out = torch.empty(N, R, device=x.device, dtype=x.dtype)
    dst = out if splits == 1 else torch.empty(splits, N, R, device=x.device, dtype=torch.float32)
    dst_strides = (0, out.stride(0), out.stride(1)) if splits == 1 else dst.stride()
    m, smn, smk = _mask_args(mask)
    _xa_kernel[(row_blocks, splits)](
        x, m, lora_A, dst, N, K, R, k_per_split,
        x.stride(0), x.stride(1), smn, smk, lora_A.stride(0), lora_A.stride(1), *dst_strides,
        HAS_MASK=mask is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=4, num_stages=3)
    if splits > 1:
        _reduce_splits((dst, out, 1.0))
    return out


def _dyb_block_m(M: int, R: int) -> int:
    """dy columns per program of _dyb_kernel (the thin sweep's best: 256 up to r = 64)."""
    return min(max(16, triton.next_power_of_2(M)), 256 if R <= 64 else 128)


def dyb_backward(dy, lora_B, u, scaling: float, with_dB: bool = True, groups: Optional[int] = None,
                 out_v=None, out_dB=None, block_n: Optional[int] = None, block_m: Optional[int] = None):
    """``v = dy B`` [N, r] (dy's dtype) and, when ``with_dB``, ``dB = s dy^T u`` [out, r] (B's dtype)
    from one read of dy. The grid is (column chunks of ``block_m``) x (row ``groups``, default enough
    programs for one wave on the GPU); each program reads its block of dy once, in steps of ``block_n``
    rows. v's partial sums over the column chunks and dB's over the row groups are fp32 and summed
    in a fixed order by :func:`_reduce_splits` (deterministic; chunks and groups of one skip that)."""
    _need_triton("dyb_backward")
    N, M = dy.shape
    R = lora_B.shape[1]
    if N == 0 or M == 0:   # nothing to read: v and dB are zero sums
        v = torch.zeros(N, R, device=dy.device, dtype=dy.dtype) if out_v is None else out_v.zero_()
        dB = (torch.zeros(M, R, device=dy.device, dtype=lora_B.dtype) if out_dB is None else out_dB.zero_()) \
            if with_dB else None
        return v, dB
    BLOCK_R = _block_r(R)
    BLOCK_N = block_n or 64
    BLOCK_M = block_m or _dyb_block_m(M, R)
    chunks = triton.cdiv(M, BLOCK_M)
    if groups is None:   # one wave: (8192 x 4096, r 16, H200) 8 groups 32 us, 16 groups 38 us
        groups = max(1, min(triton.cdiv(N, 4 * BLOCK_N), _sm_count(dy.device) // chunks))
    n_per_group = triton.cdiv(triton.cdiv(N, groups), BLOCK_N) * BLOCK_N
    groups = triton.cdiv(N, n_per_group)
    if not dyb_fits(N, M, R, chunks, groups):
        raise ValueError(f"dyb_backward: dy {tuple(dy.shape)}, r={R}: its fp32 partial sums ({chunks} x {N} x "
                         f"{BLOCK_R} and {groups} x {M} x {BLOCK_R}) need offsets past 2^31 elements; use two cuBLAS "
                         f"products (lora_linear_backward does)")
    if out_v is None:
        out_v = torch.empty(N, R, device=dy.device, dtype=dy.dtype)
    v_dst = out_v if chunks == 1 else torch.empty(chunks, N, R, device=dy.device, dtype=torch.float32)
    v_strides = (0, out_v.stride(0), out_v.stride(1)) if chunks == 1 else v_dst.stride()
    db_dst, db_strides = None, (0, 0, 0)
    if with_dB:
        if out_dB is None:
            out_dB = torch.empty(M, R, device=dy.device, dtype=lora_B.dtype)
        db_dst = out_dB if groups == 1 else torch.empty(groups, M, R, device=dy.device, dtype=torch.float32)
        db_strides = (0, out_dB.stride(0), out_dB.stride(1)) if groups == 1 else db_dst.stride()
    _dyb_kernel[(chunks, groups)](
        dy, lora_B, u, v_dst, db_dst, N, M, R, n_per_group, scaling,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1),
        *v_strides, *db_strides,
        WITH_DB=with_dB, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R,
        DOT_PRECISION=_dot_precision(dy.dtype), num_warps=8 if BLOCK_M * BLOCK_R >= 4096 else 4,
        num_stages=3)
    # v's partials over the column chunks and dB's (scaled in the kernel) over the row groups: one launch
    sums = ([(v_dst, out_v, 1.0)] if chunks > 1 else []) + ([(db_dst, out_dB, 1.0)] if with_dB and groups > 1 else [])
    if sums:
        _reduce_splits(*sums)
    return out_v, (out_dB if with_dB else None)


def dyb_fits(N: int, M: int, R: int, chunks: Optional[int] = None, groups: int = 1) -> bool:
    """Whether :func:`dyb_backward`'s partial-sum buffers stay within 32-bit element offsets (the
    kernel's program-index offsets are 32-bit); ``chunks`` defaults to its own column chunks."""
    if chunks is None:
        chunks = triton.cdiv(M, _dyb_block_m(M, R))
    return max(chunks * N, groups * M, N, M) * max(R, 16) < 2 ** 31


def vx_backward(v, x, scaling: float, mask=None, out_dtype=None, splits: Optional[int] = None, out=None,
                block_k: Optional[int] = None):
    """``dA = s v^T (x * mask)`` [r, in] in ``out_dtype`` (default x's), fp32 accumulation.

    v [N, r], x [N, in]; ``splits`` of N (default: fill the GPU); ``block_k`` columns per program."""
    _need_triton("vx_backward")
    N, K = x.shape
    R = v.shape[1]
    BLOCK_N, BLOCK_K, BLOCK_R = 64, block_k or (128 if R <= 64 else 64), _block_r(R)
    col_blocks = triton.cdiv(K, BLOCK_K)
    if splits is None:
        splits = max(1, min(triton.cdiv(N, 4 * BLOCK_N), triton.cdiv(2 * _sm_count(x.device), col_blocks)))
    n_per_split = triton.cdiv(triton.cdiv(N, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(N, n_per_split)
    if out is None:
        out = torch.empty(R, K, device=x.device, dtype=out_dtype or x.dtype)
    dst = out if splits == 1 else torch.empty(splits, R, K, device=x.device, dtype=torch.float32)
    dst_strides = (0, out.stride(0), out.stride(1)) if splits == 1 else dst.stride()
    m, smn, smk = _mask_args(mask)
    _vx_kernel[(col_blocks, splits)](
        v, x, m, dst, N, K, R, n_per_split, scaling if splits == 1 else 1.0,
        v.stride(0), v.stride(1), x.stride(0), x.stride(1), smn, smk, *dst_strides,
        HAS_MASK=mask is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=4, num_stages=3)
    if splits > 1:
        _reduce_splits((dst, out, scaling))
    return out


def lora_gemm(x, wt, p, q, scaling: float, mask=None, bias=None, out=None, out_dtype=None,
              config=0, tma: Optional[bool] = None):
    """``out = x @ wt + s (p @ q) * mask + bias`` [M, N], fp32 accumulation, written once.

    x [M, K] or None (then only the rank-r term, plus bias), wt [K, N] (any strides, e.g.
    ``weight.T``), p [M, r] (its dtype is the product dtype), q [r, N] (cast to p's dtype),
    mask [M, N] or None, bias [N] or None. ``config`` indexes :data:`GEMM_CONFIGS` (or is a dict
    of the same keys; tests use small tiles). ``tma``: run ``_lora_gemm_tma_kernel`` (True: or
    raise why it cannot), ``_lora_gemm_kernel`` (False), or None: the TMA kernel wherever
    :func:`tma_gemm_blocker` finds nothing against it.
    """
    _need_triton("lora_gemm")
    M, R = p.shape
    N = q.shape[1]
    has_base = x is not None
    K = x.shape[1] if has_base else 0
    if isinstance(config, dict):
        cfg = dict(config)
    else:
        cfg = dict(GEMM_CONFIGS[config] if has_base else LOWRANK_CONFIG)
    if out is None:
        out = torch.empty(M, N, device=p.device, dtype=out_dtype or p.dtype)
    if tma is not False:
        why = tma_gemm_blocker(x, wt, p, q, mask, out)
        if why is None:
            return _lora_gemm_tma(x, wt, p, q, scaling, bias, out, cfg)
        if tma:
            raise ValueError(f"lora_gemm: the TMA kernel cannot run this product: {why}")
    BM, BN = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    BK = cfg.pop("BLOCK_K", 16)
    cfg.pop("WS", None)
    BR = _block_r(R)
    # Fewer pipeline stages when the rank-r operands would push shared memory past Hopper's 227 KB.
    while has_base and cfg["num_stages"] > 2 and \
            (cfg["num_stages"] * (BM * BK + BK * BN) + BM * BR + BR * BN) * p.element_size() > 200 * 1024:
        cfg["num_stages"] -= 1
    m, smm, smn = _mask_args(mask)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _lora_gemm_kernel[grid](
        x, wt, p, q, m, bias, out, M, N, K, R, scaling,
        x.stride(0) if has_base else 0, x.stride(1) if has_base else 0,
        wt.stride(0) if has_base else 0, wt.stride(1) if has_base else 0,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), smm, smn, out.stride(0), out.stride(1),
        HAS_BASE=has_base, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=BR,
        DOT_PRECISION=_dot_precision(p.dtype), **cfg)
    return out


def _tma_capable(device) -> bool:
    """TMA tensor descriptors run here: a Hopper or newer GPU (compute capability >= 9), or the
    interpreter on the CPU; and this Triton has them (>= 3.3)."""
    if TensorDescriptor is None:
        return False
    if device.type != "cuda":
        return os.environ.get("TRITON_INTERPRET", "") == "1"
    return _cuda_props(device).major >= 9


def _tma_operand(t: torch.Tensor) -> bool:
    """A 2-D tensor a descriptor can address as it is: unit stride along its last dim, rows that do
    not overlap, 16-byte aligned start and row stride (the tensor-map rules)."""
    return (t.stride(1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])   # rows apart (not expanded)
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def _row_major(t: torch.Tensor):
    """``(tensor, transposed)``: ``t`` or ``t.T`` as a descriptor-ready 2-D tensor, or ``(None, _)``."""
    if _tma_operand(t):
        return t, False
    if _tma_operand(t.T):
        return t.T, True
    return None, False


def tma_gemm_blocker(x, wt, p, q, mask, out) -> Optional[str]:
    """Why :func:`lora_gemm` cannot take its TMA kernel for these operands, or None when it can.
    The rank-r operands p and q never block it (they are copied into descriptor-ready form when
    they are not, at most [M, 128] and [128, N] elements)."""
    if x is None:
        return "no base product (the rank-r-only kernel is pointer-based)"
    if mask is not None:
        return "a dropout mask multiplies the rank-r term (the pointer-based kernel applies it)"
    if p.dtype not in (torch.float16, torch.bfloat16) or x.dtype != p.dtype or wt.dtype != p.dtype \
            or out.dtype != p.dtype:
        return f"dtypes x {x.dtype}, weight {wt.dtype}, p {p.dtype}, out {out.dtype}: it takes one of fp16 / bf16"
    if not _tma_capable(x.device):
        return "no TMA here (needs compute capability >= 9 and Triton >= 3.3, or the interpreter)"
    if min(x.shape[0], x.shape[1], wt.shape[1]) == 0:
        return "an empty dimension"
    for name, t in (("x", x), ("out", out)):
        if not _tma_operand(t):
            return f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) is not row-major with 16-byte " \
                   f"aligned rows"
    if _row_major(wt)[0] is None:
        return f"the weight (shape {tuple(wt.shape)}, strides {wt.stride()}) has no unit stride with 16-byte " \
               f"aligned rows"
    return None


def _padded(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t`` [n, r] copied into a fresh row-major [n, cols] tensor, zeros past column r (a fresh
    allocation: aligned, whatever ``t``'s strides or offset were)."""
    out = t.new_zeros(t.shape[0], cols)
    out[:, :t.shape[1]] = t
    return out


# Pipeline stages that compiled for a (config, rank block, dtype, device) of the TMA kernel: fewer than
# the config asks when its tiles and the rank-r operands outgrow the GPU's shared memory.
_TMA_STAGES: dict = {}


def _fewer_stages(run, stages: int):
    """``(run(stages), stages)``, with one pipeline stage fewer each time Triton finds the kernel outgrows the GPU's
    shared memory (OutOfResources), down to one."""
    while True:
        try:
            return run(stages), stages
        except triton.runtime.errors.OutOfResources:
            if stages <= 1:
                raise
            stages -= 1


def _lora_gemm_tma(x, wt, p, q, scaling: float, bias, out, cfg: dict):
    M, K = x.shape
    N = out.shape[1]
    R = p.shape[1]
    BM, BN, BK, BR = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], _block_r(R)
    w, w_t = _row_major(wt)
    # The rank-r operands as descriptor-ready tensors in the product dtype (fp32 adapters cast once:
    # their tile would take twice the shared memory), padded to BR ranks when their rows are not
    # 16-byte aligned (the padding reads as zeros, as the descriptor's out-of-bounds fill does).
    q = _as(q, p.dtype)
    if not _tma_operand(p):
        p = _padded(p, BR)
    qm, q_t = _row_major(q)
    if qm is None:
        qm, q_t = _padded(q.T, BR), True
    x_desc = TensorDescriptor.from_tensor(x, [BM, BK])
    w_desc = TensorDescriptor.from_tensor(w, [BN, BK] if w_t else [BK, BN])
    p_desc = TensorDescriptor.from_tensor(p, [BM, BR])
    q_desc = TensorDescriptor.from_tensor(qm, [BN, BR] if q_t else [BR, BN])
    out_desc = TensorDescriptor.from_tensor(out, [BM, BN])
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    key = (BM, BN, BK, cfg["num_stages"], cfg.get("WS", False), BR, p.dtype, x.device)

    def launch(stages):
        _lora_gemm_tma_kernel[grid](
            x_desc, w_desc, p_desc, q_desc, out_desc, bias, M, N, K, scaling,
            W_KN=not w_t, Q_KN=not q_t, HAS_BIAS=bias is not None,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=cfg["GROUP_M"], WS=cfg.get("WS", False),
            num_warps=cfg["num_warps"], num_stages=stages)
    _, _TMA_STAGES[key] = _fewer_stages(launch, _TMA_STAGES.get(key, cfg["num_stages"]))
    return out


# --------------------------------------------------------------------------------------------
# The TMA GEMM launched from C++ (the op's modes 4 and 5, "ext_triton" / "ext_triton_thin"; csrc/triton_gemm.h)
# --------------------------------------------------------------------------------------------
# Parameter codes of csrc/triton_gemm.h.
_TG_MAP, _TG_DIM, _TG_STRIDE = 0x00, 0x10, 0x20
_TG_BIAS, _TG_M, _TG_N, _TG_K, _TG_SCALING, _TG_NULL = 0x30, 0x31, 0x32, 0x33, 0x34, 0x35
_TG_KIND = {_TG_BIAS: "ptr", _TG_NULL: "ptr", _TG_M: "b32", _TG_N: "b32", _TG_K: "b32", _TG_SCALING: "f32"}


def _tg_kind(code: int) -> str:
    if code < _TG_DIM:
        return "map"
    if code < _TG_STRIDE:
        return "b32"
    if code < _TG_BIAS:
        return "b64"
    return _TG_KIND[code]


def ptx_params(ptx: str) -> list:
    """The kinds of the parameters of the (one) kernel entry in ``ptx``, in order: 'map' (a 128-byte
    by-value tensor map), 'ptr' (a global pointer), 'b32' / 'b64' (integers) or 'f32'."""
    m = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ValueError("no .entry in the PTX")
    kinds = []
    for p in m.group(1).split(","):
        p = " ".join(p.split())
        if ".b8" in p and p.endswith("[128]"):
            kinds.append("map")
        elif ".ptr" in p:
            kinds.append("ptr")
        elif re.search(r"\.[usb]32\b", p):
            kinds.append("b32")
        elif re.search(r"\.[usb]64\b", p):
            kinds.append("b64")
        elif ".f32" in p:
            kinds.append("f32")
        else:
            raise ValueError(f"unexpected kernel parameter {p!r}")
    return kinds


def tg_param_codes(ptx: str, has_bias: bool, scratch_free: bool) -> list:
    """The parameter codes the C++ launch packs for the TMA GEMM compiled to ``ptx``: per descriptor (x, w,
    p, q, out) its tensor map, shape and strides (as Triton's launcher expands a host descriptor), the bias
    pointer (with a bias), M, N, K, the scaling, and a null pointer for each trailing pointer (Triton's scratch
    buffers, only when the kernel asks none: ``scratch_free``). Raises ValueError when the entry's parameters
    are not these (another Triton's convention: the C++ launch is not offered then)."""
    codes = []
    for i in range(5):
        codes += [_TG_MAP + i, _TG_DIM + 2 * i, _TG_DIM + 2 * i + 1, _TG_STRIDE + 2 * i, _TG_STRIDE + 2 * i + 1]
    codes += ([_TG_BIAS] if has_bias else []) + [_TG_M, _TG_N, _TG_K, _TG_SCALING]
    kinds = ptx_params(ptx)
    want = [_tg_kind(c) for c in codes]
    extra = kinds[len(want):]
    if kinds[:len(want)] != want or any(k != "ptr" for k in extra) or (extra and not scratch_free):
        raise ValueError(f"the compiled TMA GEMM's parameters {kinds} are not {want} + null scratch pointers")
    return codes + [_TG_NULL] * len(extra)


# (dtype, device, rank, forward config, backward config) -> [forward, forward with bias, backward]
# kernel ids registered with the C++ op (each kernel once: _EXT_GEMM_ONE, by dtype, device, rank block, config,
# direction and bias), or [] where the compilation or its check failed (the reason in _EXT_GEMM_ERRORS, warned once);
# the compiled kernels are kept alive in _EXT_GEMM_KEEP (Triton unloads a kernel's module with it).
_EXT_GEMM: dict = {}
_EXT_GEMM_ONE: dict = {}
_EXT_GEMM_ERRORS: dict = {}
_EXT_GEMM_KEEP: list = []
_EXT_GEMM_LOCK = threading.Lock()


def ext_gemm_blocker(dtype, device) -> Optional[str]:
    """Why ``ext_triton`` / ``ext_triton_thin`` cannot launch the Triton GEMM for activations of ``dtype`` on
    ``device`` (they then run cuBLAS for the big products: ``ext_prefill``'s calls, ``ext_triton_thin``'s thin
    kernels beside them), or None when they can."""
    if triton is None or TensorDescriptor is None:
        return "no Triton with TensorDescriptor (>= 3.3) installed"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{device.type} tensors without CUDA: the C++ launch of the Triton GEMM is CUDA only"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{dtype} activations: it takes bfloat16 / float16"
    if _cuda_props(device).major < 9:
        return "no TMA on this GPU (needs compute capability >= 9)"
    return None


def ext_gemm_kernels(dtype, device, r: int, forward_config: int, backward_config: int) -> list:
    """The ``gemm`` argument of ``torch.ops.balora.lora_linear`` in modes 4 and 5 (``ext_triton``,
    ``ext_triton_thin``): the TMA GEMM compiled for ``dtype`` and rank ``r`` with :data:`GEMM_CONFIGS`
    ``forward_config`` (y, without and with bias) and ``backward_config`` (dx), each registered with the C++ op once
    per device (the first call compiles three kernels: seconds). Empty, and the op then runs ``ext_prefill``'s
    products (mode 5: its thin kernels with cuBLAS for the big products), where
    :func:`ext_gemm_blocker` finds a reason, and where the compilation, the loading or the check of the compiled
    kernel's parameters fails: that is warned once (RuntimeWarning, with the cause) and kept in
    :func:`ext_gemm_errors` (``backend_info()["lora_linear"]["ext_triton_errors"]``)."""
    key = (dtype, device, r, forward_config, backward_config)
    ids = _EXT_GEMM.get(key)
    if ids is None:
        with _EXT_GEMM_LOCK:
            ids = _EXT_GEMM.get(key)
            if ids is None:
                ids = [] if ext_gemm_blocker(dtype, device) is not None else \
                    _register_gemms(dtype, device, _block_r(r), forward_config, backward_config)
                _EXT_GEMM[key] = ids
    return ids


def _register_gemms(dtype, device, BR: int, forward_config: int, backward_config: int) -> list:
    """:func:`ext_gemm_kernels`' three kernel ids, or [] (warned, kept in ``_EXT_GEMM_ERRORS``) on a failure."""
    try:
        return [_registered_gemm(dtype, device, BR, c, backward, bias)
                for c, backward, bias in ((forward_config, False, False), (forward_config, False, True),
                                          (backward_config, True, False))]
    except Exception as e:  # noqa: BLE001 -- warned and kept (ext_gemm_errors); the calls run cuBLAS
        why = (f"ext_triton cannot launch the Triton GEMM from C++ for {dtype}, rank block {BR}, configs "
               f"{forward_config}/{backward_config} on {device}: {type(e).__name__}: {e}; its calls (and "
               "ext_triton_thin's) run cuBLAS for the big products instead (ext_prefill's calls; ext_triton_thin's "
               "thin kernels)")
        _EXT_GEMM_ERRORS[(dtype, device, BR, forward_config, backward_config)] = why
        warnings.warn(why, RuntimeWarning, stacklevel=3)
        return []


def ext_gemm_errors() -> list:
    """Why ``ext_triton`` could not launch its Triton GEMM from C++ (one message per dtype, device, rank block and
    configs that failed in this process; there its calls run ``ext_prefill``'s products, ``ext_triton_thin``'s cuBLAS
    for the big products)."""
    return list(_EXT_GEMM_ERRORS.values())


def _registered_gemm(dtype, device, BR: int, config: int, backward: bool, has_bias: bool) -> int:
    key = (dtype, device.index, BR, config, backward, has_bias)
    if key not in _EXT_GEMM_ONE:
        with torch.cuda.device(device):   # (Triton loads the binary into the current device's context)
            _EXT_GEMM_ONE[key] = _register_gemm(dtype, device, BR, GEMM_CONFIGS[config], backward, has_bias)
    return _EXT_GEMM_ONE[key]


def _register_gemm(dtype, device, BR: int, cfg: dict, backward: bool, has_bias: bool) -> int:
    """Compile ``_lora_gemm_tma_kernel_fixed`` for one layout (forward: the weight and B read transposed;
    backward: read as stored), load it, check its parameters and register it with the C++ op."""
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]

    def desc(rows, cols):   # tiny operands: the compiled kernel depends on dtypes and tiles only
        return TensorDescriptor.from_tensor(torch.empty(rows, cols, dtype=dtype, device=device), [rows, cols])

    descs = (desc(BM, BK), desc(BK, BN) if backward else desc(BN, BK), desc(BM, BR),
             desc(BR, BN) if backward else desc(BN, BR), desc(BM, BN))
    bias = torch.empty(BN, dtype=dtype, device=device) if has_bias else None

    def load(stages):   # (Triton checks the shared memory when it loads the binary)
        k = _lora_gemm_tma_kernel_fixed.warmup(
            *descs, bias, BM, BN, BK, 1.0, W_KN=backward, Q_KN=backward, HAS_BIAS=has_bias, BLOCK_M=BM,
            BLOCK_N=BN, BLOCK_K=BK, GROUP_M=cfg["GROUP_M"], WS=cfg.get("WS", False), num_warps=cfg["num_warps"],
            num_stages=stages, grid=(1,))
        k._init_handles()
        return k
    k, _ = _fewer_stages(load, cfg["num_stages"])
    md = k.metadata
    meta = getattr(md, "tensordesc_meta", None)
    if not meta or len(meta) != 5:
        raise RuntimeError(f"Triton {triton.__version__} passes no host tensor maps to this kernel")
    for name in ("launch_pdl", "launch_cooperative_grid"):
        if getattr(md, name, False):
            raise RuntimeError(f"the kernel asks for {name}")
    if getattr(md, "num_ctas", 1) != 1:
        raise RuntimeError("the kernel asks for CTA clusters")
    scratch_free = not getattr(md, "global_scratch_size", 0) and not getattr(md, "profile_scratch_size", 0)
    codes = tg_param_codes(k.asm["ptx"], has_bias, scratch_free)
    boxes = [x for m in meta for x in (int(m["swizzle"]), int(m["block_size"][0]), int(m["block_size"][1]))]
    kid = torch.ops.balora.lora_gemm_kernel_register(
        [int(k.function), torch.cuda.current_device(),
         int(md.num_warps), int(md.shared), BM, BN, BR, torch.empty((), dtype=dtype).element_size(), int(has_bias),
         int(backward), *boxes, len(codes), *codes])
    _EXT_GEMM_KEEP.append(k)
    return kid


# ============================================================================================
# Forward / backward per implementation
# ============================================================================================
def _x_l(x, mask):
    return x if mask is None else x * mask


def _as(t, dtype):
    """``t`` in ``dtype`` (``Tensor.to`` costs a dispatcher round trip even when it is a no-op)."""
    return t if t.dtype == dtype else t.to(dtype)


def _scaled_mm(a, b, scaling: float):
    """``scaling * (a @ b)`` as one cuBLAS call (alpha = s, beta = 0: the 0-dim ``input`` is never
    read or copied, so no fill and no separate scaling pass)."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scaling)


def _big_plus_lowrank(x, wt, p, q, scaling: float, bias, prefill: bool):
    """``x @ wt + s (p @ q) (+ bias)`` by two cuBLAS calls, each writing the output once: the big
    GEMM first (beta=0) and the K=r GEMM added in place, or (``prefill``) the rank-r term and bias
    first and the big GEMM accumulated onto them (beta=1). csrc/lora_linear.cpp does the same."""
    if prefill:
        out = torch.addmm(bias, p, q, alpha=scaling) if bias is not None else _scaled_mm(p, q, scaling)
        return out.addmm_(x, wt)
    out = torch.addmm(bias, x, wt) if bias is not None else x @ wt
    return out.addmm_(p, q, alpha=scaling)


# v and dB of the kernel paths ("cublas", "triton") from one read of dy by _dyb_kernel up to this
# rank, with or without dropout (which does not touch dy); above it two cuBLAS calls. Measured on the
# H200 (bench/probe/lora_profile.py, CUDA-graph replay, 8192 x 4096 bf16 dy, 2026-12-03): r = 16
# 32 us against cuBLAS's 39; r = 64 47 us against 42. FUSED_DYB = False: cuBLAS at every rank. cuBLAS too
# where its partial sums would outgrow 32-bit offsets (:func:`dyb_fits`: e.g. 135 k tokens at r = 32 and
# out = 128256).
FUSED_DYB = True
FUSED_DYB_MAX_RANK = 32


def _thin_by_cublas(impl: str, mask) -> bool:
    """u and dA by cuBLAS: always for the all-cuBLAS implementations, and for the kernel paths without
    dropout (GPU time by CUDA-graph replay at 8192 x 4096, r = 16, on the H200,
    bench/results/logs/session24-thin-sweep-2026-12-03.json: u 21.4 us against the Triton kernel's best
    20.4, dA 22.1 against 22.0, no clear gain for a Triton launch's host cost). With a dropout mask
    the kernel paths use the Triton thin kernels, which read the mask, so x * m is never
    materialised. (v and dB: :data:`FUSED_DYB`.)"""
    return impl in _ALL_CUBLAS or mask is None


# Implementations whose every product is one cuBLAS call (the C++ ones issue the same products; from
# Python, under torch.compile, ext_thin, ext_allthin, ext_triton and ext_triton_thin run ext_prefill's).
_ALL_CUBLAS = ("cublas_mm", *EXT_IMPLS)


def _prefill(impl: str) -> bool:
    """Whether the rank-r term is written first and the big GEMM accumulated onto it (beta=1)."""
    return EXT_IMPLS.get(impl, 0) >= 1


def lora_linear_forward(impl: str, x, weight, bias, lora_A, lora_B, scaling: float, mask=None,
                        config: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, u)``: y = x W^T + b + s u B^T [N, out], u = (x * mask) A^T [N, r], both in x's dtype."""
    dt = x.dtype
    if impl == "torch":
        return reference.lora_linear_and_u(x, weight, bias, lora_A, lora_B, scaling, mask)
    if impl not in IMPLS:
        raise ValueError(f"lora_linear: unknown implementation {impl!r}; expected one of {IMPLS}")
    impl = _FORWARD_OF.get(impl, impl)
    u = _x_l(x, mask) @ _as(lora_A, dt).T if _thin_by_cublas(impl, mask) else xa_forward(x, lora_A, mask)
    if impl in _ALL_CUBLAS:
        # Three launches, no N x out temporary; cublas_mm and ext write the big GEMM with beta=0
        # (cuBLAS measured slower accumulating into a prefilled output), ext_prefill the rank-r term first.
        return _big_plus_lowrank(x, weight.T, u, _as(lora_B, dt).T, scaling, bias, _prefill(impl)), u
    if impl == "cublas":
        y = lora_gemm(None, None, u, lora_B.T, scaling, bias=bias)
        return y.addmm_(x, weight.T), u
    return lora_gemm(x, weight.T, u, lora_B.T, scaling, bias=bias, config=config), u


def lora_linear_backward(impl: str, dy, x, u, weight, lora_A, lora_B, scaling: float, mask=None,
                         need_x: bool = True, need_weight: bool = False, need_bias: bool = False,
                         config: int = 0) -> reference.LoraLinearGrads:
    """Gradients (see :class:`LoRALinearFunction` for the derivation); unneeded ones are None."""
    dt = x.dtype
    if impl == "torch":
        return reference.lora_linear_backward(dy, x, weight, lora_A, lora_B, scaling, mask, u=u,
                                              need_x_grad=need_x, need_weight_grad=need_weight,
                                              need_bias_grad=need_bias)
    if impl not in IMPLS:
        raise ValueError(f"lora_linear: unknown implementation {impl!r}; expected one of {IMPLS}")
    if impl in EXT_BACKWARD:   # one call into C++ issues every product
        dx, dW, db, dA, dB = torch.ops.balora.lora_linear_backward(
            dy, x, u, weight, lora_A, lora_B, scaling, mask, need_x, need_weight, need_bias, True, True,
            EXT_BACKWARD[impl])
        return reference.LoraLinearGrads(x=dx, weight=dW, bias=db, lora_A=dA, lora_B=dB)
    if impl in _ALL_CUBLAS or not FUSED_DYB or u.shape[1] > FUSED_DYB_MAX_RANK or \
            not dyb_fits(dy.shape[0], dy.shape[1], u.shape[1], groups=_sm_count(dy.device)):
        # One cuBLAS call each, the scaling as alpha: v = dy B, dB = s dy^T u.
        v = dy @ _as(lora_B, dt)
        dB = _as(_scaled_mm(dy.T, u, scaling), lora_B.dtype)
    else:
        v, dB = dyb_backward(dy, lora_B, u, scaling)
    if _thin_by_cublas(impl, mask):
        dA = _as(_scaled_mm(v.T, _x_l(x, mask), scaling), lora_A.dtype)
    else:
        dA = vx_backward(v, x, scaling, mask, out_dtype=lora_A.dtype)
    dx = None
    if need_x:
        if impl in _ALL_CUBLAS:
            if mask is None:
                dx = _big_plus_lowrank(dy, weight, v, _as(lora_A, dt), scaling, None, _prefill(impl))
            else:
                dx = torch.addmm(torch.mm(v, _as(lora_A, dt)).mul_(mask), dy, weight, beta=scaling)
        elif impl == "cublas":
            dx = lora_gemm(None, None, v, lora_A, scaling, mask=mask).addmm_(dy, weight)
        else:
            dx = lora_gemm(dy, weight, v, lora_A, scaling, mask=mask, config=config)
    return reference.LoraLinearGrads(
        x=dx, weight=dy.T @ x if need_weight else None, bias=dy.sum(0) if need_bias else None,
        lora_A=dA, lora_B=dB)


# ============================================================================================
# Measurements: which implementation is fastest for a shape (read by functional._lora_linear_impl)
# ============================================================================================
_TUNING = None


def tuning_table() -> dict:
    """The measurements the dispatcher reads (``lora_linear_tuning.json``, written by
    bench/bench_lora_linear.py). Replace it with :func:`use_tuning_table`, never in place: the
    dispatcher caches its choices per table object."""
    global _TUNING
    if _TUNING is None:
        try:
            with open(TUNING_FILE) as f:
                _TUNING = json.load(f)
        except (OSError, ValueError):
            _TUNING = {"entries": []}
    return _TUNING


def use_tuning_table(table: Optional[dict]) -> dict:
    """Make ``table`` the measurements the dispatcher reads (None: reload the committed file).
    The dispatcher's cached choices are keyed on the table object, so they are dropped."""
    global _TUNING
    _TUNING = table
    return tuning_table()


def reload_tuning_table() -> dict:
    return use_tuning_table(None)


# A candidate with launches issued from Python per call (every one but the C++ op's EXT_IMPLS; triton_ext's
# forward) is taken over the fastest C++ one only when it is faster by more than this fraction: on a loaded
# host the Python-issued ones slow down and the C++ ones hardly move (on the H200 machine at 4096 -> 4096 r16,
# session 25: `cublas` / `triton` backward alone 0.47-0.49 or 0.77-1.14 ms from one minute to the next,
# `ext_prefill` 0.48-0.50; session 26: `triton_ext` full step 0.905-0.939 ms in the table's rounds and
# 0.894-1.419 a minute later, `ext_prefill` 0.901-0.963), so a table timed in a quiet minute would pick one
# by a margin smaller than that noise.
PY_ISSUED_MARGIN = 0.03
# And, beside C++ candidates, only when the host issues its step (``host_full_ms``, or ``host_forward_ms`` for a
# call without backward, measured from an idle GPU) in at most this fraction of the step's measured time: then a
# host twice as slow still keeps ahead of the GPU. (Session 26's third table picked `triton` at 4096 -> 4096 r16,
# 4% ahead, its full step 0.869-1.053 ms in the table's rounds, and a minute later 1.11-1.28 ms beside the frozen
# layer, slower than the unfused LoRA; its host needs 1.04 ms to issue that step, `ext_prefill`'s 0.58.)
HOST_PACE_FRACTION = 0.5


def measured_choice(direction: str, N: int, in_f: int, out_f: int, r: int, dtype,
                    allowed: Tuple[str, ...] = IMPLS,
                    with_backward: bool = True, impl: Optional[str] = None) -> Tuple[str, int, Optional[dict]]:
    """``(impl, gemm_config, entry)``: the fastest implementation in ``allowed`` measured for the
    nearest shape (``allowed`` leaves out what cannot run here, e.g. the C++ ones without the extension),
    or ``impl`` when given (then only its Triton GEMM config for ``direction`` is looked up).

    Nearest: same dtype (fp16 falls back to bf16), smallest sum of |log ratio| over N, in, out and
    (half-weighted) r. Entries with ``full_ms`` choose one implementation for both directions: for a
    call that records a backward (``with_backward``) the fastest forward + backward step, for one that
    does not (inference, ``torch.no_grad``) the fastest forward (see below). Without measurements:
    ``("cublas", 0, None)``. Beside C++ candidates (``ext*``), one with launches issued from Python must
    issue its step in at most :data:`HOST_PACE_FRACTION` of the step's time and beat the fastest C++ one by
    :data:`PY_ISSUED_MARGIN`; a call that records no backward never takes ``triton_ext`` (its forward is
    ``triton``'s, which needs no extension).
    Not cached here: the dispatcher
    (:func:`balora_kernels.functional._lora_linear_plan`) caches its decisions.
    """
    entries = tuning_table().get("entries", [])
    name = str(dtype).replace("torch.", "")
    cands = [e for e in entries if e["dtype"] == name] or \
            [e for e in entries if e["dtype"] == "bfloat16" and name == "float16"]
    if not cands:
        return impl or "cublas", 0, None

    def dist(e):
        return (abs(math.log(N / e["N"])) + abs(math.log(in_f / e["in"])) + abs(math.log(out_f / e["out"]))
                + 0.5 * abs(math.log(r / e["r"])))

    e = min(cands, key=dist)
    impl = impl or _measured_impl(e, direction, allowed, with_backward)
    # the Triton GEMM config per implementation and direction ("triton_config": tables before triton_ext)
    configs = e.get("gemm_config", {}).get(impl) or (e.get("triton_config", {}) if impl == "triton" else {})
    return impl, int(configs.get(direction, 0)), e


def _measured_impl(e: dict, direction: str, allowed, with_backward: bool) -> str:
    """:func:`measured_choice`'s implementation for one table entry."""
    if "full_ms" not in e:
        return _fastest({k: t for k, t in e[f"{direction}_ms"].items() if k in allowed and t == t})
    # One implementation for both directions. A call that records a backward is timed by the
    # full step (forward, then backward, as a training step issues them: the host prepares the
    # backward while the GPU runs the forward), and only implementations no slower than the
    # plain PyTorch math ("torch") in any of the three timings (forward, backward alone, full
    # step) are candidates: the op is never slower than the unfused LoRA on a measured shape. A
    # call that records none takes the fastest forward.
    modes = ("forward_ms", "backward_ms", "full_ms") if with_backward else ("forward_ms",)
    # (without a backward, an implementation whose forward is another's, triton_ext, is that one: not a candidate)
    times = {k: tuple(e[m][k] for m in modes) for k in e["full_ms"]
             if k in allowed and all(k in e[m] and e[m][k] == e[m][k] for m in modes)
             and (with_backward or k not in _FORWARD_OF)}
    limit = tuple(e[m].get("torch", float("inf")) for m in modes)
    ok = {k: t for k, t in times.items() if all(a <= b for a, b in zip(t, limit))} or times
    if any(k in EXT_IMPLS for k in ok):   # Python-issued candidates beside C++ ones: only those that keep pace
        # (tables before session 26 have no host times: then every candidate keeps pace)
        host = e.get("host_full_ms" if with_backward else "host_forward_ms", {})
        ok = {k: t for k, t in ok.items() if k in EXT_IMPLS or host.get(k, 0.0) <= HOST_PACE_FRACTION * t[-1]}
    return _fastest({k: t[-1] for k, t in ok.items()})


def _fastest(times: dict) -> str:
    """The implementation with the smallest time, a Python-issued one only by :data:`PY_ISSUED_MARGIN`."""
    t, impl = min((t, k) for k, t in times.items())
    cpp = [(t, k) for k, t in times.items() if k in EXT_IMPLS]
    if impl not in EXT_IMPLS and cpp and min(cpp)[0] <= t * (1 + PY_ISSUED_MARGIN):
        return min(cpp)[1]
    return impl


def _plan(impl: str, x, weight, lora_A, with_backward: bool = True):
    """``((forward impl, gemm config), (backward impl, gemm config))`` for a 2-D call: ``impl`` as
    given (its Triton GEMM config from the measurements), or for 'auto' the dispatcher's choice
    (``with_backward``: whether the call records a backward)."""
    return _functional()._lora_linear_plan(x.shape[0], weight.shape[1], weight.shape[0], lora_A.shape[0],
                                           x.dtype, x.device, impl, with_backward)


_FUNCTIONAL = None


def _functional():
    """balora_kernels.functional, the one place that chooses (imported lazily: it imports this module)."""
    global _FUNCTIONAL
    if _FUNCTIONAL is None:
        from .. import functional
        _FUNCTIONAL = functional
    return _FUNCTIONAL


# ============================================================================================
# Autograd
# ============================================================================================
class LoRALinearFunction(torch.autograd.Function):
    """Autograd over 2-D ``x`` [N, in]; saves only x, u = x_l A^T [N, r] (and the dropout mask).

    Derivation (``x_l = x * m`` with m the scaled dropout mask or 1, ``u = x_l A^T``, ``v = dy B``)::

        y  = x W^T + b + s u B^T
        dy/dx through the base: dy W;  through the adapter: s (dy B) A, masked by m
        dx = dy W + s (v A) * m
        dA = s (dy B)^T x_l        = s v^T x_l
        dB = s dy^T (x_l A^T)      = s dy^T u
        dW = dy^T x,   db = sum_n dy      (only when they require grad)

    The rank-r products are formed first so every intermediate stays N x r: v and dB need only
    one read of dy, dx is one GEMM pass with the rank-r term in its accumulator, dA one read of x.

    Under ``create_graph`` (grad mode on inside backward) the gradients must themselves be
    differentiable: the kernels are not, and the saved ``u`` is a constant to autograd (dB's
    dependence on x and A would be lost), so the backward then runs the reference's products with
    ``u`` recomputed from x and A (:func:`_differentiable_backward`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_mask, impl):
        """``impl``: an implementation name or 'auto', or a plan from the dispatcher (both directions)."""
        plan = _plan(impl, x, weight, lora_A) if isinstance(impl, str) else impl
        (fwd_impl, cfg), ctx.bwd_plan = plan                             # both directions, one lookup
        y, u = lora_linear_forward(fwd_impl, x, weight, bias, lora_A, lora_B, scaling, dropout_mask, cfg)
        ctx.save_for_backward(x, u, weight, lora_A, lora_B, dropout_mask)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, lora_A, lora_B, mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        bwd_impl, cfg = ctx.bwd_plan
        if torch.is_grad_enabled():
            g = _differentiable_backward(dy, x, weight, lora_A, lora_B, ctx.scaling, mask, need, ctx.has_bias)
        else:
            g = lora_linear_backward(bwd_impl, dy, x, u, weight, lora_A, lora_B, ctx.scaling, mask,
                                     need_x=need[0], need_weight=need[1], need_bias=ctx.has_bias and need[2],
                                     config=cfg)
        return g.x, g.weight, g.bias, g.lora_A, g.lora_B, None, None, None


def _differentiable_backward(dy, x, weight, lora_A, lora_B, scaling: float, mask, need, has_bias: bool):
    """The backward under ``create_graph``: the reference's products, differentiable in every operand, with
    ``u = x_l A^T`` recomputed (not the saved constant) so that dB's graph reaches x and A. ``need``: the
    Function's ``needs_input_grad`` (x, weight, bias, ...)."""
    return reference.lora_linear_backward(dy, x, weight, lora_A, lora_B, scaling, mask, u=None,
                                          need_x_grad=need[0], need_weight_grad=need[1],
                                          need_bias_grad=has_bias and need[2])


# --------------------------------------------------------------------------------------------
# torch.library ops (used under torch.compile: opaque to the tracer, with fake implementations)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("balora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                       dropout_mask: Optional[torch.Tensor], impl: str,
                       with_backward: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y [N, out], u [N, r])``; on CPU (``impl`` 'auto') the reference math. ``with_backward``: whether
    the call records a backward (the dispatcher's choice depends on it; the tracer knows it)."""
    fwd_impl, cfg = _plan(impl, x, weight, lora_A, with_backward)[0]
    return lora_linear_forward(fwd_impl, x, weight, bias, lora_A, lora_B, scaling, dropout_mask, cfg)


@lora_linear_fwd_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, impl, with_backward=True):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("balora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd_op(grad_y: torch.Tensor, x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                       lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                       dropout_mask: Optional[torch.Tensor], need_x: bool, need_weight: bool,
                       need_bias: bool, impl: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor, torch.Tensor]:
    """``(dx, dW, db, dA, dB)``; a gradient not asked for is an empty tensor."""
    bwd_impl, cfg = _plan(impl, x, weight, lora_A, True)[1]
    g = lora_linear_backward(bwd_impl, grad_y, x, u, weight, lora_A, lora_B, scaling, dropout_mask,
                             need_x, need_weight, need_bias, cfg)
    def empty():  # one fresh placeholder per output (custom-op outputs may not alias each other)
        return x.new_empty(0)

    return (g.x if need_x else empty(), g.weight if need_weight else empty(),
            g.bias if need_bias else empty(), g.lora_A, g.lora_B)


@lora_linear_bwd_op.register_fake
def _(grad_y, x, u, weight, lora_A, lora_B, scaling, dropout_mask, need_x, need_weight, need_bias, impl):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_bias else x.new_empty(0),
            lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_mask, impl, _with_backward = inputs
    ctx.save_for_backward(x, output[1], weight, lora_A, lora_B, dropout_mask)
    ctx.scaling, ctx.impl, ctx.has_bias = scaling, impl, bias is not None


def _backward_op(ctx, grad_y, grad_u):
    x, u, weight, lora_A, lora_B, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_b = ctx.has_bias and need[2]
    if torch.is_grad_enabled():   # create_graph: see LoRALinearFunction
        g = _differentiable_backward(grad_y, x, weight, lora_A, lora_B, ctx.scaling, mask, need, ctx.has_bias)
        return g.x, g.weight, g.bias, g.lora_A, g.lora_B, None, None, None, None
    dx, dW, db, dA, dB = lora_linear_bwd_op(grad_y, x, u, weight, lora_A, lora_B, ctx.scaling, mask,
                                            need[0], need[1], need_b, ctx.impl)
    return (dx if need[0] else None, dW if need[1] else None, db if need_b else None,
            dA, dB, None, None, None, None)


lora_linear_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


def thin_kernels_apply(x: torch.Tensor, r: int) -> bool:
    """Whether ``ext_thin`` / ``ext_allthin`` / ``ext_triton_thin`` run csrc/lora_thin.cu's kernels for activations
    like ``x`` [N, in] at rank ``r`` (CUDA bf16 / fp16, 1 <= r <= 128, 0 < N <= 65535 x 64, the extension loaded);
    otherwise they run ``ext_prefill``'s products (``ext_triton_thin``: ``ext_triton``'s)."""
    return _functional()._ext_available() and bool(torch.ops.balora.lora_linear_thin_kernels(x, r))


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_mask=None, impl: str = "auto"):
    """``y = x W^T + b + s ((x * mask) A^T) B^T`` for 2-D x [N, in], differentiable in every operand.

    ``impl``: 'auto' (the dispatcher's choice, per direction), one of :data:`IMPLS`, or a plan
    ``((forward impl, gemm config), (backward impl, gemm config))`` (the benchmark forces configs so; traced by
    ``torch.compile``, a plan counts as its forward implementation's name). Under torch.func's transforms
    (``torch.func.grad``, ``vmap``, ``jvp``, ...) the reference math runs instead, for any ``impl`` (not under
    ``torch.compile`` of a transformed function, nor for ``torch.autograd.forward_ad`` dual tensors: those raise
    torch's errors, the op's autograd nodes having no setup_context / jvp).
    """
    # A call that records a backward (a training step) is chosen by the full step's time, another by the forward's.
    with_backward = torch.is_grad_enabled() and (
        x.requires_grad or lora_A.requires_grad or lora_B.requires_grad or weight.requires_grad
        or (bias is not None and bias.requires_grad))
    name = impl if isinstance(impl, str) else impl[0][0]   # (a plan: its forward implementation's name)
    if torch.compiler.is_compiling():   # (traced: the op chooses the GEMM configs itself)
        return lora_linear_fwd_op(x, weight, bias, lora_A, lora_B, float(scaling), dropout_mask, name,
                                  with_backward)[0]
    if torch._C._are_functorch_transforms_active():
        # torch.func's transforms (grad, vmap, jvp, jacrev, functional_call under them) differentiate and batch
        # plain PyTorch ops only, not this op's kernels or autograd nodes: the reference math, whatever ``impl``
        # (a name that is none is still refused).
        if name != "auto" and name not in IMPLS:
            raise ValueError(f"lora_linear: unknown implementation {name!r}; expected 'auto' or one of {IMPLS}")
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)
    plan = _plan(impl, x, weight, lora_A, with_backward) if isinstance(impl, str) else impl
    (fwd_impl, cfg), (_, bwd_cfg) = plan
    mode = EXT_IMPLS.get(fwd_impl)
    if mode is not None:   # the C++ op: its own autograd node, both directions
        gemm = ext_gemm_kernels(x.dtype, x.device, lora_A.shape[0], cfg, bwd_cfg) if mode in EXT_GEMM_MODES else []
        return torch.ops.balora.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), dropout_mask, mode, gemm)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), dropout_mask, plan)
