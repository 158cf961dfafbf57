// Loads alone, the way the grouped rescale / Gram stream a tile (csrc/grouped_mma.cu): how fast can the adapters'
// tiles be read into shared memory, by per-thread 16-byte cp.async (what the kernels do) against bulk copies
// (cp.async.bulk, one request per contiguous piece, completing on an mbarrier)? A probe, not package code: built
// here with nvcc as a plain shared library (bench/probe/stream_loads.py builds and runs it; no torch headers).
//
// One block of 128 threads per tile (a B tile: rows [k0, k0 + len) of an out x 64 factor, contiguous; an A tile:
// columns [k0, k0 + len) of a 64 x in factor, 64 row pieces), chunks of 16 KB (64 rows of B, or 64 columns of A:
// 256-byte pieces) through a ring of ST stages; every thread then reads its 32 floats of the chunk from shared
// memory and adds them (so that nothing is optimised away); one float per block is written.
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

struct Tile {
  const float* base;   // the tile's first element
  long long stride;    // B: 64 (row stride); A: in (row stride)
  int len;             // rows of B / columns of A (a multiple of 64 here: the 7B shapes)
  int is_b;
};

constexpr int kThreads = 128;
constexpr int kChunk = 4096;   // floats (16 KB)

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ float consume(const float* s) {
  float acc = 0.0f;
#pragma unroll
  for (int q = 0; q < kChunk / 4 / kThreads; ++q) {
    const float4 v = reinterpret_cast<const float4*>(s)[threadIdx.x + q * kThreads];
    acc += (v.x + v.y) + (v.z + v.w);
  }
  return acc;
}

// Per-thread 16-byte cp.async (as csrc/grouped_mma.cu's Chunk::load, without the padding).
template <int ST>
__global__ void __launch_bounds__(kThreads) cp_async_kernel(const Tile* __restrict__ tiles, float* __restrict__ out) {
  extern __shared__ __align__(128) float smem[];
  const Tile t = tiles[blockIdx.x];
  const int n_chunks = t.len / 64;
  auto load = [&](int c) {
    float* s = smem + (c % ST) * kChunk;
#pragma unroll
    for (int q = 0; q < kChunk / 4 / kThreads; ++q) {
      const int f = threadIdx.x + q * kThreads;   // 16-byte group
      const float* src;
      if (t.is_b) {
        src = t.base + (long long)c * kChunk + 4 * f;
      } else {
        const int i = f / 16, k = (f % 16) * 4;   // rank i, columns c * 64 + k ..
        src = t.base + (long long)i * t.stride + c * 64 + k;
      }
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(s + 4 * f)), "l"(src));
    }
  };
  for (int c = 0; c < ST - 1; ++c) {
    if (c < n_chunks) load(c);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  float acc = 0.0f;
  for (int c = 0; c < n_chunks; ++c) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(ST - 2));
    __syncthreads();
    if (c + ST - 1 < n_chunks) load(c + ST - 1);
    asm volatile("cp.async.commit_group;\n" ::);
    acc += consume(smem + (c % ST) * kChunk);
  }
  if (acc == 1.2345f) out[blockIdx.x] = acc;
}

// Bulk copies: a B chunk is one 16 KB copy, an A chunk 64 copies of 256 bytes (threads 0-63 one each), all completing
// on the stage's mbarrier (thread 0 arrives with the expected 16 KB).
template <int ST>
__global__ void __launch_bounds__(kThreads) bulk_kernel(const Tile* __restrict__ tiles, float* __restrict__ out) {
  extern __shared__ __align__(128) float smem[];
  __shared__ __align__(8) uint64_t bar[ST];
  const Tile t = tiles[blockIdx.x];
  const int n_chunks = t.len / 64;
  if (threadIdx.x == 0) {
    for (int s = 0; s < ST; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(&bar[s])));
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
  }
  __syncthreads();
  auto load = [&](int c) {
    float* s = smem + (c % ST) * kChunk;
    const unsigned b = smem_addr(&bar[c % ST]);
    if (threadIdx.x == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(kChunk * 4) : "memory");
    if (t.is_b) {
      if (threadIdx.x == 0)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                         smem_addr(s)),
                     "l"(t.base + (long long)c * kChunk), "r"(kChunk * 4), "r"(b)
                     : "memory");
    } else if (threadIdx.x < 64) {
      const int i = threadIdx.x;
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                       smem_addr(s + i * 64)),
                   "l"(t.base + (long long)i * t.stride + c * 64), "r"(256), "r"(b)
                   : "memory");
    }
  };
  for (int c = 0; c < ST - 1 && c < n_chunks; ++c) load(c);
  float acc = 0.0f;
  for (int c = 0; c < n_chunks; ++c) {
    const unsigned b = smem_addr(&bar[c % ST]);
    const unsigned parity = (c / ST) & 1;
    asm volatile(
        "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n" ::"r"(b),
        "r"(parity)
        : "memory");
    __syncthreads();   // every thread done with chunk c - 1's stage
    if (c + ST - 1 < n_chunks) load(c + ST - 1);
    acc += consume(smem + (c % ST) * kChunk);
  }
  if (acc == 1.2345f) out[blockIdx.x] = acc;
}

template <class K>
int launch(K kernel, const Tile* tiles, int n_tiles, float* out, int smem, cudaStream_t stream) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return (int)e;
  kernel<<<n_tiles, kThreads, smem, stream>>>(tiles, out);
  return (int)cudaGetLastError();
}

}  // namespace

// method 0: cp.async, 1: bulk; stages 2-4; smem: dynamic shared memory per block (>= stages * 16 KB; larger values
// limit the blocks per SM as the real kernels' footprints do).
extern "C" int stream_loads(const void* tiles, int n_tiles, float* out, int method, int stages, int smem,
                            void* stream) {
  const Tile* t = static_cast<const Tile*>(tiles);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (smem < stages * kChunk * 4) return -1;
  if (method == 0) {
    if (stages == 2) return launch(cp_async_kernel<2>, t, n_tiles, out, smem, s);
    if (stages == 3) return launch(cp_async_kernel<3>, t, n_tiles, out, smem, s);
    if (stages == 4) return launch(cp_async_kernel<4>, t, n_tiles, out, smem, s);
  } else {
    if (stages == 2) return launch(bulk_kernel<2>, t, n_tiles, out, smem, s);
    if (stages == 3) return launch(bulk_kernel<3>, t, n_tiles, out, smem, s);
    if (stages == 4) return launch(bulk_kernel<4>, t, n_tiles, out, smem, s);
  }
  return -2;
}
