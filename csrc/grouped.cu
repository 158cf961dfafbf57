// Grouped Gram and grouped in-place rescale of small-rank adapters (r <= 16) on the CUDA cores: the CUDA path of
// steps 1-2 and 4 of balora_kernels/ops/grouped_projection.py (whose Triton kernels are the fallback and the
// path for larger ranks and 16-bit factors above r = 16); float32 factors of ranks 17 to 64 take the tensor-core
// kernels of csrc/grouped_mma.cu from this file's entry points (the end of this file). Same device tile table as
// the Triton kernels (csrc/grouped_tiles.cuh), one launch per kernel and dtype.
//
// Gram: one warp per tile, one lane per row of B / column of A at a time; each lane adds the row's outer product
// (lower triangle, float32 FMAs) to registers (its next rows already loading), the warp sums its lanes by a fixed butterfly (reduce-scatter) and
// writes the tile's partial; the warp that completes a Gram (an integer counter per Gram, no float atomics)
// sums that Gram's partials in tile order into grams [P, 2, R, R]. Every sum has a fixed order: bitwise
// reproducible. Rescale: one block per tile, one thread per row of B (B <- B T) / column of A (A <- T^-1 A),
// float32 FMAs in ascending order, one rounding to the parameter dtype; tiles of skipped pairs are not read
// or written. In place: each thread reads and writes its own row / column only.
//
// Needs only the CUDA runtime (no torch headers): csrc/bindings.cpp is the torch-facing side.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include "grouped_tiles.cuh"

namespace {

// Launch shapes (macros so that bench/probe builds can compare alternatives; the defaults are the measured choice:
// bench/results/logs/grouped-cuda-probe-2026-11-28.json and grouped-cuda-probe2-2026-11-28.json, 7B adapters on an
// H200). The rescale takes fewer, more unrolled threads per tile for float32 (4-byte loads) than for 16-bit factors.
#ifndef BK_GRAM_WARPS
#define BK_GRAM_WARPS 2
#endif
#ifndef BK_RESCALE_THREADS_F32
#define BK_RESCALE_THREADS_F32 128
#endif
#ifndef BK_RESCALE_THREADS_16
#define BK_RESCALE_THREADS_16 256
#endif
#ifndef BK_GRAM_UNROLL_SMALL
#define BK_GRAM_UNROLL_SMALL 4
#endif
#ifndef BK_GRAM_UNROLL_16
#define BK_GRAM_UNROLL_16 2
#endif
#ifndef BK_RESCALE_UNROLL_F32_SMALL
#define BK_RESCALE_UNROLL_F32_SMALL 4
#endif
#ifndef BK_RESCALE_UNROLL_F32_16
#define BK_RESCALE_UNROLL_F32_16 (BK_RESCALE_PREFETCH_F32_16 ? 1 : 2)
#endif
#ifndef BK_RESCALE_PREFETCH_F32_16   // float32, rank block 16: each thread loads its next rows before it rescales
#define BK_RESCALE_PREFETCH_F32_16 1  // the current ones (two buffers)
#endif
#ifndef BK_RESCALE_UNROLL_16BIT
#define BK_RESCALE_UNROLL_16BIT 1
#endif
#ifndef BK_GRAM_PREFETCH   // each lane loads its next rows before adding the current ones (two register buffers)
#define BK_GRAM_PREFETCH 1
#endif
constexpr int kGramWarps = BK_GRAM_WARPS;   // tiles per Gram block (one per warp)
template <class T>
__host__ __device__ constexpr int rescale_threads() { return sizeof(T) == 4 ? BK_RESCALE_THREADS_F32 : BK_RESCALE_THREADS_16; }
constexpr unsigned kFull = 0xffffffffu;

enum Dtype { kF32 = 0, kBF16 = 1, kF16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Read-only loads (the Gram) take the non-coherent path; the in-place rescale reads plain loads.
template <bool NC, class X>
__device__ __forceinline__ X load(const X* p) {
  if constexpr (NC) return __ldg(p);
  else return *p;
}

// The RK values of one row of B (contiguous) or column of A (step `stride`) as float, zero beyond r. `vec`: the
// row is RK contiguous, 16-byte aligned elements (r == RK, aligned base): read as 16-byte vectors.
template <bool NC, class T, int RK>
__device__ __forceinline__ void load_vec(const T* p, long long step, int r, bool vec, float (&v)[RK]) {
  constexpr int per16 = 16 / (int)sizeof(T);
  if constexpr (RK % per16 == 0) {
    if (vec) {
#pragma unroll
      for (int c = 0; c < RK; c += per16) {
        const uint4 w = load<NC>(reinterpret_cast<const uint4*>(p + c));
        const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
        for (int q = 0; q < per16; ++q) v[c + q] = to_float(e[q]);
      }
      return;
    }
  }
#pragma unroll
  for (int c = 0; c < RK; ++c) v[c] = c < r ? to_float(load<NC>(p + c * step)) : 0.0f;
}

template <class T, int RK>
__device__ __forceinline__ void store_vec(T* p, long long step, int r, bool vec, const float (&v)[RK]) {
  constexpr int per16 = 16 / (int)sizeof(T);
  if constexpr (RK % per16 == 0) {
    if (vec) {
#pragma unroll
      for (int c = 0; c < RK; c += per16) {
        uint4 w;
        T* e = reinterpret_cast<T*>(&w);
#pragma unroll
        for (int q = 0; q < per16; ++q) e[q] = from_float<T>(v[c + q]);
        *reinterpret_cast<uint4*>(p + c) = w;
      }
      return;
    }
  }
#pragma unroll
  for (int c = 0; c < RK; ++c)
    if (c < r) p[c * step] = from_float<T>(v[c]);
}

// One row of B (column of A) times M (i ascending, float32 FMAs), rounded once and written over the row.
template <class T, int RK>
__device__ __forceinline__ void rescale_row(const float (&v)[RK], const float* M, T* base, long long offset,
                                            long long step, int r, bool vec) {
  float out[RK];
#pragma unroll
  for (int j = 0; j < RK; ++j) out[j] = v[0] * M[j];
#pragma unroll
  for (int i = 1; i < RK; ++i)
#pragma unroll
    for (int j = 0; j < RK; ++j) out[j] = fmaf(v[i], M[i * RK + j], out[j]);
  store_vec<T, RK>(base + offset, step, r, vec, out);
}

// Whether tile rows can be read as 16-byte vectors: rows of B (step 1) of exactly RK elements, 16-byte aligned.
template <class T, int RK>
__device__ __forceinline__ bool vec_rows(const Tile& tl, bool is_b, int r) {
  return is_b && r == RK && (RK * sizeof(T)) % 16 == 0 && (reinterpret_cast<uintptr_t>(tl.base) % 16) == 0;
}

// Reduce-scatter over the warp: acc[N] per lane (N a multiple of 32) -> lane l holds, in acc[0 .. N/32), the
// warp's sums of entries [l N/32, (l + 1) N/32). Each step halves the entries a lane keeps: it sends the half its
// partner keeps and adds the partner's copy of its own half (one lane computes each sum: a fixed tree).
template <int N, int M>
__device__ __forceinline__ void reduce_scatter_step(float (&acc)[N], int lane) {
  constexpr int half = N * M / 32;   // entries kept after this step, per lane (M = 16, 8, ..., 1)
  const bool upper = (lane & M) != 0;
#pragma unroll
  for (int e = 0; e < half; ++e) {
    const float send = upper ? acc[e] : acc[e + half];
    const float keep = upper ? acc[e + half] : acc[e];
    acc[e] = keep + __shfl_xor_sync(kFull, send, M);
  }
  if constexpr (M > 1) reduce_scatter_step<N, M / 2>(acc, lane);
}

// Packed lower triangle: entry e <-> (i, j), j <= i, row by row.
__device__ __forceinline__ void tri_index(int e, int& i, int& j) {
  i = (int)((sqrtf(8.0f * e + 1.0f) - 1.0f) * 0.5f);
  while ((i + 1) * (i + 2) / 2 <= e) ++i;
  while (i * (i + 1) / 2 > e) --i;
  j = e - i * (i + 1) / 2;
}

template <class T, int RK>
__global__ void __launch_bounds__(kGramWarps * 32) grouped_gram_kernel(const long long* __restrict__ tiles, int n_b,
                                                                       int n_tiles, int r, int R,
                                                                       float* __restrict__ partials,
                                                                       int partial_stride,
                                                                       const long long* __restrict__ ranges,
                                                                       int* __restrict__ counters,
                                                                       float* __restrict__ grams) {
  constexpr int NE = RK * (RK + 1) / 2;
  constexpr int N = (NE + 31) / 32 * 32;
  constexpr int U = RK <= 8 ? BK_GRAM_UNROLL_SMALL : BK_GRAM_UNROLL_16;   // rows per lane per step, loaded together
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kGramWarps + (threadIdx.x >> 5);
  if (t >= n_tiles) return;   // the whole warp: no block-level barrier below
  const Tile tl = load_tile(tiles, t);
  const bool is_b = t < n_b;
  const T* base = reinterpret_cast<const T*>(tl.base) + (is_b ? tl.k0 * r : tl.k0);
  const long long step = is_b ? 1 : tl.stride;       // between the r values of one row / column
  const long long next = is_b ? r : 1;               // between consecutive rows / columns
  const bool vec = vec_rows<T, RK>(tl, is_b, r);
  float acc[N];
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = 0.0f;
  // rows k + 32 u (u < U) of this lane, zero past the tile
  auto load_rows = [&](float (&v)[U][RK], int k) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = k + 32 * u;
      if (kk < tl.k_len) load_vec<true, T, RK>(base + kk * next, step, r, vec, v[u]);
      else
#pragma unroll
        for (int c = 0; c < RK; ++c) v[u][c] = 0.0f;
    }
  };
  auto add_rows = [&](const float (&v)[U][RK]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      int e = 0;
#pragma unroll
      for (int i = 0; i < RK; ++i)
#pragma unroll
        for (int j = 0; j <= i; ++j, ++e) acc[e] = fmaf(v[u][i], v[u][j], acc[e]);
    }
  };
#if BK_GRAM_PREFETCH
  // Two buffers, alternating: the next rows are in flight while the current ones are added (same sums, same
  // order as without). Measured on an H200 (bench/results/logs/session8-grouped-gram-probe-2026-12-01.txt):
  // 7B float32 r = 16 Gram 0.083 -> 0.072 ms, r = 8 0.038 -> 0.037.
  if (lane < tl.k_len) {
    float va[U][RK], vb[U][RK];
    int k = lane;
    load_rows(va, k);
    while (true) {
      if (k + 32 * U < tl.k_len) load_rows(vb, k + 32 * U);
      add_rows(va);
      k += 32 * U;
      if (k >= tl.k_len) break;
      if (k + 32 * U < tl.k_len) load_rows(va, k + 32 * U);
      add_rows(vb);
      k += 32 * U;
      if (k >= tl.k_len) break;
    }
  }
#else
  for (int k = lane; k < tl.k_len; k += 32 * U) {
    float v[U][RK];
    load_rows(v, k);
    add_rows(v);
  }
#endif
  reduce_scatter_step<N, 16>(acc, lane);
  constexpr int Q = N / 32;
  float* part = partials + tl.slot * partial_stride;
#pragma unroll
  for (int q = 0; q < Q; ++q) part[lane * Q + q] = acc[q];
  // The last tile of this Gram to finish sums all its partials, in tile order (threadFenceReduction pattern).
  __threadfence();
  __syncwarp();
  const int g = 2 * tl.pair + (is_b ? 0 : 1);
  const long long first = ranges[2 * g];
  const int count = (int)ranges[2 * g + 1];
  int last = 0;
  if (lane == 0) last = atomicAdd(counters + g, 1) == count - 1;
  last = __shfl_sync(kFull, last, 0);
  if (!last) return;
  __syncwarp();        // the shuffle orders no memory: lane 0's atomic before every lane's fence and reads
  __threadfence();
  float* G = grams + (long long)g * R * R;
  for (int e = lane; e < R * R; e += 32) {   // zero outside the r x r block (and the padding of R)
    const int i = e / R, j = e % R;
    if (i >= r || j >= r) G[e] = 0.0f;
  }
  for (int e = lane; e < r * (r + 1) / 2; e += 32) {
    int i, j;
    tri_index(e, i, j);   // r <= RK: the same packed index as the RK triangle
    float s = 0.0f;   // in tile order (loading 8 tiles' partials together measured slower: registers)
    for (int c = 0; c < count; ++c) s += __ldcg(partials + (first + c) * partial_stride + e);
    G[i * R + j] = s;
    G[j * R + i] = s;
  }
  if (lane == 0) counters[g] = 0;   // ready for the next launch (and CUDA-graph replay)
}

template <class T, int RK>
__global__ void __launch_bounds__(rescale_threads<T>()) grouped_rescale_kernel(const long long* __restrict__ tiles,
                                                                          int n_b, int r, int R,
                                                                          const float* __restrict__ tw,
                                                                          const int* __restrict__ status,
                                                                          int skip_bits) {
  constexpr int NT = rescale_threads<T>();
  constexpr int U = sizeof(T) == 4 ? (RK <= 8 ? BK_RESCALE_UNROLL_F32_SMALL : BK_RESCALE_UNROLL_F32_16)
                                   : BK_RESCALE_UNROLL_16BIT;
  __shared__ __align__(16) float M[RK * RK];   // B tiles: T [i][j]; A tiles: T^-1 transposed, [i][j] = W[j][i]
  const int t = blockIdx.x;
  const Tile tl = load_tile(tiles, t);
  if (status[tl.pair] & skip_bits) return;   // skipped pairs: nothing read or written (whole block)
  const bool is_b = t < n_b;
  const float* src = tw + ((long long)2 * tl.pair + (is_b ? 0 : 1)) * R * R;
  for (int e = threadIdx.x; e < RK * RK; e += NT) {
    const int i = e / RK, j = e % RK;
    M[e] = (i < r && j < r) ? (is_b ? src[i * R + j] : src[j * R + i]) : 0.0f;
  }
  __syncthreads();
  T* base = reinterpret_cast<T*>(tl.base) + (is_b ? tl.k0 * r : tl.k0);
  const long long step = is_b ? 1 : tl.stride;
  const long long next = is_b ? r : 1;
  const bool vec = vec_rows<T, RK>(tl, is_b, r);
  if constexpr (sizeof(T) == 4 && RK == 16 && BK_RESCALE_PREFETCH_F32_16) {
    // Two buffers, alternating: a thread's next rows are loaded before it writes the current ones (other rows, so
    // in place stays safe) and are in flight while those are multiplied; same sums, same order, same bits. Measured
    // on an H200, 7B float32 r = 16 (bench/results/logs/session8-grouped-rescale-probe2-2026-12-01.txt):
    // 0.103 ms against 0.105 for U = 2 rows per step without it; slower for 16-bit factors and r = 8 (not used).
    auto load_rows = [&](float (&v)[U][RK], int k) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kk = k + NT * u;
        if (kk < tl.k_len) load_vec<false, T, RK>(base + kk * next, step, r, vec, v[u]);
      }
    };
    auto rescale_rows = [&](const float (&v)[U][RK], int k) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kk = k + NT * u;
        if (kk >= tl.k_len) continue;
        rescale_row<T, RK>(v[u], M, base, kk * next, step, r, vec);
      }
    };
    if (threadIdx.x < tl.k_len) {
      float va[U][RK], vb[U][RK];
      int k = threadIdx.x;
      load_rows(va, k);
      while (true) {
        if (k + NT * U < tl.k_len) load_rows(vb, k + NT * U);
        rescale_rows(va, k);
        k += NT * U;
        if (k >= tl.k_len) break;
        if (k + NT * U < tl.k_len) load_rows(va, k + NT * U);
        rescale_rows(vb, k);
        k += NT * U;
        if (k >= tl.k_len) break;
      }
    }
  } else {
    for (int k = threadIdx.x; k < tl.k_len; k += NT * U) {
      float v[U][RK];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kk = k + NT * u;
        if (kk < tl.k_len) load_vec<false, T, RK>(base + kk * next, step, r, vec, v[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kk = k + NT * u;
        if (kk >= tl.k_len) continue;
        rescale_row<T, RK>(v[u], M, base, kk * next, step, r, vec);
      }
    }
  }
}

template <class T, int RK>
int launch_gram(const long long* tiles, int n_b, int n_tiles, int r, int R, float* partials, int partial_stride,
                const long long* ranges, int* counters, float* grams, cudaStream_t stream) {
  const int blocks = (n_tiles + kGramWarps - 1) / kGramWarps;
  grouped_gram_kernel<T, RK><<<blocks, kGramWarps * 32, 0, stream>>>(tiles, n_b, n_tiles, r, R, partials,
                                                                      partial_stride, ranges, counters, grams);
  return (int)cudaGetLastError();
}

template <class T, int RK>
int launch_rescale(const long long* tiles, int n_b, int n_tiles, int r, int R, const float* tw, const int* status,
                   int skip_bits, cudaStream_t stream) {
  grouped_rescale_kernel<T, RK><<<n_tiles, rescale_threads<T>(), 0, stream>>>(tiles, n_b, r, R, tw, status, skip_bits);
  return (int)cudaGetLastError();
}

template <class T, template <class, int> class Launch, class... Args>
int by_rank(int r, Args... args) {
  if (r <= 4) return Launch<T, 4>::run(args...);
  if (r <= 8) return Launch<T, 8>::run(args...);
  return Launch<T, 16>::run(args...);
}

template <class T, int RK>
struct GramLaunch {
  template <class... A>
  static int run(A... a) { return launch_gram<T, RK>(a...); }
};
template <class T, int RK>
struct RescaleLaunch {
  template <class... A>
  static int run(A... a) { return launch_rescale<T, RK>(a...); }
};

template <template <class, int> class Launch, class... Args>
int by_dtype_rank(int dtype, int r, Args... args) {
  if (dtype == kBF16) return by_rank<__nv_bfloat16, Launch>(r, args...);
  if (dtype == kF16) return by_rank<__half, Launch>(r, args...);
  return by_rank<float, Launch>(r, args...);
}

}  // namespace

extern "C" {

// csrc/grouped_mma.cu: float32 factors of ranks 17 to 64 on the tensor cores.
int bk_grouped_mma_rank_block(int r);
int bk_grouped_mma_gram_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, float* partials,
                               int partial_stride, const long long* ranges, int* counters, float* grams,
                               cudaStream_t stream);
int bk_grouped_mma_rescale_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, const float* tw,
                                  const int* status, int skip_bits, cudaStream_t stream);

// Largest rank the kernels take for a dtype code (0 float32, 1 bfloat16, 2 float16): float32 factors above 16
// take csrc/grouped_mma.cu's tensor-core kernels. A tile's partial needs partial_stride >= bk_grouped_partial_size(r)
// floats: a packed triangle up to r = 16, an RK x RK square above.
int bk_grouped_max_rank(int dtype) { return dtype == kF32 ? 64 : 16; }
int bk_grouped_partial_size(int r) {
  if (r > 16) {
    const int rk = bk_grouped_mma_rank_block(r);
    return rk * rk;
  }
  const int rk = r <= 4 ? 4 : (r <= 8 ? 8 : 16);
  return (rk * (rk + 1) / 2 + 31) / 32 * 32;
}

// dtype: 0 float32, 1 bfloat16, 2 float16. Returns a cudaError_t (0 on success); 1 (cudaErrorInvalidValue) for
// a rank or dtype out of range. counters int32 [2 P], zero before the first launch (each launch leaves them zero).
int bk_grouped_gram_launch(const long long* tiles, int n_b, int n_a, int r, int R, int dtype, float* partials,
                           int partial_stride, const long long* ranges, int* counters, float* grams,
                           cudaStream_t stream) {
  if (dtype < 0 || dtype > 2 || r < 1 || r > bk_grouped_max_rank(dtype) || R < r ||
      partial_stride < bk_grouped_partial_size(r) || (r > 16 && R < bk_grouped_mma_rank_block(r)))
    return 1;
  if (n_b + n_a == 0) return 0;
  if (r > 16)
    return bk_grouped_mma_gram_launch(tiles, n_b, n_b + n_a, r, R, partials, partial_stride, ranges, counters, grams,
                                      stream);
  return by_dtype_rank<GramLaunch>(dtype, r, tiles, n_b, n_b + n_a, r, R, partials, partial_stride, ranges,
                                   counters, grams, stream);
}

int bk_grouped_rescale_launch(const long long* tiles, int n_b, int n_a, int r, int R, int dtype, const float* tw,
                              const int* status, int skip_bits, cudaStream_t stream) {
  // (above r = 16, R >= the rank block as for the Gram, csrc/bindings.cpp's rule: the kernels read only the r x r
  // block of tw and of each Gram's partials, so R >= r would do; one rule for both ops)
  if (dtype < 0 || dtype > 2 || r < 1 || r > bk_grouped_max_rank(dtype) || R < r ||
      (r > 16 && R < bk_grouped_mma_rank_block(r)))
    return 1;
  if (n_b + n_a == 0) return 0;
  if (r > 16) return bk_grouped_mma_rescale_launch(tiles, n_b, n_b + n_a, r, R, tw, status, skip_bits, stream);
  return by_dtype_rank<RescaleLaunch>(dtype, r, tiles, n_b, n_b + n_a, r, R, tw, status, skip_bits, stream);
}

}  // extern "C"
