// Per-pair r x r math of balora_kernels.reference.balancing_transforms, in float64, for one thread block.
//
// Written as block-cooperative code (`for (i = tid; i < n; i += nt)` loops separated by BK_SYNC()) so that
// the same source compiles
//   * for the GPU (csrc/balance.cu: one thread block per pair, matrices in shared or global memory), and
//   * for the host with -DBK_HOST_EMULATION (one "thread", BK_SYNC a no-op): tests/test_projection_kernels.py
//     compiles it with g++ and checks the math against the reference on the CPU.
// No torch headers here: `nvcc -c csrc/balance.cu` needs only the CUDA toolkit.
//
// Algorithm (see reference.py's docstring; n = r):
//   1. G_B = P diag(d) P^T, G_A = R diag(e) R^T (cyclic Jacobi, round-robin order);
//      X = P sqrt(d live), Y = R sqrt(e live), live = eigenvalue > RANK_RTOL * largest (reference.gram_rtol of
//      float32 Grams: the Grams this kernel receives are float32).
//   2. H = X^T Y; H^T H = V diag(lambda) V^T (descending); U_j = H v_j, S_j = ||H v_j||; live = S_j above
//      reference.product_floor = max(eps_f S_1, sqrt(n eps_g) sqrt(d_max e_max)), eps_f the pair's factor
//      rounding unit (passed in), eps_g = FLT_EPSILON.
//   3. T[:, j<k] = Y v_j S_j^-1/2; if k < n: T[:, k+j] = j-th eigenvector (ascending) of Z Z^T, Z = X U_live.
//   4. T^-1 by Gauss-Jordan with partial pivoting (equals the reference's block formula, exactly invertible).
//   5. C = T^T G_B + T^-1 G_A (rows: components, live first; columns: slots of the pair). nearest: the live
//      components take the k slots with the largest live share of ||C[:, j]||^2 (ties: lower slot), the
//      rest the others, Q = polar of each block; svd: live component i keeps slot i with sign(C_ii), the
//      rest block its polar factor. Never a rotation across live and rest components.
//      polar(C) = U V^T from eig(C^T C), dead directions completed from eig(I - U U^T), then two
//      Newton-Schulz steps Q <- Q (3I - Q^T Q) / 2 so that Q is orthogonal to rounding.
//   6. T <- T Q, T^-1 <- Q^T T^-1; balance gaps before / after from the Grams (after: from T before the rotation Q,
//      which leaves the gap unchanged).
// Fast path (full_rank_transforms): when bounds prove that the reference keeps every component (the usual
// case), steps 1-4 are replaced by a Cholesky factor of G_B and, with M = L^T G_A L, T = L^-T M^1/4 (times a
// rotation): in the nearest mode M^-1/4 comes from a scaled Newton iteration for inverse fourth roots
// (inv_fourth_root_ns), T^-1 = M^-1/4 L^T and T = (G_A L) M^-1/4 M^-1/2 (fourth_root_transforms, matrix products
// only), in the svd mode (or when that does not settle) from one Jacobi eigendecomposition of M;
// no inversion either way. The polar factor of step 5 is computed by scaled Newton-Schulz iterations too
// (polar_ns), falling back to eig(C^T C) when they do not converge. All give the same transforms as the general
// path (to float64 rounding): the nearest mode's T Q does not depend on the basis of T's columns.
#pragma once

#ifdef BK_HOST_EMULATION
#include <cmath>
#define BK_DEV inline
#define BK_HD inline
#define BK_SYNC() ((void)0)
using std::fabs;
using std::fmax;
using std::sqrt;
using std::isfinite;
using std::fma;
using std::nan;
using std::frexp;
using std::log;
using std::ceil;
using std::ldexp;
inline float bk_fdiv(float a, float b) { return a / b; }
inline float bk_rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double bk_rsqrt(double x) { return 1.0 / std::sqrt(x); }
#define BK_LDG(p) (*(p))
#define BK_UNROLL4
#else
#define BK_DEV __device__ __forceinline__
#define BK_HD __host__ __device__ inline
__device__ __forceinline__ float bk_fdiv(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ float bk_rsqrtf(float x) { return rsqrtf(x); }
__device__ __forceinline__ double bk_rsqrt(double x) { return rsqrt(x); }
#define BK_LDG(p) __ldg(p)       // a load through the read-only path (data that does not change during the kernel)
#define BK_UNROLL4 _Pragma("unroll 4")
#define BK_SYNC() __syncthreads()
#endif

namespace bk {

constexpr double RANK_RTOL = 1.52587890625e-05;   // 2^-16, reference.RANK_RTOL (gram_rtol of float32 Grams)
constexpr double GRAM_EPS = 1.1920928955078125e-07; // 2^-23, torch.finfo(float32).eps: eps_g of the Grams
constexpr int STATUS_NONFINITE = 1;
constexpr int STATUS_ZERO = 2;
constexpr int STATUS_RANK_DEFICIENT = 4;
constexpr int STATUS_RANK_SHIFT = 8;               // status >> 8: the live components k (0 for skipped pairs)
constexpr int MAX_SWEEPS = 24;
constexpr int NUM_MATS = 11;                       // r x r float64 buffers per pair
constexpr int kBlockedRank = 33;                   // ranks from here take the blocked kernels (CtxT<4>, below)
constexpr int PATH_GENERAL = 0, PATH_FAST_EIG = 1, PATH_FAST_NS = 2;  // Ctx::path

struct Ctx {
  int tid, nt, n;     // thread index, threads in the block (a multiple of 32 on the GPU), rank
  double* red;        // [32] reduction scratch
  double* rc;         // [2 (n/2+1)] rotation cosines of one Jacobi step (two matrices)
  double* rs;         // [2 (n/2+1)] rotation sines
  bool pair_eig;      // diagonalize G_B and G_A together (all matrices in shared memory)
  int* rp;            // [n/2+1] rotation index p
  int* rq;            // [n/2+1] rotation index q
  int* perm;          // [n]
  int* slot;          // [n] slot j -> index in the live block (< k) or k + index in the rest block
  int* iflag;         // [4]
  double* v0;         // [n] vectors
  double* v1;
  double* v2;
  double* v3;
  double* stage;      // the staged products' operand tiles (stage_doubles(n); ranks >= kBlockedRank only)
  int path;           // how the last pair's T was found (PATH_*) and, on PATH_FAST_NS, the Newton-Schulz steps
  int ns_steps;       // of the inverse fourth root (PATH_FAST_NS): read by the host build's tests only
  int polar_steps;    // of polar_ns: likewise
};

// The kernel's compile-time choice of how it multiplies r x r matrices (see matmul_store): 1 for small ranks
// (matmul_mma_direct on the float64 tensor cores of sm_80 and later, one output per thread on the CUDA cores in the
// host build), 4 for ranks >= kBlockedRank (matmul_mma; 4 x 4 outputs per thread on the CUDA cores in the host
// build). Only the functions that reach matmul take it (as their template parameter CT).
template <int TB_MAX>
struct CtxT : Ctx {
  static constexpr int tb_max = TB_MAX;
};

struct Mats {
  double *GB, *GA, *X, *Y, *T, *W, *M1, *M2, *M3, *AW, *VW;
};

// ---- block reductions (every thread gets the same value, summed in a fixed order) ----
BK_DEV double block_sum(Ctx& c, double v) {
#ifdef BK_HOST_EMULATION
  return v;
#else
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  BK_SYNC();
  if ((c.tid & 31) == 0) c.red[c.tid >> 5] = v;
  BK_SYNC();
  double s = 0.0;
  const int nw = c.nt >> 5;
  for (int w = 0; w < nw; ++w) s += c.red[w];
  return s;
#endif
}

// Two block sums with the barriers of one: (a, b) summed over the block, each in block_sum's order.
struct Sum2 {
  double a, b;
};
BK_DEV Sum2 block_sum2(Ctx& c, double a, double b) {
#ifdef BK_HOST_EMULATION
  return {a, b};
#else
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  BK_SYNC();
  const int nw = c.nt >> 5;            // <= 16 (blocks of at most 512 threads): c.red holds 32 values
  if ((c.tid & 31) == 0) {
    c.red[c.tid >> 5] = a;
    c.red[16 + (c.tid >> 5)] = b;
  }
  BK_SYNC();
  Sum2 s{0.0, 0.0};
  for (int w = 0; w < nw; ++w) {
    s.a += c.red[w];
    s.b += c.red[16 + w];
  }
  return s;
#endif
}

BK_DEV double block_max(Ctx& c, double v) {
#ifdef BK_HOST_EMULATION
  return v;
#else
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, o));
  BK_SYNC();
  if ((c.tid & 31) == 0) c.red[c.tid >> 5] = v;
  BK_SYNC();
  double s = 0.0;
  const int nw = c.nt >> 5;
  for (int w = 0; w < nw; ++w) s = fmax(s, c.red[w]);
  return s;
#endif
}

// Rotation (c, s) that annihilates S[p][q] of the symmetric 2x2 [[app, apq], [apq, aqq]] (Golub & Van Loan
// sym.schur2). The tangent is computed in float32 (fast; the matrix is pre-scaled to max |S| ~ 1), then
// c = (1 + t^2)^-1/2 to float64 accuracy by two Newton steps: the rotation is orthogonal to float64 rounding
// and annihilates S[p][q] up to ~1e-7 of its size. Once the off-diagonal norm is below 1e-8 of the total,
// `precise` sweeps use the float64 formula, so the sweep count stays that of exact rotations.
BK_DEV void jacobi_rotation(double app, double aqq, double apq, bool precise, double* cs, double* sn) {
  if (precise) {                   // last sweeps: exact float64 rotations (quadratic convergence to the end)
    if (apq == 0.0) { *cs = 1.0; *sn = 0.0; return; }
    const double tau = (aqq - app) / (2.0 * apq);
    const double t = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
    *cs = 1.0 / sqrt(1.0 + t * t);
    *sn = t * *cs;
    return;
  }
  const float fpq = (float)apq;
  if (fpq == 0.0f) { *cs = 1.0; *sn = 0.0; return; }
  const float tau = bk_fdiv((float)(aqq - app), 2.0f * fpq);
  const float at = fabsf(tau);
  const float tf = at > 1e18f ? bk_fdiv(0.5f, tau) : bk_fdiv(tau >= 0.0f ? 1.0f : -1.0f, at + sqrtf(1.0f + tau * tau));
  const double t = (double)tf;
  const double x = 1.0 + t * t;
  double y = (double)bk_rsqrtf((float)x);
  y = y * (1.5 - 0.5 * x * y * y);
  y = y * (1.5 - 0.5 * x * y * y);
  *cs = y;
  *sn = t * y;
}

BK_DEV void set_identity(Ctx& c, double* M, int n) {
  for (int idx = c.tid; idx < n * n; idx += c.nt) M[idx] = (idx / n == idx % n) ? 1.0 : 0.0;
  BK_SYNC();
}

BK_DEV void copy_mat(Ctx& c, double* dst, const double* src, int n) {
  for (int idx = c.tid; idx < n * n; idx += c.nt) dst[idx] = src[idx];
  BK_SYNC();
}

// A thread's flat indices tid, tid + nt, tid + 2 nt, ... of a row-major index space `width` wide, as (row, col):
// the block-cooperative loop `for (idx = tid; idx < rows * width; idx += nt)` without a division per step
// (`for (FlatIter it(c, width); it.row < rows; it.next())`), for widths known only at run time. width > 0.
struct FlatIter {
  int row, col, drow, dcol, width;
  BK_DEV FlatIter(const Ctx& c, int w) : row(c.tid / w), col(c.tid % w), drow(c.nt / w), dcol(c.nt % w), width(w) {}
  BK_DEV void next() {
    row += drow;
    col += dcol;
    if (col >= width) { col -= width; ++row; }
  }
};

// C [m x p] = op(A) [m x q] op(B) [q x p] on the CUDA cores: the host build's products (and BK_TENSOR_F64=0
// builds'); compact row-major operands with the given leading dims. Each thread computes TB x TB outputs
// (register blocking: 2 TB loads per TB^2 FMAs, TB^2 independent chains): TB consecutive rows i0 + a and TB
// columns jc + b tp strided by tp = ceil(p / TB), so that the threads of a warp (consecutive jc) read consecutive
// elements of a row of B and write consecutive outputs: one shared-memory wavefront per load where TB consecutive
// columns per thread made a 4-way bank conflict at TB = 4 (BK_MATMUL_STRIDED_COLS=0 builds the consecutive
// columns, for comparison). Every output is still the sum over
// k = 0..q-1 in ascending order, by fma from 0.0, whatever TB and column order: the result does not depend on
// the blocking (nor on the number of threads). `store(i, j, s)` receives each output, always from the same
// thread for a given shape (no barrier at the end: the caller's).
#ifndef BK_MATMUL_STRIDED_COLS
#define BK_MATMUL_STRIDED_COLS 1
#endif
template <int TB, class Store>
BK_DEV Store matmul_tiles(const Ctx& c, const double* A, bool tA, const double* B, bool tB, int m, int q, int p,
                          int lda, int ldb, Store store) {
  const int tm = (m + TB - 1) / TB, tp = (p + TB - 1) / TB;
  const int col_step = BK_MATMUL_STRIDED_COLS ? tp : 1;
  for (int t = c.tid; t < tm * tp; t += c.nt) {
    const int i0 = (t / tp) * TB, j0 = BK_MATMUL_STRIDED_COLS ? t % tp : (t % tp) * TB;
    double acc[TB][TB];
    for (int a = 0; a < TB; ++a)
      for (int b = 0; b < TB; ++b) acc[a][b] = 0.0;
    for (int k = 0; k < q; ++k) {
      double av[TB], bv[TB];
      for (int a = 0; a < TB; ++a) {
        const int i = i0 + a < m ? i0 + a : m - 1;        // clamped: a padding row reads a valid element
        av[a] = tA ? A[k * lda + i] : A[i * lda + k];
      }
      for (int b = 0; b < TB; ++b) {
        const int j = j0 + b * col_step < p ? j0 + b * col_step : p - 1;
        bv[b] = tB ? B[j * ldb + k] : B[k * ldb + j];
      }
      for (int a = 0; a < TB; ++a)
        for (int b = 0; b < TB; ++b) acc[a][b] = fma(av[a], bv[b], acc[a][b]);
    }
    for (int a = 0; a < TB; ++a)
      for (int b = 0; b < TB; ++b)
        if (i0 + a < m && j0 + b * col_step < p) store(i0 + a, j0 + b * col_step, acc[a][b]);
  }
  return store;
}

// ---- float64 tensor-core products (sm_80 and later; the blocked kernels, ranks >= kBlockedRank) ----
// C = op(A) op(B) by 64 x 64 output tiles: the block stages 16-wide k chunks of both operands in shared memory
// (c.stage, wherever the operands live: most of a rank-64 pair's matrices are in global memory) and each of the
// 8 warps multiplies its 16 x 32 part with mma.m16n8k4.f64 on sm_90, mma.m8n8k4.f64 below (BK_DMMA_K; the next
// chunk's loads in flight meanwhile). The
// padded leading dimensions make the fragment loads conflict-free: lanes 0-15 (and 16-31) of an A fragment read
// rows g = 0..3 at k = kk + t, t = 0..3 (offsets 20 g + t: 16 distinct bank pairs), of a B fragment k rows
// kk + t at columns g (68 t + g). Every output is the float64 sum over k in ascending order, four k per mma
// instruction: on an H200 these products wrote the same bits as matmul_tiles' fma chain (bench/probe/eig_phases.py's
// BK_TENSOR_F64=0 build beside this one, bench/results/logs/session15-eig-phases-tensor-cores-2026-12-02.json),
// whatever the operands' placement or the grid; the same thread stores a given output for a given shape, as in
// matmul_tiles. r = 64, 224 pairs: the r x r kernel 1.374 -> 0.875 ms (with T by products, below).
constexpr int kStageTile = 64;                 // output rows and columns of a block tile
constexpr int kStageK = 16;                    // k per staged chunk (32 measured slower: 1.06 against 0.91 ms)
constexpr int kStageLdA = kStageK + 4;         // As[i][k]
constexpr int kStageLdB = kStageTile + 4;      // Bs[k][j]
constexpr int kStageThreads = 256;             // 8 warps: a 4 x 2 grid of 16 x 32 warp tiles
BK_HD int stage_doubles(int n) { return n >= kBlockedRank ? kStageTile * kStageLdA + kStageK * kStageLdB : 0; }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(BK_HOST_EMULATION)
#ifndef BK_TENSOR_F64
#define BK_TENSOR_F64 1       // 0 (a probe switch): every product on the CUDA cores (matmul_tiles)
#endif
#else
#undef BK_TENSOR_F64
#define BK_TENSOR_F64 0
#endif

// The blocked products' mma shape: m16n8k<BK_DMMA_K> (4, 8 or 16: the float64 shapes sm_90 added), or 0 for two
// m8n8k4 (sm_80's shape, what they ran until session 18; the only one below sm_90).
#ifndef BK_DMMA_K
#define BK_DMMA_K 4
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#undef BK_DMMA_K
#define BK_DMMA_K 0
#endif

#if BK_TENSOR_F64
__device__ __forceinline__ void dmma_884(double (&d)[2], double a, double b) {
  asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};"
      : "+d"(d[0]), "+d"(d[1])
      : "d"(a), "d"(b));
}

// d += a b for a 16 x 8 tile over K = 4, 8 or 16 (mma.m16n8k<K>.f64, sm_90): lo / hi hold rows g / g + 8 of the
// tile (columns 2 t, 2 t + 1; g = lane / 4, t = lane % 4); a[2 q + h] = A[g + 8 h][4 q + t], b[q] = B[4 q + t][g].
template <int K>
__device__ __forceinline__ void dmma_16x8(double (&lo)[2], double (&hi)[2], const double (&a)[K / 2],
                                          const double (&b)[K / 4]) {
  if constexpr (K == 4) {
    asm("mma.sync.aligned.m16n8k4.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
        : "+d"(lo[0]), "+d"(lo[1]), "+d"(hi[0]), "+d"(hi[1])
        : "d"(a[0]), "d"(a[1]), "d"(b[0]));
  } else if constexpr (K == 8) {
    asm("mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+d"(lo[0]), "+d"(lo[1]), "+d"(hi[0]), "+d"(hi[1])
        : "d"(a[0]), "d"(a[1]), "d"(a[2]), "d"(a[3]), "d"(b[0]), "d"(b[1]));
  } else {
    static_assert(K == 16, "m16n8k4, k8 or k16");
    asm("mma.sync.aligned.m16n8k16.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, {%4, %5, %6, %7, %8, %9, %10, %11}, "
        "{%12, %13, %14, %15}, {%0, %1, %2, %3};"
        : "+d"(lo[0]), "+d"(lo[1]), "+d"(hi[0]), "+d"(hi[1])
        : "d"(a[0]), "d"(a[1]), "d"(a[2]), "d"(a[3]), "d"(a[4]), "d"(a[5]), "d"(a[6]), "d"(a[7]), "d"(b[0]),
          "d"(b[1]), "d"(b[2]), "d"(b[3]));
  }
}

// C = op(A) op(B), each output handed to store(i, j, value); returns the store (a functor's sums: see
// ResidualStore). The transposes are template arguments (matmul_mma_t's dispatch). Not inlined: one instance per
// call site, its store inside. Measured on an H200 (7B pairs, r = 64, 224 pairs; the r x r kernel beside the other
// build in the same device call): 0.462 ms against 0.576 with one shared instance per transpose pair handing its
// accumulators to inlined stores through local memory (bench/results/logs/session18-eig-phases-shared-tile-*.json),
// 0.473 against 0.542 with a second set of instances specialised for r = 64's sizes beside these (more code:
// slower, though fewer instructions per product; session18-eig-phases-first-*.json).
template <bool TA, bool TB, class Store>
__device__ __noinline__ Store matmul_mma(const Ctx& c, const double* A, const double* B, int m, int q, int p, int lda,
                                         int ldb, Store store) {
  static_assert(kStageTile == 64 && kStageK == 16 && kStageThreads == 256, "the index math below assumes these");
  double* As = c.stage;
  double* Bs = c.stage + kStageTile * kStageLdA;
  const int lane = c.tid & 31, warp = c.tid >> 5;
  const int wr = (warp >> 1) * 16, wc = (warp & 1) * 32, g = lane >> 2, t4 = lane & 3;
  for (int bi = 0; bi < m; bi += kStageTile) {
    for (int bj = 0; bj < p; bj += kStageTile) {
      double acc[2][4][2];
      for (int t = 0; t < 2; ++t)
        for (int u = 0; u < 4; ++u) acc[t][u][0] = acc[t][u][1] = 0.0;
      double ra[4], rb[4];
      // The chunk element (row or column, k) a thread moves in each of its 4 steps: along the operand's contiguous
      // dimension, so that a warp reads consecutive addresses.
      auto fetch = [&](int k0) {
        for (int s = 0; s < 4; ++s) {
          const int idx = c.tid + s * kStageThreads;
          const int ia = TA ? (idx & 63) : (idx >> 4), ka = TA ? (idx >> 6) : (idx & 15);
          const int gi = bi + ia, gka = k0 + ka;
          ra[s] = (gi < m && gka < q) ? (TA ? A[gka * lda + gi] : A[gi * lda + gka]) : 0.0;
          const int jb = TB ? (idx >> 4) : (idx & 63), kb = TB ? (idx & 15) : (idx >> 6);
          const int gj = bj + jb, gkb = k0 + kb;
          rb[s] = (gj < p && gkb < q) ? (TB ? B[gj * ldb + gkb] : B[gkb * ldb + gj]) : 0.0;
        }
      };
      fetch(0);
      for (int k0 = 0; k0 < q; k0 += kStageK) {
        BK_SYNC();                                  // the stage's previous readers are done
        for (int s = 0; s < 4; ++s) {
          const int idx = c.tid + s * kStageThreads;
          As[(TA ? (idx & 63) : (idx >> 4)) * kStageLdA + (TA ? (idx >> 6) : (idx & 15))] = ra[s];
          Bs[(TB ? (idx & 15) : (idx >> 6)) * kStageLdB + (TB ? (idx >> 4) : (idx & 63))] = rb[s];
        }
        BK_SYNC();
        if (k0 + kStageK < q) fetch(k0 + kStageK);  // in flight during this chunk's products
#if BK_DMMA_K == 0
        for (int kk = 0; kk < kStageK; kk += 4) {
          double a[2], b[4];
          for (int t = 0; t < 2; ++t) a[t] = As[(wr + 8 * t + g) * kStageLdA + kk + t4];
          for (int u = 0; u < 4; ++u) b[u] = Bs[(kk + t4) * kStageLdB + wc + 8 * u + g];
          for (int t = 0; t < 2; ++t)
            for (int u = 0; u < 4; ++u) dmma_884(acc[t][u], a[t], b[u]);
        }
#else
        constexpr int KS = BK_DMMA_K;
        for (int kk = 0; kk < kStageK; kk += KS) {
          double a[KS / 2], b[4][KS / 4];
          for (int q4 = 0; q4 < KS / 4; ++q4)
            for (int h = 0; h < 2; ++h) a[2 * q4 + h] = As[(wr + 8 * h + g) * kStageLdA + kk + 4 * q4 + t4];
          for (int u = 0; u < 4; ++u)
            for (int q4 = 0; q4 < KS / 4; ++q4) b[u][q4] = Bs[(kk + 4 * q4 + t4) * kStageLdB + wc + 8 * u + g];
          for (int u = 0; u < 4; ++u) dmma_16x8<KS>(acc[0][u], acc[1][u], a, b[u]);
        }
#endif
      }
      for (int t = 0; t < 2; ++t)
        for (int u = 0; u < 4; ++u)
          for (int e = 0; e < 2; ++e) {
            const int i = bi + wr + 8 * t + g, j = bj + wc + 8 * u + 2 * t4 + e;
            if (i < m && j < p) store(i, j, acc[t][u][e]);
          }
    }
  }
  return store;
}

// The small ranks' products (CT::tb_max 1: ranks < kBlockedRank, whose matrices are all in shared memory unless the
// device's limits are lower than an H100's; launched with whole warps, BK_FIXED_N*_THREADS): one 8 x 8 output
// tile per warp at a time, the fragments loaded straight from the operands (no staging, no barrier), k ascending
// in steps of four as in matmul_mma.
template <class Store>
__device__ __forceinline__ Store matmul_mma_direct(const Ctx& c, const double* A, bool tA, const double* B, bool tB,
                                                   int m, int q, int p, int lda, int ldb, Store store) {
  const int lane = c.tid & 31, g = lane >> 2, t4 = lane & 3;
  const int tm = (m + 7) >> 3, tp = (p + 7) >> 3;
  for (int t = c.tid >> 5; t < tm * tp; t += c.nt >> 5) {
    const int i0 = (t / tp) * 8, j0 = (t % tp) * 8, i = i0 + g, j = j0 + g;
    double acc[2] = {0.0, 0.0};
    for (int k0 = 0; k0 < q; k0 += 4) {
      const int k = k0 + t4;
      const double a = (i < m && k < q) ? (tA ? A[k * lda + i] : A[i * lda + k]) : 0.0;
      const double b = (j < p && k < q) ? (tB ? B[j * ldb + k] : B[k * ldb + j]) : 0.0;
      dmma_884(acc, a, b);
    }
    for (int e = 0; e < 2; ++e) {
      const int col = j0 + 2 * t4 + e;
      if (i < m && col < p) store(i, col, acc[e]);
    }
  }
  return store;
}

// matmul_mma with the transposes as template arguments (literals at every call site: once matmul_store is inlined
// only the one branch remains).
template <class Store>
__device__ __forceinline__ Store matmul_mma_t(const Ctx& c, const double* A, bool tA, const double* B, bool tB, int m,
                                              int q, int p, int lda, int ldb, Store store) {
  if (tA) {
    if (tB) return matmul_mma<true, true>(c, A, B, m, q, p, lda, ldb, store);
    return matmul_mma<true, false>(c, A, B, m, q, p, lda, ldb, store);
  }
  if (tB) return matmul_mma<false, true>(c, A, B, m, q, p, lda, ldb, store);
  return matmul_mma<false, false>(c, A, B, m, q, p, lda, ldb, store);
}
#endif

// Every product runs on the float64 tensor cores where the GPU build has them: the blocked kernels' (CT::tb_max
// >= 4) by matmul_mma (their launches always have kStageThreads threads: bk::balance_config), the small ranks' by
// matmul_mma_direct. On the CUDA cores otherwise (host build, BK_TENSOR_F64=0): 4 x 4 outputs per thread for the
// blocked kernels when that still gives every thread a tile, else 2 x 2, else one; the small ranks' kernels one
// output per thread (blocked code's registers made the compiler spill across the kernel there).
template <class CT, class Store>
BK_DEV Store matmul_store(const CT& c, const double* A, bool tA, const double* B, bool tB, int m, int q, int p,
                          int lda, int ldb, Store store) {
#if BK_TENSOR_F64
  if constexpr (CT::tb_max >= 4) {
    return matmul_mma_t(c, A, tA, B, tB, m, q, p, lda, ldb, store);
  } else {
    return matmul_mma_direct(c, A, tA, B, tB, m, q, p, lda, ldb, store);
  }
#else
  if constexpr (CT::tb_max >= 4) {
    if (m * p >= 16 * c.nt) return matmul_tiles<4>(c, A, tA, B, tB, m, q, p, lda, ldb, store);
  }
  if constexpr (CT::tb_max >= 2) {
    if (m * p >= 4 * c.nt) return matmul_tiles<2>(c, A, tA, B, tB, m, q, p, lda, ldb, store);
  }
  return matmul_tiles<1>(c, A, tA, B, tB, m, q, p, lda, ldb, store);
#endif
}

template <class CT>
BK_DEV void matmul(CT& c, double* Cm, const double* A, bool tA, const double* B, bool tB, int m, int q, int p,
                   int lda, int ldb) {
  matmul_store(c, A, tA, B, tB, m, q, p, lda, ldb, [=](int i, int j, double s) { Cm[i * p + j] = s; });
  BK_SYNC();
}

template <class CT>
BK_DEV void mm(CT& c, double* C, const double* A, bool tA, const double* B, bool tB, int n) {
  matmul(c, C, A, tA, B, tB, n, n, n, n, n);
}

// ---- symmetric eigensolver: cyclic Jacobi, round-robin (parallel) ordering ----
// cnt (1 or 2) independent matrices are diagonalized in lockstep: the same steps and barriers serve both,
// which halves the latency of the two Gram eigendecompositions. For each t < cnt: S[t] [n x n] symmetric
// (destroyed), V[t] [n x n] workspace; writes eigenvectors as columns of vec[t] and eigenvalues to val[t],
// ascending.
BK_DEV void sym_eig_multi(Ctx& c, int cnt, double* const* Sa, double* const* Va, double* const* veca,
                          double* const* vala, int n) {
  double up[2] = {1.0, 1.0};
  bool active[2] = {false, false}, precise[2] = {false, false};
  for (int t = 0; t < cnt; ++t) {
    // Scale by a power of two (exact) so that max |S| is in [0.5, 1): float32 rotations stay in range.
    double* S = Sa[t];
    double amax = 0.0;
    for (int idx = c.tid; idx < n * n; idx += c.nt) amax = fmax(amax, fabs(S[idx]));
    amax = block_max(c, amax);
    int ex = 0;
    if (amax > 0.0 && isfinite(amax)) frexp(amax, &ex);
    const double down = ldexp(1.0, -ex);
    up[t] = ldexp(1.0, ex);
    for (int idx = c.tid; idx < n * n; idx += c.nt) S[idx] *= down;
    set_identity(c, Va[t], n);
  }
  const int N = n + (n & 1);      // even size; index n is a dummy when n is odd (identity rotations)
  const int m = N / 2;
  for (int sweep = 0; sweep < MAX_SWEEPS; ++sweep) {
    bool any = false;
    for (int t = 0; t < cnt; ++t) {
      const double* S = Sa[t];
      double off = 0.0, tot = 0.0;
      for (int idx = c.tid; idx < n * n; idx += c.nt) {
        const double v = S[idx] * S[idx];
        tot += v;
        if (idx / n != idx % n) off += v;
      }
      off = block_sum(c, off);
      tot = block_sum(c, tot);
      active[t] = off > 1e-28 * tot;          // not converged (false also for tot == 0 / NaN)
      precise[t] = !(off > 1e-16 * tot);
      any = any || active[t];
    }
    if (!any) break;
    for (int s = 0; s < N - 1; ++s) {
      for (int kk = c.tid; kk < cnt * m; kk += c.nt) {
        const int t = kk >= m ? 1 : 0, k = kk - t * m;
        int p, q;
        if (k == 0) { p = s; q = N - 1; }
        else { p = (s + k) % (N - 1); q = (s - k + N - 1) % (N - 1); }
        double cs = 1.0, sn = 0.0;
        const double* S = Sa[t];
        if (q < n && active[t]) jacobi_rotation(S[p * n + p], S[q * n + q], S[p * n + q], precise[t], &cs, &sn);
        if (t == 0) { c.rp[k] = p; c.rq[k] = q; }
        c.rc[kk] = cs; c.rs[kk] = sn;
      }
      BK_SYNC();
      // S <- J^T S J, one 2x2 block per (pair a, pair b); V <- V J.
      const int mm2 = m * m;
      for (int idx = c.tid; idx < cnt * mm2; idx += c.nt) {
        const int t = idx >= mm2 ? 1 : 0, rem = idx - t * mm2;
        if (!active[t]) continue;
        double* S = Sa[t];
        const int a = rem / m, b = rem - (rem / m) * m;
        const int p1 = c.rp[a], q1 = c.rq[a], p2 = c.rp[b], q2 = c.rq[b];
        const double c1 = c.rc[t * m + a], s1 = c.rs[t * m + a], c2 = c.rc[t * m + b], s2 = c.rs[t * m + b];
        const bool h1 = q1 < n, h2 = q2 < n;
        const double m00 = S[p1 * n + p2];
        const double m01 = h2 ? S[p1 * n + q2] : 0.0;
        const double m10 = h1 ? S[q1 * n + p2] : 0.0;
        const double m11 = (h1 && h2) ? S[q1 * n + q2] : 0.0;
        const double l00 = c1 * m00 - s1 * m10, l01 = c1 * m01 - s1 * m11;
        const double l10 = s1 * m00 + c1 * m10, l11 = s1 * m01 + c1 * m11;
        S[p1 * n + p2] = c2 * l00 - s2 * l01;
        if (h2) S[p1 * n + q2] = s2 * l00 + c2 * l01;
        if (h1) S[q1 * n + p2] = c2 * l10 - s2 * l11;
        if (h1 && h2) S[q1 * n + q2] = s2 * l10 + c2 * l11;
      }
      const int nm = n * m;
      for (int idx = c.tid; idx < cnt * nm; idx += c.nt) {
        const int t = idx >= nm ? 1 : 0, rem = idx - t * nm;
        if (!active[t]) continue;
        double* V = Va[t];
        const int i = rem / m, b = rem - (rem / m) * m;
        const int p2 = c.rp[b], q2 = c.rq[b];
        if (q2 < n) {
          const double c2 = c.rc[t * m + b], s2 = c.rs[t * m + b];
          const double vp = V[i * n + p2], vq = V[i * n + q2];
          V[i * n + p2] = c2 * vp - s2 * vq;
          V[i * n + q2] = s2 * vp + c2 * vq;
        }
      }
      BK_SYNC();
    }
  }
  for (int t = 0; t < cnt; ++t) {
    const double* S = Sa[t];
    const double* V = Va[t];
    for (int i = c.tid; i < n; i += c.nt) {       // rank sort, ties by index: a permutation
      const double w = S[i * n + i];
      int rank = 0;
      for (int j = 0; j < n; ++j) {
        const double u = S[j * n + j];
        rank += (u < w) || (u == w && j < i);
      }
      c.perm[rank] = i;
    }
    BK_SYNC();
    double* vec = veca[t];
    double* val = vala[t];
    for (int idx = c.tid; idx < n * n; idx += c.nt) vec[idx] = V[(idx / n) * n + c.perm[idx % n]];
    for (int j = c.tid; j < n; j += c.nt) val[j] = S[c.perm[j] * n + c.perm[j]] * up[t];
    BK_SYNC();
  }
}

BK_DEV void sym_eig(Ctx& c, double* S, double* V, double* vec, double* val, int n) {
  double* Sa[1] = {S};
  double* Va[1] = {V};
  double* veca[1] = {vec};
  double* vala[1] = {val};
  sym_eig_multi(c, 1, Sa, Va, veca, vala, n);
}

// Normalize the columns of U [m x m] in place; columns with norm <= rtol * max norm are zeroed and flagged
// dead in `norms` (set to 0). Returns the number of dead columns.
BK_DEV int normalize_columns(Ctx& c, double* U, double* norms, int m, double rtol) {
  for (int j = c.tid; j < m; j += c.nt) {
    double s = 0.0;
    for (int i = 0; i < m; ++i) s += U[i * m + j] * U[i * m + j];
    norms[j] = sqrt(s);
  }
  BK_SYNC();
  double nmax = 0.0;
  for (int j = 0; j < m; ++j) nmax = fmax(nmax, norms[j]);
  int dead = 0;
  for (int j = 0; j < m; ++j) dead += !(norms[j] > rtol * nmax);
  BK_SYNC();
  for (int idx = c.tid; idx < m * m; idx += c.nt) {
    const int j = idx % m;
    const double nj = norms[j];
    U[idx] = (nj > rtol * nmax) ? U[idx] / nj : 0.0;
  }
  BK_SYNC();
  for (int j = c.tid; j < m; j += c.nt) if (!(norms[j] > rtol * nmax)) norms[j] = 0.0;
  BK_SYNC();
  return dead;
}

// Orthogonal polar factor Q [m x m] of Cm [m x m] (compact, ld m). Workspaces: Vc, U, E [m x m], AW, VW.
template <class CT>
BK_DEV void polar(CT& c, const double* Cm, double* Q, double* Vc, double* U, double* E, double* AW, double* VW,
                  int m) {
  matmul(c, AW, Cm, true, Cm, false, m, m, m, m, m);           // C^T C
  sym_eig(c, AW, VW, Vc, c.v2, m);
  matmul(c, U, Cm, false, Vc, false, m, m, m, m, m);           // C v_j = sigma_j u_j
  const int dead = normalize_columns(c, U, c.v3, m, 1e-10);
  if (dead > 0) {
    // Complete U with an orthonormal basis of the complement of its live columns: the top
    // eigenvectors of I - U U^T (eigenvalue 1 on the complement, 0 on span(U)).
    matmul(c, AW, U, false, U, true, m, m, m, m, m);
    for (int idx = c.tid; idx < m * m; idx += c.nt) AW[idx] = (idx / m == idx % m ? 1.0 : 0.0) - AW[idx];
    BK_SYNC();
    sym_eig(c, AW, VW, E, c.v2, m);
    if (c.tid == 0) {
      int t = 0;
      for (int j = 0; j < m; ++j) if (c.v3[j] == 0.0) c.perm[j] = m - 1 - (t++);  else c.perm[j] = -1;
    }
    BK_SYNC();
    for (int idx = c.tid; idx < m * m; idx += c.nt) {
      const int i = idx / m, j = idx % m;
      if (c.perm[j] >= 0) U[idx] = E[i * m + c.perm[j]];
    }
    BK_SYNC();
  }
  matmul(c, Q, U, false, Vc, true, m, m, m, m, m);             // Q = U V^T
  for (int it = 0; it < 2; ++it) {                             // Newton-Schulz: Q <- Q (3I - Q^T Q) / 2
    matmul(c, AW, Q, true, Q, false, m, m, m, m, m);
    matmul(c, U, Q, false, AW, false, m, m, m, m, m);
    for (int idx = c.tid; idx < m * m; idx += c.nt) Q[idx] = 1.5 * Q[idx] - 0.5 * U[idx];
    BK_SYNC();
  }
}

// The store of a product P = scale op(A) op(B) [n x n] that also sums, over the outputs its thread stores,
// ||P - I||_F^2 (res) and tr P (tr): matmul_store returns it with the sums. (A lambda capturing the two sums by
// reference kept them in local memory across the non-inlined tensor-core product.)
struct ResidualStore {
  double* P;
  int n;
  double scale;
  double res, tr;
  BK_DEV void operator()(int i, int j, double v) {
    const double y = scale * v;
    P[i * n + j] = y;
    const double e = y - (i == j ? 1.0 : 0.0);
    res += e * e;
    if (i == j) tr += y;
  }
};

// P = op(A) B [n x n], ||P - I||_F^2 (a) and tr P (b), summed over the block (the sums are also the barrier after P).
template <class CT>
BK_DEV Sum2 product_off_identity(CT& c, const double* A, bool tA, const double* B, double* P, int n) {
  const ResidualStore st = matmul_store(c, A, tA, B, false, n, n, n, n, n, ResidualStore{P, n, 1.0, 0.0, 0.0});
  return block_sum2(c, st.res, st.tr);
}

// The Newton-Schulz iterations' scaling (polar_ns, inv_fourth_root_ns): before each step the iterate is scaled
// so that its matrix P (Q^T Q, or N) has mean eigenvalue 1, s = n / tr P, clamped to [1, NS_SCALE_CAP]: after any
// step every eigenvalue of P is at most 1 (both maps send (0, 3), resp. (0, 5), into (0, 1]), so s >= 1 and the
// largest scaled eigenvalue stays below the cap, inside the region of convergence; the iterations converge to the
// same matrix functions as unscaled ones, in fewer steps when the spectrum is spread (eigenvalues of Q^T Q in
// [0.5, 1]: the polar step after maps them to [0.91, 0.93] instead of [0.78, 1]; the root's to [0.92, 0.94] instead
// of [0.80, 1]). Scalar models of both iterations (bench/probe/ns_scaling.py, the cap anywhere in [1.8, 2.5]): on
// the spectra of the benchmark's 7B pairs (r = 64, condition numbers ~2) 16 instead of 20-24 products for the root,
// on log-uniform spectra with condition numbers 1e2 to 1e6 25-40% fewer steps, on clustered ones 8-17%.
// BK_NS_SCALE_CAP=1 (a probe switch): unscaled iterations.
#ifndef BK_NS_SCALE_CAP
#define BK_NS_SCALE_CAP 2.0
#endif
constexpr double NS_SCALE_CAP = BK_NS_SCALE_CAP;
BK_DEV double ns_scale(double tr, int n) { return fmin(fmax(n / tr, 1.0), NS_SCALE_CAP); }

// Orthogonal polar factor Q [m x m] of a nonsingular Cm [m x m] by Newton-Schulz, Q <- Q (3I - Q^T Q) / 2 from
// Q = Cm / (a bound on ||Cm||_2), each step scaled (ns_scale: Q <- sqrt(s) Q first): matrix products only, no
// eigendecomposition. Converges (quadratically at the end) to the same factor as polar() whenever Cm is
// nonsingular; stops one step after ||Q^T Q - I||_F < 1e-8 (then Q is orthogonal to float64 rounding). Returns
// false, Q unspecified, when it has not converged in NS_MAX_ITERS steps (Cm singular or condition number beyond
// ~1e10): the caller then uses polar(). Workspaces A, Qn [m x m].
constexpr int NS_MAX_ITERS = 64;
template <class CT>
BK_DEV bool polar_ns(CT& c, const double* Cm, double* Q, double* A, double* Qn, int m) {
  double fro = 0.0;
  for (int idx = c.tid; idx < m * m; idx += c.nt) fro += Cm[idx] * Cm[idx];
  double cmax = 0.0, rmax = 0.0;
  for (int j = c.tid; j < m; j += c.nt) {
    double cs = 0.0, rs = 0.0;
    for (int i = 0; i < m; ++i) { cs += fabs(Cm[i * m + j]); rs += fabs(Cm[j * m + i]); }
    cmax = fmax(cmax, cs);
    rmax = fmax(rmax, rs);
  }
  fro = block_sum(c, fro);
  cmax = block_max(c, cmax);
  rmax = block_max(c, rmax);
  const double bound = fmin(sqrt(fro), sqrt(cmax * rmax));   // >= ||Cm||_2: singular values of Q0 in (0, 1]
  if (!(bound > 0.0) || !isfinite(bound)) return false;
  const double inv = 1.0 / bound;
  for (int idx = c.tid; idx < m * m; idx += c.nt) Q[idx] = Cm[idx] * inv;
  BK_SYNC();
  double* cur = Q;
  double* nxt = Qn;
  for (int it = 0; it < NS_MAX_ITERS; ++it) {
    // A = Q^T Q, ||A - I||_F^2 and tr A (each thread's share is summed in its tile order: with another
    // thread-to-output mapping (register blocking, the tensor-core products, the host build) its last bit, and so
    // at the threshold the iteration count, may differ; Q converges either way)
    const Sum2 rt = product_off_identity(c, cur, true, cur, A, m);
    if (!(rt.a < 1e30) || !(rt.b > 0.0)) return false;          // NaN / divergence
    const double s = ns_scale(rt.b, m), mu = sqrt(s);
    const double* q = cur;                                      // Qn = sqrt(s) (1.5 Q - 0.5 s Q A)
    double* qn = nxt;
    matmul_store(c, cur, false, A, false, m, m, m, m, m,
                 [=](int i, int j, double v) { qn[i * m + j] = mu * (1.5 * q[i * m + j] - 0.5 * s * v); });
    BK_SYNC();
    double* t = cur; cur = nxt; nxt = t;
    c.polar_steps += 1;
    if (rt.a < 1e-16) {
      if (cur != Q) copy_mat(c, Q, cur, m);
      return true;
    }
  }
  return false;
}

// T^-1 of T [n x n] (kept) into W; M is a workspace. Gauss-Jordan with partial pivoting.
BK_DEV void invert(Ctx& c, const double* T, double* W, double* M, int n) {
  copy_mat(c, M, T, n);
  set_identity(c, W, n);
  for (int col = 0; col < n; ++col) {
    if (c.tid == 0) {
      int piv = col;
      double best = fabs(M[col * n + col]);
      for (int i = col + 1; i < n; ++i) {
        const double v = fabs(M[i * n + col]);
        if (v > best) { best = v; piv = i; }
      }
      c.iflag[0] = piv;
    }
    BK_SYNC();
    const int piv = c.iflag[0];
    if (piv != col) {
      for (int j = c.tid; j < n; j += c.nt) {
        double t = M[col * n + j]; M[col * n + j] = M[piv * n + j]; M[piv * n + j] = t;
        t = W[col * n + j]; W[col * n + j] = W[piv * n + j]; W[piv * n + j] = t;
      }
    }
    BK_SYNC();
    for (int i = c.tid; i < n; i += c.nt) c.v0[i] = M[i * n + col];
    BK_SYNC();
    const double inv = 1.0 / c.v0[col];
    for (int j = c.tid; j < n; j += c.nt) { M[col * n + j] *= inv; W[col * n + j] *= inv; }
    BK_SYNC();
    for (int idx = c.tid; idx < n * n; idx += c.nt) {
      const int i = idx / n, j = idx % n;
      if (i != col) {
        const double f = c.v0[i];
        M[idx] -= f * M[col * n + j];
        W[idx] -= f * W[col * n + j];
      }
    }
    BK_SYNC();
  }
}

// rel_gap from block-wide sums of a^2, b^2 and (a - b)^2.
BK_DEV double rel_gap_of_sums(double sa, double sb, double sd, double* fro_a, double* fro_b) {
  if (fro_a) *fro_a = sqrt(sa);
  if (fro_b) *fro_b = sqrt(sb);
  const double den = sqrt(fmax(sa, sb));
  return den > 0.0 ? sqrt(sd) / den : 0.0;
}

// ||A - B||_F / max(||A||_F, ||B||_F) (0 when both are zero); ||A||_F, ||B||_F into fro_a, fro_b when given.
BK_DEV double rel_gap(Ctx& c, const double* A, const double* B, int n, double* fro_a = nullptr,
                      double* fro_b = nullptr) {
  double sa = 0.0, sb = 0.0, sd = 0.0;
  for (int idx = c.tid; idx < n * n; idx += c.nt) {
    sa += A[idx] * A[idx];
    sb += B[idx] * B[idx];
    sd += (A[idx] - B[idx]) * (A[idx] - B[idx]);
  }
  const Sum2 s1 = block_sum2(c, sa, sb);
  return rel_gap_of_sums(s1.a, s1.b, block_sum(c, sd), fro_a, fro_b);
}

// X = P * sqrt(live eigenvalues) (columns scaled), eigenvalues ascending in val.
BK_DEV void sqrt_factor(Ctx& c, double* X, const double* P, const double* val, int n) {
  const double top = fmax(val[n - 1], 0.0);
  for (int idx = c.tid; idx < n * n; idx += c.nt) {
    const double d = val[idx % n];
    X[idx] = (d > RANK_RTOL * top) ? P[idx] * sqrt(d) : 0.0;
  }
  BK_SYNC();
}

BK_DEV void write_out(Ctx& c, float* out, int R, const double* M, int n) {
  for (int idx = c.tid; idx < R * R; idx += c.nt) {
    const int i = idx / R, j = idx % R;
    out[idx] = (i < n && j < n) ? (float)M[i * n + j] : 0.0f;
  }
}

BK_DEV void write_identity(Ctx& c, float* out, int R, int n) {
  for (int idx = c.tid; idx < R * R; idx += c.nt) {
    const int i = idx / R, j = idx % R;
    out[idx] = (i == j && i < n) ? 1.0f : 0.0f;
  }
}

// Cholesky factor of the symmetric X [n x n] (destroyed: the trailing working copy), column by column, into the
// lower triangle of L (zero above the diagonal). false (the same for every thread) when a pivot is not positive.
BK_DEV bool cholesky(Ctx& c, double* X, double* L, int n) {
  for (int j = 0; j < n; ++j) {
    const double d = X[j * n + j];               // every thread reads the same value: a uniform decision
    if (!(d > 0.0)) return false;
    const double inv = bk_rsqrt(d), invd = inv * inv;
    // Column j of X into c.v0 (one barrier more per column): the update below reads it along l, which in X (rows n
    // doubles apart) put a warp's 32 reads in one shared-memory bank.
    for (int i = c.tid; i < n; i += c.nt) {
      const double x = X[i * n + j];
      c.v0[i] = x;
      L[i * n + j] = i >= j ? x * inv : 0.0;
    }
    BK_SYNC();
    // Trailing lower triangle: X[i][l] -= X[i][j] X[l][j] / d, each element by the same thread and expression as
    // the loop over idx / m, idx % m it replaces (same bits), without its two divisions per element. H200
    // (bench/probe/eig_phases.py, the previous probe's matrix placements): Cholesky 147 k -> 138 k cycles per pair
    // at r = 64 (112 pairs), 974 k -> 887 k at r = 128, 15.6 k -> 16.4 k at r = 16; the kernel within 1.5%.
    const int m = n - 1 - j;
    if (m > 0) {
      const double* col = c.v0;
      for (FlatIter it(c, m); it.row < m; it.next()) {
        const int i = j + 1 + it.row, l = j + 1 + it.col;
        if (l <= i) X[i * n + l] -= col[i] * col[l] * invd;
      }
    }
    BK_SYNC();
  }
  return true;
}

// Inverse fourth root of a symmetric positive definite A [n x n] with eigenvalues in (0, 1] by the coupled Newton
// iteration for inverse p-th roots, p = 4 (Guo & Higham, SIAM J. Matrix Anal. Appl. 28, 2006; stable): X0 = I,
// N0 = A, S = (5I - N) / 4, X <- X S, N <- S^4 N; X -> A^-1/4 and N = X^4 A -> I. Each step scaled (ns_scale:
// X <- s^1/4 X, N <- s N first, which keeps N = X^4 A). Matrix products only, four per step (X N, N^2 for
// S^2 = (25I - 10 N + N^2) / 16, S^4 = S^2 S^2, S^4 N; the first step's X S needs none), in one chain where two
// coupled square roots (Y -> A^1/2, then its square root) took two chains of three products per step: the
// benchmark's 7B pairs at r = 64 (host build), 39 products -> 16 (4 steps and the last X S). A small eigenvalue
// mu of A grows by at least (5/4)^4 = 2.44 per step (s >= 1) until the quadratic phase (1 - e -> 1 - 5 e^2 / 8).
// Stops after the X update that follows ||N - I||_F < 1e-8 (X^4 A = I to float64 rounding then); returns null
// (outputs unspecified) on divergence or when that has not happened within max_iters steps, else the buffer
// holding X.
// buf: six n x n workspaces, buf[0] holding A on entry (destroyed); res, tr: ||A - I||_F^2 and tr A.
constexpr int NS_ROOT_MAX_ITERS = 96;
constexpr int NS_ROOT_QUADRATIC_STEPS = 8;   // the transition and quadratic phase's steps (at most 4 beyond the
                                             // linear phase's in scalar models, from any start) + margin
template <class CT>
BK_DEV double* inv_fourth_root_ns(CT& c, double* const* buf, double res, double tr, int n, int max_iters) {
  double *N = buf[0], *Nn = buf[1], *S2 = buf[2], *S4 = buf[3], *X = buf[4], *Xn = buf[5];
  for (int it = 0;; ++it) {
    if (!(res < 1e30) || !(tr > 0.0)) return nullptr;             // NaN / divergence
    const double s = ns_scale(tr, n), mu = sqrt(sqrt(s));
    const double* xc = X;
    const double* nc = N;
    double* xn = Xn;
    double* s2 = S2;
    // X <- mu X (5I - sN) / 4 = mu (1.25 X - 0.25 s X N); on the first step (X = I, not stored) elementwise,
    // with S^2 = (25I - 10 sN + s^2 N^2) / 16 from the product N N.
    const bool converged = res < 1e-16;                           // then this X update ends it
    if (!converged && it == max_iters) return nullptr;
    if (it > 0)
      matmul_store(c, X, false, N, false, n, n, n, n, n,
                   [=](int i, int j, double v) { xn[i * n + j] = mu * (1.25 * xc[i * n + j] - 0.25 * s * v); });
    if (converged) {
      if (it == 0)
        for (int idx = c.tid; idx < n * n; idx += c.nt)
          xn[idx] = mu * ((idx / n == idx % n ? 1.25 : 0.0) - 0.25 * s * nc[idx]);
      BK_SYNC();
      c.ns_steps = it + 1;
      return Xn;
    }
    const bool first = it == 0;
    matmul_store(c, N, false, N, false, n, n, n, n, n, [=](int i, int j, double v) {
      const double d = (i == j) ? 1.0 : 0.0, x = nc[i * n + j];
      s2[i * n + j] = (25.0 * d - 10.0 * s * x + s * s * v) * 0.0625;
      if (first) xn[i * n + j] = mu * (1.25 * d - 0.25 * s * x);
    });
    BK_SYNC();
    matmul(c, S4, S2, false, S2, false, n, n, n, n, n);           // S^4
    // N <- s S^4 N, its residual and trace
    const ResidualStore st = matmul_store(c, S4, false, N, false, n, n, n, n, n, ResidualStore{Nn, n, s, 0.0, 0.0});
    const Sum2 rt = block_sum2(c, st.res, st.tr);                 // (also the barrier after N)
    res = rt.a;
    tr = rt.b;
    double* tmp = N; N = Nn; Nn = tmp;
    tmp = X; X = Xn; Xn = tmp;
  }
}

// dst = scale (src + src^T) / 2 [n x n], then a barrier. dst and src do not overlap (restrict: the loads of later
// elements need not wait for the stores before them).
BK_DEV void sym_part(Ctx& c, double* __restrict__ dst, const double* __restrict__ src, double scale, int n) {
  BK_UNROLL4
  for (int idx = c.tid; idx < n * n; idx += c.nt) {
    const int i = idx / n, j = idx % n;
    dst[idx] = scale * 0.5 * (src[i * n + j] + src[j * n + i]);
  }
  BK_SYNC();
}

// min(||A||_F, ||A||_1) of A [n x n] (block-wide; every thread gets it): for a symmetric A an upper bound on its
// largest eigenvalue in absolute value, at most sqrt(n) times above it. (Column sums, ||A||_1 = ||A||_inf for a
// symmetric A: a warp's threads read consecutive addresses, where the row sums' read rows n doubles apart; the
// callers' matrices are symmetric to the bit, so the sums are the same.)
BK_DEV double sym_norm_bound(Ctx& c, const double* A, int n) {
  double fro = 0.0, rmax = 0.0;
  for (int idx = c.tid; idx < n * n; idx += c.nt) fro += A[idx] * A[idx];
  for (int i = c.tid; i < n; i += c.nt) {
    double rs = 0.0;
    for (int j = 0; j < n; ++j) rs += fabs(A[j * n + i]);
    rmax = fmax(rmax, rs);
  }
  fro = block_sum(c, fro);
  rmax = block_max(c, rmax);
  return fmin(sqrt(fro), rmax);
}

// Fast path's T and T^-1 without an eigendecomposition, for the nearest mode (whose final T Q does not depend
// on the basis of T's columns): T = L^-T M^1/4, T^-1 = M^-1/4 L^T, the inverse fourth root by inv_fourth_root_ns.
// On entry: L in b.Y, M (symmetric) in b.AW, kept, G_A L in b.X. The full-rank gate, lambda_min(M) > 1.1 gate
// with gate computed from an upper bound on lambda_max (at least the gate of the eigenvalue test: a pair it
// passes, the eigenvalue test passes too), is read off the root: lambda_min(M) = lambda_max(M^-1/2)^-2, bounded
// below through norms of M^-1/2 = (bound^-1/4 X)^2 (a product T needs anyway). A pair above the gate has every
// eigenvalue of M / bound above 1.1 gate / bound, from which the root converges within the steps its linear phase
// needs (log(bound / (1.1 gate)) / log(2.25), a margin over 2.44 per step) plus NS_ROOT_QUADRATIC_STEPS: more
// steps than that mean a pair below the gate. Returns false, with nothing but the workspaces, W and T written
// (both fallbacks write those before reading them), when the gate is not proven or the iteration does not
// converge: the caller then runs the eigendecomposition path, which decides the pair exactly as before.
template <class CT>
BK_DEV bool fourth_root_transforms(CT& c, const Mats& b, double eps_f, double fro_b, double fro_a, int n) {
  const double bound = sym_norm_bound(c, b.AW, n);              // >= lambda_max (M is symmetric)
  if (!(bound > 0.0) || !isfinite(bound)) return false;
  const double gate = fmax(eps_f * eps_f * bound, fmax(RANK_RTOL, n * GRAM_EPS) * fro_b * fro_a);
  if (!(1.1 * gate < bound)) return false;                      // lambda_min <= 1.1 gate: exact path
  // N0 = M / bound (eigenvalues in (0, 1]), its residual and trace.
  const double inv = 1.0 / bound;
  double r = 0.0, t = 0.0;
  for (int idx = c.tid; idx < n * n; idx += c.nt) {
    const double y = b.AW[idx] * inv;
    b.M1[idx] = y;
    const bool diag = idx / n == idx % n;
    const double e = y - (diag ? 1.0 : 0.0);
    r += e * e;
    if (diag) t += y;
  }
  const Sum2 rt = block_sum2(c, r, t);                          // (also the barrier after N0)
  // N and its next value first (the most read: first in shared memory, bk::carve_mats), then S^2, S^4, X
  double* buf[6] = {b.M1, b.M2, b.M3, b.VW, b.W, b.T};
  const double steps = ceil(log(bound / (1.1 * gate)) / log(2.25)) + NS_ROOT_QUADRATIC_STEPS;
  const double* x = inv_fourth_root_ns(c, buf, rt.a, rt.b, n,
                                       steps < NS_ROOT_MAX_ITERS ? (int)steps : NS_ROOT_MAX_ITERS);
  if (x == nullptr) return false;
  // M^-1/4 = bound^-1/4 X (symmetrized) into M1 (X is in W or T: read before they are written below).
  // T^-1 = M^-1/4 L^T, and, as G_A = L^-T M L^-1, T = L^-T M^1/4 = G_A L M^-3/4 = (G_A L) M^-1/4 M^-1/2 with
  // M^-1/2 = (M^-1/4)^2: three products, where a back substitution L^T T = M^1/4 (one column per thread, a chain
  // of dependent loads) took 290 k cycles per pair at r = 64 on an H200
  // (bench/results/logs/session11-eig-fixed64-2026-12-02.json, "NS: T, T^-1"). Its rounding: the gate bounds the
  // condition numbers of M, G_A and L (below 1 / (1.1 RANK_RTOL) ~ 6e4 each): the cancellation in G_A L M^-3/4
  // costs up to about n cond float64 units, and T T^-1 = G_A L (M^-1/4)^4 L^T = I holds as far as X^4 matches
  // (M / bound)^-1 (inv_fourth_root_ns's N), its residual amplified by about cond(L) cond(M): both far below the
  // float32 rounding of the T it writes. The GPU tests' product and balance bounds against the reference hold on
  // every 7B shape for r = 1 to 128.
  sym_part(c, b.M1, x, 1.0 / sqrt(sqrt(bound)), n);
  // (one round: both products read M^-1/4 only)
  double* w = b.W;
  double* m3 = b.M3;
  matmul_store(c, b.M1, false, b.Y, true, n, n, n, n, n, [=](int i, int j, double v) { w[i * n + j] = v; });   // T^-1
  matmul_store(c, b.M1, false, b.M1, false, n, n, n, n, n, [=](int i, int j, double v) { m3[i * n + j] = v; });  // ^2
  BK_SYNC();
  // The gate: lambda_min(M) = 1 / lambda_max(M^-1/2)^2 and lambda_max(M^-1/2) <= min(||M^-1/2||_F,
  // ||M^-1/2||_1) (= ||.||_inf: symmetric), at most sqrt(n) times above it (so pairs with lambda_min(M) within n
  // times the gate may take the eigendecomposition path: the same decisions, slower).
  const double z = sym_norm_bound(c, m3, n);
  if (!(1.0 > 1.1 * gate * z * z)) return false;                // gate not proven (or rounding): exact path
  mm(c, b.M2, b.X, false, b.M1, false, n);                       // G_A L M^-1/4
  mm(c, b.T, b.M2, false, b.M3, false, n);                       // T
  return true;
}

// Steps 1-4 for a pair whose every component is live (see the header; the reference's decisions are the same):
// with the Cholesky factor G_B = L L^T (a square root X = L) and M = L^T G_A L = H H^T = E diag(lambda) E^T
// (one eigendecomposition; lambda = S^2, E = U), T^-1 = S^-1/2 U^T X^T = lambda^-1/4 E^T L^T and
// T = L^-T E lambda^1/4 (back substitution): the same SVD-aligned transforms as steps 1-4, with one Jacobi
// eigendecomposition instead of three and no Gauss-Jordan inversion.
// Taken only when bounds prove that the reference keeps every Gram eigenvalue (> RANK_RTOL * largest) and
// every product singular value (> product_floor): lambda_min(G_B) >= lambda_min(M) / lambda_max(G_A) and
// lambda_max <= ||.||_F, so lambda_min(M) > 1.1 max(eps_f^2 lambda_max(M), max(RANK_RTOL, n eps_g) ||G_B||_F
// ||G_A||_F) suffices. Returns false (T, T^-1 not written) otherwise, or when G_B is not numerically positive
// definite: the general path decides then. With basis_free (the nearest mode), fourth_root_transforms first
// tries the same T up to a rotation of its columns without the eigendecomposition.
template <class CT>
BK_DEV bool full_rank_transforms(CT& c, const Mats& b, double eps_f, double fro_b, double fro_a, int n,
                                 bool basis_free) {
  // Cholesky, column by column: L into Y (zero above the diagonal), M1 the trailing working copy (the first
  // matrix in shared memory: bk::carve_mats).
  copy_mat(c, b.M1, b.GB, n);
  if (!cholesky(c, b.M1, b.Y, n)) return false;
  // M = L^T G_A L, symmetrized, and its eigendecomposition (ascending).
  mm(c, b.X, b.GA, false, b.Y, false, n);       // G_A L (kept for fourth_root_transforms' T)
  mm(c, b.M3, b.Y, true, b.X, false, n);
  sym_part(c, b.AW, b.M3, 1.0, n);
  if (basis_free && fourth_root_transforms(c, b, eps_f, fro_b, fro_a, n)) {
    c.path = PATH_FAST_NS;
    return true;
  }
  c.path = PATH_FAST_EIG;
  sym_eig(c, b.AW, b.VW, b.M1, c.v1, n);
  const double lmin = c.v1[0], lmax = c.v1[n - 1];
  const double gate = fmax(eps_f * eps_f * lmax, fmax(RANK_RTOL, n * GRAM_EPS) * fro_b * fro_a);
  if (!(lmin > 1.1 * gate)) return false;
  // Components in descending order: component j is eigenpair n-1-j; v2[j] = lambda^1/4 = S_j^1/2.
  for (int j = c.tid; j < n; j += c.nt) c.v2[j] = sqrt(sqrt(c.v1[n - 1 - j]));
  BK_SYNC();
  mm(c, b.M2, b.Y, false, b.M1, false, n);       // L E
  for (int idx = c.tid; idx < n * n; idx += c.nt) {   // T^-1[j][i] = (L E)[i][n-1-j] / lambda_j^1/4
    const int j = idx / n, i = idx % n;
    b.W[idx] = b.M2[i * n + (n - 1 - j)] / c.v2[j];
  }
  for (int j = c.tid; j < n; j += c.nt) {        // L^T T[:, j] = E[:, n-1-j] lambda_j^1/4, one column per thread
    for (int i = n - 1; i >= 0; --i) {
      double s = b.M1[i * n + (n - 1 - j)] * c.v2[j];
      for (int k = i + 1; k < n; ++k) s -= b.Y[k * n + i] * b.T[k * n + j];
      b.T[i * n + j] = s / b.Y[i * n + i];
    }
  }
  BK_SYNC();
  return true;
}

// Steps 1-4 in general (any rank): writes T, T^-1 and returns the number of live components k (0: zero product,
// nothing written).
template <class CT>
BK_DEV int general_transforms(CT& c, const Mats& b, double eps_f, int n) {

  // 1. square-root factors of both Grams (diagonalized together when both fit in shared memory), and their
  //    largest eigenvalues ||B||_2^2, ||A||_2^2.
  double d_max = 0.0, e_max = 0.0;
  if (c.pair_eig) {
    copy_mat(c, b.AW, b.GB, n);
    copy_mat(c, b.M2, b.GA, n);
    double* Sa[2] = {b.AW, b.M2};
    double* Va[2] = {b.VW, b.M3};
    double* veca[2] = {b.M1, b.T};
    double* vala[2] = {c.v1, c.v2};
    sym_eig_multi(c, 2, Sa, Va, veca, vala, n);
    d_max = c.v1[n - 1];
    e_max = c.v2[n - 1];
    sqrt_factor(c, b.X, b.M1, c.v1, n);
    sqrt_factor(c, b.Y, b.T, c.v2, n);
  } else {
    copy_mat(c, b.AW, b.GB, n);
    sym_eig(c, b.AW, b.VW, b.M1, c.v1, n);
    d_max = c.v1[n - 1];
    sqrt_factor(c, b.X, b.M1, c.v1, n);
    copy_mat(c, b.AW, b.GA, n);
    sym_eig(c, b.AW, b.VW, b.M1, c.v1, n);
    e_max = c.v1[n - 1];
    sqrt_factor(c, b.Y, b.M1, c.v1, n);
  }

  // 2. H = X^T Y; right singular vectors from eig(H^T H), descending; U_j = H v_j / S_j.
  mm(c, b.M2, b.X, true, b.Y, false, n);                       // M2 = H
  mm(c, b.AW, b.M2, true, b.M2, false, n);                     // H^T H
  sym_eig(c, b.AW, b.VW, b.M1, c.v1, n);
  for (int idx = c.tid; idx < n * n; idx += c.nt) {            // M3 = V, columns descending
    const int i = idx / n, j = idx % n;
    b.M3[idx] = b.M1[i * n + (n - 1 - j)];
  }
  BK_SYNC();
  mm(c, b.M1, b.M2, false, b.M3, false, n);                    // M1 = H V = U S
  for (int j = c.tid; j < n; j += c.nt) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += b.M1[i * n + j] * b.M1[i * n + j];
    c.v1[j] = sqrt(s);                                          // S_j
  }
  BK_SYNC();
  // Live: above reference.product_floor, the noise that rounding the factors (eps_f S_1) and the Grams
  // (sqrt(n eps_g) ||B||_2 ||A||_2) leaves in the product's singular values.
  double smax = 0.0;
  for (int j = 0; j < n; ++j) smax = fmax(smax, c.v1[j]);
  const double floor_s = fmax(eps_f * smax, sqrt(n * GRAM_EPS) * sqrt(fmax(d_max, 0.0) * fmax(e_max, 0.0)));
  int k = 0;
  for (int j = 0; j < n; ++j) k += (c.v1[j] > floor_s);
  // Live components are the leading columns (descending order); k counts them.
  if (k == 0) return 0;                                       // zero product: nothing written
  for (int idx = c.tid; idx < n * n; idx += c.nt) {            // M1 = U_live (dead columns zero)
    const int j = idx % n;
    b.M1[idx] = (j < k) ? b.M1[idx] / c.v1[j] : 0.0;
  }
  BK_SYNC();

  // 3. T = [Y V_live S^-1/2, N].
  mm(c, b.M2, b.Y, false, b.M3, false, n);                     // M2 = Y V
  for (int idx = c.tid; idx < n * n; idx += c.nt) {
    const int j = idx % n;
    b.T[idx] = (j < k) ? b.M2[idx] / sqrt(c.v1[j]) : 0.0;
  }
  BK_SYNC();
  if (k < n) {
    mm(c, b.M3, b.X, false, b.M1, false, n);                   // Z = X U_live
    mm(c, b.AW, b.M3, false, b.M3, true, n);                   // Z Z^T
    sym_eig(c, b.AW, b.VW, b.M2, c.v2, n);                     // ascending: ker(T_live^-1) first
    for (int idx = c.tid; idx < n * n; idx += c.nt) {
      const int i = idx / n, j = idx % n;
      if (j >= k) b.T[idx] = b.M2[i * n + (j - k)];
    }
    BK_SYNC();
  }

  // 4. T^-1.
  invert(c, b.T, b.W, b.M1, n);
  return k;
}

// Slots of the pair for the k live components (rows 0..k-1 of C [n x n]) in "nearest" mode, as
// reference.balancing_transforms chooses them: the k slots j with the largest live share
// sum_{i<k} C_ij^2 / sum_i C_ij^2 (0 for a zero column), ties to the lower slot (a stable descending sort).
// Writes c.slot[j] = index of slot j among the live slots (< k) or k + its index among the rest slots.
BK_DEV void choose_slots(Ctx& c, const double* C, int n, int k) {
  for (int j = c.tid; j < n; j += c.nt) {
    double w_live = 0.0, w_all = 0.0;
    for (int i = 0; i < n; ++i) {
      const double v = C[i * n + j] * C[i * n + j];
      w_all += v;
      if (i < k) w_live += v;
    }
    c.v0[j] = w_all > 0.0 ? w_live / w_all : 0.0;
  }
  BK_SYNC();
  for (int j = c.tid; j < n; j += c.nt) {       // position of slot j in the stable descending order
    const double w = c.v0[j];
    int pos = 0;
    for (int i = 0; i < n; ++i) pos += (c.v0[i] > w) || (c.v0[i] == w && i < j);
    c.perm[j] = pos < k;                        // 1: a live slot
  }
  BK_SYNC();
  for (int j = c.tid; j < n; j += c.nt) {
    int live_before = 0;
    for (int i = 0; i < j; ++i) live_before += c.perm[i];
    c.slot[j] = c.perm[j] ? live_before : k + (j - live_before);
  }
  BK_SYNC();
}

// One pair. gB, gA: fp32 Grams [R x R] (top-left n x n used). eps_f: the rounding unit of the pair's factors
// (reference.factor_eps). outT, outW: fp32 [R x R]. status: int, gaps: double[2] (before, after).
// mode 0 = nearest, 1 = svd.
template <class CT>
BK_DEV void balance_pair(CT& c, const Mats& b, const float* gB, const float* gA, int R, int mode, double eps_f,
                         float* outT, float* outW, int* status, double* gaps) {
  const int n = c.n;
  c.ns_steps = 0;
  c.polar_steps = 0;
  // The symmetrized Grams, with rel_gap(G_B, G_A)'s sums taken as they are written (rel_gap read them back from
  // the matrices: the same sums, the same bits). The Grams are read through the read-only path (they do not change
  // during the kernel), so that the loads need not wait for the stores before them.
  double bad = 0.0, sb = 0.0, sa = 0.0, sd = 0.0;
  for (int idx = c.tid; idx < n * n; idx += c.nt) {
    const int i = idx / n, j = idx % n;
    const double b1 = BK_LDG(gB + i * R + j), b2 = BK_LDG(gB + j * R + i);
    const double a1 = BK_LDG(gA + i * R + j), a2 = BK_LDG(gA + j * R + i);
    if (!(isfinite(b1) && isfinite(a1))) bad = 1.0;
    const double gb = 0.5 * (b1 + b2), ga = 0.5 * (a1 + a2);
    b.GB[idx] = gb;
    b.GA[idx] = ga;
    sb += gb * gb;
    sa += ga * ga;
    sd += (gb - ga) * (gb - ga);
  }
  const Sum2 s1 = block_sum2(c, bad, sd);                      // (also the barrier after G_B, G_A)
  if (s1.a > 0.0) {
    write_identity(c, outT, R, n);
    write_identity(c, outW, R, n);
    if (c.tid == 0) { *status = STATUS_NONFINITE; gaps[0] = nan(""); gaps[1] = nan(""); }
    BK_SYNC();
    return;
  }
  const Sum2 s2 = block_sum2(c, sb, sa);
  double fro_b = 0.0, fro_a = 0.0;
  const double gap_before = rel_gap_of_sums(s2.a, s2.b, s1.b, &fro_b, &fro_a);

  // 1-4. T, T^-1 of the pair's live components (k of them) and of the rest.
  int k = n;
  if (!full_rank_transforms(c, b, eps_f, fro_b, fro_a, n, mode == 0)) {
    c.path = PATH_GENERAL;
    k = general_transforms(c, b, eps_f, n);
    if (k == 0) {
      write_identity(c, outT, R, n);
      write_identity(c, outW, R, n);
      if (c.tid == 0) { *status = STATUS_ZERO; gaps[0] = gap_before; gaps[1] = gap_before; }
      BK_SYNC();
      return;
    }
  }

  // 5. C = T^T G_B + T^-1 G_A. Q = blockdiag(Q_live, Q_rest) placed in the chosen slots: Q_live =
  //    polar(C_live) (nearest) or sign(diag C_live) (svd); Q_rest = polar(C_rest). Never rotate across live
  //    and rest.
  // P_B = T^T G_B into AW, P_A = T^-1 G_A into VW (both free from here until polar() below), C = P_B + P_A into
  // M2 (one round: the second product adds onto the first's outputs, which the same thread wrote: both products
  // have one shape, so matmul_store hands each output to the same thread).
  double* m2 = b.M2;
  double* pb = b.AW;
  double* pa = b.VW;
  matmul_store(c, b.T, true, b.GB, false, n, n, n, n, n, [=](int i, int j, double s) { pb[i * n + j] = s; });
  matmul_store(c, b.W, false, b.GA, false, n, n, n, n, n, [=](int i, int j, double s) {
    pa[i * n + j] = s;
    m2[i * n + j] = pb[i * n + j] + s;
  });
  BK_SYNC();                                                  // M2 = C
  // 6. Gap after, from the balanced Grams before the rotation Q of this step: T^T G_B T = P_B T and T^-1 G_A T^-T
  // = P_A T^-T (into GB and GA, read no more; one round), whose gap Q does not change (the final ones are
  // Q^T (.) Q, Q orthogonal: Frobenius norms are invariant). Two products where the rotated Grams took four.
  double* bal_b = b.GB;
  double* bal_a = b.GA;
  matmul_store(c, pb, false, b.T, false, n, n, n, n, n, [=](int i, int j, double s) { bal_b[i * n + j] = s; });
  matmul_store(c, pa, false, b.W, true, n, n, n, n, n, [=](int i, int j, double s) { bal_a[i * n + j] = s; });
  BK_SYNC();
  const double gap_after = rel_gap(c, bal_b, bal_a, n);
  const int mr = n - k;
  double* C_live = b.M3;                       // compact k x k, then the compact mr x mr rest block
  double* C_rest = b.M3 + k * k;               // (k^2 + mr^2 <= n^2)
  double* Q_live = b.X;
  double* Q_rest = b.X + k * k;
  if (mode == 0 && mr > 0) {
    choose_slots(c, b.M2, n, k);
  } else {                                     // full rank, or svd: component i keeps slot i
    for (int j = c.tid; j < n; j += c.nt) c.slot[j] = j;
    BK_SYNC();
  }
  for (int j = c.tid; j < k; j += c.nt) c.v0[j] = (b.M2[j * n + j] < 0.0) ? -1.0 : 1.0;
  for (int idx = c.tid; idx < n * n; idx += c.nt) {
    const int i = idx / n, s = c.slot[idx % n];
    if (i < k && s < k) C_live[i * k + s] = b.M2[idx];
    else if (i >= k && s >= k) C_rest[(i - k) * mr + (s - k)] = b.M2[idx];
  }
  BK_SYNC();
  if (mode == 0) {
    if (!polar_ns(c, C_live, Q_live, b.M1, b.M2, k)) polar(c, C_live, Q_live, b.Y, b.M1, b.M2, b.AW, b.VW, k);
  } else {
    for (int idx = c.tid; idx < k * k; idx += c.nt) Q_live[idx] = (idx / k == idx % k) ? c.v0[idx / k] : 0.0;
    BK_SYNC();
  }
  if (mr > 0) polar(c, C_rest, Q_rest, b.Y, b.M1, b.M2, b.AW, b.VW, mr);
  for (int idx = c.tid; idx < n * n; idx += c.nt) {            // M2 = Q: the blocks, in their slots
    const int i = idx / n, s = c.slot[idx % n];
    double q = 0.0;
    if (i < k && s < k) q = Q_live[i * k + s];
    else if (i >= k && s >= k) q = Q_rest[(i - k) * mr + (s - k)];
    b.M2[idx] = q;
  }
  BK_SYNC();
  double* Q = b.M2;
  double* Tq = b.M1;                                           // the final T, T^-1 (independent products: one round)
  double* Wq = b.Y;
  matmul_store(c, b.T, false, Q, false, n, n, n, n, n, [=](int i, int j, double s) { Tq[i * n + j] = s; });  // T Q
  matmul_store(c, Q, true, b.W, false, n, n, n, n, n, [=](int i, int j, double s) { Wq[i * n + j] = s; });   // Q^T T^-1
  BK_SYNC();

  // A last guard against non-finite transforms.
  double nonfinite = 0.0;
  for (int idx = c.tid; idx < n * n; idx += c.nt)
    if (!(isfinite(Tq[idx]) && isfinite(Wq[idx]))) nonfinite = 1.0;
  if (block_sum(c, nonfinite) > 0.0 || !isfinite(gap_after)) {
    write_identity(c, outT, R, n);
    write_identity(c, outW, R, n);
    if (c.tid == 0) { *status = STATUS_NONFINITE; gaps[0] = nan(""); gaps[1] = nan(""); }
    BK_SYNC();
    return;
  }
  write_out(c, outT, R, Tq, n);
  write_out(c, outW, R, Wq, n);
  if (c.tid == 0) {
    *status = ((k < n) ? STATUS_RANK_DEFICIENT : 0) | (k << STATUS_RANK_SHIFT);
    gaps[0] = gap_before;
    gaps[1] = gap_after;
  }
  BK_SYNC();
}

// Layout of the per-block scratch: vectors and indices (always in shared memory on the GPU).
BK_HD int small_doubles(int n) { return 32 + 4 * (n / 2 + 1) + 4 * n + stage_doubles(n); }
BK_HD int small_ints(int n) { return 2 * (n / 2 + 1) + 2 * n + 4; }

BK_DEV void carve_small(Ctx& c, double* dbl, int n) {
  c.red = dbl;
  c.rc = c.red + 32;
  c.rs = c.rc + 2 * (n / 2 + 1);
  c.v0 = c.rs + 2 * (n / 2 + 1);
  c.v1 = c.v0 + n;
  c.v2 = c.v1 + n;
  c.v3 = c.v2 + n;
  c.stage = c.v3 + n;
  int* ints = reinterpret_cast<int*>(c.stage + stage_doubles(n));
  c.rp = ints;
  c.rq = c.rp + (n / 2 + 1);
  c.perm = c.rq + (n / 2 + 1);
  c.slot = c.perm + n;
  c.iflag = c.slot + n;
}

BK_HD long long small_bytes(int n) { return 8LL * small_doubles(n) + 4LL * small_ints(n) + 8; }

// The first `in_fast` matrices come from `fast`, the others from `slow`. Order: the workspaces of the inverse fourth
// root (M1, M2, M3, VW, T, W: every product of the fast path's iterations; M1 also the Cholesky factorisation's
// working copy and the polar iteration's Q^T Q, M2 its next Q), then X (G_A L, then the polar factor), AW, Y, GB, GA
// (BK_CARVE_LEGACY=1, a probe switch: the order of session 8, AW and VW first). Measured on an H200 (7B adapters,
// r = 64, bench/results/logs/session9-rxr-probe-2026-12-01.json, the square roots' kernel of then): 1.46 ms against
// 1.67 with AW and VW first (two blocks per SM, 2 matrices each); Y before X: no different (0.84 ms either way at
// one block per SM, session9-rxr-probe2-2026-12-01.json). W moved before X in session 17, when it became one of
// the root's workspaces.
#ifndef BK_CARVE_LEGACY
#define BK_CARVE_LEGACY 0
#endif
BK_DEV Mats carve_mats(double* fast, double* slow, int in_fast, int n) {
  double* ptrs[NUM_MATS];
  const long long nn = (long long)n * n;
  for (int i = 0; i < NUM_MATS; ++i) ptrs[i] = (i < in_fast) ? fast + i * nn : slow + (i - in_fast) * nn;
  Mats m;
#if BK_CARVE_LEGACY
  m.AW = ptrs[0]; m.VW = ptrs[1]; m.GB = ptrs[2]; m.GA = ptrs[3]; m.X = ptrs[4]; m.Y = ptrs[5];
  m.T = ptrs[6]; m.W = ptrs[7]; m.M1 = ptrs[8]; m.M2 = ptrs[9]; m.M3 = ptrs[10];
#else
  m.M1 = ptrs[0]; m.M2 = ptrs[1]; m.M3 = ptrs[2]; m.VW = ptrs[3]; m.T = ptrs[4]; m.W = ptrs[5];
  m.X = ptrs[6]; m.AW = ptrs[7]; m.Y = ptrs[8]; m.GB = ptrs[9]; m.GA = ptrs[10];
#endif
  return m;
}

}  // namespace bk
