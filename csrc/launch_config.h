// Launch configuration of the r x r kernel (csrc/balance.cu) from the device's shared-memory limits: pure host
// arithmetic, also compiled into the host build (csrc/host_emulation.cc) so that CI checks it for GPUs it does
// not have. Per block the kernel keeps a small workspace and as many of its bk::NUM_MATS r x r float64 matrices
// in shared memory as the budget allows (the rest in global scratch). Ranks >= kBlockedRank: one block per
// multiprocessor gets whatever the device lets one block opt in to; where two blocks per multiprocessor are
// wanted, each gets at most half of the multiprocessor's shared memory (less the 1 KB the runtime reserves per
// block) and at most kMaxSmemBytes, so that both stay resident. Ranks below: at most kMaxSmemBytes and the opt-in
// limit, without the per-multiprocessor cap (on GPUs with less shared memory than an H100 fewer of their blocks
// then share a multiprocessor: speed only, they do not wait for each other).
#pragma once

#include "balance_math.cuh"

// Threads per block for ranks 4, 8, 16, 32 and 64 (the fixed-rank kernels are compiled for these block sizes; a
// probe build may pass others for ranks 4 to 32).
#ifndef BK_FIXED_N4_THREADS
#define BK_FIXED_N4_THREADS 64
#endif
#ifndef BK_FIXED_N8_THREADS
#define BK_FIXED_N8_THREADS 64
#endif
#ifndef BK_FIXED_N16_THREADS
#define BK_FIXED_N16_THREADS 128
#endif
#ifndef BK_FIXED_N32_THREADS
#define BK_FIXED_N32_THREADS 128
#endif
#define BK_FIXED_N64_THREADS 256   // every rank above 32 takes 256 (balance_config)
// The small ranks' tensor-core products (bk::matmul_mma_direct) need whole warps.
static_assert(BK_FIXED_N4_THREADS % 32 == 0 && BK_FIXED_N8_THREADS % 32 == 0 && BK_FIXED_N16_THREADS % 32 == 0 &&
                  BK_FIXED_N32_THREADS % 32 == 0 && BK_FIXED_N4_THREADS > 0 && BK_FIXED_N8_THREADS > 0 &&
                  BK_FIXED_N16_THREADS > 0 && BK_FIXED_N32_THREADS > 0,
              "the r x r kernels run whole warps");
// bk::block_sum2 keeps 16 partial sums per value: blocks of at most 512 threads.
static_assert(BK_FIXED_N4_THREADS <= 512 && BK_FIXED_N8_THREADS <= 512 && BK_FIXED_N16_THREADS <= 512 &&
                  BK_FIXED_N32_THREADS <= 512 && BK_FIXED_N64_THREADS <= 512,
              "the r x r kernels' block reductions take at most 512 threads");
static_assert(BK_FIXED_N64_THREADS == bk::kStageThreads,
              "the blocked kernels' products (bk::matmul_mma) need 256 threads");
// Ranks >= kBlockedRank keep as many of their 11 matrices in shared memory as the launch allows, the inverse fourth
// root's workspaces first (see bk::carve_mats). With at most one pair per SM (P <= SMs), or r > 64, one block per SM
// takes all the shared memory a block may opt in to (227 KB on an H100 / H200: 6 matrices at r = 64, all of them
// up to r = 48); with more pairs two blocks per SM take kMaxSmemBytes each on an H100 / H200 (2 matrices at
// r = 64, 4 at r = 48), so that 2 x SMs pairs still run in one wave. (The small workspace, bk::small_bytes,
// includes the 18.5 KB of staged operands of these ranks' tensor-core products since session 15: before, all 11
// matrices fitted up to r = 51 and 5 at r = 48.) Measured on an H200 with the run-time-rank
// kernel (7B adapters, r = 64; bench/results/logs/session9-rxr-probe-2026-12-01.json and session9-rxr-probe2-
// 2026-12-01.json): 224 pairs 1.47 ms (one block per SM, so two waves: 1.66; two blocks of 113 KB, 3 matrices
// each: 1.56), 112 pairs 0.84 ms (two blocks of 113 KB per SM: 1.14); r = 64 now takes a fixed-rank kernel
// (balance_fixed.cu). BK_BLOCKED_ONE_PER_SM=0 (a probe switch): two blocks per SM for any P.
#ifndef BK_BLOCKED_ONE_PER_SM
#define BK_BLOCKED_ONE_PER_SM 1
#endif
// Probe switch: at most this many of the matrices of ranks >= kBlockedRank in shared memory (fewer leave the
// multiprocessor more L1 cache for the ones in global memory); -1, the default: as many as fit. Measured on an H200
// (bench/results/logs/session10-rxr-probe-2026-12-02.json): none about as fast as the default, 1 or 3 slower.
#ifndef BK_BLOCKED_MAX_MATS
#define BK_BLOCKED_MAX_MATS -1
#endif

namespace bk {

constexpr int kMaxSmemBytes = 100 * 1024;   // the budget of launches that want several blocks per SM
constexpr int kSmemReservedPerBlock = 1024; // shared memory the runtime reserves per block (sm_80 and later)

struct SmemLimits {
  int per_block_optin;   // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int per_sm;            // cudaDevAttrMaxSharedMemoryPerMultiprocessor
};

struct BalanceConfig {
  int threads, grid, smem_bytes, mats_in_smem;
  long long scratch_doubles;
};

// The dynamic shared memory limit to set on the kernels for ranks below kBlockedRank (the fixed-rank ones of
// those ranks included): every launch of theirs stays within it.
inline int small_rank_smem_limit(const SmemLimits& lim) {
  return lim.per_block_optin < kMaxSmemBytes ? lim.per_block_optin : kMaxSmemBytes;
}

// Launch configuration for P pairs of rank n on a device with num_sms multiprocessors and these limits.
inline BalanceConfig balance_config(int P, int n, int num_sms, const SmemLimits& lim) {
  BalanceConfig cfg;
  cfg.threads = n == 4 ? BK_FIXED_N4_THREADS : n == 8 ? BK_FIXED_N8_THREADS : n == 16 ? BK_FIXED_N16_THREADS
              : n == 32 ? BK_FIXED_N32_THREADS : n <= 8 ? 64 : (n <= 32 ? 128 : BK_FIXED_N64_THREADS);
  const long long small = (small_bytes(n) + 7) / 8 * 8;
  const long long mat = 8LL * n * n;
  const long long several = small_rank_smem_limit(lim);   // a block's budget when several share an SM
  int in_smem = 0, per_sm = n <= 32 ? 4 : (n <= 64 ? 2 : 1);
  if (n >= kBlockedRank) {
    const bool one = n > 64 || (BK_BLOCKED_ONE_PER_SM && P <= num_sms);
    per_sm = one ? 1 : 2;
    long long budget = lim.per_block_optin;
    if (!one) {
      const long long half = lim.per_sm / 2 - kSmemReservedPerBlock;   // two blocks resident per SM
      budget = several < half ? several : half;
    }
    const long long fit = (budget - small) / mat;
    const int cap = BK_BLOCKED_MAX_MATS >= 0 && BK_BLOCKED_MAX_MATS < NUM_MATS ? BK_BLOCKED_MAX_MATS : NUM_MATS;
    in_smem = fit < 0 ? 0 : (fit > cap ? cap : (int)fit);
  } else if (small + NUM_MATS * mat <= several) {
    in_smem = NUM_MATS;
  } else if (small + 2 * mat <= several) {
    in_smem = 2;
  }
  cfg.mats_in_smem = in_smem;
  cfg.smem_bytes = (int)(small + in_smem * mat);
  int g = num_sms * per_sm;
  if (g > P) g = P;
  if (g < 1) g = 1;
  cfg.grid = g;
  cfg.scratch_doubles = (long long)g * (NUM_MATS - in_smem) * n * n + 1;
  return cfg;
}

}  // namespace bk
