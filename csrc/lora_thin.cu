// The LoRA op's rank-r passes (see lora_thin.h for the math): CUDA-core kernels, fp32 accumulation.
//
// They exist for the host-bound regime (a few thousand tokens or fewer), where each launch saved is worth
// more than the GPU time: a row pass replaces two cuBLAS calls (u = x A^T and the rank-r term, or v = dy B
// and the rank-r part of dx) and the column pass two more (dB and dA). The row pass keeps a block's
// t = X Rm in shared memory between its two phases, so t never makes a round trip through global memory.
// On long sequences cuBLAS's tensor-core kernels are faster; the dispatcher chooses from measurements.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lora_thin.h"

namespace {

constexpr int kThreads = 256;
constexpr int kRows = 8;                                         // rows of X per row-pass block
constexpr int kPerThread = kRows * BK_THIN_MAX_RANK / kThreads;  // (row, j) sums per thread in phase 1
constexpr int kEJ = 32;                                          // rank chunk of Em staged in phase 2
constexpr int kCols = 64;                                        // columns per column-pass block
constexpr int kJGroups = kThreads / kCols;                       // the rank split over kJGroups threads
constexpr int kJMax = BK_THIN_MAX_RANK / kJGroups;               // sums per thread in the column pass
constexpr int kNC = 32;                                          // rows of P and Q per column-pass step

// K chunk of the row pass's phase 1: long chunks (fewer round trips to memory) while they fit.
__host__ __device__ constexpr int row_chunk(int r) { return r <= 32 ? 256 : 64; }

// Floats of dynamic shared memory of a row-pass block.
__host__ __device__ constexpr int row_smem_floats(int r) {
  return kRows * (row_chunk(r) + 1) +
         (row_chunk(r) * (r + 1) > kEJ * (kThreads + 1) ? row_chunk(r) * (r + 1) : kEJ * (kThreads + 1)) +
         kRows * r;
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// x * m as the activation dtype rounds it (the reference materialises x * m in that dtype).
template <typename T>
__device__ __forceinline__ float masked(float x, const T* m, long long i) {
  return m ? to_f(from_f<T>(x * to_f(m[i]))) : x;
}

// Latency: every staging loop below is unrolled so that a thread's global loads are in flight together;
// the sums run as several independent chains. (The blocks are few when the host sets the pace.)
template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads) row_pass_kernel(BkRowPass p) {
  extern __shared__ float smem[];
  const int r = p.r;
  const int kc = row_chunk(r);
  const int ldr = r + 1;                     // padded rows: conflict-free stores of either Rm layout
  float* xs = smem;                          // [kRows][kc + 1]
  float* rs = xs + kRows * (kc + 1);         // phase 1: Rm chunk [kc][r + 1]; phase 2: Em chunk [kEJ][kThreads + 1]
  float* ts = smem + row_smem_floats(r) - kRows * r;  // [kRows][r]
  const T* X = static_cast<const T*>(p.X);
  const T* XM = static_cast<const T*>(p.XM);
  const TA* rm = static_cast<const TA*>(p.rm);
  const int tid = threadIdx.x;
  const long long n0 = static_cast<long long>(blockIdx.x) * kRows;

  // Phase 1: t = xl Rm over K in chunks; each thread owns up to kPerThread (row, j) sums.
  float acc[kPerThread];
#pragma unroll
  for (int q = 0; q < kPerThread; ++q) acc[q] = 0.f;
  for (int k0 = 0; k0 < p.K; k0 += kc) {
#pragma unroll 8
    for (int i = tid; i < kRows * kc; i += kThreads) {
      const int row = i / kc, kk = i % kc;
      const long long n = n0 + row;
      const int k = k0 + kk;
      float v = 0.f;
      if (n < p.N && k < p.K) v = masked<T>(to_f(X[n * p.ldx + k]), XM, n * p.ldx + k);
      xs[row * (kc + 1) + kk] = v;
    }
    if (p.rs_k == 1) {  // Rm contiguous along k (rows of lora_A): consecutive threads read consecutive k
#pragma unroll 8
      for (int i = tid; i < kc * r; i += kThreads) {
        const int j = i / kc, kk = i % kc, k = k0 + kk;
        rs[kk * ldr + j] = k < p.K ? to_f(rm[k + j * p.rs_j]) : 0.f;
      }
    } else {            // contiguous along j (rows of lora_B)
#pragma unroll 8
      for (int i = tid; i < kc * r; i += kThreads) {
        const int kk = i / r, j = i % r, k = k0 + kk;
        rs[kk * ldr + j] = k < p.K ? to_f(rm[k * p.rs_k + j * p.rs_j]) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      const int e = tid + q * kThreads;
      if (e < kRows * r) {
        const float* xr = xs + (e / r) * (kc + 1);
        const float* rc = rs + e % r;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll 4
        for (int kk = 0; kk < kc; kk += 4) {
          a0 = fmaf(xr[kk], rc[kk * ldr], a0);
          a1 = fmaf(xr[kk + 1], rc[(kk + 1) * ldr], a1);
          a2 = fmaf(xr[kk + 2], rc[(kk + 2) * ldr], a2);
          a3 = fmaf(xr[kk + 3], rc[(kk + 3) * ldr], a3);
        }
        acc[q] += (a0 + a1) + (a2 + a3);
      }
    }
    __syncthreads();
  }

  // t rounded to the activation dtype, as it is stored (and as the reference's products see it).
  T* t_out = static_cast<T*>(p.t_out);
#pragma unroll
  for (int q = 0; q < kPerThread; ++q) {
    const int e = tid + q * kThreads;
    if (e < kRows * r) {
      const int row = e / r, j = e % r;
      const T tv = from_f<T>(acc[q]);
      ts[e] = to_f(tv);
      if (n0 + row < p.N) t_out[(n0 + row) * r + j] = tv;
    }
  }
  if (p.out == nullptr) return;

  // Phase 2: out[n, o] = s * sum_j t[n, j] Em(o, j) (+ bias[o]) (* OM[n, o]); kThreads columns at a time,
  // one per thread, Em staged kEJ ranks at a time.
  const TA* em = static_cast<const TA*>(p.em);
  const T* bias = static_cast<const T*>(p.bias);
  const T* OM = static_cast<const T*>(p.OM);
  T* out = static_cast<T*>(p.out);
  float* es = rs;                            // [kEJ][kThreads + 1]
  const int rows = static_cast<int>(p.N - n0 < kRows ? p.N - n0 : kRows);
  for (int o0 = 0; o0 < p.O; o0 += kThreads) {
    const int o = o0 + tid;
    float a[kRows];
#pragma unroll
    for (int row = 0; row < kRows; ++row) a[row] = 0.f;
    for (int j0 = 0; j0 < r; j0 += kEJ) {
      const int je = r - j0 < kEJ ? r - j0 : kEJ;
      __syncthreads();                       // ts written / the previous chunk consumed
      if (p.es_j == 1) {                     // Em contiguous along j (rows of lora_B)
#pragma unroll 8
        for (int i = tid; i < je * kThreads; i += kThreads) {
          const int oo = i / je, jj = i % je;
          es[jj * (kThreads + 1) + oo] = o0 + oo < p.O ? to_f(em[(o0 + oo) * p.es_o + j0 + jj]) : 0.f;
        }
      } else {                               // contiguous along o (rows of lora_A)
#pragma unroll 8
        for (int i = tid; i < je * kThreads; i += kThreads) {
          const int jj = i / kThreads, oo = i % kThreads;
          es[jj * (kThreads + 1) + oo] = o0 + oo < p.O ? to_f(em[(o0 + oo) * p.es_o + (j0 + jj) * p.es_j]) : 0.f;
        }
      }
      __syncthreads();
      for (int jj = 0; jj < je; ++jj) {
        const float w = es[jj * (kThreads + 1) + tid];
#pragma unroll
        for (int row = 0; row < kRows; ++row) a[row] = fmaf(ts[row * r + j0 + jj], w, a[row]);
      }
    }
    if (o < p.O) {
      const float b = bias ? to_f(bias[o]) : 0.f;
#pragma unroll
      for (int row = 0; row < kRows; ++row) {
        if (row < rows) {
          const long long i = (n0 + row) * p.ldo + o;
          float v = p.s * a[row] + b;
          if (OM) v *= to_f(OM[i]);
          out[i] = from_f<T>(v);
        }
      }
    }
  }
}

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads) col_pass_kernel(BkColPass p) {
  __shared__ float qs[kNC][BK_THIN_MAX_RANK];
  const BkColTask& t = p.task[blockIdx.y];
  if (t.P == nullptr || static_cast<long long>(blockIdx.x) * kCols >= t.C) return;  // uniform per block
  const T* P = static_cast<const T*>(t.P);
  const T* PM = static_cast<const T*>(t.PM);
  const T* Q = static_cast<const T*>(t.Q);
  const int r = p.r;
  const int jc = (r + kJGroups - 1) / kJGroups;  // sums per thread
  const int jw = jc * kJGroups;                  // staged width (>= r, <= BK_THIN_MAX_RANK)
  const int c = blockIdx.x * kCols + threadIdx.x % kCols;
  const int j0 = (threadIdx.x / kCols) * jc;
  float acc[kJMax];
#pragma unroll
  for (int jj = 0; jj < kJMax; ++jj) acc[jj] = 0.f;
  for (int n0 = 0; n0 < p.N; n0 += kNC) {
#pragma unroll 8
    for (int i = threadIdx.x; i < kNC * jw; i += kThreads) {
      const int nn = i / jw, j = i % jw;
      qs[nn][j] = (n0 + nn < p.N && j < r) ? to_f(Q[static_cast<long long>(n0 + nn) * r + j]) : 0.f;
    }
    float pv[kNC];
#pragma unroll
    for (int nn = 0; nn < kNC; ++nn) {
      const long long i = static_cast<long long>(n0 + nn) * t.ldp + c;
      pv[nn] = (c < t.C && n0 + nn < p.N) ? masked<T>(to_f(P[i]), PM, i) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int nn = 0; nn < kNC; ++nn) {
#pragma unroll
      for (int jj = 0; jj < kJMax; ++jj)
        if (jj < jc) acc[jj] = fmaf(pv[nn], qs[nn][j0 + jj], acc[jj]);
    }
    __syncthreads();
  }
  if (c >= t.C) return;
  TA* dst = static_cast<TA*>(t.dst);
#pragma unroll
  for (int jj = 0; jj < kJMax; ++jj) {
    const int j = j0 + jj;
    if (jj < jc && j < r) dst[c * t.oc + j * t.oj] = from_f<TA>(p.s * acc[jj]);
  }
}

template <typename T, typename TA>
int launch_rows(const BkRowPass& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.N + kRows - 1) / kRows);
  const size_t smem = sizeof(float) * row_smem_floats(p.r);
  row_pass_kernel<T, TA><<<blocks, kThreads, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename TA>
int launch_cols(const BkColPass& p, cudaStream_t stream) {
  const int C = p.task[0].C > p.task[1].C ? p.task[0].C : p.task[1].C;
  const dim3 grid(static_cast<unsigned>((C + kCols - 1) / kCols), 2);
  col_pass_kernel<T, TA><<<grid, kThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

int bad_dtypes() { return static_cast<int>(cudaErrorInvalidValue); }

}  // namespace

extern "C" int bk_lora_row_pass(const BkRowPass* p, int act, int ad, cudaStream_t stream) {
  if (p->r < 1 || p->r > BK_THIN_MAX_RANK || p->N < 1) return bad_dtypes();
  if (act == BK_THIN_BF16 && ad == BK_THIN_BF16) return launch_rows<__nv_bfloat16, __nv_bfloat16>(*p, stream);
  if (act == BK_THIN_BF16 && ad == BK_THIN_F32) return launch_rows<__nv_bfloat16, float>(*p, stream);
  if (act == BK_THIN_F16 && ad == BK_THIN_F16) return launch_rows<__half, __half>(*p, stream);
  if (act == BK_THIN_F16 && ad == BK_THIN_F32) return launch_rows<__half, float>(*p, stream);
  return bad_dtypes();
}

extern "C" int bk_lora_col_pass(const BkColPass* p, int act, int ad, cudaStream_t stream) {
  if (p->r < 1 || p->r > BK_THIN_MAX_RANK || p->N < 1) return bad_dtypes();
  if (act == BK_THIN_BF16 && ad == BK_THIN_BF16) return launch_cols<__nv_bfloat16, __nv_bfloat16>(*p, stream);
  if (act == BK_THIN_BF16 && ad == BK_THIN_F32) return launch_cols<__nv_bfloat16, float>(*p, stream);
  if (act == BK_THIN_F16 && ad == BK_THIN_F16) return launch_cols<__half, __half>(*p, stream);
  if (act == BK_THIN_F16 && ad == BK_THIN_F32) return launch_cols<__half, float>(*p, stream);
  return bad_dtypes();
}
