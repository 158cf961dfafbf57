// The LoRA op's thin (rank-r) passes as CUDA kernels (csrc/lora_thin.cu), for the "ext_fused" mode of
// csrc/lora_linear.cpp: one launch per pass instead of two or three cuBLAS calls, which is what the op
// costs when the host sets the pace (short sequences). Plain C structs and raw pointers, so that the
// host-compiled lora_linear.cpp and the nvcc-compiled lora_thin.cu share nothing but this header.
//
// Row pass, per row n of X [N, K] (row stride ldx, unit column stride; XM, when given, the same layout):
//   t[n, j]   = sum_k xl[n, k] Rm(k, j),   xl = X (* XM, rounded to the activation dtype)
//   t_out[n, j] = t rounded to the activation dtype                          (t_out [N, r], contiguous)
//   out[n, o] = round(s * sum_j t_out[n, j] Em(o, j) + bias[o]) (* OM[n, o])  (out [N, O], row stride ldo)
// with Rm(k, j) = rm[k * rs_k + j * rs_j] and Em(o, j) = em[o * es_o + j * es_j] (the adapters, in their
// own dtype), fp32 accumulation, one rounding of each output. Forward: X = x, Rm = A^T, Em = B, out = the
// rank-r term plus bias (the big GEMM then accumulates x W^T onto it). Backward: X = dy, Rm = B,
// Em = A^T, OM = the dropout mask, out = the rank-r part of dx. out may be null (t_out only).
//
// Column pass, two independent tasks in one launch (a task with null P is skipped):
//   dst[c * oc + j * oj] = round(s * sum_n pl[n, c] Q[n, j]),   pl = P (* PM, rounded to the activation dtype)
// P [N, C] (row stride ldp, unit column stride), Q [N, r] contiguous (activation dtype), dst in the
// adapters' dtype; the sum over n runs in a fixed order (deterministic). Backward: dB = s dy^T u
// (P = dy, Q = u, dst [out, r]) and dA = s v^T x_l (P = x, PM = mask, Q = v, dst [r, in]).
#pragma once

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { BK_THIN_BF16 = 0, BK_THIN_F16 = 1, BK_THIN_F32 = 2 };  // activation: BF16 or F16; adapters: also F32
enum { BK_THIN_MAX_RANK = 128 };

typedef struct {
  const void* X;
  const void* XM;
  long long ldx;
  int N, K;
  const void* rm;
  long long rs_k, rs_j;
  const void* em;
  long long es_o, es_j;
  int r, O;
  const void* bias;
  const void* OM;
  long long ldo;
  float s;
  void* t_out;
  void* out;
} BkRowPass;

typedef struct {
  const void* P;
  const void* PM;
  long long ldp;
  int C;
  const void* Q;
  void* dst;
  long long oc, oj;
} BkColTask;

typedef struct {
  BkColTask task[2];
  int N, r;
  float s;
} BkColPass;

// 0 on success, else a cudaError_t (the launch's); act: BK_THIN_BF16 / BK_THIN_F16, ad: act or BK_THIN_F32.
int bk_lora_row_pass(const BkRowPass* p, int act, int ad, cudaStream_t stream);
int bk_lora_col_pass(const BkColPass* p, int act, int ad, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
