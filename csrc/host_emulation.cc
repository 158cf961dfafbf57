// Host build of balance_math.cuh for tests (not part of the extension): the per-pair math run on the CPU
// with one "thread", so that CI can check the CUDA kernel's algorithm against the reference without a GPU.
//   g++ -O2 -shared -fPIC -DBK_HOST_EMULATION csrc/host_emulation.cc -o libbk_host.so
// tests/test_projection_kernels.py builds it and calls bk_host_balance_transforms through ctypes. paths (or null):
// per pair, bk::PATH_* | inverse fourth root steps << 8 | polar Newton-Schulz steps << 16 (which r x r path found T
// and how: see balance_pair).
#include <vector>

#include "balance_math.cuh"
#include "launch_config.h"

extern "C" void bk_host_balance_transforms(const float* grams, const double* eps_f, int P, int n, int R, int mode,
                                           int pair_eig, float* tw, int* status, double* gaps, int* paths) {
  std::vector<double> small((bk::small_bytes(n) + 7) / 8);
  std::vector<double> mats((size_t)bk::NUM_MATS * n * n);
  bk::CtxT<4> c;                    // the blocked products (the same sums as unblocked: see bk::matmul_tiles)
  c.tid = 0;
  c.nt = 1;
  c.n = n;
  c.pair_eig = pair_eig != 0;       // the GPU's choice: both Grams together when all matrices fit in shared memory
  bk::carve_small(c, small.data(), n);
  const bk::Mats m = bk::carve_mats(mats.data(), mats.data(), bk::NUM_MATS, n);
  const long long RR = (long long)R * R;
  for (int p = 0; p < P; ++p) {
    c.path = -1;
    bk::balance_pair(c, m, grams + (2 * p) * RR, grams + (2 * p + 1) * RR, R, mode, eps_f[p], tw + (2 * p) * RR,
                     tw + (2 * p + 1) * RR, status + p, gaps + 2 * p);
    if (paths) paths[p] = c.path | (c.path == bk::PATH_FAST_NS ? c.ns_steps << 8 : 0) | c.polar_steps << 16;
  }
}

// bk::FlatIter against the loop it replaces, `for (idx = tid; idx < rows * width; idx += nt)`, for every thread of a
// block of nt: returns 0 when each thread's (row, col) sequence is exactly row * width + col = tid, tid + nt, ...
// with col < width; otherwise 1 + the first thread whose sequence differs.
extern "C" int bk_host_flat_iter_check(int nt, int width, int rows) {
  for (int tid = 0; tid < nt; ++tid) {
    bk::Ctx c;
    c.tid = tid;
    c.nt = nt;
    long long expect = tid;
    for (bk::FlatIter it(c, width); it.row < rows; it.next(), expect += nt)
      if (it.col < 0 || it.col >= width || (long long)it.row * width + it.col != expect) return 1 + tid;
    if (expect < (long long)rows * width) return 1 + tid;   // stopped early
  }
  return 0;
}

// bk::balance_config (the r x r kernel's launch configuration, csrc/launch_config.h) for a device with the given
// shared-memory limits: out = {threads, grid, smem_bytes, mats_in_smem, small_rank_smem_limit}, *scratch the float64
// scratch elements.
extern "C" void bk_host_balance_config(int P, int n, int num_sms, int per_block_optin, int per_sm, int* out,
                                       long long* scratch) {
  const bk::SmemLimits lim{per_block_optin, per_sm};
  const bk::BalanceConfig cfg = bk::balance_config(P, n, num_sms, lim);
  out[0] = cfg.threads;
  out[1] = cfg.grid;
  out[2] = cfg.smem_bytes;
  out[3] = cfg.mats_in_smem;
  out[4] = bk::small_rank_smem_limit(lim);
  *scratch = cfg.scratch_doubles;
}
