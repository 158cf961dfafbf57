// Launches a Triton-compiled TMA GEMM from C++ (see triton_gemm.h): per call, one tensor map per operand
// (cuTensorMapEncodeTiled, as Triton's own launcher fills them: no interleave, 128-byte L2 promotion, zero fill
// out of bounds) and the parameters packed in the order the compiled entry point declares them, then one
// cuLaunchKernel. The driver functions come from the runtime's entry-point query (no link to libcuda).
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "triton_gemm.h"

namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
using LaunchKernel = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                  CUstream, void**, void**);
using GetErrorString = CUresult (*)(CUresult, const char**);

// Codes of this file (negative: CUresult values are >= 0).
enum {
  kNoDriverEntry = -1,   // the driver lacks cuTensorMapEncodeTiled / cuLaunchKernel (a driver before CUDA 12)
  kBadParam = -2,        // a parameter code outside triton_gemm.h's list
  kBadArgs = -3,         // dtype, sizes or operands the kernel cannot take
};

// The driver's function `name` in its CUDA 12.0 form (cudaGetDriverEntryPointByVersion from CUDA 12.5, where the
// unversioned query is deprecated; before it the unversioned query, which toolkits 12.0-12.4 have).
template <class F>
F driver_fn(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  const cudaError_t err = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found);
#else
  const cudaError_t err = cudaGetDriverEntryPoint(name, &fn, cudaEnableDefault, &found);
#endif
  if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) return nullptr;
  return reinterpret_cast<F>(fn);
}

struct Driver {
  EncodeTiled encode = driver_fn<EncodeTiled>("cuTensorMapEncodeTiled");
  LaunchKernel launch = driver_fn<LaunchKernel>("cuLaunchKernel");
  GetErrorString error_string = driver_fn<GetErrorString>("cuGetErrorString");
};

const Driver& driver() {
  static const Driver d;   // (thread-safe initialisation)
  return d;
}

long long cdiv(long long a, long long b) { return (a + b - 1) / b; }

}  // namespace

extern "C" {

int bk_tg_launch(const bk_tg_kernel* k, int dtype, const bk_tg_operand* ops, const void* bias, long long M,
                 long long N, long long K, float scaling, void* stream) {
  const Driver& d = driver();
  if (d.encode == nullptr || d.launch == nullptr) return kNoDriverEntry;
  if ((dtype != 1 && dtype != 2) || k->elem_size != 2 || M <= 0 || N <= 0 || K <= 0 || M > INT32_MAX ||
      N > INT32_MAX || K > INT32_MAX || k->n_params < 0 || k->n_params > BK_TG_MAX_PARAMS)
    return kBadArgs;
  const CUtensorMapDataType type = dtype == 1 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  alignas(64) CUtensorMap maps[BK_TG_OPERANDS];
  for (int i = 0; i < BK_TG_OPERANDS; ++i) {
    const bk_tg_operand& o = ops[i];
    const cuuint64_t dims[2] = {(cuuint64_t)o.cols, (cuuint64_t)o.rows};
    const cuuint64_t strides[1] = {(cuuint64_t)o.ld * (cuuint64_t)k->elem_size};
    const cuuint32_t box[2] = {(cuuint32_t)k->box[i][1], (cuuint32_t)k->box[i][0]};
    const cuuint32_t unit[2] = {1, 1};
    const CUresult r = d.encode(&maps[i], type, 2, const_cast<void*>(o.ptr), dims, strides, box, unit,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, (CUtensorMapSwizzle)k->swizzle[i],
                                CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return (int)r;
  }
  // Storage for the scalar parameters (each parameter points at its own slot).
  int32_t i32[BK_TG_MAX_PARAMS];
  int64_t i64[BK_TG_MAX_PARAMS];
  float f32[BK_TG_MAX_PARAMS];
  const void* ptr[BK_TG_MAX_PARAMS];
  void* params[BK_TG_MAX_PARAMS];
  for (int j = 0; j < k->n_params; ++j) {
    const int c = k->param[j];
    if (c >= 0x00 && c < BK_TG_OPERANDS) {
      params[j] = &maps[c];
    } else if (c >= 0x10 && c < 0x10 + 2 * BK_TG_OPERANDS) {
      const bk_tg_operand& o = ops[(c - 0x10) / 2];
      i32[j] = (int32_t)((c - 0x10) % 2 == 0 ? o.rows : o.cols);
      params[j] = &i32[j];
    } else if (c >= 0x20 && c < 0x20 + 2 * BK_TG_OPERANDS) {
      const bk_tg_operand& o = ops[(c - 0x20) / 2];
      i64[j] = (c - 0x20) % 2 == 0 ? o.ld : 1;
      params[j] = &i64[j];
    } else if (c == BK_TG_BIAS || c == BK_TG_NULL) {
      ptr[j] = c == BK_TG_BIAS ? bias : nullptr;
      params[j] = &ptr[j];
    } else if (c == BK_TG_M || c == BK_TG_N || c == BK_TG_K) {
      i32[j] = (int32_t)(c == BK_TG_M ? M : c == BK_TG_N ? N : K);
      params[j] = &i32[j];
    } else if (c == BK_TG_SCALING) {
      f32[j] = scaling;
      params[j] = &f32[j];
    } else {
      return kBadParam;
    }
  }
  const long long grid = cdiv(M, k->block_m) * cdiv(N, k->block_n);
  if (grid > INT32_MAX) return kBadArgs;
  return (int)d.launch(reinterpret_cast<CUfunction>(k->function), (unsigned)grid, 1, 1, 32u * k->num_warps, 1, 1,
                       (unsigned)k->shared, static_cast<CUstream>(stream), params, nullptr);
}

const char* bk_tg_error_string(int err) {
  switch (err) {
    case kNoDriverEntry: return "the CUDA driver has no cuTensorMapEncodeTiled / cuLaunchKernel (needs CUDA 12+)";
    case kBadParam: return "a parameter code outside csrc/triton_gemm.h's list";
    case kBadArgs: return "dtype, sizes (1 .. 2^31 - 1) or grid outside what the kernel takes";
    default: break;
  }
  const char* s = nullptr;
  const GetErrorString f = driver().error_string;
  if (f != nullptr && f((CUresult)err, &s) == CUDA_SUCCESS && s != nullptr) return s;
  return "unknown CUDA driver error";
}

}  // extern "C"
