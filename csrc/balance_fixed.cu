// The balancing-transforms kernel for the common LoRA ranks with the rank and block size as compile-time
// constants (see balance_kernel.cuh): the same math and sums as the run-time-rank kernel in balance.cu, in a
// file of its own so that the two compile in parallel. BK_FIXED_RANKS=0 compiles none (a probe build).
#include "balance_kernel.cuh"

#ifndef BK_FIXED_RANKS
#define BK_FIXED_RANKS 1
#endif

namespace bk {

namespace {

// TB: how the products run (bk::CtxT: 1 below kBlockedRank, 4 from there, as the run-time-rank kernels),
// MINB: __launch_bounds__'s blocks per SM (1 for ranks 4 to 32, as before r = 64 joined; 2 at r = 64, as the
// run-time-rank blocked kernel).
template <int N, int NT, int TB, int MINB>
int launch_one(const float* grams, const double* eps_f, int P, int R, int mode, float* tw, int* status, double* gaps,
               double* scratch, int grid, int smem_bytes, int mats_in_smem, cudaStream_t stream) {
  balance_transforms_kernel<TB, N, NT, MINB><<<grid, NT, smem_bytes, stream>>>(grams, eps_f, P, N, R, mode, tw, status,
                                                                             gaps, scratch, mats_in_smem);
  return (int)cudaGetLastError();
}

template <int N, int NT, int TB, int MINB>
int configure_one(int max_smem_bytes) {
  return (int)cudaFuncSetAttribute(balance_transforms_kernel<TB, N, NT, MINB>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem_bytes);
}

}  // namespace

// The fixed ranks, their threads per block (the same threads as bk_balance_config gives these ranks), register
// blocking and blocks per SM. r = 64 is the blocked kernel's fixed instance: on an H200, 7B adapters, 1.457 ->
// 1.367 ms for 224 pairs, 0.830 -> 0.775 for 112, the same bits (bench/results/logs/session11-eig-fixed64-
// 2026-12-02.json, where "plain" is the run-time-rank kernel and "fixed_64" this one; bench/probe/eig_phases.py
// now builds the former as its variant no_fixed_64); BK_FIXED_N64=0 (a probe switch) leaves r = 64 to the
// run-time-rank kernel.
#ifndef BK_FIXED_N64
#define BK_FIXED_N64 1
#endif
#if BK_FIXED_RANKS && BK_FIXED_N64
#define BK_FIXED_64(X) X(64, BK_FIXED_N64_THREADS, 4, 2)
#else
#define BK_FIXED_64(X)
#endif
#if BK_FIXED_RANKS
#define BK_FOR_FIXED_RANKS(X) X(4, BK_FIXED_N4_THREADS, 1, 1) X(8, BK_FIXED_N8_THREADS, 1, 1) \
  X(16, BK_FIXED_N16_THREADS, 1, 1) X(32, BK_FIXED_N32_THREADS, 1, 1) BK_FIXED_64(X)
#else
#define BK_FOR_FIXED_RANKS(X)
#endif

int configure_fixed_rank(int small_rank_limit, int blocked_limit) {
  int err = 0;
#define BK_CONFIGURE(N, NT, TB, MINB) \
  if (err == 0) err = configure_one<N, NT, TB, MINB>(N >= kBlockedRank ? blocked_limit : small_rank_limit);
  BK_FOR_FIXED_RANKS(BK_CONFIGURE)
#undef BK_CONFIGURE
  return err;
}

int launch_fixed_rank(const float* grams, const double* eps_f, int P, int n, int R, int mode, float* tw, int* status,
                      double* gaps, double* scratch, int threads, int grid, int smem_bytes, int mats_in_smem,
                      cudaStream_t stream) {
#define BK_LAUNCH(N, NT, TB, MINB)                                                                                 \
  if (n == N && threads == NT)                                                                                     \
    return launch_one<N, NT, TB, MINB>(grams, eps_f, P, R, mode, tw, status, gaps, scratch, grid, smem_bytes,       \
                                       mats_in_smem, stream);
  BK_FOR_FIXED_RANKS(BK_LAUNCH)
#undef BK_LAUNCH
  return -1;
}

}  // namespace bk
