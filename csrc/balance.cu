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

constexpr int kMaxSmemBytes = 100 * 1024;   // leaves room for two blocks per SM
constexpr int kBlockedRank = 33;            // ranks from here take the register-blocked kernel

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
  int in_smem = 0;
  if (small + bk::NUM_MATS * mat <= kMaxSmemBytes) in_smem = bk::NUM_MATS;
  else if (small + 2 * mat <= kMaxSmemBytes) in_smem = 2;
  *mats_in_smem = in_smem;
  *smem_bytes = (int)(small + in_smem * mat);
  const int per_sm = n <= 32 ? 4 : (n <= 64 ? 2 : 1);
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
  // Raise the dynamic shared-memory limit once per device (not again while a CUDA graph is captured).
  static int configured[64] = {0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return (int)err;
  if (dev < 0 || dev >= 64 || smem_bytes > configured[dev]) {
    err = cudaFuncSetAttribute(bk::balance_transforms_kernel<1, 0, 0, 2>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmemBytes);
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(bk::balance_transforms_kernel<4, 0, 0, 2>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmemBytes);
    if (err == cudaSuccess) err = (cudaError_t)bk::configure_fixed_rank(kMaxSmemBytes);
    if (err != cudaSuccess) return (int)err;
    if (dev >= 0 && dev < 64) configured[dev] = kMaxSmemBytes;
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
