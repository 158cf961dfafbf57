// A Triton kernel compiled in Python and launched from C++: balora_kernels/ops/lora_linear.py compiles its TMA GEMM
// (`_lora_gemm_tma_kernel`: out = x w + s p q (+ b), every operand through a TMA descriptor), loads it through
// Triton, checks the parameter list of the compiled entry point and hands the loaded function with this
// description to the C++ op (`balora::lora_gemm_kernel_register`); csrc/lora_linear.cpp then launches it without
// Python (csrc/triton_gemm.cu: the tensor maps encoded and the parameters packed per call).
// Plain C types only: csrc/lora_linear.cpp includes no CUDA header.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// The five descriptor operands, in the kernel's argument order.
enum { BK_TG_X = 0, BK_TG_W = 1, BK_TG_P = 2, BK_TG_Q = 3, BK_TG_OUT = 4, BK_TG_OPERANDS = 5 };

// Parameter codes: what each parameter of the compiled entry point holds, in order.
//   0x00 + i       the CUtensorMap of operand i (128 bytes by value)
//   0x10 + 2 i + d  operand i's shape along d (d = 0 rows, 1 columns), 32-bit
//   0x20 + 2 i + d  operand i's stride along d in elements, 64-bit
//   BK_TG_BIAS     the bias pointer; BK_TG_M / _N / _K the problem sizes (32-bit); BK_TG_SCALING s (float32);
//   BK_TG_NULL     a null pointer (Triton's global and profile scratch, asked for only with zero sizes)
enum { BK_TG_BIAS = 0x30, BK_TG_M = 0x31, BK_TG_N = 0x32, BK_TG_K = 0x33, BK_TG_SCALING = 0x34, BK_TG_NULL = 0x35 };
enum { BK_TG_MAX_PARAMS = 48 };

typedef struct {
  unsigned long long function;     // the loaded CUfunction (Triton keeps its module loaded)
  int device;                      // CUDA device index it was loaded on
  int num_warps, shared;           // block of 32 * num_warps threads, dynamic shared memory in bytes
  int block_m, block_n;            // output tile: grid = cdiv(M, block_m) * cdiv(N, block_n)
  int block_r;                     // rank block (the rank-r operands' tile width; their TMA boxes may be narrower)
  int swizzle[BK_TG_OPERANDS];     // per operand: CUtensorMapSwizzle
  int box[BK_TG_OPERANDS][2];      // per operand: the TMA box, rows x columns (Triton's, from the compiled kernel)
  int elem_size;                   // bytes per element (2: bfloat16 / float16)
  int has_bias;
  int backward;                    // 0: w [N, K] and q [N, r], read transposed (y); 1: w [K, N], q [r, N] (dx)
  int n_params;
  int param[BK_TG_MAX_PARAMS];
} bk_tg_kernel;

typedef struct {
  const void* ptr;                 // row-major 2-D tensor: rows x cols, row stride ld (elements), unit col stride
  long long rows, cols, ld;
} bk_tg_operand;

// dtype: 1 bfloat16, 2 float16. Returns 0, a CUresult, or a negative code of this file (see bk_tg_error_string).
int bk_tg_launch(const bk_tg_kernel* k, int dtype, const bk_tg_operand* ops, const void* bias, long long M,
                 long long N, long long K, float scaling, void* stream);
const char* bk_tg_error_string(int err);

#ifdef __cplusplus
}
#endif
