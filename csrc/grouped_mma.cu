// Grouped Gram and grouped in-place rescale of float32 adapters of ranks 17 to 64 on the tensor cores (3xTF32):
// the CUDA path of steps 1-2 and 4 of balora_kernels/ops/grouped_projection.py there, launched through
// csrc/grouped.cu's bk_grouped_gram_launch / bk_grouped_rescale_launch (the one entry point of each step, which
// takes csrc/grouped.cu's CUDA-core kernels for ranks <= 16). Same tile table (csrc/grouped_tiles.cuh).
//
// One block of 256 threads per tile (the plan cuts these factors into tiles of 2048 rows). The tile's rows of B
// (columns of A) stream through a three-stage cp.async ring of chunks of KC = 4096 / RK rows x RK ranks (RK = 32 or
// 64, zero beyond r and past the tile), held as X [KC, RK] (B) or X^T [RK, KC] (A), whichever is the factor's own
// layout, rows padded so that every fragment load of mma.m16n8k8 is free of bank conflicts. Each float32 value x is
// split into hi and lo (split_tf32): three of the four products hi hi, hi lo, lo hi, lo lo carry x y to about 2^-22
// relative (the fourth, below that, is dropped), as Triton's tf32x3. The tensor cores' float32 sums are kept short
// (mma_tf32_zero).
//
// Gram: G = X^T X = S + C + C^T with S = hi^T hi and C = hi^T lo (C^T = lo^T hi): two products per step, S summed
// per chunk on the tensor cores and across chunks on the CUDA cores. The tile's partial, symmetrised (0.5 (S_ij +
// S_ji) + (C_ij + C_ji), the same expression for (i, j) and (j, i)), goes to its slot; the block that completes a
// Gram (an integer counter per Gram, no float atomics) sums that Gram's partials in tile order into grams [P, 2, R,
// R]: a fixed order everywhere, bitwise reproducible.
// Rescale: B <- B T (out = X T), A <- T^-1 A (out^T = X W^T): hi hi + hi lo + lo hi of X and the transform (split
// once per tile, in shared memory), each k8 step's sum on the tensor cores added on the CUDA cores, one rounding;
// tiles of skipped pairs are not read or written. In place: a chunk's outputs are stored after all of it was read,
// and the chunks in flight are other rows.
//
// Measured on an H200 (7B adapters, float32; bench/results/logs/session16-mma-*-2026-12-02.*, GPU ms against the
// Triton kernels): Gram r = 64 0.404 against 0.468, r = 32 0.173 against 0.978; rescale r = 64 0.582 against 0.612,
// r = 32 0.191 against 0.277. Both at r = 64 are latency-bound, not at the memory floor (0.155 / 0.31 ms): ncu (on
// 1024-row tiles) gives 31% / 46% of DRAM bandwidth, 42-47% of issue slots, 25% occupancy (two blocks of 8 warps
// per SM: registers and shared memory), the tensor pipe 28-33% busy. Tried and not kept: splitting each chunk once into hi / lo planes
// read by ldmatrix (fewer instructions per mma, one more barrier per chunk and more shared memory: Gram 0.404 ->
// 0.524 ms, rescale 0.582 -> 0.620 at r = 64), hi and lo both by cvt.rna.tf32.f32 (BK_MMA_SPLIT_CVT: Gram 0.448 ->
// 0.560 at 1024-row tiles), four stages (BK_MMA_STAGES: rescale 0.581 -> 0.673 there, fragments in registers), three blocks per SM (spills;
// BK_MMA_*_BLOCKS), the transform's fragments in registers (BK_MMA_RESCALE_MREGS: rescale 0.582 -> 0.598).
//
// Needs only the CUDA runtime (no torch headers).
#include <cuda_runtime.h>

#include <stdint.h>

#include <type_traits>

#include "cp_async.cuh"
#include "grouped_tiles.cuh"

namespace {

// Launch shapes and methods (macros so that bench/probe builds can compare alternatives:
// bench/probe/build_grouped_variants.sh, bench/probe/grouped_cuda.py).
#ifndef BK_MMA_STAGES
#define BK_MMA_STAGES 3
#endif
#ifndef BK_MMA_RESCALE_MREGS   // 1: each warp's fragments of the transform in registers for the whole tile
#define BK_MMA_RESCALE_MREGS 0
#endif
#ifndef BK_MMA_GRAM_BLOCKS     // blocks per SM the Gram's register budget is set for (__launch_bounds__)
#define BK_MMA_GRAM_BLOCKS 2
#endif
#ifndef BK_MMA_RESCALE_BLOCKS  // the same for the rescale
#define BK_MMA_RESCALE_BLOCKS 2
#endif
#ifndef BK_MMA_SPLIT_CVT       // 1: hi and lo by cvt.rna.tf32.f32; 0: hi rounded by integer ops, lo as is
#define BK_MMA_SPLIT_CVT 0
#endif
constexpr int kThreads = 256;           // 8 warps
constexpr int kStages = BK_MMA_STAGES;  // cp.async ring depth
constexpr int kChunkElems = 4096;       // KC x RK floats per chunk
// One tile of the table (csrc/grouped_tiles.cuh) as these kernels read it.
struct TileRows {
  float* base;            // the tile's first row of B / column of A
  long long stride;       // A: row stride (elements); B: r
  int k_len;
  long long slot;
  int pair;
  bool is_b;
};

// (Reads the row itself, A's stride only for A tiles: built from load_tile, the kernels' PTX came out different
// from that of the build tested on the H200.)
__device__ __forceinline__ TileRows tile_rows(const long long* tiles, int t, int n_b, int r) {
  const long long* f = tiles + (long long)t * kFields;
  TileRows tl;
  tl.is_b = t < n_b;
  tl.stride = tl.is_b ? r : f[1];
  tl.base = reinterpret_cast<float*>(f[0]) + (tl.is_b ? f[2] * r : f[2]);
  tl.k_len = (int)f[3];
  tl.slot = f[4];
  tl.pair = (int)f[5];
  return tl;
}

// x = hi + lo to about 2^-22 relative: hi = x rounded to tf32 (to nearest, ties away: so |lo| <= 2^-11 |x|; x - hi
// is exact in float32), lo = x - hi, which the tensor cores read as tf32 (its 13 low bits ignored). Cutting hi
// instead of rounding it leaves four times the error: 3xTF32 products of 7B-shaped factors emulated in float64 on
// the CPU (bench/probe/tf32_split_emulation.py), 3.5e-7 relative against 7.8e-8 rounded (7.7e-8 with lo rounded
// too); the plain float32 product 1.4e-7.
__device__ __forceinline__ uint32_t tf32_round(float x) {
#if BK_MMA_SPLIT_CVT
  uint32_t y;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(y) : "f"(x));
  return y;
#else
  return (__float_as_uint(x) + 0x1000u) & 0xffffe000u;   // (a NaN may turn into -0 here: then lo is the NaN)
#endif
}
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = tf32_round(x);
#if BK_MMA_SPLIT_CVT
  lo = tf32_round(x - __uint_as_float(hi));
#else
  lo = __float_as_uint(x - __uint_as_float(hi));
#endif
}

// d += a b, mma.m16n8k8 (tf32 in, float32 accumulate). Fragments (g = lane / 4, t = lane % 4): a0 (g, t),
// a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); b0 (k = t, n = g), b1 (t + 4, g); d0, d1 (g, 2t, 2t + 1),
// d2, d3 (g + 8, 2t, 2t + 1).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// d = a b (a zero accumulator). The tensor cores' float32 sums are not rounded to nearest (measured: a 1024-row
// Gram accumulated in the tensor cores, 1.2e-6 relative error against float64 where the plain float32 Gram has
// 1.6e-7), so long sums take short tensor-core sums added on the CUDA cores.
__device__ __forceinline__ void mma_tf32_zero(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.0f));
}

// The chunk layout: X[k][i] (k < KC rows of B, i < RK ranks) at k * LDB + i for B tiles, at i * LDA + k for A
// tiles (A's own layout: X^T). PB, PA: the paddings that keep the kernel's fragment loads conflict-free.
template <int RK, int PB, int PA>
struct Chunk {
  static constexpr int KC = kChunkElems / RK;
  static constexpr int LDB = RK + PB, LDA = KC + PA;
  static constexpr int kFloats = (KC * LDB > RK * LDA) ? KC * LDB : RK * LDA;   // one stage
  template <bool IS_B>
  __device__ static __forceinline__ float at(const float* s, int k, int i) {
    return IS_B ? s[k * LDB + i] : s[i * LDA + k];
  }
  // Rows [k0, k0 + KC) of the tile into stage s: 16-byte copies where four consecutive elements are all inside
  // the factor and 16-byte aligned (vec: checked once per tile), element copies otherwise, zeros outside.
  __device__ static __forceinline__ void load(float* s, const TileRows& tl, int r, int k0, bool vec) {
    constexpr int kGroups = kChunkElems / 4;
#pragma unroll
    for (int q = 0; q < kGroups / kThreads; ++q) {
      const int f = threadIdx.x + q * kThreads;
      if (tl.is_b) {                              // row k, ranks [c, c + 4)
        const int k = f / (RK / 4), c = (f % (RK / 4)) * 4;
        const bool row_ok = k0 + k < tl.k_len;
        const float* src = tl.base + (long long)(k0 + k) * tl.stride + c;
        float* dst = s + k * LDB + c;
        if (vec) {
          cp_async16_zfill(dst, row_ok ? src : tl.base, row_ok);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool ok = row_ok && c + e < r;
            cp_async4_zfill(dst + e, ok ? src + e : tl.base, ok);
          }
        }
      } else {                                    // rank i, columns [k, k + 4)
        const int i = f / (KC / 4), k = (f % (KC / 4)) * 4;
        const bool row_ok = i < r;
        const float* src = tl.base + (long long)i * tl.stride + k0 + k;
        float* dst = s + i * LDA + k;
        if (vec && row_ok && k0 + k + 4 <= tl.k_len) {
          cp_async16_zfill(dst, src, true);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool ok = row_ok && k0 + k + e < tl.k_len;
            cp_async4_zfill(dst + e, ok ? src + e : tl.base, ok);
          }
        }
      }
    }
  }
};

// Whether the tile's chunks can be copied in 16-byte pieces: B rows of exactly RK floats (r == RK) from a 16-byte
// aligned start; A rows (stride a multiple of 4) from a 16-byte aligned start (then every 4-column group is).
template <int RK>
__device__ __forceinline__ bool vec_tile(const TileRows& tl, int r) {
  const bool aligned = (reinterpret_cast<uintptr_t>(tl.base) % 16) == 0;
  return aligned && (tl.is_b ? r == RK : tl.stride % 4 == 0);
}

// The kernels' chunk layouts: the Gram reads X(k0 + t, m + g) (bank 8t + g for B tiles, 4g + t for A tiles), the
// rescale X(m + g, k0 + t) (4g + t, 8t + g) and its transform M(k0 + t, n + g) (row stride RescaleLdm: 8t + g).
template <int RK>
using GramChunk = Chunk<RK, 8, 4>;
template <int RK>
using RescaleChunk = Chunk<RK, 4, 8>;
template <int RK>
__host__ __device__ constexpr int RescaleLdm() { return RK + 8; }

// Starts the ring: chunks 0 .. kStages - 2 in flight (one commit group each, empty ones included).
template <class C>
__device__ __forceinline__ void ring_start(float* ring, const TileRows& tl, int r, bool vec, int n_chunks) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_chunks) C::load(ring + s * C::kFloats, tl, r, s * C::KC, vec);
    cp_async_commit();
  }
}

// Chunk c is in its stage for every thread; chunk c + kStages - 1 is on its way into the stage chunk c - 1 left.
template <class C>
__device__ __forceinline__ const float* ring_next(float* ring, const TileRows& tl, int r, bool vec, int n_chunks,
                                                  int c) {
  cp_async_wait<kStages - 2>();
  __syncthreads();   // chunk c visible to all; every thread done with chunk c - 1's stage
  const int nc = c + kStages - 1;
  if (nc < n_chunks) C::load(ring + (nc % kStages) * C::kFloats, tl, r, nc * C::KC, vec);
  cp_async_commit();
  return ring + (c % kStages) * C::kFloats;
}

// The Gram's end: the warps' S and X (warp tile at m0, n0, k group kg) through shared memory (the ring, no longer
// needed), summed over the k groups in warp order; the tile's partial G = 0.5 (S + S^T) + (X + X^T) into its slot;
// the block that completes a Gram sums its partials in tile order (threadFenceReduction pattern).
template <int RK, int KG>
__device__ __forceinline__ void gram_epilogue(float* ring, const float (&S)[4][4], const float (&X)[4][4],
                                              const TileRows& tl, int m0, int n0, int kg, int r, int R,
                                              float* __restrict__ partials, int partial_stride,
                                              const long long* __restrict__ ranges, int* __restrict__ counters,
                                              float* __restrict__ grams, int& last) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  cp_async_wait<0>();
  __syncthreads();   // every warp done with the ring: it becomes E[kg][S or X][RK][RK]
  float* E = ring;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = m0 + g + (e >= 2 ? 8 : 0), col = n0 + 8 * j + 2 * t + (e & 1);
      E[(kg * 2 + 0) * RK * RK + i * RK + col] = S[j][e];
      E[(kg * 2 + 1) * RK * RK + i * RK + col] = X[j][e];
    }
  __syncthreads();
  float* part = partials + tl.slot * partial_stride;
  auto sum_kg = [&](int which, int idx) {
    float v = E[which * RK * RK + idx];
#pragma unroll
    for (int q = 1; q < KG; ++q) v += E[(q * 2 + which) * RK * RK + idx];
    return v;
  };
  for (int e = threadIdx.x; e < RK * RK; e += kThreads) {
    const int i = e / RK, j = e % RK, et = j * RK + i;
    part[e] = 0.5f * (sum_kg(0, e) + sum_kg(0, et)) + (sum_kg(1, e) + sum_kg(1, et));
  }
  __threadfence();
  __syncthreads();
  const int gi = 2 * tl.pair + (tl.is_b ? 0 : 1);
  const long long first = ranges[2 * gi];
  const int count = (int)ranges[2 * gi + 1];
  if (threadIdx.x == 0) last = atomicAdd(counters + gi, 1) == count - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  float* G = grams + (long long)gi * R * R;
  for (int e = threadIdx.x; e < R * R; e += kThreads) {
    const int i = e / R, j = e % R;
    float v = 0.0f;   // zero outside the r x r block: X is zero beyond r
    if (i < RK && j < RK) {
      const float* p = partials + first * partial_stride + i * RK + j;
      for (int q0 = 0; q0 < count; q0 += 8) {   // eight loads in flight, then their sum in tile order
        float w[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) w[q] = q0 + q < count ? __ldcg(p + (long long)(q0 + q) * partial_stride) : 0.0f;
#pragma unroll
        for (int q = 0; q < 8; ++q)
          if (q0 + q < count) v += w[q];
      }
    }
    G[e] = v;
  }
  if (threadIdx.x == 0) counters[gi] = 0;   // ready for the next launch (and CUDA-graph replay)
}

// A warp's 32 x 16 outputs (rows k0 + [0, 32) of the tile, columns n0 + [0, 16)), rounded once, over the factor: rows
// of B (two floats at a time when rows are exactly RK long and aligned) / columns of A.
template <int RK>
__device__ __forceinline__ void rescale_store(const float (&acc)[2][2][4], const TileRows& tl, int k0, int n0, int g, int t,
                                              int r, bool vec) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = k0 + 16 * a + g + 8 * h;   // tile row of B / column of A
      if (k >= tl.k_len) continue;
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int j = n0 + 8 * b + 2 * t;
        const float v0 = acc[a][b][2 * h], v1 = acc[a][b][2 * h + 1];
        if (tl.is_b) {
          float* p = tl.base + (long long)k * tl.stride + j;
          if (vec) {
            *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
          } else {
            if (j < r) p[0] = v0;
            if (j + 1 < r) p[1] = v1;
          }
        } else {
          float* p = tl.base + (long long)j * tl.stride + k;
          if (j < r) p[0] = v0;
          if (j + 1 < r) p[tl.stride] = v1;
        }
      }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Gram. Warp tiles of 16 x 32 entries (4 mma tiles) of the RK x RK Gram: NWT = RK^2 / 512 of them (8 at RK = 64,
// 2 at RK = 32); the KG = 8 / NWT warps of one warp tile take contiguous quarters / halves / all of each chunk's
// k8 steps, their sums added at the end in warp order.
template <int RK>
__global__ void __launch_bounds__(kThreads, BK_MMA_GRAM_BLOCKS) mma_gram_kernel(
    const long long* __restrict__ tiles, int n_b, int r, int R, float* __restrict__ partials, int partial_stride,
    const long long* __restrict__ ranges, int* __restrict__ counters, float* __restrict__ grams) {
  using C = GramChunk<RK>;
  constexpr int NWT = RK * RK / 512, KG = 8 / NWT, STEPS = C::KC / 8 / KG;
  static_assert(NWT * KG == 8 && STEPS * KG * 8 == C::KC, "warp tiling");
  static_assert(kStages * C::kFloats >= 2 * KG * RK * RK, "the epilogue reuses the ring");
  extern __shared__ __align__(16) float ring[];
  __shared__ int last;
  const TileRows tl = tile_rows(tiles, blockIdx.x, n_b, r);
  const bool vec = vec_tile<RK>(tl, r);
  const int n_chunks = (tl.k_len + C::KC - 1) / C::KC;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wt = warp % NWT, kg = warp / NWT;
  const int m0 = (wt / (RK / 32)) * 16, n0 = (wt % (RK / 32)) * 32;
  float S[4][4], X[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) S[j][e] = X[j][e] = 0.0f;
  ring_start<C>(ring, tl, r, vec, n_chunks);
  auto chunks = [&](auto is_b) {   // the factor's side as a compile-time constant
    constexpr bool B = decltype(is_b)::value;
    for (int c = 0; c < n_chunks; ++c) {
      const float* s = ring_next<C>(ring, tl, r, vec, n_chunks, c);
      // This chunk's hi^T hi on the tensor cores, then added to S on the CUDA cores (C = hi^T lo, ~2^-11 of it,
      // stays on the tensor cores: their rounding of C is far below float32's of G).
      float tS[4][4];
#pragma unroll
      for (int st = 0; st < STEPS; ++st) {
        const int k = (kg * STEPS + st) * 8 + t;
        uint32_t ah[4];
        ah[0] = tf32_round(C::template at<B>(s, k, m0 + g));
        ah[1] = tf32_round(C::template at<B>(s, k, m0 + g + 8));
        ah[2] = tf32_round(C::template at<B>(s, k + 4, m0 + g));
        ah[3] = tf32_round(C::template at<B>(s, k + 4, m0 + g + 8));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t bh[2], bl[2];
          split_tf32(C::template at<B>(s, k, n0 + 8 * j + g), bh[0], bl[0]);
          split_tf32(C::template at<B>(s, k + 4, n0 + 8 * j + g), bh[1], bl[1]);
          if (st == 0) mma_tf32_zero(tS[j], ah, bh);
          else mma_tf32(tS[j], ah, bh);
          mma_tf32(X[j], ah, bl);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) S[j][e] += tS[j][e];
    }
  };
  if (tl.is_b) chunks(std::true_type{});
  else chunks(std::false_type{});
  gram_epilogue<RK, KG>(ring, S, X, tl, m0, n0, kg, r, R, partials, partial_stride, ranges, counters, grams, last);
}

// ---------------------------------------------------------------------------------------------------------------
// Rescale. out [KC, RK] = X M, M = T (B tiles) or W^T (A tiles), split into hi and lo once per tile in shared
// memory, read from there at every k8 step (BK_MMA_RESCALE_MREGS=1: each warp's fragments of it held in registers
// for the whole tile instead). Warp tiles of 32 x 16 outputs (2 x 2 mma tiles): RK / 16 across, 8 / (RK / 16) down
// (KC = 32 times that). At RK = 64 the 128 registers that two blocks per SM allow spill 44 bytes per thread.
template <int RK>
__global__ void __launch_bounds__(kThreads, BK_MMA_RESCALE_BLOCKS) mma_rescale_kernel(
    const long long* __restrict__ tiles, int n_b, int r, int R, const float* __restrict__ tw,
    const int* __restrict__ status, int skip_bits) {
  using C = RescaleChunk<RK>;
  constexpr int LDM = RescaleLdm<RK>();
  constexpr int WN = RK / 16, WM = 8 / WN;
  static_assert(WM * 32 == C::KC, "warp tiling");
  extern __shared__ __align__(16) float smem[];
  uint32_t* Mh = reinterpret_cast<uint32_t*>(smem);
  uint32_t* Ml = Mh + RK * LDM;
  float* ring = smem + 2 * RK * LDM;
  const TileRows tl = tile_rows(tiles, blockIdx.x, n_b, r);
  if (status[tl.pair] & skip_bits) return;   // skipped pairs: nothing read or written (whole block)
  const bool vec = vec_tile<RK>(tl, r);
  const int n_chunks = (tl.k_len + C::KC - 1) / C::KC;
  ring_start<C>(ring, tl, r, vec, n_chunks);
  const float* src = tw + ((long long)2 * tl.pair + (tl.is_b ? 0 : 1)) * R * R;
  for (int e = threadIdx.x; e < RK * RK; e += kThreads) {
    const int i = e / RK, j = e % RK;
    const float m = (i < r && j < r) ? (tl.is_b ? src[i * R + j] : src[j * R + i]) : 0.0f;
    split_tf32(m, Mh[i * LDM + j], Ml[i * LDM + j]);
  }
  __syncthreads();   // M split and stored
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int m0 = (warp / WN) * 32, n0 = (warp % WN) * 16;
#if BK_MMA_RESCALE_MREGS
  // This warp's fragments of M for the whole tile: [k8 step][n tile][b0, b1], hi and lo.
  uint32_t bh[RK / 8][2][2], bl[RK / 8][2][2];
#pragma unroll
  for (int q = 0; q < RK / 8; ++q)
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int idx = (8 * q + t + 4 * h) * LDM + n0 + 8 * b + g;
        bh[q][b][h] = Mh[idx];
        bl[q][b][h] = Ml[idx];
      }
#endif
  auto chunks = [&](auto is_b) {   // the factor's side as a compile-time constant
    constexpr bool B = decltype(is_b)::value;
    for (int c = 0; c < n_chunks; ++c) {
      const float* s = ring_next<C>(ring, tl, r, vec, n_chunks, c);
      float acc[2][2][4];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.0f;
#pragma unroll
      for (int q = 0; q < RK / 8; ++q) {
        const int k0 = 8 * q;
        uint32_t ah[2][4], al[2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const int m = m0 + 16 * a + g;
          split_tf32(C::template at<B>(s, m, k0 + t), ah[a][0], al[a][0]);
          split_tf32(C::template at<B>(s, m + 8, k0 + t), ah[a][1], al[a][1]);
          split_tf32(C::template at<B>(s, m, k0 + t + 4), ah[a][2], al[a][2]);
          split_tf32(C::template at<B>(s, m + 8, k0 + t + 4), ah[a][3], al[a][3]);
        }
#pragma unroll
        for (int b = 0; b < 2; ++b) {
#if BK_MMA_RESCALE_MREGS
          const uint32_t(&mh)[2] = bh[q][b];
          const uint32_t(&ml)[2] = bl[q][b];
#else
          const int idx = (k0 + t) * LDM + n0 + 8 * b + g;
          const uint32_t mh[2] = {Mh[idx], Mh[idx + 4 * LDM]};
          const uint32_t ml[2] = {Ml[idx], Ml[idx + 4 * LDM]};
#endif
#pragma unroll
          for (int a = 0; a < 2; ++a) {   // this k8 step's sum on the tensor cores (small terms first), then added
            float d[4];
            mma_tf32_zero(d, al[a], mh);
            mma_tf32(d, ah[a], ml);
            mma_tf32(d, ah[a], mh);
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[a][b][e] += d[e];
          }
        }
      }
      rescale_store<RK>(acc, tl, c * C::KC + m0, n0, g, t, r, vec);
    }
  };
  if (tl.is_b) chunks(std::true_type{});
  else chunks(std::false_type{});
}

template <int RK>
int gram_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, float* partials, int partial_stride,
                const long long* ranges, int* counters, float* grams, cudaStream_t stream) {
  constexpr size_t smem = kStages * GramChunk<RK>::kFloats * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(mma_gram_kernel<RK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return (int)err;
  mma_gram_kernel<RK><<<n_tiles, kThreads, smem, stream>>>(tiles, n_b, r, R, partials, partial_stride, ranges,
                                                           counters, grams);
  return (int)cudaGetLastError();
}

template <int RK>
int rescale_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, const float* tw, const int* status,
                   int skip_bits, cudaStream_t stream) {
  constexpr size_t smem = (2 * RK * RescaleLdm<RK>() + kStages * RescaleChunk<RK>::kFloats) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(mma_rescale_kernel<RK>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
  if (err != cudaSuccess) return (int)err;
  mma_rescale_kernel<RK><<<n_tiles, kThreads, smem, stream>>>(tiles, n_b, r, R, tw, status, skip_bits);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

// Float32 factors of ranks 17 to 64 (csrc/grouped.cu's entry points call these; they check the arguments): the
// Gram's partials are RK x RK squares (partial_stride >= RK^2), R >= RK.
int bk_grouped_mma_rank_block(int r) { return r <= 32 ? 32 : 64; }

int bk_grouped_mma_gram_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, float* partials,
                               int partial_stride, const long long* ranges, int* counters, float* grams,
                               cudaStream_t stream) {
  if (r <= 32) return gram_launch<32>(tiles, n_b, n_tiles, r, R, partials, partial_stride, ranges, counters, grams,
                                      stream);
  return gram_launch<64>(tiles, n_b, n_tiles, r, R, partials, partial_stride, ranges, counters, grams, stream);
}

int bk_grouped_mma_rescale_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, const float* tw,
                                  const int* status, int skip_bits, cudaStream_t stream) {
  if (r <= 32) return rescale_launch<32>(tiles, n_b, n_tiles, r, R, tw, status, skip_bits, stream);
  return rescale_launch<64>(tiles, n_b, n_tiles, r, R, tw, status, skip_bits, stream);
}

}  // extern "C"
