// The balancing-transforms kernel for the common LoRA ranks with the rank and block size as compile-time
// constants (see balance_kernel.cuh): the same math and sums as the run-time-rank kernel in balance.cu, in a
// file of its own so that the two compile in parallel. BK_FIXED_RANKS=0 compiles none (a probe build).
#include "balance_kernel.cuh"

#ifndef BK_FIXED_RANKS
#define BK_FIXED_RANKS 1
#endif

namespace bk {

namespace {

template <int N, int NT>
int launch_one(const float* grams, const double* eps_f, int P, int R, int mode, float* tw, int* status, double* gaps,
               double* scratch, int grid, int smem_bytes, int mats_in_smem, cudaStream_t stream) {
  balance_transforms_kernel<1, N, NT, 1><<<grid, NT, smem_bytes, stream>>>(grams, eps_f, P, N, R, mode, tw, status,
                                                                         gaps, scratch, mats_in_smem);
  return (int)cudaGetLastError();
}

template <int N, int NT>
int configure_one(int max_smem_bytes) {
  return (int)cudaFuncSetAttribute(balance_transforms_kernel<1, N, NT, 1>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem_bytes);
}

}  // namespace

// The fixed ranks and their threads per block: the same threads as bk_balance_config gives these ranks.
#if BK_FIXED_RANKS
#define BK_FOR_FIXED_RANKS(X) X(4, BK_FIXED_N4_THREADS) X(8, BK_FIXED_N8_THREADS) X(16, BK_FIXED_N16_THREADS) \
  X(32, BK_FIXED_N32_THREADS)
#else
#define BK_FOR_FIXED_RANKS(X)
#endif

int configure_fixed_rank(int max_smem_bytes) {
  int err = 0;
#define BK_CONFIGURE(N, NT) if (err == 0) err = configure_one<N, NT>(max_smem_bytes);
  BK_FOR_FIXED_RANKS(BK_CONFIGURE)
#undef BK_CONFIGURE
  return err;
}

int launch_fixed_rank(const float* grams, const double* eps_f, int P, int n, int R, int mode, float* tw, int* status,
                      double* gaps, double* scratch, int threads, int grid, int smem_bytes, int mats_in_smem,
                      cudaStream_t stream) {
#define BK_LAUNCH(N, NT)                                                                                         \
  if (n == N && threads == NT)                                                                                   \
    return launch_one<N, NT>(grams, eps_f, P, R, mode, tw, status, gaps, scratch, grid, smem_bytes, mats_in_smem, \
                             stream);
  BK_FOR_FIXED_RANKS(BK_LAUNCH)
#undef BK_LAUNCH
  return -1;
}

}  // namespace bk
