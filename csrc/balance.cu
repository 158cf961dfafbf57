// Batched balancing transforms: one thread block per (lora_A, lora_B) pair, float64, r <= 128.
//
// Input  grams  fp32 [P, 2, R, R]  ([p, 0] = G_B = B^T B, [p, 1] = G_A = A A^T, top-left r x r used)
//        eps_f  fp64 [P]           (each pair's factor rounding unit: the product noise floor)
// Output tw     fp32 [P, 2, R, R]  ([p, 0] = T, [p, 1] = T^-1, zero-padded), gaps fp64 [P, 2],
//        status int32 [P]          (bits 0-2: nonfinite / zero / rank-deficient, bits 8+: live components k)
// The math is in balance_math.cuh, the kernel template in balance_kernel.cuh; the common ranks take the
// fixed-rank kernels of balance_fixed.cu. This file needs only the CUDA runtime (no torch headers), so that
// tools/check_cuda_build.sh can compile it with plain nvcc; csrc/bindings.cpp is the torch-facing side.
#include <cstdio>
#include <cstdlib>

#include "balance_kernel.cuh"

namespace {

// The device's shared-memory limits (cached per device). BALORA_KERNELS_SMEM_LIMITS="per_block_optin,per_sm"
// (bytes) lowers them for the launch configuration (testing on one GPU what a smaller one runs); the kernels'
// attributes are always set from the device's own limits.
bk::SmemLimits device_smem_limits(int dev) {
  static bk::SmemLimits cached[64] = {};
  bk::SmemLimits lim{48 * 1024, 2 * 48 * 1024 + 2 * bk::kSmemReservedPerBlock};   // if the queries fail
  if (dev >= 0 && dev < 64 && cached[dev].per_block_optin > 0) return cached[dev];
  int optin = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) == cudaSuccess && optin > 0 &&
      per_sm > 0) {
    lim = {optin, per_sm};
  } else {
    (void)cudaGetLastError();
  }
  if (dev >= 0 && dev < 64) cached[dev] = lim;
  return lim;
}

bk::SmemLimits config_smem_limits(int dev) {
  bk::SmemLimits lim = device_smem_limits(dev);
  const char* env = std::getenv("BALORA_KERNELS_SMEM_LIMITS");
  long long optin = 0, per_sm = 0;
  if (env != nullptr && std::sscanf(env, "%lld,%lld", &optin, &per_sm) == 2) {
    if (optin > 0 && optin < lim.per_block_optin) lim.per_block_optin = (int)optin;
    if (per_sm > 0 && per_sm < lim.per_sm) lim.per_sm = (int)per_sm;
  }
  return lim;
}

int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    dev = 0;
  }
  return dev;
}

}  // namespace

extern "C" {

// Launch configuration for P pairs of rank n on the current device with `num_sms` multiprocessors (see
// launch_config.h). Writes threads per block, grid size, dynamic shared memory bytes, matrices kept in shared
// memory and the float64 global scratch elements the launch needs.
void bk_balance_config(int P, int n, int num_sms, int* threads, int* grid, int* smem_bytes, int* mats_in_smem,
                       long long* scratch_doubles) {
  const bk::BalanceConfig cfg = bk::balance_config(P, n, num_sms, config_smem_limits(current_device()));
  *threads = cfg.threads;
  *grid = cfg.grid;
  *smem_bytes = cfg.smem_bytes;
  *mats_in_smem = cfg.mats_in_smem;
  *scratch_doubles = cfg.scratch_doubles;
}

// Returns a cudaError_t (0 on success). `scratch` must hold the config's scratch_doubles.
int bk_balance_launch(const float* grams, const double* eps_f, int P, int n, int R, int mode, float* tw, int* status, double* gaps,
                      double* scratch, int threads, int grid, int smem_bytes, int mats_in_smem,
                      cudaStream_t stream) {
  if (P == 0) return 0;
  // The blocked kernels' tensor-core products (bk::matmul_mma) cover their tiles with exactly kStageThreads threads,
  // which balance_config always gives ranks >= kBlockedRank: any other count is refused, never run.
  if (n >= bk::kBlockedRank && threads != bk::kStageThreads) return (int)cudaErrorInvalidValue;
  // Raise the dynamic shared-memory limits once per device (not again while a CUDA graph is captured), to the
  // device's own limits: every configuration bk::balance_config gives stays within them.
  static bool configured[64] = {false};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return (int)err;
  if (dev < 0 || dev >= 64 || !configured[dev]) {
    const bk::SmemLimits lim = device_smem_limits(dev);
    const int small_limit = bk::small_rank_smem_limit(lim);
    err = cudaFuncSetAttribute(bk::balance_transforms_kernel<1, 0, 0, 2>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, small_limit);
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(bk::balance_transforms_kernel<4, 0, 0, 2>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, lim.per_block_optin);
    if (err == cudaSuccess) err = (cudaError_t)bk::configure_fixed_rank(small_limit, lim.per_block_optin);
    if (err != cudaSuccess) return (int)err;
    if (dev >= 0 && dev < 64) configured[dev] = true;
  }
  const int fixed = bk::launch_fixed_rank(grams, eps_f, P, n, R, mode, tw, status, gaps, scratch, threads, grid,
                                          smem_bytes, mats_in_smem, stream);
  if (fixed >= 0) return fixed;
  if (n >= bk::kBlockedRank)
    bk::balance_transforms_kernel<4, 0, 0, 2><<<grid, threads, smem_bytes, stream>>>(
        grams, eps_f, P, n, R, mode, tw, status, gaps, scratch, mats_in_smem);
  else
    bk::balance_transforms_kernel<1, 0, 0, 2><<<grid, threads, smem_bytes, stream>>>(
        grams, eps_f, P, n, R, mode, tw, status, gaps, scratch, mats_in_smem);
  return (int)cudaGetLastError();
}

const char* bk_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

}  // extern "C"
