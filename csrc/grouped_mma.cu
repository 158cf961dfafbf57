// Grouped Gram and grouped in-place rescale of float32 adapters of ranks 17 to 64 on the tensor cores (3xTF32):
// the CUDA path of steps 1-2 and 4 of balora_kernels/ops/grouped_projection.py there, launched through
// csrc/grouped.cu's bk_grouped_gram_launch / bk_grouped_rescale_launch (the one entry point of each step, which
// takes csrc/grouped.cu's CUDA-core kernels for ranks <= 16). Same tile table (csrc/grouped_tiles.cuh).
//
// One block per tile (the plan cuts these factors into tiles of 2048 rows). The tile's rows of B (columns of A)
// stream through a cp.async ring of chunks of KC = 4096 / RK rows x RK ranks (RK = 32 or 64, zero beyond r and past
// the tile), held as X [KC, RK] (B) or X^T [RK, KC] (A), whichever is the factor's own layout, rows padded so that
// every fragment load of mma.m16n8k8 is free of bank conflicts. Each float32 value x is split into hi and lo
// (split_tf32): three of the four products hi hi, hi lo, lo hi, lo lo carry x y to about 2^-22 relative (the
// fourth, below that, is dropped), as Triton's tf32x3. The tensor cores' float32 sums are kept short
// (mma_tf32_zero).
//
// Gram: G = X^T X = hi^T hi + (hi^T lo + lo^T hi), each tile's upper triangle held in the accumulators of four warps
// (mma_gram_kernel, the tile's rows split between them) and symmetrised; the tile's partial goes to its slot; the
// block that completes a Gram (an integer counter per Gram, no float atomics) sums that Gram's partials in tile
// order into grams [P, 2, R, R]: a fixed order everywhere, bitwise reproducible.
// Rescale: B <- B T (out = X T), A <- T^-1 A (out^T = X W^T): hi hi + hi lo + lo hi of X and the transform (split
// once per tile, in shared memory), each k8 step's sum on the tensor cores added on the CUDA cores, one rounding;
// tiles of skipped pairs are not read or written. In place: a chunk's outputs are stored after all of it was read,
// and the chunks in flight are other rows.
//
// On Hopper (an sm_90a image, BK_SM90A) rank block 64 takes the wgmma kernels at the end of this file instead:
// wg_gram_kernel and wg_rescale_kernel: the same tiles and split, one warpgroup per tile (the Gram as S + C + C^T
// with S = hi^T hi, C = hi^T lo, its ring two stages deep; the rescale sums its small terms over a 64-row block's
// eight k8 steps).
//
// Measured on an H200 (7B adapters, float32; bench/results/logs/session16-mma-*-2026-12-02.*, GPU ms against the
// Triton kernels): Gram r = 64 0.404 against 0.468, r = 32 0.173 against 0.978 (session 16's mma.sync Gram, since
// replaced: see mma_gram_kernel); rescale r = 64 0.582 against 0.612, r = 32 0.191 against 0.277. The wgmma
// kernels at r = 64 (session 19, bench/results/logs/session19-wg-*-2026-12-02.*): Gram 0.403 -> 0.335 ms, rescale
// 0.586 -> 0.438 (ncu: 43% / 60% of DRAM bandwidth); at r = 32 the wgmma rescale was no faster (0.199 against
// 0.191), so rank block 32 stays here. The wgmma Gram is bound by shared memory, not by DRAM or latency (session
// 21, bench/results/logs/session21-*: ncu L1/TEX throughput 77-80%; by our count mostly the operands' reads, if
// each wgmma reads its B operand once per warp of the warpgroup): refilling a stage as soon as its chunk is split
// (two chunks in flight per block: 0.345 against 0.338 ms), a warp-specialised version (a producer warpgroup
// loading and splitting into two pairs of planes, a consumer warpgroup running the products, named barriers: 0.337,
// the same bits), tiles launched longest first (0.342) did not help; the code is in
// session21-gram-experiments-not-kept.patch.
// Tried and not kept (sessions 16-19): splitting each chunk once into hi / lo planes read by ldmatrix (fewer
// instructions per mma, one more barrier per chunk and more shared memory: Gram 0.404 -> 0.524 ms, rescale 0.582 ->
// 0.620 at r = 64), hi and lo both by cvt.rna.tf32.f32 (BK_MMA_SPLIT_CVT: Gram 0.448 -> 0.560 at 1024-row tiles),
// four stages (BK_MMA_STAGES: rescale 0.581 -> 0.673 there, fragments in registers), three blocks per SM (spills;
// BK_MMA_RESCALE_BLOCKS), the transform's fragments in registers (BK_MMA_RESCALE_MREGS: rescale 0.582 -> 0.598).
//
// Needs only the CUDA runtime (no torch headers).
#include <cuda_runtime.h>

#include <stdint.h>

#include <atomic>
#include <cstdlib>
#include <type_traits>
#include <utility>

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
#ifndef BK_MMA_RESCALE_BLOCKS  // blocks per SM the rescale's register budget is set for (__launch_bounds__)
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
  template <int NT = kThreads>   // the block's threads
  __device__ static __forceinline__ void load(float* s, const TileRows& tl, int r, int k0, bool vec) {
    constexpr int kGroups = kChunkElems / 4;
#pragma unroll
    for (int q = 0; q < kGroups / NT; ++q) {
      const int f = threadIdx.x + q * NT;
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

// Starts the ring (ST stages): chunks 0 .. ST - 2 in flight (one commit group each, empty ones included).
template <class C, int NT = kThreads, int ST = kStages>
__device__ __forceinline__ void ring_start(float* ring, const TileRows& tl, int r, bool vec, int n_chunks) {
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < n_chunks) C::template load<NT>(ring + s * C::kFloats, tl, r, s * C::KC, vec);
    cp_async_commit();
  }
}

// Chunk c is in its stage for every thread; chunk c + ST - 1 is on its way into the stage chunk c - 1 left.
template <class C, int NT = kThreads, int ST = kStages>
__device__ __forceinline__ const float* ring_next(float* ring, const TileRows& tl, int r, bool vec, int n_chunks,
                                                  int c) {
  cp_async_wait<ST - 2>();
  __syncthreads();   // chunk c visible to all; every thread done with chunk c - 1's stage
  const int nc = c + ST - 1;
  if (nc < n_chunks) C::template load<NT>(ring + (nc % ST) * C::kFloats, tl, r, nc * C::KC, vec);
  cp_async_commit();
  return ring + (c % ST) * C::kFloats;
}

// The tile's partial from E[KG][S or X][RK][RK] (the block's sums, in shared memory, visible to all threads):
// summed over the k groups in order, G = 0.5 (S + S^T) + (X + X^T) into the tile's slot; the block that completes a
// Gram sums its partials in tile order (threadFenceReduction pattern).
template <int RK, int KG, int NT>
__device__ __forceinline__ void gram_reduce(const float* E, const TileRows& tl, int r, int R,
                                            float* __restrict__ partials, int partial_stride,
                                            const long long* __restrict__ ranges, int* __restrict__ counters,
                                            float* __restrict__ grams, int& last) {
  float* part = partials + tl.slot * partial_stride;
  auto sum_kg = [&](int which, int idx) {
    float v = E[which * RK * RK + idx];
#pragma unroll
    for (int q = 1; q < KG; ++q) v += E[(q * 2 + which) * RK * RK + idx];
    return v;
  };
  for (int e = threadIdx.x; e < RK * RK; e += NT) {
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
  for (int e = threadIdx.x; e < R * R; e += NT) {
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

// The transform of the tile's pair, M = T (B tiles: out = X M) or W^T (A tiles: out^T = X W^T), zero beyond r,
// split into hi and lo at index(i, j) of Mh and Ml for M[i][j] (k = i, output column j).
template <int RK, int NT, class Index>
__device__ __forceinline__ void split_transform(const float* __restrict__ tw, const TileRows& tl, int r, int R,
                                                uint32_t* Mh, uint32_t* Ml, Index index) {
  const float* src = tw + ((long long)2 * tl.pair + (tl.is_b ? 0 : 1)) * R * R;
  for (int e = threadIdx.x; e < RK * RK; e += NT) {
    const int i = e / RK, j = e % RK;
    const float m = (i < r && j < r) ? (tl.is_b ? src[i * R + j] : src[j * R + i]) : 0.0f;
    const int o = index(i, j);
    split_tf32(m, Mh[o], Ml[o]);
  }
}

// Outputs (k, j) and (k, j + 1) (j even; tile row k of B / column of A, rank j), rounded once, over the factor: two
// floats at a time for rows of B exactly RK long and aligned (vec); nothing at ranks from r on.
__device__ __forceinline__ void store_pair(const TileRows& tl, int k, int j, float v0, float v1, int r, bool vec) {
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

// A warp's 32 x 16 outputs (rows k0 + [0, 32) of the tile, columns n0 + [0, 16)).
__device__ __forceinline__ void rescale_store(const float (&acc)[2][2][4], const TileRows& tl, int k0, int n0, int g,
                                              int t, int r, bool vec) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = k0 + 16 * a + g + 8 * h;
      if (k >= tl.k_len) continue;
#pragma unroll
      for (int b = 0; b < 2; ++b) store_pair(tl, k, n0 + 8 * b + 2 * t, acc[a][b][2 * h], acc[a][b][2 * h + 1], r, vec);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Gram (mma.sync; the only Gram kernel below sm_90, and rank block 32 on Hopper). The upper triangle of the RK x RK
// Gram as the m16n8 tiles (i, j) with j >= 2 i (20 at RK = 64, 6 at 32; they cover every (a, b) with a <= b), held
// in the warps' accumulators for the whole tile. At RK = 64 the tiles are shared between two warps (HALVES: m tiles
// 0 and 3 against 1 and 2, ten tiles each) and the block's four warps are two row groups x two halves; at 32 each
// warp holds all six and the four warps are four row groups. Each warp takes its row group's rows of every chunk;
// per k8 step a thread loads the values its tiles use once (X(k + t + 4 h, g + 8 u): the A fragment of m tile i
// and the B fragment of n tile j are the same registers, u = 2 i, 2 i + 1 and u = j), splits them, and runs S (+)=
// hi^T hi (a zero accumulator, added on the CUDA cores: short tensor-core sums) and Y += hi^T lo + lo^T hi per
// tile: each value goes through shared memory once per warp that uses it, not once per product. The row groups'
// sums are added in row-group order; G(a, b) = G(b, a) = S(a, b) + Y(a, b) for a <= b, in gram_reduce's layout (S
// and Y / 2, both symmetric: its symmetrisation gives S + Y exactly).
// Measured on an H200 (7B adapters, float32, tiles of 2048 rows; bench/results/logs/session21-final-gram-probe-*,
// beside session 16's kernel, which had warp tiles of 16 x 32 entries, eight warps, each loading and splitting again
// every value its tile columns use): r = 32 0.173 -> 0.144 ms; r = 64, where the wgmma kernel does not run (below
// sm_90, or BALORA_KERNELS_WGMMA=0), 0.403 -> 0.412 (ncu: 34% of DRAM bandwidth, 43% of issue slots; the wgmma
// kernel 0.336). Two blocks per SM with five / four stages were slower (r = 64 0.438, r = 32 0.166), three stages
// at r = 32 no faster (0.148; session21-gram-registers-probe-*).
#ifndef BK_MMA_GRAM_STAGES64   // ring stages, rank block 64
#define BK_MMA_GRAM_STAGES64 4
#endif
#ifndef BK_MMA_GRAM_STAGES32   // the same for rank block 32 (chunks of 128 rows)
#define BK_MMA_GRAM_STAGES32 2
#endif
#ifndef BK_MMA_GRAM_BLOCKS64   // blocks per SM the register budget is set for (__launch_bounds__), rank block 64
#define BK_MMA_GRAM_BLOCKS64 3
#endif
#ifndef BK_MMA_GRAM_BLOCKS32   // the same for rank block 32
#define BK_MMA_GRAM_BLOCKS32 4
#endif
constexpr int kGramThreads = 128;
template <int RK>
struct GramTiles {
  static constexpr int NW = kGramThreads / 32, MT = RK / 16, NJ = RK / 8;
  static constexpr int HALVES = RK == 64 ? 2 : 1, RG = NW / HALVES;   // tile halves, row groups
  // The half that holds m tile i, and the tiles of a half.
  __host__ __device__ static constexpr int owner(int i) {
    return HALVES == 1 ? 0 : ((i == 0 || i == MT - 1) ? 0 : 1);
  }
  __host__ __device__ static constexpr int tiles_of(int h) {
    int n = 0;
    for (int i = 0; i < MT; ++i)
      if (owner(i) == h) n += NJ - 2 * i;
    return n;
  }
  // Index of tile (i, j) among its half's tiles (i ascending, then j).
  __host__ __device__ static constexpr int index(int i, int j) {
    int n = 0;
    for (int i2 = 0; i2 < i; ++i2)
      if (owner(i2) == owner(i)) n += NJ - 2 * i2;
    return n + j - 2 * i;
  }
  // Whether half h's tiles use the values u (column / row block g + 8 u): those of its m tiles i (u = 2 i, 2 i + 1)
  // and of their n tiles j >= 2 i.
  __host__ __device__ static constexpr bool uses(int h, int u) {
    for (int i = 0; i < MT; ++i)
      if (owner(i) == h && u >= 2 * i) return true;
    return false;
  }
  static constexpr int NTMAX = tiles_of(0) > tiles_of(HALVES - 1) ? tiles_of(0) : tiles_of(HALVES - 1);
  static constexpr int kSums = 2 * NTMAX * 4 * 32;   // one warp's S and Y, lane-interleaved
  static constexpr int kEpiFloats = (NW - HALVES) * kSums + 2 * RK * RK;   // later row groups' sums, E
  static constexpr int ST = RK == 64 ? BK_MMA_GRAM_STAGES64 : BK_MMA_GRAM_STAGES32;
  static constexpr size_t smem() {
    return (size_t)(ST * GramChunk<RK>::kFloats > kEpiFloats ? ST * GramChunk<RK>::kFloats : kEpiFloats) *
           sizeof(float);
  }
};

// f(std::integral_constant<int, 0>{}) ... f(std::integral_constant<int, N - 1>{}): loop indices that are constant
// expressions (the tile index of GramTiles::index must be folded for S and Y to stay in registers).
template <class F, int... I>
__device__ __forceinline__ void static_for_impl(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

template <int RK, int H, bool B>
__device__ __forceinline__ void gram_chunk_tiles(const float* s, int k0, int g, int t,
                                                 float (&S)[GramTiles<RK>::NTMAX][4],
                                                 float (&Y)[GramTiles<RK>::NTMAX][4]) {
  using C = GramChunk<RK>;
  using G = GramTiles<RK>;
  constexpr int STEPS = C::KC / 8 / G::RG;   // k8 steps per warp per chunk
#pragma unroll 1
  for (int st = 0; st < STEPS; ++st) {
    const int k = k0 + st * 8 + t;
    uint32_t vh[G::NJ][2], vl[G::NJ][2];
    static_for<G::NJ>([&](auto U) {
      constexpr int u = decltype(U)::value;
      if constexpr (G::uses(H, u)) {
        split_tf32(C::template at<B>(s, k, g + 8 * u), vh[u][0], vl[u][0]);
        split_tf32(C::template at<B>(s, k + 4, g + 8 * u), vh[u][1], vl[u][1]);
      }
    });
    static_for<G::MT>([&](auto I) {
      constexpr int i = decltype(I)::value;
      if constexpr (G::owner(i) == H) {
        const uint32_t ah[4] = {vh[2 * i][0], vh[2 * i + 1][0], vh[2 * i][1], vh[2 * i + 1][1]};
        const uint32_t al[4] = {vl[2 * i][0], vl[2 * i + 1][0], vl[2 * i][1], vl[2 * i + 1][1]};
        static_for<G::NJ>([&](auto J) {
          constexpr int j = decltype(J)::value;
          if constexpr (j >= 2 * i) {
            constexpr int q = G::index(i, j);
            const uint32_t bh[2] = {vh[j][0], vh[j][1]}, bl[2] = {vl[j][0], vl[j][1]};
            float p[4];
            mma_tf32_zero(p, ah, bh);
#pragma unroll
            for (int e = 0; e < 4; ++e) S[q][e] += p[e];
            mma_tf32(Y[q], ah, bl);
            mma_tf32(Y[q], al, bh);
          }
        });
      }
    });
  }
}

// Half H's tiles of the row group's sums S, Y into E (warps of row group 0, after adding the later row groups').
template <int RK, int H>
__device__ __forceinline__ void gram_store_tiles(float* E, int g, int t, const float (&S)[GramTiles<RK>::NTMAX][4],
                                                 const float (&Y)[GramTiles<RK>::NTMAX][4]) {
  using G = GramTiles<RK>;
  static_for<G::MT>([&](auto I) {
    constexpr int i = decltype(I)::value;
    if constexpr (G::owner(i) == H) {
      static_for<G::NJ>([&](auto J) {
        constexpr int j = decltype(J)::value;
        if constexpr (j >= 2 * i) {
          constexpr int q = G::index(i, j);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int a = 16 * i + g + (e >= 2 ? 8 : 0), b = 8 * j + 2 * t + (e & 1);
            if (a <= b) {
              E[a * RK + b] = E[b * RK + a] = S[q][e];
              E[RK * RK + a * RK + b] = E[RK * RK + b * RK + a] = 0.5f * Y[q][e];
            }
          }
        }
      });
    }
  });
}

template <int RK>
__global__ void __launch_bounds__(kGramThreads, RK == 64 ? BK_MMA_GRAM_BLOCKS64 : BK_MMA_GRAM_BLOCKS32)
mma_gram_kernel(
    const long long* __restrict__ tiles, int n_b, int r, int R, float* __restrict__ partials, int partial_stride,
    const long long* __restrict__ ranges, int* __restrict__ counters, float* __restrict__ grams) {
  using C = GramChunk<RK>;
  using G = GramTiles<RK>;
  constexpr int NTM = G::NTMAX, ST = G::ST, HALVES = G::HALVES;
  constexpr int ROWS = C::KC / G::RG;   // a warp's rows of each chunk
  static_assert(ROWS % 8 == 0 && ROWS * G::RG == C::KC, "row groups");
  extern __shared__ __align__(16) float ring[];
  __shared__ int last;
  const TileRows tl = tile_rows(tiles, blockIdx.x, n_b, r);
  const bool vec = vec_tile<RK>(tl, r);
  const int n_chunks = (tl.k_len + C::KC - 1) / C::KC;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int h = warp % HALVES, rg = warp / HALVES;
  float S[NTM][4], Y[NTM][4];
#pragma unroll
  for (int q = 0; q < NTM; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e) S[q][e] = Y[q][e] = 0.0f;
  ring_start<C, kGramThreads, ST>(ring, tl, r, vec, n_chunks);
  auto chunks = [&](auto is_b) {   // the factor's side as a compile-time constant
    constexpr bool B = decltype(is_b)::value;
    for (int c = 0; c < n_chunks; ++c) {
      const float* s = ring_next<C, kGramThreads, ST>(ring, tl, r, vec, n_chunks, c);
      if (HALVES == 1 || h == 0) gram_chunk_tiles<RK, 0, B>(s, rg * ROWS, g, t, S, Y);
      else gram_chunk_tiles<RK, HALVES - 1, B>(s, rg * ROWS, g, t, S, Y);
    }
  };
  if (tl.is_b) chunks(std::true_type{});
  else chunks(std::false_type{});
  cp_async_wait<0>();
  __syncthreads();   // every warp done with the ring: the later row groups' sums, then E
  float* P = ring;
  float* E = ring + (G::NW - HALVES) * G::kSums;
  if (rg > 0) {
    float* p = P + (warp - HALVES) * G::kSums + lane;
#pragma unroll
    for (int q = 0; q < NTM; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[(q * 4 + e) * 32] = S[q][e];
        p[(NTM * 4 + q * 4 + e) * 32] = Y[q][e];
      }
  }
  __syncthreads();
  if (rg == 0) {
#pragma unroll
    for (int q = 0; q < NTM; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float sv = S[q][e], yv = Y[q][e];
        for (int w = 1; w < G::RG; ++w) {   // in row-group order
          const float* p = P + (w * HALVES + h - HALVES) * G::kSums + lane;
          sv += p[(q * 4 + e) * 32];
          yv += p[(NTM * 4 + q * 4 + e) * 32];
        }
        S[q][e] = sv;
        Y[q][e] = yv;
      }
    if (HALVES == 1 || h == 0) gram_store_tiles<RK, 0>(E, g, t, S, Y);
    else gram_store_tiles<RK, HALVES - 1>(E, g, t, S, Y);
  }
  __syncthreads();
  gram_reduce<RK, 1, kGramThreads>(E, tl, r, R, partials, partial_stride, ranges, counters, grams, last);
}

template <int RK>
int gram_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, float* partials, int partial_stride,
                const long long* ranges, int* counters, float* grams, cudaStream_t stream) {
  constexpr size_t smem = GramTiles<RK>::smem();
  cudaError_t err = cudaFuncSetAttribute(mma_gram_kernel<RK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return (int)err;
  mma_gram_kernel<RK><<<n_tiles, kGramThreads, smem, stream>>>(tiles, n_b, r, R, partials, partial_stride, ranges,
                                                               counters, grams);
  return (int)cudaGetLastError();
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
  split_transform<RK, kThreads>(tw, tl, r, R, Mh, Ml, [](int i, int j) { return i * LDM + j; });
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
      rescale_store(acc, tl, c * C::KC + m0, n0, g, t, r, vec);
    }
  };
  if (tl.is_b) chunks(std::true_type{});
  else chunks(std::false_type{});
}

// ---------------------------------------------------------------------------------------------------------------
// Hopper (sm_90a images: BK_SM90A builds, compute capability 9.0): the Gram and the rescale of rank block 64 with
// wgmma, one warpgroup (128 threads) per tile, the same chunks, ring, split and sums as above (same tile table,
// same partials). Operands from shared memory in wgmma's K-major layout without swizzle (wg_b_index), the rescale's
// A (the factor's rows) from registers (the mma.m16n8k8 fragment, warp w of the warpgroup holding rows 16 w +
// [0, 16)); accumulators as mma.m16n8k8's, eight columns per four registers. Each X value is loaded and split once
// per block (mma_*_kernel's warps each load and split again every X value their column tiles use).
// Measured on an H100 and not kept (bench/results/logs/session19-wg-variants-h100-*, from this file's state then;
// r = 64, ms): the Gram's A from registers (0.388 against 0.380 from shared memory, both with two blocks per SM and
// three ring stages; three blocks with two stages, kept: 0.355), its planes double-buffered so that a chunk is
// split while the last one's products run (0.446: ptxas serialises the wgmmas, C7514), the rescale's hi hi summed
// over two steps on the tensor cores (0.504 against 0.501), four ring stages (Gram 0.394, rescale 0.502).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BK_WG_ARCH 1
#else
#define BK_WG_ARCH 0
#endif
#ifndef BK_WG_BLOCKS        // blocks per SM the wgmma rescale's register budget is set for (__launch_bounds__)
#define BK_WG_BLOCKS 2
#endif
#ifndef BK_WG_GRAM_BLOCKS   // the same for the wgmma Gram (three: 168 registers, 8 bytes spilled; two ring stages)
#define BK_WG_GRAM_BLOCKS 3
#endif
#ifndef BK_WG_GRAM_STAGES   // the wgmma Gram's ring depth
#define BK_WG_GRAM_STAGES 2
#endif
constexpr int kWgThreads = 128;
constexpr int kWgGramStages = BK_WG_GRAM_STAGES;

#if BK_WG_ARCH   // (the helpers exist where the kernels below have bodies)
// B operand (K x N, one k8 step of N columns after another) in wgmma's K-major layout without swizzle: core
// matrices of 8 columns n x 4 k (16 bytes per column, 128 bytes), the two k halves of a step 128 bytes apart (the
// descriptor's leading byte offset), groups of 8 columns 256 bytes apart (its stride byte offset), steps N * 32
// bytes apart. Element index (4-byte units).
template <int N>
__host__ __device__ constexpr int wg_b_index(int k, int n) {
  return (k >> 3) * (8 * N) + (n >> 3) * 64 + ((k >> 2) & 1) * 32 + (n & 7) * 4 + (k & 3);
}
// The descriptor of an operand at p in that layout (shared memory, 16-byte aligned); step q: + q * N * 2 (its
// address >> 4).
__device__ __forceinline__ uint64_t wg_desc(const void* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return (uint64_t)((a >> 4) & 0x3FFF) | ((uint64_t)(128 >> 4) << 16) | ((uint64_t)(256 >> 4) << 32);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Reads of d after a wait stay after it (the asm ties d to the program order of volatile asm).
template <int K>
__device__ __forceinline__ void wg_reg_fence(float (&d)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(d[i]));
}
// Shared-memory stores of this thread visible to wgmma (the async proxy) once a barrier follows.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// wgmma m64n64k8 (tf32 in, float32 accumulate) up to its accumulators %0 .. %31, and their constraints (32 floats
// d, read and written).
#define BK_WG_MMA_D32                                                                                   \
  "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, " \
  "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define BK_WG_ACC32(d)                                                                                    \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),     \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),      \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),     \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
// d (+)= a b: wgmma m64n64k8, tf32 in, float32 accumulate, A from registers; SCALE_D 0: d = a b.
template <int SCALE_D>
__device__ __forceinline__ void wgmma_tf32_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      BK_WG_MMA_D32
      "{%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
      : BK_WG_ACC32(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(SCALE_D));
}
// The same with A from shared memory too (K-major descriptor a).
template <int SCALE_D>
__device__ __forceinline__ void wgmma_tf32_ss(float (&d)[32], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      BK_WG_MMA_D32
      "%32, %33, p, 1, 1;\n}\n"
      : BK_WG_ACC32(d)
      : "l"(a), "l"(b), "n"(SCALE_D));
}
#endif  // BK_WG_ARCH

// Gram, rank block 64. Per chunk (64 rows): its hi and lo split once into wgmma's layout (planes Ph, Pl; the last
// chunk's products waited for first), then per k8 step tS (+)= hi^T hi and X += hi^T lo with both operands from
// shared memory: A = hi^T is the hi plane read as M (ranks) x K (rows), the same K-major layout and descriptor as B =
// hi. tS (this chunk's sum on the tensor cores) is added to S on the CUDA cores in chunk order, as mma_gram_kernel.
__global__ void __launch_bounds__(kWgThreads, BK_WG_GRAM_BLOCKS) wg_gram_kernel(
    const long long* __restrict__ tiles, int n_b, int r, int R, float* __restrict__ partials, int partial_stride,
    const long long* __restrict__ ranges, int* __restrict__ counters, float* __restrict__ grams) {
#if BK_WG_ARCH
  constexpr int RK = 64, NA = RK / 2, ST = kWgGramStages;
  using C = GramChunk<RK>;
  constexpr int Q = C::KC / 8, PF = C::KC * RK;   // steps per chunk, floats per plane
  static_assert(ST * C::kFloats >= 2 * RK * RK, "the epilogue reuses the ring");
  extern __shared__ __align__(16) float smem[];
  uint32_t* Ph = reinterpret_cast<uint32_t*>(smem);
  uint32_t* Pl = Ph + PF;
  float* ring = smem + 2 * PF;
  __shared__ int last;
  const TileRows tl = tile_rows(tiles, blockIdx.x, n_b, r);
  const bool vec = vec_tile<RK>(tl, r);
  const int n_chunks = (tl.k_len + C::KC - 1) / C::KC;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float S[NA], X[NA], tS[NA];
#pragma unroll
  for (int e = 0; e < NA; ++e) S[e] = X[e] = tS[e] = 0.0f;
  ring_start<C, kWgThreads, ST>(ring, tl, r, vec, n_chunks);
  const uint64_t dh = wg_desc(Ph), dl = wg_desc(Pl);
  auto chunks = [&](auto is_b) {   // the factor's side as a compile-time constant
    constexpr bool B = decltype(is_b)::value;
    for (int c = 0; c < n_chunks; ++c) {
      if (c > 0) {   // the previous chunk's products done (the planes free again): its hi^T hi into S
        wg_wait<0>();
        wg_reg_fence(tS);
#pragma unroll
        for (int e = 0; e < NA; ++e) S[e] += tS[e];
      }
      const float* s = ring_next<C, kWgThreads, ST>(ring, tl, r, vec, n_chunks, c);   // (every warp past its wait)
      // Split: four rows k of one rank n per group, hi and lo stored as 16 bytes each.
#pragma unroll
      for (int p = 0; p < PF / 4 / kWgThreads; ++p) {
        const int f = threadIdx.x + p * kWgThreads;
        const int n = f % RK, k = (f / RK) * 4;
        float4 x;
        if (B) {
          x = make_float4(C::template at<true>(s, k, n), C::template at<true>(s, k + 1, n),
                          C::template at<true>(s, k + 2, n), C::template at<true>(s, k + 3, n));
        } else {
          x = *reinterpret_cast<const float4*>(s + n * C::LDA + k);
        }
        uint4 h, l;
        split_tf32(x.x, h.x, l.x);
        split_tf32(x.y, h.y, l.y);
        split_tf32(x.z, h.z, l.z);
        split_tf32(x.w, h.w, l.w);
        const int o = wg_b_index<RK>(k, n);
        *reinterpret_cast<uint4*>(Ph + o) = h;
        *reinterpret_cast<uint4*>(Pl + o) = l;
      }
      fence_proxy_async();
      __syncthreads();
      wg_fence();
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const uint64_t step = (uint64_t)(q * RK * 2);
        if (q == 0) wgmma_tf32_ss<0>(tS, dh + step, dh + step);
        else wgmma_tf32_ss<1>(tS, dh + step, dh + step);
        wgmma_tf32_ss<1>(X, dh + step, dl + step);
      }
      wg_commit();
    }
  };
  if (tl.is_b) chunks(std::true_type{});
  else chunks(std::false_type{});
  wg_wait<0>();
  wg_reg_fence(tS);
  wg_reg_fence(X);
  if (n_chunks > 0) {
#pragma unroll
    for (int e = 0; e < NA; ++e) S[e] += tS[e];
  }
  cp_async_wait<0>();
  __syncthreads();   // every warp done with the ring: it becomes E[S or X][RK][RK]
  float* E = ring;
#pragma unroll
  for (int e = 0; e < NA; ++e) {
    const int i = 16 * warp + g + ((e & 2) ? 8 : 0), col = 8 * (e >> 2) + 2 * t + (e & 1);
    E[i * RK + col] = S[e];
    E[RK * RK + i * RK + col] = X[e];
  }
  __syncthreads();
  gram_reduce<RK, 1, kWgThreads>(E, tl, r, R, partials, partial_stride, ranges, counters, grams, last);
#else
  __trap();   // launched only where an sm_90a image runs (wgmma_device)
#endif
}

// Rescale, rank block 64 (at 32 the mma.sync kernel is faster, 0.191 against 0.199 ms:
// bench/results/logs/session19-wg-first-*). M (T or
// W^T) split once per tile into wgmma's layout (Mh, Ml); per 64-row block of a chunk and k8 step: d = hi Mh (this
// step's sum on the tensor cores, added to the output on the CUDA cores, as mma_rescale_kernel) and lo (+)= lo Mh +
// hi Ml (the small terms, summed on the tensor cores over the block's steps). Two d buffers: step q's products run
// while step q - 1's d is added.
__global__ void __launch_bounds__(kWgThreads, BK_WG_BLOCKS) wg_rescale_kernel(
    const long long* __restrict__ tiles, int n_b, int r, int R, const float* __restrict__ tw,
    const int* __restrict__ status, int skip_bits) {
#if BK_WG_ARCH
  constexpr int RK = 64, NA = RK / 2, Q = RK / 8;
  using C = RescaleChunk<RK>;
  static_assert(C::KC % 64 == 0, "64-row blocks");
  extern __shared__ __align__(16) float smem[];
  uint32_t* Mh = reinterpret_cast<uint32_t*>(smem);
  uint32_t* Ml = Mh + RK * RK;
  float* ring = smem + 2 * RK * RK;
  const TileRows tl = tile_rows(tiles, blockIdx.x, n_b, r);
  if (status[tl.pair] & skip_bits) return;   // skipped pairs: nothing read or written (whole block)
  const bool vec = vec_tile<RK>(tl, r);
  const int n_chunks = (tl.k_len + C::KC - 1) / C::KC;
  ring_start<C, kWgThreads>(ring, tl, r, vec, n_chunks);
  split_transform<RK, kWgThreads>(tw, tl, r, R, Mh, Ml, [](int i, int j) { return wg_b_index<RK>(i, j); });
  fence_proxy_async();   // (the first ring_next's barrier follows)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint64_t dh = wg_desc(Mh), dl = wg_desc(Ml);
  float lo[NA], d0[NA], d1[NA];
#pragma unroll
  for (int e = 0; e < NA; ++e) lo[e] = d0[e] = d1[e] = 0.0f;
  auto chunks = [&](auto is_b) {   // the factor's side as a compile-time constant
    constexpr bool B = decltype(is_b)::value;
    for (int c = 0; c < n_chunks; ++c) {
      const float* s = ring_next<C, kWgThreads>(ring, tl, r, vec, n_chunks, c);
#pragma unroll
      for (int h = 0; h < C::KC / 64; ++h) {
        const int m = h * 64 + 16 * warp + g;   // this thread's rows m, m + 8 of the chunk
        float acc[NA];
#pragma unroll
        for (int e = 0; e < NA; ++e) acc[e] = 0.0f;
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          uint32_t ah[4], al[4];
          split_tf32(C::template at<B>(s, m, 8 * q + t), ah[0], al[0]);
          split_tf32(C::template at<B>(s, m + 8, 8 * q + t), ah[1], al[1]);
          split_tf32(C::template at<B>(s, m, 8 * q + t + 4), ah[2], al[2]);
          split_tf32(C::template at<B>(s, m + 8, 8 * q + t + 4), ah[3], al[3]);
          const uint64_t step = (uint64_t)(q * RK * 2);
          wg_fence();
          if (q & 1) wgmma_tf32_rs<0>(d1, ah, dh + step);
          else wgmma_tf32_rs<0>(d0, ah, dh + step);
          if (q == 0) wgmma_tf32_rs<0>(lo, al, dh + step);
          else wgmma_tf32_rs<1>(lo, al, dh + step);
          wgmma_tf32_rs<1>(lo, ah, dl + step);
          wg_commit();
          if (q > 0) {   // step q - 1 done: its d added
            wg_wait<1>();
            float(&dp)[NA] = (q & 1) ? d0 : d1;
            wg_reg_fence(dp);
#pragma unroll
            for (int e = 0; e < NA; ++e) acc[e] += dp[e];
          }
        }
        wg_wait<0>();
        float(&dq)[NA] = ((Q - 1) & 1) ? d1 : d0;
        wg_reg_fence(dq);
        wg_reg_fence(lo);
#pragma unroll
        for (int e = 0; e < NA; ++e) acc[e] = (acc[e] + dq[e]) + lo[e];
        const int k0 = c * C::KC + h * 64 + 16 * warp;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int k = k0 + g + 8 * hh;
          if (k >= tl.k_len) continue;
#pragma unroll
          for (int j = 0; j < RK / 8; ++j)
            store_pair(tl, k, 8 * j + 2 * t, acc[4 * j + 2 * hh], acc[4 * j + 2 * hh + 1], r, vec);
        }
      }
    }
  };
  if (tl.is_b) chunks(std::true_type{});
  else chunks(std::false_type{});
#else
  __trap();   // launched only where an sm_90a image runs (wgmma_device)
#endif
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

int wg_gram_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, float* partials, int partial_stride,
                   const long long* ranges, int* counters, float* grams, cudaStream_t stream) {
  using C = GramChunk<64>;
  constexpr size_t smem = (2 * C::KC * 64 + kWgGramStages * C::kFloats) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(wg_gram_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return (int)err;
  wg_gram_kernel<<<n_tiles, kWgThreads, smem, stream>>>(tiles, n_b, r, R, partials, partial_stride, ranges, counters,
                                                        grams);
  return (int)cudaGetLastError();
}

int wg_rescale_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, const float* tw, const int* status,
                      int skip_bits, cudaStream_t stream) {
  constexpr size_t smem = (2 * 64 * 64 + kStages * RescaleChunk<64>::kFloats) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(wg_rescale_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return (int)err;
  wg_rescale_kernel<<<n_tiles, kWgThreads, smem, stream>>>(tiles, n_b, r, R, tw, status, skip_bits);
  return (int)cudaGetLastError();
}

// Whether the wgmma kernels run here: this build has an sm_90a image (BK_SM90A, defined with that -gencode;
// BK_MMA_WGMMA=0 builds them out; the environment variable BALORA_KERNELS_WGMMA=0, read once per process, turns
// them off: the tests run the mma.sync kernels on Hopper so), the current device is of compute capability 9.0,
// where that image loads, and the driver did load it: not the compute_90 PTX compiled just in time
// (CUDA_FORCE_PTX_JIT=1, say), whose wg_ kernels are the __trap() bodies (4 registers, against 168 and 235).
// Decided once per device (a failed query is not remembered: asked again at the next launch).
// cudaFuncGetAttributes enqueues no work; where the driver loads modules lazily it may load this one, as the launch
// after it would.
#ifndef BK_MMA_WGMMA
#define BK_MMA_WGMMA 1
#endif
bool wgmma_device() {
#if defined(BK_SM90A) && BK_MMA_WGMMA
  constexpr int kWgMinRegs = 64;         // fewer: the trap bodies
  static std::atomic<int> decided[64];   // per device: 0 not yet, 1 wgmma, 2 not
  static const bool off = [] {           // BALORA_KERNELS_WGMMA=0: the mma.sync kernels everywhere
    const char* e = std::getenv("BALORA_KERNELS_WGMMA");
    return e != nullptr && e[0] == '0' && e[1] == '\0';
  }();
  if (off) return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const bool cache = dev >= 0 && dev < 64;
  const int known = cache ? decided[dev].load() : 0;
  if (known != 0) return known == 1;
  int major = 0, minor = 0;
  cudaFuncAttributes gram{}, rescale{};
  const bool queried = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                       cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
                       (major != 9 || minor != 0 ||
                        (cudaFuncGetAttributes(&gram, wg_gram_kernel) == cudaSuccess &&
                         cudaFuncGetAttributes(&rescale, wg_rescale_kernel) == cudaSuccess));
  if (!queried) {
    (void)cudaGetLastError();   // (not left for the next launch's check)
    return false;
  }
  const bool yes = major == 9 && minor == 0 && gram.numRegs >= kWgMinRegs && rescale.numRegs >= kWgMinRegs;
  if (cache) decided[dev].store(yes ? 1 : 2);
  return yes;
#else
  return false;
#endif
}

}  // namespace

extern "C" {

// 1 where bk_grouped_mma_*_launch take the wgmma kernels (rank block 64: ranks 33 to 64), 0 elsewhere.
int bk_grouped_mma_wgmma() { return wgmma_device() ? 1 : 0; }

// Float32 factors of ranks 17 to 64 (csrc/grouped.cu's entry points call these; they check the arguments): the
// Gram's partials are RK x RK squares (partial_stride >= RK^2), R >= RK.
int bk_grouped_mma_rank_block(int r) { return r <= 32 ? 32 : 64; }

int bk_grouped_mma_gram_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, float* partials,
                               int partial_stride, const long long* ranges, int* counters, float* grams,
                               cudaStream_t stream) {
  if (r <= 32) return gram_launch<32>(tiles, n_b, n_tiles, r, R, partials, partial_stride, ranges, counters, grams,
                                      stream);
  if (wgmma_device())
    return wg_gram_launch(tiles, n_b, n_tiles, r, R, partials, partial_stride, ranges, counters, grams, stream);
  return gram_launch<64>(tiles, n_b, n_tiles, r, R, partials, partial_stride, ranges, counters, grams, stream);
}

int bk_grouped_mma_rescale_launch(const long long* tiles, int n_b, int n_tiles, int r, int R, const float* tw,
                                  const int* status, int skip_bits, cudaStream_t stream) {
  if (r <= 32) return rescale_launch<32>(tiles, n_b, n_tiles, r, R, tw, status, skip_bits, stream);
  if (wgmma_device()) return wg_rescale_launch(tiles, n_b, n_tiles, r, R, tw, status, skip_bits, stream);
  return rescale_launch<64>(tiles, n_b, n_tiles, r, R, tw, status, skip_bits, stream);
}

}  // extern "C"
