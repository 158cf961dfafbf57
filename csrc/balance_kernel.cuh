// The balancing-transforms kernel template (one thread block per pair; the math is balance_math.cuh), shared
// by csrc/balance.cu (any rank, sizes at run time) and csrc/balance_fixed.cu (the common ranks compiled with the
// rank and the block size as constants: every r x r loop unrolled, no run-time trip counts). Needs only the
// CUDA runtime (no torch headers).
#pragma once

#include <cuda_runtime.h>

#include "balance_math.cuh"
#include "launch_config.h"   // BK_FIXED_N*_THREADS, bk::balance_config

namespace bk {

// TB_MAX: how the r x r products run (bk::CtxT): 4 for ranks above 32 (staged tensor-core products), 1 below
// (direct tensor-core products; see bk::matmul_store). NFIX, NT: the rank and threads per block as compile-time
// constants (0: read at run time; a fixed-rank kernel must be launched with n == NFIX and blockDim.x == NT).
// MIN_BLOCKS: __launch_bounds__.
template <int TB_MAX, int NFIX, int NT, int MIN_BLOCKS>
__global__ void __launch_bounds__(NT > 0 ? NT : 256, MIN_BLOCKS)
    balance_transforms_kernel(const float* __restrict__ grams, const double* __restrict__ eps_f, int P, int n_rt,
                              int R, int mode, float* __restrict__ tw, int* __restrict__ status,
                              double* __restrict__ gaps, double* __restrict__ scratch, int mats_in_smem) {
  extern __shared__ double smem[];
  const int n = NFIX > 0 ? NFIX : n_rt;
  CtxT<TB_MAX> c;
  c.tid = threadIdx.x;
  c.nt = NT > 0 ? NT : (int)blockDim.x;
  c.n = n;
  c.pair_eig = mats_in_smem == NUM_MATS;
  carve_small(c, smem, n);
  double* fast = smem + (small_bytes(n) + 7) / 8;
  const long long nn = (long long)n * n;
  double* slow = scratch + (long long)blockIdx.x * (NUM_MATS - mats_in_smem) * nn;
  const Mats m = carve_mats(fast, slow, mats_in_smem, n);
  const long long RR = (long long)R * R;
  for (int p = blockIdx.x; p < P; p += gridDim.x) {
    balance_pair(c, m, grams + (2 * p) * RR, grams + (2 * p + 1) * RR, R, mode, eps_f[p], tw + (2 * p) * RR,
                 tw + (2 * p + 1) * RR, status + p, gaps + 2 * p);
    __syncthreads();
  }
}

// csrc/balance_fixed.cu. launch_fixed_rank: the fixed-rank kernel for (n, threads) if one is compiled, else -1
// (the caller launches the run-time-rank kernel); a cudaError_t otherwise. configure_fixed_rank: raises every
// fixed-rank kernel's dynamic shared-memory limit, to small_rank_limit below kBlockedRank and blocked_limit from
// there (a cudaError_t).
int launch_fixed_rank(const float* grams, const double* eps_f, int P, int n, int R, int mode, float* tw, int* status,
                      double* gaps, double* scratch, int threads, int grid, int smem_bytes, int mats_in_smem,
                      cudaStream_t stream);
int configure_fixed_rank(int small_rank_limit, int blocked_limit);

}  // namespace bk
