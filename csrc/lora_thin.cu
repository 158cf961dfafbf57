// The rank-r products of the LoRA linear layer on tensor cores: kernels of the C++ op's "ext_thin" and "ext_allthin"
// modes (csrc/lora_linear.cpp), 16-bit activations, ranks up to 128. Three kernel families, each one launch:
//
//   row      out [N, r]  = (G * M) F^T      G [N, K] (x or dy), M [N, K] mask or none, F [r, K]
//                                          (u = x_l A^T with F = A; v = dy B with F = B^T)
//   lowrank  out [N, C]  = (s P Q (+ bias)) * M     P [N, r], Q [r, C]
//                                          (the rank-r term the big cuBLAS GEMM then accumulates onto, beta = 1:
//                                          y's s u B^T + b, and dx's s (v A) * m)
//   col      out [C, r]  = s (G * M)^T P    G [N, C], P [N, r], two problems per launch ("ext_allthin" only:
//                                          dB = s dy^T u and dA^T = s x_l^T v of one backward)
//
// Why: each ATen call costs host time that the step waits for when tokens are few (1024 tokens of a 4096-wide
// layer: the host, not the GPU, sets the pace). Here each product is one launch that reads its big operand once,
// in a multi-stage cp.async pipeline (16-byte copies where the rows allow it, element loads with zero fill at the
// edges), multiplies 16 x 16 x 16 tiles with WMMA (float32 accumulators) and rounds once to the output type.
// Inputs are 16-bit (bfloat16 or float16, all of one type; the caller casts float32 adapters first). The sums
// stay inside one block (no atomics, no split-K): every result is reproducible bit for bit.
//
// Measured on the H200 (bench/results/logs/session12-thin-profile-2026-12-02.json, GPU time per call): row and
// lowrank take about twice cuBLAS's time at 8192 tokens (row 44 / 71 us for u / v against 22 / 24 us, lowrank
// 46 us against 25 us; at 1024 tokens row 3.5x, lowrank 1.3x), while the op's host time per forward + backward
// drops from 445 to 247 us at 1024 tokens. So the dispatcher, which chooses by measured step time, takes these
// kernels only where the host sets the pace. With many tokens the col kernel's blocks (one per 64 columns, each
// summing over every token) are too few and too long: a first kernel of this kind, reading 16- or 32-column
// strips, ran at about a third of cuBLAS's speed at 8192 tokens (session12-thin-profile-run1-2026-12-02.json);
// "ext_thin" keeps dB and dA on cuBLAS, "ext_allthin" trades that for one launch instead of two cuBLAS calls.
//
// Needs only the CUDA runtime (no torch headers); the torch-facing side is csrc/lora_linear.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdint.h>

#include <type_traits>

#include "cp_async.cuh"

namespace {

using namespace nvcuda;

constexpr int kThreads = 128;  // four warps in every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kPad = 8;        // 16-bit elements added to each shared-memory row (bank spread; keeps 16-byte rows)

// ---------------------------------------------------------------------------------------------------------------
// Element helpers
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Eight consecutive elements [c0, c0 + 8) of one source row into shared memory (16-byte aligned): one cp.async
// when the row is valid, the eight are inside ncols and the row allows 16-byte copies (vec); otherwise element
// loads, zero outside the row or the matrix.
template <class T>
__device__ __forceinline__ void load8(T* dst, const T* row, long long c0, long long ncols, bool row_ok, bool vec) {
  if (row_ok && vec && c0 + 8 <= ncols) {
    cp_async16(dst, row + c0);
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) dst[e] = (row_ok && c0 + e < ncols) ? row[c0 + e] : from_float<T>(0.f);
}

// The [RP x BL] tile F(j, l0 + l) of a rank-r factor, F(j, l) = f[j * s_j + l * s_l], into shared memory: as rows j
// of BL elements, ld apart, when L_CONTIG (s_l == 1: rows of A), else as rows l of RP elements (s_j == 1: rows of
// B). Rows j >= r and columns l0 + l >= nl are zero.
template <bool L_CONTIG, int RP, int BL, class T>
__device__ __forceinline__ void load_factor_tile(T* dst, int ld, const T* f, long long s_j, long long s_l, int r,
                                                 long long l0, long long nl, bool vec) {
  if constexpr (L_CONTIG) {
    for (int c = threadIdx.x; c < RP * (BL / 8); c += kThreads) {
      const int j = c / (BL / 8), l = (c % (BL / 8)) * 8;
      load8(dst + j * ld + l, f + (j < r ? j * s_j : 0), l0 + l, nl, j < r, vec);
    }
  } else {
    for (int c = threadIdx.x; c < BL * (RP / 8); c += kThreads) {
      const int l = c / (RP / 8), j = (c % (RP / 8)) * 8;
      const bool ok = l0 + l < nl;
      load8(dst + l * ld + j, f + (ok ? (l0 + l) * s_l : 0), j, r, ok, vec);
    }
  }
}

// Multiplies a shared tile by the mask tile of the same shape, in place (x * m, rounded like ATen's product).
template <class T>
__device__ __forceinline__ void mask_tile(T* tile, const T* mask, int rows, int cols, int ld) {
  for (int i = threadIdx.x; i < rows * cols; i += kThreads) {
    const int a = i / cols, b = i % cols;
    tile[a * ld + b] = from_float<T>(to_float(tile[a * ld + b]) * to_float(mask[a * ld + b]));
  }
}

__host__ __device__ constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

// ---------------------------------------------------------------------------------------------------------------
// row: out [N, r] = (G * M) F^T, one block per BM rows of G, the whole K in BK-wide stages.
// F is read as F(j, k) = f[j * f_sj + k * f_sk]; F_KC: f_sk == 1 (rows of A), else f_sj == 1 (rows of B).
// ---------------------------------------------------------------------------------------------------------------
struct RowArgs {
  const void* g;        // [N, K], row stride ldg, unit column stride
  long long ldg;
  const void* m;        // mask of G's shape (row stride ldm) or null
  long long ldm;
  const void* f;        // F (see above)
  long long f_sj, f_sk;
  void* out;            // [N, r] contiguous, G's type
  long long N, K;
  int r;
  bool g_vec, m_vec, f_vec;  // 16-byte copies allowed (aligned base and row stride)
};

template <int RT, bool F_KC>
struct RowShape {
  // r <= 16: 16 rows a block, the four warps splitting each 256-wide stage along K (64 columns each; their sums
  // added at the end): many small blocks, several per SM, so N = 1024 still spreads over the GPU. Larger ranks:
  // 64 rows a block, one warp per 16 rows, 64-wide stages (their F tiles would not fit beside 256-wide ones).
  // Stages: as many as keep every rank's tiles (with a mask) under 99 KB, the opt-in limit of compute capability
  // 8.6 / 8.9.
  static constexpr int WM = RT == 1 ? 1 : 4, WK = kWarps / WM;   // warps along M and along K
  static constexpr int BM = 16 * WM, BK = 64 * WK, RP = 16 * RT;
  static constexpr int STAGES = RT == 1 ? 3 : (RT == 2 ? 4 : (RT == 4 ? 3 : 2));
  static constexpr int LDG = BK + kPad;                       // G and M tiles [BM][LDG]
  static constexpr int LDF = F_KC ? BK + kPad : RP + kPad;    // F tile [RP][LDF] (F_KC) or [BK][LDF]
  static constexpr int F_ELEMS = F_KC ? RP * LDF : BK * LDF;
  static constexpr int LDO = RP + 4;                          // float epilogue tiles [WK][BM][LDO]
  __host__ __device__ static constexpr int stage_bytes(bool mask) {
    return align128(2 * (BM * LDG * (mask ? 2 : 1) + F_ELEMS));
  }
  __host__ __device__ static constexpr int smem_bytes(bool mask) {
    return STAGES * stage_bytes(mask) > align128(WK * BM * LDO * 4) ? STAGES * stage_bytes(mask)
                                                                     : align128(WK * BM * LDO * 4);
  }
};

template <class T, int RT, bool F_KC>
__global__ void __launch_bounds__(kThreads) row_kernel(RowArgs a) {
  using S = RowShape<RT, F_KC>;
  extern __shared__ __align__(128) unsigned char smem[];
  const T* g = static_cast<const T*>(a.g);
  const T* m = static_cast<const T*>(a.m);
  const T* f = static_cast<const T*>(a.f);
  const bool has_m = m != nullptr;
  const int stage_bytes = S::stage_bytes(has_m);
  const long long n0 = (long long)blockIdx.x * S::BM;
  const int nk = (int)((a.K + S::BK - 1) / S::BK);
  const int warp = threadIdx.x / 32, wm = warp % S::WM, wk = warp / S::WM;   // rows 16 wm, columns 64 wk

  auto tiles = [&](int s, T*& gs, T*& ms, T*& fs) {
    gs = reinterpret_cast<T*>(smem + s * stage_bytes);
    ms = gs + S::BM * S::LDG;
    fs = has_m ? ms + S::BM * S::LDG : ms;
  };
  auto load_stage = [&](int s, int kt) {
    T *gs, *ms, *fs;
    tiles(s, gs, ms, fs);
    const long long k0 = (long long)kt * S::BK;
    for (int c = threadIdx.x; c < S::BM * (S::BK / 8); c += kThreads) {
      const int i = c / (S::BK / 8), k = (c % (S::BK / 8)) * 8;
      const bool ok = n0 + i < a.N;
      load8(gs + i * S::LDG + k, g + (ok ? (n0 + i) * a.ldg : 0), k0 + k, a.K, ok, a.g_vec);
      if (has_m) load8(ms + i * S::LDG + k, m + (ok ? (n0 + i) * a.ldm : 0), k0 + k, a.K, ok, a.m_vec);
    }
    load_factor_tile<F_KC, S::RP, S::BK>(fs, S::LDF, f, a.f_sj, a.f_sk, a.r, k0, a.K, a.f_vec);
  };

  using FLayout = std::conditional_t<F_KC, wmma::col_major, wmma::row_major>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RT];
#pragma unroll
  for (int j = 0; j < RT; ++j) wmma::fill_fragment(acc[j], 0.f);

#pragma unroll
  for (int s = 0; s < S::STAGES - 1; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<S::STAGES - 2>();
    __syncthreads();
    T *gs, *ms, *fs;
    tiles(kt % S::STAGES, gs, ms, fs);
    if (has_m) {
      mask_tile(gs, ms, S::BM, S::BK, S::LDG);
      __syncthreads();
    }
    if (kt + S::STAGES - 1 < nk) load_stage((kt + S::STAGES - 1) % S::STAGES, kt + S::STAGES - 1);
    cp_async_commit();
#pragma unroll
    for (int kk = wk * 64; kk < wk * 64 + 64; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, gs + wm * 16 * S::LDG + kk, S::LDG);
#pragma unroll
      for (int j = 0; j < RT; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, FLayout> fb;
        wmma::load_matrix_sync(fb, F_KC ? fs + j * 16 * S::LDF + kk : fs + kk * S::LDF + j * 16, S::LDF);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  float* os = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int j = 0; j < RT; ++j)
    wmma::store_matrix_sync(os + (wk * S::BM + wm * 16) * S::LDO + j * 16, acc[j], S::LDO, wmma::mem_row_major);
  __syncthreads();
  T* out = static_cast<T*>(a.out);
  for (int i = threadIdx.x; i < S::BM * a.r; i += kThreads) {
    const int n = i / a.r, j = i % a.r;
    if (n0 + n >= a.N) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < S::WK; ++w) sum += os[(w * S::BM + n) * S::LDO + j];   // in warp order
    out[(n0 + n) * a.r + j] = from_float<T>(sum);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// lowrank: out [N, C] = (s P Q (+ bias)) * M, one block per 64 x 128 output tile.
// Q is read as Q(j, c) = q[j * q_sj + c * q_sc]; Q_CC: q_sc == 1 (rows of A), else q_sj == 1 (rows of B).
// ---------------------------------------------------------------------------------------------------------------
struct LowrankArgs {
  const void* p;        // [N, r], row stride ldp, unit column stride
  long long ldp;
  const void* q;        // Q (see above)
  long long q_sj, q_sc;
  const void* bias;     // [C] or null
  const void* m;        // mask [N, C] (row stride ldm) or null
  long long ldm;
  void* out;            // [N, C], row stride ldo
  long long ldo;
  float s;
  long long N, C;
  int r;
  bool p_vec, q_vec, m_vec, o_vec;
};

template <int RT, bool Q_CC>
struct LowrankShape {
  static constexpr int BM = 64, BN = 128, RP = 16 * RT, CT = BN / 16;
  static constexpr int LDP = RP + kPad;
  static constexpr int LDQ = Q_CC ? BN + kPad : RP + kPad;   // Q tile [RP][LDQ] (Q_CC) or [BN][LDQ]
  static constexpr int Q_ELEMS = Q_CC ? RP * LDQ : BN * LDQ;
  static constexpr int LDO = BN + 4;
  __host__ __device__ static constexpr int smem_bytes() {
    const int s = align128(2 * BM * LDP) + align128(2 * Q_ELEMS), o = align128(BM * LDO * 4);
    return s > o ? s : o;
  }
};

template <class T, int RT, bool Q_CC>
__global__ void __launch_bounds__(kThreads) lowrank_kernel(LowrankArgs a) {
  using S = LowrankShape<RT, Q_CC>;
  extern __shared__ __align__(128) unsigned char smem[];
  const T* p = static_cast<const T*>(a.p);
  const T* q = static_cast<const T*>(a.q);
  T* ps = reinterpret_cast<T*>(smem);
  T* qs = reinterpret_cast<T*>(smem + align128(2 * S::BM * S::LDP));
  const long long n0 = (long long)blockIdx.y * S::BM, c0 = (long long)blockIdx.x * S::BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int c = threadIdx.x; c < S::BM * (S::RP / 8); c += kThreads) {
    const int i = c / (S::RP / 8), j = (c % (S::RP / 8)) * 8;
    const bool ok = n0 + i < a.N;
    load8(ps + i * S::LDP + j, p + (ok ? (n0 + i) * a.ldp : 0), j, a.r, ok, a.p_vec);
  }
  load_factor_tile<Q_CC, S::RP, S::BN>(qs, S::LDQ, q, a.q_sj, a.q_sc, a.r, c0, a.C, a.q_vec);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  using QLayout = std::conditional_t<Q_CC, wmma::row_major, wmma::col_major>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[S::CT];
#pragma unroll
  for (int c = 0; c < S::CT; ++c) wmma::fill_fragment(acc[c], 0.f);
#pragma unroll
  for (int k = 0; k < RT; ++k) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, ps + warp * 16 * S::LDP + k * 16, S::LDP);
#pragma unroll
    for (int c = 0; c < S::CT; ++c) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, QLayout> fb;
      wmma::load_matrix_sync(fb, Q_CC ? qs + k * 16 * S::LDQ + c * 16 : qs + c * 16 * S::LDQ + k * 16, S::LDQ);
      wmma::mma_sync(acc[c], fa, fb, acc[c]);
    }
  }
  __syncthreads();  // the float tile below reuses the operand tiles
  float* os = reinterpret_cast<float*>(smem) + warp * 16 * S::LDO;
#pragma unroll
  for (int c = 0; c < S::CT; ++c) wmma::store_matrix_sync(os + c * 16, acc[c], S::LDO, wmma::mem_row_major);
  __syncwarp();

  // Each warp writes its 16 rows, eight columns (one 16-byte store) per lane and step.
  const T* bias = static_cast<const T*>(a.bias);
  const T* m = static_cast<const T*>(a.m);
  T* out = static_cast<T*>(a.out);
  for (int e = lane; e < 16 * (S::BN / 8); e += 32) {
    const int i = e / (S::BN / 8), k = (e % (S::BN / 8)) * 8;
    const long long n = n0 + warp * 16 + i, c = c0 + k;
    if (n >= a.N || c >= a.C) continue;
    const bool full = c + 8 <= a.C;
    __align__(16) T v[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (!full && c + t >= a.C) break;
      float val = a.s * os[i * S::LDO + k + t];
      if (bias) val += to_float(bias[c + t]);
      if (m) val *= to_float(m[n * a.ldm + c + t]);
      v[t] = from_float<T>(val);
    }
    T* dst = out + n * a.ldo + c;
    if (full && a.o_vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
    } else {
      for (int t = 0; t < 8 && c + t < a.C; ++t) dst[t] = v[t];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// col: out(c, j) = s ((G * M)^T P)(c, j) for c < C, j < r, with G [N, C], M [N, C] mask or none, P [N, r]
//   (dB = s dy^T u: G = dy, P = u, out [C, r]; dA = s v^T x_l, written transposed: G = x, M = m, P = v,
//   out(c, j) at dA[j, c]). One block per 64 columns of G, the whole N in 64-row stages: the sum over the tokens
//   stays inside one block, in a fixed order. Two problems (dB and dA of one backward) share one launch: blocks
//   [0, blocks(0)) take the first, the rest the second. Meant for few tokens, where one launch instead of two cuBLAS
//   calls saves host time (with many tokens its 64-column blocks are too few and too long; the dispatcher measures).
// ---------------------------------------------------------------------------------------------------------------
struct ColArgs {
  const void* g;        // [N, C], row stride ldg, unit column stride
  long long ldg;
  const void* m;        // mask of G's shape (row stride ldm) or null
  long long ldm;
  const void* p;        // [N, r], row stride ldp, unit column stride
  long long ldp;
  void* out;            // out(c, j) = out[c * o_sc + j * o_sj], float32 when out_f32, else G's type
  long long o_sc, o_sj;
  bool out_f32;
  float s;
  long long N, C;
  int r;
  bool g_vec, m_vec, p_vec;
};

template <int RT>
struct ColShape {
  // (two stages at r > 64: three with a mask would pass 99 KB, the opt-in limit of compute capability 8.6 / 8.9)
  static constexpr int BC = 64, BN = 64, RP = 16 * RT, STAGES = RT == 8 ? 2 : 3;
  static constexpr int LDG = BC + kPad;   // G and M tiles [BN][LDG]
  static constexpr int LDP = RP + kPad;   // P tile [BN][LDP]
  static constexpr int LDO = RP + 4;      // float epilogue tile [BC][LDO]
  __host__ __device__ static constexpr int stage_bytes(bool mask) {
    return align128(2 * (BN * LDG * (mask ? 2 : 1) + BN * LDP));
  }
  __host__ __device__ static constexpr int smem_bytes(bool mask) {
    return STAGES * stage_bytes(mask) > align128(BC * LDO * 4) ? STAGES * stage_bytes(mask) : align128(BC * LDO * 4);
  }
  static long long blocks(const ColArgs& a) { return (a.C + BC - 1) / BC; }
};

template <class T, int RT>
__global__ void __launch_bounds__(kThreads) col_kernel(ColArgs a0, ColArgs a1, unsigned blocks0) {
  using S = ColShape<RT>;
  extern __shared__ __align__(128) unsigned char smem[];
  const bool second = blockIdx.x >= blocks0;
  const ColArgs a = second ? a1 : a0;
  const T* g = static_cast<const T*>(a.g);
  const T* m = static_cast<const T*>(a.m);
  const T* p = static_cast<const T*>(a.p);
  const bool has_m = m != nullptr;
  // (the block's shared memory fits the masked layout when either problem has a mask; each problem lays out
  // its own stages within it)
  const int stage_bytes = S::stage_bytes(has_m);
  const long long c0 = (long long)(second ? blockIdx.x - blocks0 : blockIdx.x) * S::BC;
  const int nt = (int)((a.N + S::BN - 1) / S::BN);
  const int warp = threadIdx.x / 32;   // columns c0 + 16 warp .. + 15

  auto tiles = [&](int st, T*& gs, T*& ms, T*& ps) {
    gs = reinterpret_cast<T*>(smem + st * stage_bytes);
    ms = gs + S::BN * S::LDG;
    ps = has_m ? ms + S::BN * S::LDG : ms;
  };
  auto load_stage = [&](int st, int t) {
    T *gs, *ms, *ps;
    tiles(st, gs, ms, ps);
    const long long n0 = (long long)t * S::BN;
    for (int c = threadIdx.x; c < S::BN * (S::BC / 8); c += kThreads) {
      const int i = c / (S::BC / 8), k = (c % (S::BC / 8)) * 8;
      const bool ok = n0 + i < a.N;
      load8(gs + i * S::LDG + k, g + (ok ? (n0 + i) * a.ldg : 0), c0 + k, a.C, ok, a.g_vec);
      if (has_m) load8(ms + i * S::LDG + k, m + (ok ? (n0 + i) * a.ldm : 0), c0 + k, a.C, ok, a.m_vec);
    }
    for (int c = threadIdx.x; c < S::BN * (S::RP / 8); c += kThreads) {
      const int i = c / (S::RP / 8), j = (c % (S::RP / 8)) * 8;
      const bool ok = n0 + i < a.N;
      load8(ps + i * S::LDP + j, p + (ok ? (n0 + i) * a.ldp : 0), j, a.r, ok, a.p_vec);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RT];
#pragma unroll
  for (int j = 0; j < RT; ++j) wmma::fill_fragment(acc[j], 0.f);
#pragma unroll
  for (int st = 0; st < S::STAGES - 1; ++st) {
    if (st < nt) load_stage(st, st);
    cp_async_commit();
  }
  for (int t = 0; t < nt; ++t) {
    cp_async_wait<S::STAGES - 2>();
    __syncthreads();
    T *gs, *ms, *ps;
    tiles(t % S::STAGES, gs, ms, ps);
    if (has_m) {
      mask_tile(gs, ms, S::BN, S::BC, S::LDG);
      __syncthreads();
    }
    if (t + S::STAGES - 1 < nt) load_stage((t + S::STAGES - 1) % S::STAGES, t + S::STAGES - 1);
    cp_async_commit();
#pragma unroll
    for (int kk = 0; kk < S::BN; kk += 16) {
      // G^T's 16 x 16 tile (c, n): G's tile read column-major
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, gs + kk * S::LDG + warp * 16, S::LDG);
#pragma unroll
      for (int j = 0; j < RT; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, ps + kk * S::LDP + j * 16, S::LDP);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  float* os = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int j = 0; j < RT; ++j)
    wmma::store_matrix_sync(os + warp * 16 * S::LDO + j * 16, acc[j], S::LDO, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < S::BC * a.r; i += kThreads) {
    // consecutive threads along c when the output is transposed (dA), along j otherwise
    const bool c_fast = a.o_sc == 1;
    const int c = c_fast ? i % S::BC : i / a.r, j = c_fast ? i / S::BC : i % a.r;
    if (c0 + c >= a.C) continue;
    const float val = a.s * os[c * S::LDO + j];
    const long long at = (c0 + c) * a.o_sc + (long long)j * a.o_sj;
    if (a.out_f32) {
      static_cast<float*>(a.out)[at] = val;
    } else {
      static_cast<T*>(a.out)[at] = from_float<T>(val);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------------
// Dynamic shared memory above the default 48 KB needs the function's opt-in, once per device; `configured` is the
// calling launcher's own flag word (one bit per device; a race only repeats the call).
template <class Kernel>
int ensure_smem(Kernel kernel, int bytes, unsigned long long& configured) {
  if (bytes <= 48 * 1024) return 0;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return (int)err;
  const unsigned long long bit = 1ull << (dev & 63);
  if (configured & bit) return 0;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return (int)err;
  configured |= bit;
  return 0;
}

// Rank tiles: r <= 16, 32, 64, 128 -> RT = 1, 2, 4, 8 (the products are padded with zeros to 16 RT).
template <template <class, int> class Launch, class T, class... Args>
int by_rank(int r, Args... args) {
  if (r <= 16) return Launch<T, 1>::run(args...);
  if (r <= 32) return Launch<T, 2>::run(args...);
  if (r <= 64) return Launch<T, 4>::run(args...);
  return Launch<T, 8>::run(args...);
}

template <template <class, int> class Launch, class... Args>
int by_dtype_rank(int dtype, int r, Args... args) {
  return dtype == 1 ? by_rank<Launch, __nv_bfloat16>(r, args...) : by_rank<Launch, __half>(r, args...);
}

template <class T, int RT>
struct RowLaunch {
  static int run(const RowArgs& a, bool f_kc, cudaStream_t stream) {
    return f_kc ? go<true>(a, stream) : go<false>(a, stream);
  }
  template <bool KC>
  static int go(const RowArgs& a, cudaStream_t stream) {
    static unsigned long long configured = 0;
    const int smem = RowShape<RT, KC>::smem_bytes(a.m != nullptr);
    if (int err = ensure_smem(row_kernel<T, RT, KC>, RowShape<RT, KC>::smem_bytes(true), configured)) return err;
    const unsigned grid = (unsigned)((a.N + RowShape<RT, KC>::BM - 1) / RowShape<RT, KC>::BM);
    row_kernel<T, RT, KC><<<grid, kThreads, smem, stream>>>(a);
    return (int)cudaGetLastError();
  }
};

template <class T, int RT>
struct LowrankLaunch {
  static int run(const LowrankArgs& a, bool q_cc, cudaStream_t stream) {
    return q_cc ? go<true>(a, stream) : go<false>(a, stream);
  }
  template <bool CC>
  static int go(const LowrankArgs& a, cudaStream_t stream) {
    using S = LowrankShape<RT, CC>;
    static unsigned long long configured = 0;
    if (int err = ensure_smem(lowrank_kernel<T, RT, CC>, S::smem_bytes(), configured)) return err;
    const dim3 grid((unsigned)((a.C + S::BN - 1) / S::BN), (unsigned)((a.N + S::BM - 1) / S::BM));
    lowrank_kernel<T, RT, CC><<<grid, kThreads, S::smem_bytes(), stream>>>(a);
    return (int)cudaGetLastError();
  }
};

template <class T, int RT>
struct ColLaunch {
  static int run(const ColArgs& a0, const ColArgs& a1, cudaStream_t stream) {
    using S = ColShape<RT>;
    static unsigned long long configured = 0;
    if (int err = ensure_smem(col_kernel<T, RT>, S::smem_bytes(true), configured)) return err;
    const long long b0 = S::blocks(a0), b1 = a1.C > 0 ? S::blocks(a1) : 0;
    const bool mask = a0.m != nullptr || a1.m != nullptr;
    col_kernel<T, RT><<<(unsigned)(b0 + b1), kThreads, S::smem_bytes(mask), stream>>>(a0, a1, (unsigned)b0);
    return (int)cudaGetLastError();
  }
};

bool aligned16(const void* p, long long row_stride) {
  return p != nullptr && (reinterpret_cast<uintptr_t>(p) % 16 == 0) && row_stride % 8 == 0;
}

}  // namespace

extern "C" {

// Largest rank the kernels take.
int bk_thin_max_rank() { return 128; }

// dtype: 1 bfloat16, 2 float16 (every 16-bit operand of one call). Pointers are device addresses; strides in
// elements. Each returns a cudaError_t (0 on success), 1 (cudaErrorInvalidValue) for a rank or dtype out of range.
// Empty problems launch nothing.

// out [N, r] (contiguous) = (G * M) F^T; G [N, K] row stride ldg, M null or row stride ldm; F(j, k) =
// f[j * f_sj + k * f_sk] with f_sk == 1 or f_sj == 1.
int bk_thin_row_launch(int dtype, const void* g, long long ldg, const void* m, long long ldm, const void* f,
                       long long f_sj, long long f_sk, void* out, long long N, long long K, int r,
                       cudaStream_t stream) {
  if (r < 1 || r > 128 || (dtype != 1 && dtype != 2) || (f_sk != 1 && f_sj != 1)) return 1;
  if (N == 0) return 0;
  const bool kc = f_sk == 1;
  RowArgs a{g, ldg, m, ldm, f, f_sj, f_sk, out, N, K, r,
            aligned16(g, ldg), aligned16(m, ldm), aligned16(f, kc ? f_sj : f_sk)};
  return by_dtype_rank<RowLaunch>(dtype, r, a, kc, stream);
}

// out [N, C] (row stride ldo) = (s P Q (+ bias)) * M; P [N, r] row stride ldp; Q(j, c) = q[j * q_sj + c * q_sc]
// with q_sc == 1 or q_sj == 1; bias [C] contiguous or null; M null or row stride ldm.
int bk_thin_lowrank_launch(int dtype, const void* p, long long ldp, const void* q, long long q_sj, long long q_sc,
                           const void* bias, const void* m, long long ldm, void* out, long long ldo, float s,
                           long long N, long long C, int r, cudaStream_t stream) {
  if (r < 1 || r > 128 || (dtype != 1 && dtype != 2) || (q_sc != 1 && q_sj != 1)) return 1;
  if (N == 0 || C == 0) return 0;
  const bool cc = q_sc == 1;
  LowrankArgs a{p, ldp, q, q_sj, q_sc, bias, m, ldm, out, ldo, s, N, C, r,
                aligned16(p, ldp), aligned16(q, cc ? q_sj : q_sc), aligned16(m, ldm), aligned16(out, ldo)};
  return by_dtype_rank<LowrankLaunch>(dtype, r, a, cc, stream);
}

// Up to two problems in one launch (the second skipped when C1 == 0; N is shared): for each, out(c, j) =
// s ((G * M)^T P)(c, j) for c < C, j < r, written at out[c * o_sc + j * o_sj] in float32 when out_f32 else in the
// 16-bit type; G [N, C] row stride ldg, M null or row stride ldm, P [N, r] row stride ldp.
int bk_thin_col_launch(int dtype, long long N, int r, float s,
                       const void* g0, long long ldg0, const void* m0, long long ldm0, const void* p0, long long ldp0,
                       void* out0, long long o_sc0, long long o_sj0, int out_f32_0, long long C0,
                       const void* g1, long long ldg1, const void* m1, long long ldm1, const void* p1, long long ldp1,
                       void* out1, long long o_sc1, long long o_sj1, int out_f32_1, long long C1,
                       cudaStream_t stream) {
  if (r < 1 || r > 128 || (dtype != 1 && dtype != 2)) return 1;
  if (C0 <= 0 || N <= 0) return 1;   // the first problem is the one always present; the op never asks for N = 0
  ColArgs a0{g0, ldg0, m0, ldm0, p0, ldp0, out0, o_sc0, o_sj0, out_f32_0 != 0, s, N, C0, r,
             aligned16(g0, ldg0), aligned16(m0, ldm0), aligned16(p0, ldp0)};
  ColArgs a1{g1, ldg1, m1, ldm1, p1, ldp1, out1, o_sc1, o_sj1, out_f32_1 != 0, s, N, C1 > 0 ? C1 : 0, r,
             aligned16(g1, ldg1), aligned16(m1, ldm1), aligned16(p1, ldp1)};
  return by_dtype_rank<ColLaunch>(dtype, r, a0, a1, stream);
}

const char* bk_thin_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
