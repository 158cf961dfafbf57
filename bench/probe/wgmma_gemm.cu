// Probe (#4, session 29): a Hopper GEMM with the LoRA rank-r term in its accumulator, written by hand (TMA + wgmma,
// warp-specialised, persistent), to see whether it reaches cuBLAS's plain x W^T where the Triton TMA GEMM
// (ops/lora_linear.py, _lora_gemm_tma_kernel) stays 2-13% over it (forward layout only).
//
//   y[M, N] = s * u[M, R] B[N, R]^T + x[M, K] W[N, K]^T (+ bias[N])      (bf16 / fp16, fp32 accumulation)
//
// One CTA per SM (persistent over output tiles in grouped order); warpgroup 0 produces (one thread issues the
// TMA loads of a STAGES-deep ring), warpgroups 1 and 2 consume (each 64 rows of the 128 x 256 tile by wgmma
// m64n256k16, both operands K-major in shared memory, swizzled). The rank-r K-steps run first (their boxes RBOX
// wide: 32-, 64- or 128-byte swizzle), then the accumulator is scaled by s (skipped for s = 1: u taken
// pre-scaled, so the products need not drain), then the K loop. Variants (wg_lora_fwd's code): wait depth 0 / 1
// (release a stage when its products are done / one k-step later), epilogue by 4-byte stores from registers or
// by TMA stores of 64 x 64 chunks staged in shared memory, clusters of 2 CTAs (two row tiles sharing the W / B
// tile, each loading half of it multicast to both), K steps of 64 or 32.
// Measured on the H200 (bench/results/logs/session29-*): 1.05-1.14x cuBLAS at the 8192-token shapes (1.04-1.10x with
// u pre-scaled), the Triton kernel's level, not cuBLAS's (see docs/DEVLOG.md, session 29). Session 30
// (bench/results/logs/session30-*): the single loop's SASS carries an empty wgmma group after each K step's products
// (HGMMA.64x8x16 RZ, added by ptxas where the rank and K branches merge before the commit), so wait depth 1 waits
// for the step's own products. The SPLIT variants (two loops, one commit each: no empty group) hung in their first
// check, cause not found; the ping-pong consumers' (PING, built only with SPLIT) first form had a phase bug, found
// by reading after the call that included it hung (mended by the order barriers, not run since). Not run on a GPU
// either: the epilogue's commit of an empty bulk group past N (session 29's review), SPLIT 2-4 and mbar_wait's trap
// (bench/probe/wgmma_hang_tests.sh runs them).
// Built as a shared library, called through ctypes by bench/probe/wgmma_gemm.py:
//   nvcc -gencode arch=compute_90a,code=sm_90a -O3 -std=c++17 -shared -Xcompiler -fPIC \
//        -o .bkcache/wgmma/wgmma_gemm.so bench/probe/wgmma_gemm.cu
#include <cuda.h>
#include <cuda_runtime.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int BM = 128, BN = 256;
constexpr int THREADS = 384;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Where a hung wait records itself (wg_set_diag: host memory mapped into the device's address space, or null):
// word 0 counts the records, then 4 words each (block, thread, the barrier's shared-memory address, parity).
__device__ uint32_t* g_diag = nullptr;

__device__ __forceinline__ bool mbar_try(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return done != 0;
}
// Records a wait that never ended and traps (the launch then fails instead of hanging); kept out of line.
__device__ __noinline__ void mbar_hung(uint32_t bar, uint32_t parity) {
  const uint32_t k = atomicAdd(g_diag, 1u);
  if (k < 1024) {
    uint32_t* r = g_diag + 1 + 4 * k;
    r[0] = blockIdx.x;
    r[1] = threadIdx.x;
    r[2] = bar;
    r[3] = parity;
  }
  __threadfence_system();
  asm volatile("trap;");
}
// Waits for the phase of parity `parity` to complete; after ~3e9 cycles (about 2 s) with a diagnostic buffer set,
// mbar_hung.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  if (mbar_try(bar, parity)) return;
  const long long start = clock64();
  while (!mbar_try(bar, parity)) {
    if (clock64() - start > 3000000000LL && g_diag != nullptr) mbar_hung(smem_u32(bar), parity);
  }
}
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
}

// K-major operand descriptor, swizzle SW bytes (32, 64, 128; rows of SW bytes, 8-row atoms SW * 8 apart).
template <int SW>
__device__ __forceinline__ uint64_t kmajor_desc(const void* p) {
  constexpr uint64_t layout = SW == 128 ? 1 : SW == 64 ? 2 : 3;
  const uint64_t a = smem_u32(p);
  return ((a & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t((8 * SW) >> 4) << 32) | (layout << 62);
}

template <bool BF16>
__device__ __forceinline__ float to_float(uint16_t v) {
  if constexpr (BF16) return __bfloat162float(__ushort_as_bfloat16(v));
  else return __half2float(__ushort_as_half(v));
}
template <bool BF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (BF16) {
    const __nv_bfloat162 t = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&t);
  } else {
    const __half2 t = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&t);
  }
}

// The same box written into the shared memory of every CTA of the cluster in mask (same offsets, same barrier).
__device__ __forceinline__ void tma_load_mc(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar,
                                            uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar)), "h"(mask)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// Arrive on the barrier at the same shared-memory offset in CTA `rank` of the cluster.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_u32(bar)), "r"(rank));
  // (the default .release.cta: a cluster-scope release fence here waited for this warp's wgmmas in flight)
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}

__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(smem_u32(src))
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// bias[c] and bias[c + 1] as floats (0 past N or without a bias).
template <bool BF16>
__device__ __forceinline__ void bias_pair(const uint16_t* bias, int c, int N, float& b0, float& b1) {
  b0 = bias != nullptr && c < N ? to_float<BF16>(bias[c]) : 0.f;
  b1 = bias != nullptr && c + 1 < N ? to_float<BF16>(bias[c + 1]) : 0.f;
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// wgmma m64n256k16, float32 accumulators d[0..127] (operands %0 .. %127), descriptors %128 / %129, scale-d %130.
#define BK_WG_OPS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define BK_WG_ACC \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define BK_WGMMA_256(TYPE)                                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                          \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " {" BK_WG_OPS             \
               "}, %128, %129, p, 1, 1, 0, 0;\n}\n"                                                    \
               : BK_WG_ACC                                                                              \
               : "l"(da), "l"(db), "r"(scale_d))

template <bool BF16>
__device__ __forceinline__ void wgmma_256(float (&d)[128], uint64_t da, uint64_t db, uint32_t scale_d) {
  if constexpr (BF16) BK_WGMMA_256("bf16");
  else BK_WGMMA_256("f16");
}

// (MAPA: the CTA's own arrival too through mapa + .shared::cluster, as CUTLASS's consumer_release arrives)
template <int CLUSTER, bool MAPA = false>
__device__ __forceinline__ void release(uint64_t* bar) {
  if constexpr (MAPA) {
    const uint32_t me = CLUSTER > 1 ? cluster_rank() : 0;
#pragma unroll
    for (uint32_t r = 0; r < CLUSTER; ++r) mbar_arrive_cluster(bar, (me + r) % CLUSTER);
  } else if constexpr (CLUSTER == 1) {
    mbar_arrive(bar);
  } else {
    const uint32_t me = cluster_rank();
    mbar_arrive(bar);
#pragma unroll
    for (uint32_t r = 1; r < CLUSTER; ++r) mbar_arrive_cluster(bar, (me + r) % CLUSTER);
  }
}

template <int STAGES, int KB>
struct alignas(1024) Smem {
  uint16_t a[STAGES][BM * KB];   // 16 KB a stage at KB = 64
  uint16_t b[STAGES][BN * KB];   // 32 KB
  uint16_t ep[2][2][64 * 64];    // per consumer, two 64 x 64 output chunks (8 KB each, 128-byte swizzle)
  uint64_t full[STAGES], empty[STAGES];
};

// Output tiles in grouped order (group_m row tiles share their column tiles in L2); with clusters of C CTAs num_m
// counts groups of C row tiles, and CTA `rank` of the cluster takes row tile C tm + rank.
struct Tiles {
  int num_m, num_n, group_m;
  template <int C>
  __device__ void coords(int tile, uint32_t rank, int& tm, int& tn) const {
    const int in_group = group_m * num_n;
    const int first_m = (tile / in_group) * group_m;
    const int size_m = min(num_m - first_m, group_m);
    tm = (first_m + (tile % in_group) % size_m) * C + (int)rank;
    tn = (tile % in_group) / size_m;
  }
};

// PING 0: both consumers share each 128 x 256 tile (64 rows each). PING 1 (ping-pong): tiles of 64 x 256, the two
// consumers take alternate tiles, so that one stores its tile while the other multiplies the next; named barriers
// 3 / 4 order their K loops (a consumer waits on a stage's full barrier only once the other has waited on all of
// its tile's: a parity wait may not run more than one phase ahead). TMA_EPI 2: no epilogue (timing only: what
// storing y costs). SPLIT: see the consumer's loops.
template <int STAGES, int KB, int RBOX, bool BF16, int WAIT, int TMA_EPI, int CLUSTER, int PING, int SPLIT>
__global__ void __launch_bounds__(THREADS, 1)
lora_wgmma_fwd(const __grid_constant__ CUtensorMap tm_x, const __grid_constant__ CUtensorMap tm_w,
               const __grid_constant__ CUtensorMap tm_u, const __grid_constant__ CUtensorMap tm_q,
               const __grid_constant__ CUtensorMap tm_y, uint16_t* __restrict__ y, const uint16_t* __restrict__ bias,
               int M, int N, int K, int R, long ldy, float scaling, Tiles tiles) {
  extern __shared__ uint8_t smem_raw[];
  static_assert(RBOX <= KB, "a rank step fills one stage");
  Smem<STAGES, KB>& sm = *reinterpret_cast<Smem<STAGES, KB>*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int wg = threadIdx.x / 128;
  constexpr int TM = PING ? 64 : BM;   // rows of an output tile
  // CLUSTER 2: CTAs 2c and 2c + 1 take the row tiles 2 pm and 2 pm + 1 of one column tile (tiles counts pairs);
  // each loads its own x / u tile and half of the W / B tile, multicast to both.
  const int num_tiles = tiles.num_m * tiles.num_n;
  const uint32_t crank = CLUSTER > 1 ? cluster_rank() : 0;
  const int first_tile = blockIdx.x / CLUSTER, tile_step = gridDim.x / CLUSTER;
  const int rank_blocks = (R + RBOX - 1) / RBOX;
  const int k_blocks = (K + KB - 1) / KB;
  const int blocks = rank_blocks + k_blocks;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&sm.full[s], 1);
      mbar_init(&sm.empty[s], (PING ? 4 : 8) * CLUSTER);   // one arrival per consuming warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (CLUSTER > 1) cluster_sync();
  else __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = first_tile; tile < num_tiles; tile += tile_step) {
        int tm, tn;
        tiles.coords<CLUSTER>(tile, crank, tm, tn);
        for (int kb = 0; kb < blocks; ++kb) {
          mbar_wait(&sm.empty[stage], phase ^ 1);
          const bool rank_step = kb < rank_blocks;
          const int width = rank_step ? RBOX : KB;
          const int k = rank_step ? kb * RBOX : (kb - rank_blocks) * KB;
          mbar_expect_tx(&sm.full[stage], (TM + BN) * width * 2);
          tma_load(sm.a[stage], rank_step ? &tm_u : &tm_x, k, tm * TM, &sm.full[stage]);
          if constexpr (CLUSTER == 1) {
            tma_load(sm.b[stage], rank_step ? &tm_q : &tm_w, k, tn * BN, &sm.full[stage]);
          } else {
            tma_load_mc(sm.b[stage] + crank * (BN / 2) * width, rank_step ? &tm_q : &tm_w, k,
                        tn * BN + crank * (BN / 2), &sm.full[stage], 0x3);
          }
          if (++stage == STAGES) { stage = 0; phase ^= 1; }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int cw = wg - 1;                 // consumer 0 / 1: rows 0-63 / 64-127 of the tile (PING: tiles 0 / 1 mod 2)
    const int row0 = PING ? 0 : cw * 64;   // this consumer's first row in the tile
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    float acc[128];
    int stage = 0, prev = -1;
    uint32_t phase = 0;
    int local = 0;
    for (int tile = first_tile; tile < num_tiles; tile += tile_step, ++local) {
      if (PING && (local & 1) != cw) {   // the other consumer's tile: skip its stages in the ring
        stage += blocks;
        phase ^= (stage / STAGES) & 1;
        stage %= STAGES;
        continue;
      }
      int tm, tn;
      tiles.coords<CLUSTER>(tile, crank, tm, tn);
      if (PING && local > 0) named_sync(3 + cw, 256);   // the other consumer has issued its tile's products
      // One stage's products, committed as one group; then the stage before it (depth 1) or this one (depth 0) is
      // released once its products are done.
      // SPLIT 2-4 (tests of what hangs SPLIT 1): 2 waits for every group right after the depth-WAIT wait (no overlap,
      // same code otherwise); 3 arrives on the CTA's own barrier through mapa + .shared::cluster; 4 (WAIT 1) defers
      // the wait and the release of the previous stage until after the next stage's full barrier was waited on.
      constexpr bool MAPA = SPLIT == 3;
      auto retire = [&]() {
        wg_commit();
        if constexpr (SPLIT == 4) {
          prev = stage;   // waited for and released in settle(), or at the tile's end
        } else {
          wg_wait<WAIT>();
          if constexpr (SPLIT == 2) wg_wait<0>();
          if (WAIT == 0) {
            if (lane == 0) release<CLUSTER, MAPA>(&sm.empty[stage]);
          } else {
            if (prev >= 0 && lane == 0) release<CLUSTER, MAPA>(&sm.empty[prev]);
            prev = stage;
          }
        }
        if (++stage == STAGES) { stage = 0; phase ^= 1; }
      };
      auto settle = [&]() {   // SPLIT 4, after a full wait: the previous stage's products done, the stage released
        if constexpr (SPLIT == 4) {
          if (prev >= 0) {
            wg_wait<0>();
            if (lane == 0) release<CLUSTER>(&sm.empty[prev]);
            prev = -1;
          }
        }
      };
      if constexpr (SPLIT) {
        // The rank steps and the K steps as two loops, each with one straight-line commit (SPLIT 0, one loop whose
        // two branches merge before the commit: ptxas adds an empty wgmma group there, so wait depth 1 waits for
        // the stage's own products).
        for (int kb = 0; kb < rank_blocks; ++kb) {
          mbar_wait(&sm.full[stage], phase);
          settle();
          wg_fence();
          const uint16_t* a = sm.a[stage] + row0 * RBOX;
#pragma unroll
          for (int j = 0; j < RBOX / 16; ++j)
            wgmma_256<BF16>(acc, kmajor_desc<RBOX * 2>(a + 16 * j), kmajor_desc<RBOX * 2>(sm.b[stage] + 16 * j),
                            (kb > 0 || j > 0) ? 1u : 0u);
          retire();
        }
        if (scaling != 1.f) {   // (s = 1: u taken pre-scaled, no drain of the products)
          wg_wait<0>();
#pragma unroll
          for (int i = 0; i < 128; ++i) acc[i] *= scaling;
        }
        for (int kb = 0; kb < k_blocks; ++kb) {
          mbar_wait(&sm.full[stage], phase);
          settle();
          wg_fence();
          const uint16_t* a = sm.a[stage] + row0 * KB;
#pragma unroll
          for (int j = 0; j < KB / 16; ++j)
            wgmma_256<BF16>(acc, kmajor_desc<KB * 2>(a + 16 * j), kmajor_desc<KB * 2>(sm.b[stage] + 16 * j), 1u);
          retire();
        }
      } else {
        for (int kb = 0; kb < blocks; ++kb) {
          mbar_wait(&sm.full[stage], phase);
          wg_fence();
          if (kb < rank_blocks) {
            const uint16_t* a = sm.a[stage] + row0 * RBOX;
#pragma unroll
            for (int j = 0; j < RBOX / 16; ++j)
              wgmma_256<BF16>(acc, kmajor_desc<RBOX * 2>(a + 16 * j), kmajor_desc<RBOX * 2>(sm.b[stage] + 16 * j),
                              (kb > 0 || j > 0) ? 1u : 0u);
          } else {
            const uint16_t* a = sm.a[stage] + row0 * KB;
#pragma unroll
            for (int j = 0; j < KB / 16; ++j)
              wgmma_256<BF16>(acc, kmajor_desc<KB * 2>(a + 16 * j), kmajor_desc<KB * 2>(sm.b[stage] + 16 * j), 1u);
          }
          wg_commit();
          if (kb == rank_blocks - 1 && scaling != 1.f) {   // (s = 1: u taken pre-scaled, no drain of the products)
            wg_wait<0>();
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] *= scaling;
          } else {
            wg_wait<WAIT>();
          }
          if (WAIT == 0) {
            if (lane == 0) release<CLUSTER>(&sm.empty[stage]);
          } else {
            if (prev >= 0 && lane == 0) release<CLUSTER>(&sm.empty[prev]);
            prev = stage;
          }
          if (++stage == STAGES) { stage = 0; phase ^= 1; }
        }
      }
      if (PING && tile + tile_step < num_tiles) asm volatile("bar.arrive %0, 256;\n" ::"r"(4 - cw) : "memory");
      if (WAIT != 0) {
        wg_wait<0>();
        if (lane == 0) release<CLUSTER, SPLIT == 3>(&sm.empty[prev]);
        prev = -1;
      }
      if constexpr (TMA_EPI == 2) {   // (a store that never happens keeps the products live)
        if (acc[0] == -12345.f) y[threadIdx.x] = 0;
        continue;
      }
      if constexpr (TMA_EPI == 1) {
        // Epilogue through shared memory: four 64 x 64 chunks of this consumer's 64 rows, each written (bf16 pairs,
        // 128-byte swizzle: conflict-free) into one of two buffers and stored by one TMA store (clipped at the edges).
        const bool leader = threadIdx.x % 128 == 0;
        const int rl = warp * 16 + lane / 4;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          uint8_t* buf = reinterpret_cast<uint8_t*>(sm.ep[cw][c & 1]);
          if (leader) bulk_wait_read<1>();
          named_sync(1 + cw, 128);
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            const int j = 8 * c + jj;
            const int col = 8 * jj + 2 * (lane % 4);
            const int gc = tn * BN + 64 * c + col;
            float b0, b1;
            bias_pair<BF16>(bias, gc, N, b0, b1);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int r = rl + 8 * h;
              const int off = r * 128 + ((((col * 2) >> 4) ^ (r & 7)) << 4) + ((col * 2) & 15);
              *reinterpret_cast<uint32_t*>(buf + off) =
                  pack2<BF16>(acc[4 * j + 2 * h] + b0, acc[4 * j + 2 * h + 1] + b1);
            }
          }
          fence_async_shared();
          named_sync(1 + cw, 128);
          if (leader) {   // one bulk group per chunk, empty past N, so that wait_group.read 1 frees this buffer
            if (tn * BN + 64 * c < N) tma_store(&tm_y, buf, tn * BN + 64 * c, tm * TM + row0);
            bulk_commit();
          }
        }
        continue;
      }
      // Epilogue: thread (warp, lane) holds rows r0 and r0 + 8, columns 8 i + 2 (lane % 4) + {0, 1}.
      const int r0 = tm * TM + row0 + warp * 16 + lane / 4;
      const int c0 = tn * BN + 2 * (lane % 4);
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int c = c0 + 8 * i;
        float b0, b1;
        bias_pair<BF16>(bias, c, N, b0, b1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = r0 + 8 * h;
          if (r >= M) continue;
          uint16_t* o = y + (long)r * ldy + c;
          const float v0 = acc[4 * i + 2 * h] + b0, v1 = acc[4 * i + 2 * h + 1] + b1;
          if (c + 1 < N) {
            *reinterpret_cast<uint32_t*>(o) = pack2<BF16>(v0, v1);
          } else if (c < N) {
            *o = static_cast<uint16_t>(pack2<BF16>(v0, 0.f) & 0xFFFF);
          }
        }
      }
    }
    if (TMA_EPI == 1 && threadIdx.x % 128 == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }   // consumers
  if constexpr (CLUSTER > 1) cluster_sync();   // no CTA leaves while its peer may still write into it
}


using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encoder() {
  static EncodeTiled f = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return EncodeTiled(nullptr);
    return reinterpret_cast<EncodeTiled>(fn);
  }();
  return f;
}

int make_map(CUtensorMap* m, bool bf16, const void* p, long rows, long cols, long ld, int box_cols, int box_rows) {
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)ld * 2};
  const cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows};
  const cuuint32_t unit[2] = {1, 1};
  const int sw_bytes = box_cols * 2;
  const CUtensorMapSwizzle sw = sw_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                : sw_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                 : CU_TENSOR_MAP_SWIZZLE_32B;
  return (int)encoder()(m, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                        const_cast<void*>(p), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, sw,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

int g_last_grid = 0, g_max_clusters = 0;

template <int STAGES, int KB, int RBOX, bool BF16, int WAIT, int TMA_EPI, int CLUSTER, int PING, int SPLIT>
int launch(const CUtensorMap* maps, void* y, const void* bias, int M, int N, int K, int R, long ldy, float s,
           Tiles t, int grid, cudaStream_t stream) {
  const bool persistent = grid < t.num_m * t.num_n * CLUSTER;
  auto k = lora_wgmma_fwd<STAGES, KB, RBOX, BF16, WAIT, TMA_EPI, CLUSTER, PING, SPLIT>;
  const int smem = (int)sizeof(Smem<STAGES, KB>) + 1024;
  cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return 1000 + (int)e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid / CLUSTER * CLUSTER);
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CLUSTER;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (CLUSTER > 1) {   // a persistent grid must fit at once: clusters live within one GPC
    int clusters = 0;
    e = cudaOccupancyMaxActiveClusters(&clusters, k, &cfg);
    if (e != cudaSuccess || clusters < 1) return 4000 + (int)e;
    g_max_clusters = clusters;
    if (persistent && (int)cfg.gridDim.x > clusters * CLUSTER) cfg.gridDim.x = clusters * CLUSTER;
  }
  g_last_grid = (int)cfg.gridDim.x;
  e = cudaLaunchKernelEx(&cfg, k, maps[0], maps[1], maps[2], maps[3], maps[4], static_cast<uint16_t*>(y),
                         static_cast<const uint16_t*>(bias), M, N, K, R, ldy, s, t);
  if (e != cudaSuccess) return 3000 + (int)e;
  e = cudaGetLastError();
  return e == cudaSuccess ? 0 : 2000 + (int)e;
}

template <int STAGES, int KB, int WAIT, int EPI, int C, int P, int SP>
int run(bool bf16, int rbox, const CUtensorMap* maps, void* y, const void* bias, int M, int N, int K, int R,
        long ldy, float s, Tiles t, int grid, cudaStream_t st) {
#define BK_RUN(RB, B) launch<STAGES, KB, RB, B, WAIT, EPI, C, P, SP>(maps, y, bias, M, N, K, R, ldy, s, t, grid, st)
  if (bf16) return rbox == 16 ? BK_RUN(16, true) : rbox == 32 ? BK_RUN(32, true) : BK_RUN(KB, true);
  return rbox == 16 ? BK_RUN(16, false) : rbox == 32 ? BK_RUN(32, false) : BK_RUN(KB, false);
#undef BK_RUN
}

}  // namespace

// The grid of the last launch, and the most clusters of 2 that fit at once (for the probe's table).
extern "C" int wg_last_grid() { return g_last_grid; }
// The diagnostic buffer of mbar_wait (a device-accessible address of host memory, e.g. a pinned tensor's; 0: none).
extern "C" int wg_set_diag(void* p) {
  void* d = nullptr;
  if (p != nullptr) {
    const cudaError_t e = cudaHostGetDevicePointer(&d, p, 0);   // (under UVA the same address)
    if (e != cudaSuccess) return 1000 + (int)e;
  }
  uint32_t* q = static_cast<uint32_t*>(d);
  return (int)cudaMemcpyToSymbol(g_diag, &q, sizeof(q));
}
extern "C" int wg_max_clusters() { return g_max_clusters; }

// variant = stages + 10 * wait depth (0 or 1) + 100 * epilogue (0 registers, 1 TMA store, 2 none: timing only)
// + 1000 * (clusters of 2 CTAs sharing the W / B tile) + 10000 * (K steps of 32 instead of 64) + 100000 * ping-pong
// consumers (64-row tiles) + 1000000 * (rank and K steps as two loops: SPLIT 1; 2-4 its tests, see the consumer).
// dtype 1 bf16, 2 fp16. Returns 0 or an error code.
extern "C" int wg_lora_fwd(int variant, int dtype, const void* x, const void* w, const void* u, const void* q,
                           const void* bias, void* y, int M, int N, int K, int R, long ldx, long ldw, long ldu,
                           long ldq, long ldy, float s, int group_m, int grid, void* stream) {
  if (encoder() == nullptr) return 1;
  // (row strides and addresses a tensor map cannot take are refused by cuTensorMapEncodeTiled: codes 1xx-5xx)
  if (R < 1 || R > 128 || group_m < 1 || grid < 2 || (dtype != 1 && dtype != 2)) return 2;
  const bool bf16 = dtype == 1;
  const int kb = variant / 10000 ? 32 : 64;
  const int rbox = std::min(R <= 16 ? 16 : R <= 32 ? 32 : 64, kb);
  const int cluster = (variant / 1000) % 10 ? 2 : 1;
  const int tm_rows = (variant / 100000) % 10 ? 64 : BM;
  alignas(64) CUtensorMap maps[5];
  int e;
  if ((e = make_map(&maps[0], bf16, x, M, K, ldx, kb, tm_rows))) return 100 + e;
  if ((e = make_map(&maps[1], bf16, w, N, K, ldw, kb, BN / cluster))) return 200 + e;
  if ((e = make_map(&maps[2], bf16, u, M, R, ldu, rbox, tm_rows))) return 300 + e;
  if ((e = make_map(&maps[3], bf16, q, N, R, ldq, rbox, BN / cluster))) return 400 + e;
  if ((e = make_map(&maps[4], bf16, y, M, N, ldy, 64, 64))) return 500 + e;
  Tiles t{((M + tm_rows - 1) / tm_rows + cluster - 1) / cluster, (N + BN - 1) / BN, group_m};
  grid = std::min(grid, t.num_m * t.num_n * cluster);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
#define BK_CASE(V, S, KB_, W, E, C, P, SP) \
  case V: return run<S, KB_, W, E, C, P, SP>(bf16, rbox, maps, y, bias, M, N, K, R, ldy, s, t, grid, st);
  switch (variant) {
    BK_CASE(14, 4, 64, 1, 0, 1, 0, 0)
    BK_CASE(114, 4, 64, 1, 1, 1, 0, 0)
    BK_CASE(1114, 4, 64, 1, 1, 2, 0, 0)
    BK_CASE(1104, 4, 64, 0, 1, 2, 0, 0)
    BK_CASE(104, 4, 64, 0, 1, 1, 0, 0)
    BK_CASE(10118, 8, 32, 1, 1, 1, 0, 0)
    BK_CASE(11118, 8, 32, 1, 1, 2, 0, 0)
    BK_CASE(11108, 8, 32, 0, 1, 2, 0, 0)
    BK_CASE(1214, 4, 64, 1, 2, 2, 0, 0)
    BK_CASE(1000114, 4, 64, 1, 1, 1, 0, 1)
    BK_CASE(1001114, 4, 64, 1, 1, 2, 0, 1)
    BK_CASE(1001104, 4, 64, 0, 1, 2, 0, 1)
    BK_CASE(1001214, 4, 64, 1, 2, 2, 0, 1)
    BK_CASE(1101114, 4, 64, 1, 1, 2, 1, 1)
    BK_CASE(1100114, 4, 64, 1, 1, 1, 1, 1)
    BK_CASE(1101104, 4, 64, 0, 1, 2, 1, 1)
    BK_CASE(1101214, 4, 64, 1, 2, 2, 1, 1)
    BK_CASE(2000114, 4, 64, 1, 1, 1, 0, 2)
    BK_CASE(2001114, 4, 64, 1, 1, 2, 0, 2)
    BK_CASE(3000114, 4, 64, 1, 1, 1, 0, 3)
    BK_CASE(3001114, 4, 64, 1, 1, 2, 0, 3)
    BK_CASE(4000114, 4, 64, 1, 1, 1, 0, 4)
    BK_CASE(4001114, 4, 64, 1, 1, 2, 0, 4)
    default: return 3;
  }
#undef BK_CASE
}
