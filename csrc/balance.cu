// Batched balancing transforms: one thread block per (lora_A, lora_B) pair, float64, r <= 128.
//
// Input  grams  fp32 [P, 2, R, R]  ([p, 0] = G_B = B^T B, [p, 1] = G_A = A A^T, top-left r x r used)
//        eps_f  fp64 [P]           (each pair's factor rounding unit: the product noise floor)
// Output tw     fp32 [P, 2, R, R]  ([p, 0] = T, [p, 1] = T^-1, zero-padded), gaps fp64 [P, 2],
//        status int32 [P]          (bits 0-2: nonfinite / zero / rank-deficient, bits 8+: live components k)
// The math is in balance_math.cuh, the kernel template in balance_kernel.cuh; the common ranks take the
// fixed-rank kernels of balance_fixed.cu. This file needs only the CUDA runtime (no torch headers), so that
// tools/check_cuda_build.sh can compile it with plain nvcc; csrc/bindings.cpp is the torch-facing side.
#include "balance_kernel.cuh"

namespace {

constexpr int kMaxSmemBytes = 100 * 1024;   // ranks <= 32: every matrix fits, and two blocks per SM
constexpr int kBlockedRank = 33;            // ranks from here take the register-blocked kernel

// Ranks >= kBlockedRank keep as many of their 11 matrices in shared memory as the launch allows, the Newton-Schulz
// workspaces first (see bk::carve_mats). With at most one pair per SM (P <= SMs), or r > 64, one block per SM
// takes all the shared memory a block may opt in to (227 KB on an H100 / H200: 6 matrices at r = 64, all of them
// up to r = 48); with more pairs two blocks per SM take kMaxSmemBytes each (2 matrices at r = 64, 5 at r = 48),
// so that 2 x SMs pairs still run in one wave. Measured on an H200 (7B adapters, r = 64; bench/results/logs/
// session9-rxr-probe-2026-12-01.json and session9-rxr-probe2-2026-12-01.json): 224 pairs 1.47 ms (one block per
// SM, so two waves: 1.66; two blocks of 113 KB, 3 matrices each: 1.56; before this session 2.13), 112 pairs
// 0.84 ms (two blocks of 113 KB per SM: 1.14; before 1.38). BK_BLOCKED_ONE_PER_SM=0 (a probe switch): two
// blocks per SM for any P.
#ifndef BK_BLOCKED_ONE_PER_SM
#define BK_BLOCKED_ONE_PER_SM 1
#endif
// Probe switch: at most this many of the matrices of ranks >= kBlockedRank in shared memory (fewer leave the
// multiprocessor more L1 cache for the ones in global memory); -1, the default: as many as fit. Measured on an H200
// (bench/results/logs/session10-rxr-probe-2026-12-02.json): none about as fast as the default, 1 or 3 slower.
#ifndef BK_BLOCKED_MAX_MATS
#define BK_BLOCKED_MAX_MATS -1
#endif

// The dynamic shared memory one block may opt in to on the current device (cached per device).
int optin_smem_limit() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return kMaxSmemBytes;
  if (cached[dev] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      v = 0;
    }
    cached[dev] = v > kMaxSmemBytes ? v : kMaxSmemBytes;
  }
  return cached[dev];
}

}  // namespace

extern "C" {

// Launch configuration for P pairs of rank n on a device with `num_sms` multiprocessors.
// Writes threads per block, grid size, dynamic shared memory bytes, matrices kept in shared memory and
// the float64 global scratch elements the launch needs.
void bk_balance_config(int P, int n, int num_sms, int* threads, int* grid, int* smem_bytes, int* mats_in_smem,
                       long long* scratch_doubles) {
  *threads = n == 4 ? BK_FIXED_N4_THREADS : n == 8 ? BK_FIXED_N8_THREADS : n == 16 ? BK_FIXED_N16_THREADS
           : n == 32 ? BK_FIXED_N32_THREADS : n <= 8 ? 64 : (n <= 32 ? 128 : 256);
  const long long small = (bk::small_bytes(n) + 7) / 8 * 8;
  const long long mat = 8LL * n * n;
  int in_smem = 0, per_sm = n <= 32 ? 4 : (n <= 64 ? 2 : 1);
  if (n >= kBlockedRank) {
    const bool one = n > 64 || (BK_BLOCKED_ONE_PER_SM && P <= num_sms);
    per_sm = one ? 1 : 2;
    const long long fit = ((one ? optin_smem_limit() : kMaxSmemBytes) - small) / mat;
    const int cap = BK_BLOCKED_MAX_MATS >= 0 && BK_BLOCKED_MAX_MATS < bk::NUM_MATS ? BK_BLOCKED_MAX_MATS : bk::NUM_MATS;
    in_smem = fit < 0 ? 0 : (fit > cap ? cap : (int)fit);
  } else if (small + bk::NUM_MATS * mat <= kMaxSmemBytes) {
    in_smem = bk::NUM_MATS;
  } else if (small + 2 * mat <= kMaxSmemBytes) {
    in_smem = 2;
  }
  *mats_in_smem = in_smem;
  *smem_bytes = (int)(small + in_smem * mat);
  int g = num_sms * per_sm;
  if (g > P) g = P;
  if (g < 1) g = 1;
  *grid = g;
  *scratch_doubles = (long long)g * (bk::NUM_MATS - in_smem) * n * n + 1;
}

// Returns a cudaError_t (0 on success). `scratch` must hold the config's scratch_doubles.
int bk_balance_launch(const float* grams, const double* eps_f, int P, int n, int R, int mode, float* tw, int* status, double* gaps,
                      double* scratch, int threads, int grid, int smem_bytes, int mats_in_smem,
                      cudaStream_t stream) {
  if (P == 0) return 0;
  // Raise the dynamic shared-memory limits once per device (not again while a CUDA graph is captured).
  static bool configured[64] = {false};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return (int)err;
  if (dev < 0 || dev >= 64 || !configured[dev]) {
    err = cudaFuncSetAttribute(bk::balance_transforms_kernel<1, 0, 0, 2>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmemBytes);
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(bk::balance_transforms_kernel<4, 0, 0, 2>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, optin_smem_limit());
    if (err == cudaSuccess) err = (cudaError_t)bk::configure_fixed_rank(kMaxSmemBytes);
    if (err != cudaSuccess) return (int)err;
    if (dev >= 0 && dev < 64) configured[dev] = true;
  }
  const int fixed = bk::launch_fixed_rank(grams, eps_f, P, n, R, mode, tw, status, gaps, scratch, threads, grid,
                                          smem_bytes, mats_in_smem, stream);
  if (fixed >= 0) return fixed;
  if (n >= kBlockedRank)
    bk::balance_transforms_kernel<4, 0, 0, 2><<<grid, threads, smem_bytes, stream>>>(
        grams, eps_f, P, n, R, mode, tw, status, gaps, scratch, mats_in_smem);
  else
    bk::balance_transforms_kernel<1, 0, 0, 2><<<grid, threads, smem_bytes, stream>>>(
        grams, eps_f, P, n, R, mode, tw, status, gaps, scratch, mats_in_smem);
  return (int)cudaGetLastError();
}

const char* bk_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

}  // extern "C"
