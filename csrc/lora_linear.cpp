// The LoRA linear op with its autograd node in C++: `torch.ops.balora.lora_linear`.
//
//   y = x W^T + b + s ((x * m) A^T) B^T        x [N, in], W [out, in], b [out] or none,
//                                              A [r, in], B [out, r], m [N, in] or none
//
// The forward is one Python -> C++ call and the backward none (the autograd engine runs it), which is what
// the op costs when the host, not the GPU, sets the pace (short sequences, small layers). The math is that of
// LoRALinearFunction in balora_kernels/ops/lora_linear.py, whose docstring gives the derivation:
//
//   u  = x_l A^T,  x_l = x * m                  (saved for backward with x and m; W, A, B by reference)
//   y  = x W^T (+ b) + s u B^T
//   v  = dy B
//   dB = s dy^T u,   dA = s v^T x_l              (in the adapters' dtypes)
//   dx = dy W + s (v A) * m
//   dW = dy^T x,     db = sum_n dy               (only when they require grad)
//
// Six modes (`mode`), the Python implementations "ext", "ext_prefill", "ext_thin", "ext_allthin", "ext_triton",
// "ext_triton_thin":
//   0  every product one cuBLAS call through ATen; the big GEMM first, then the rank-r term by a K = r GEMM
//      into its output;
//   1  the same, the other order: the rank-r term (+ b) first, then the big GEMM accumulates onto it (beta = 1);
//   2  mode 1's order with the rank-r terms of y and dx on csrc/lora_thin.cu's kernels (each one launch writing its
//      output once), u too under dropout (its row kernel reads the mask); the two big GEMMs, v, dB, dA and u
//      without dropout stay on cuBLAS (faster there than the row kernel at every measured size). For CUDA tensors in
//      bfloat16 / float16 with r <= 128, in builds with the CUDA sources (BK_WITH_CUDA_THIN); other calls run
//      mode 1 (thin_kernels_apply says which), and so does a backward with create_graph (the kernels are not
//      differentiable).
//   3  mode 2 with dB and dA also on csrc/lora_thin.cu's kernels, both in one launch (where mode 2 makes two cuBLAS
//      calls: less host time, for few tokens): the two big GEMMs, v and u without dropout on cuBLAS; same conditions.
//   4  mode 1's products with y and dx each by one launch of the Triton TMA GEMM that the Python side compiled and
//      registered (`lora_gemm_kernel_register`; csrc/triton_gemm.h): the rank-r term in its accumulator, the output
//      written once, no Python per launch. The op's `gemm` names the registered kernels [forward without bias,
//      forward with bias, backward]; a product whose kernel is missing (-1), or whose operands the kernel cannot
//      address as they are (not CUDA 16-bit, a weight that is not row-major, x, y, dy, dx or A with rows not 16-byte
//      aligned, an empty or over 2^31 - 1 size, another device), and dx under dropout or with create_graph, runs mode
//      1's cuBLAS calls. The ids must come from ops/lora_linear.py's ext_gemm_kernels (for x's dtype and device): the
//      op checks that they were registered, not which slot or dtype they were compiled for.
//   5  mode 4's GEMMs with every rank-r product on csrc/lora_thin.cu's kernels, each one launch: u and v by the row
//      kernel, dB and dA by the col kernel (mode 3's), where mode 4 makes four cuBLAS calls. cuBLAS is faster on the
//      GPU (the row kernel: 19 us against 5 for u at 1024 x 4096, r = 16, on the H200) but costs the host ~15-50 us
//      a call there (heuristics, split-K's second launch) against ~5 for a launch: for few tokens, where the host
//      sets the pace. Under the thin kernels' conditions (mode 2's), else mode 4; dx under dropout as mode 3.
//
// Adapters may be float32 with 16-bit activations: they are cast to x's dtype for the products and their
// gradients come back in their own dtype. Without BK_WITH_CUDA_THIN this file is pure ATen and builds for CPU
// tensors, which is how CI tests it (tests/test_lora_linear_ext.py); BK_OP_NAMESPACE names the operator
// namespace (balora by default; the device probes in bench/probe/ build it under their own).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "messages.h"
#include "triton_gemm.h"

#ifdef BK_WITH_CUDA_THIN
// csrc/lora_thin.cu (the stream is a cudaStream_t; this file includes no CUDA header).
extern "C" {
int bk_thin_max_rank();
int bk_thin_row_launch(int dtype, const void* g, long long ldg, const void* m, long long ldm, const void* f,
                       long long f_sj, long long f_sk, void* out, long long N, long long K, int r, void* stream);
int bk_thin_lowrank_launch(int dtype, const void* p, long long ldp, const void* q, long long q_sj, long long q_sc,
                           const void* bias, const void* m, long long ldm, void* out, long long ldo, float s,
                           long long N, long long C, int r, void* stream);
int bk_thin_col_launch(int dtype, long long N, int r, float s,
                       const void* g0, long long ldg0, const void* m0, long long ldm0, const void* p0, long long ldp0,
                       void* out0, long long o_sc0, long long o_sj0, int out_f32_0, long long C0,
                       const void* g1, long long ldg1, const void* m1, long long ldm1, const void* p1, long long ldp1,
                       void* out1, long long o_sc1, long long o_sj1, int out_f32_1, long long C1, void* stream);
const char* bk_thin_error_string(int err);
}
#endif

#ifndef BK_OP_NAMESPACE
#define BK_OP_NAMESPACE balora
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// s * (a @ b) as one cuBLAS call: alpha = s, beta = 0 (the 0-dim input is never read).
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double s) {
  return at::addmm(at::empty({}, a.options()), a, b, /*beta=*/0, /*alpha=*/s);
}

// big + s * (p @ q) (+ bias), written once by each of two GEMMs, in either order (see the header).
at::Tensor big_plus_lowrank(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& p, const at::Tensor& q,
                            double s, const c10::optional<at::Tensor>& bias, bool prefill) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (prefill) {
    at::Tensor out = has_bias ? at::addmm(*bias, p, q, /*beta=*/1, /*alpha=*/s) : scaled_mm(p, q, s);
    return out.addmm_(x, wt);
  }
  at::Tensor out = has_bias ? at::addmm(*bias, x, wt) : at::mm(x, wt);
  return out.addmm_(p, q, /*beta=*/1, /*alpha=*/s);
}

// ---- mode 2: the rank-r products on csrc/lora_thin.cu's kernels ----------------------------------------------
// Whether a call with these operands runs them (else mode 1's cuBLAS products).
bool thin_kernels_apply(const at::Tensor& x, int64_t r) {
#ifdef BK_WITH_CUDA_THIN
  const auto dt = x.scalar_type();
  // (lowrank's grid has the row blocks of 64 on its y axis, at most 65535 of them)
  return x.is_cuda() && (dt == at::kBFloat16 || dt == at::kHalf) && r >= 1 && r <= bk_thin_max_rank() &&
         x.size(0) > 0 && x.size(0) <= 65535LL * 64;
#else
  (void)x;
  (void)r;
  return false;
#endif
}

#ifdef BK_WITH_CUDA_THIN
// A 2-D operand the kernels read: unit column stride (any row stride), else a contiguous copy.
at::Tensor rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }
int thin_dtype(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? 1 : 2; }
void* stream_of(const at::Tensor& t) {
  const auto impl = c10::impl::getDeviceGuardImpl(t.device().type());
  return impl->getStream(t.device()).native_handle();
}
void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, bk::msg("balora::lora_linear: the ", what, " kernel failed to launch: ",
                                bk_thin_error_string(err)));
}

// [N, r] = (g * m) f^T for f [r, K] (any strides with one unit stride): u = x_l A^T, or v = dy B with f = B^T and no
// mask (modes 2 and 3 take it for u under dropout only, cuBLAS being faster on the GPU; mode 5 for u and v).
at::Tensor thin_row(const at::Tensor& g, const at::Tensor& m, const at::Tensor& f) {
  const int64_t r = f.size(0);
  at::Tensor out = at::empty({g.size(0), r}, g.options());
  const at::Tensor fr = (f.stride(0) == 1 || f.stride(1) == 1) ? f : f.contiguous();
  check_launch(bk_thin_row_launch(thin_dtype(g), g.data_ptr(), g.stride(0), m.defined() ? m.data_ptr() : nullptr,
                                  m.defined() ? m.stride(0) : 0, fr.data_ptr(), fr.stride(0), fr.stride(1),
                                  out.data_ptr(), g.size(0), g.size(1), (int)r, stream_of(g)),
               "row (u = x_l A^T, v = dy B)");
  return out;
}

// [N, C] = (s p q (+ bias)) * m for p [N, r], q [r, C] (any strides with one unit stride).
at::Tensor thin_lowrank(const at::Tensor& p, const at::Tensor& q, double s, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& m) {
  const int64_t C = q.size(1);
  at::Tensor out = at::empty({p.size(0), C}, p.options());
  const at::Tensor qr = (q.stride(0) == 1 || q.stride(1) == 1) ? q : q.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  check_launch(bk_thin_lowrank_launch(thin_dtype(p), p.data_ptr(), p.stride(0), qr.data_ptr(), qr.stride(0),
                                      qr.stride(1), has_bias ? b.data_ptr() : nullptr,
                                      m.defined() ? m.data_ptr() : nullptr, m.defined() ? m.stride(0) : 0,
                                      out.data_ptr(), out.stride(0), (float)s, p.size(0), C, (int)p.size(1),
                                      stream_of(p)),
               "rank-r term (s u B^T, s v A)");
  return out;
}

// The reductions over the tokens in one launch: dB = s dy^T u [out, r] (when need_b) and dA = s v^T x_l [r, in]
// (when need_a), each in its adapter's dtype (float32 accumulation; adapters in another dtype than x are written
// in float32 and cast).
std::pair<at::Tensor, at::Tensor> thin_col_grads(const at::Tensor& dy, const at::Tensor& u, const at::Tensor& x,
                                                 const at::Tensor& m, const at::Tensor& v, double s, bool need_b,
                                                 bool need_a, at::ScalarType b_dt, at::ScalarType a_dt) {
  const auto dt = dy.scalar_type();
  const int64_t N = dy.size(0), r = u.size(1);
  auto out_for = [&](at::ScalarType want, std::initializer_list<int64_t> shape) {
    return at::empty(shape, dy.options().dtype(want == dt ? dt : at::kFloat));
  };
  at::Tensor db = need_b ? out_for(b_dt, {dy.size(1), r}) : at::Tensor();
  at::Tensor da = need_a ? out_for(a_dt, {r, x.size(1)}) : at::Tensor();
  const at::Tensor g_b = need_b ? rows(dy) : at::Tensor(), g_a = need_a ? rows(x) : at::Tensor();
  const at::Tensor m_a = need_a && m.defined() ? rows(m) : at::Tensor();
  struct Problem {
    const void *g = nullptr, *m = nullptr, *p = nullptr;
    long long ldg = 0, ldm = 0, ldp = 0, o_sc = 0, o_sj = 0, C = 0;
    void* out = nullptr;
    int f32 = 0;
  } pb[2];
  int n = 0;
  // (an empty side, out or in = 0, has an empty gradient and no problem in the launch)
  if (need_b && g_b.size(1) > 0)   // dB(c, j) at c * r + j
    pb[n++] = {g_b.data_ptr(), nullptr, u.data_ptr(), g_b.stride(0), 0, u.stride(0), r, 1, g_b.size(1),
               db.data_ptr(), db.scalar_type() == at::kFloat};
  if (need_a && g_a.size(1) > 0)   // dA(j, c) at j * in + c
    pb[n++] = {g_a.data_ptr(), m_a.defined() ? m_a.data_ptr() : nullptr, v.data_ptr(), g_a.stride(0),
               m_a.defined() ? m_a.stride(0) : 0, v.stride(0), 1, g_a.size(1), g_a.size(1), da.data_ptr(),
               da.scalar_type() == at::kFloat};
  if (n > 0)
    check_launch(bk_thin_col_launch(thin_dtype(dy), N, (int)r, (float)s,
                                    pb[0].g, pb[0].ldg, pb[0].m, pb[0].ldm, pb[0].p, pb[0].ldp, pb[0].out,
                                    pb[0].o_sc, pb[0].o_sj, pb[0].f32, pb[0].C,
                                    pb[1].g, pb[1].ldg, pb[1].m, pb[1].ldm, pb[1].p, pb[1].ldp, pb[1].out,
                                    pb[1].o_sc, pb[1].o_sj, pb[1].f32, pb[1].C, stream_of(dy)),
                 "adapter gradients (dB = s dy^T u, dA = s v^T x)");
  return {need_b ? as_dtype(db, b_dt) : db, need_a ? as_dtype(da, a_dt) : da};
}
#endif

// ---- mode 4: the Triton TMA GEMM, compiled in Python, launched from here (csrc/triton_gemm.h) ------------------
// Registered kernels: filled once each, then read by any thread (an entry is written before the count exposes it).
constexpr int64_t kMaxGemmKernels = 256;
bk_tg_kernel g_gemm_kernels[kMaxGemmKernels];
std::atomic<int64_t> g_gemm_count{0};
std::mutex g_gemm_mutex;

// desc: function, device, num_warps, shared, block_m, block_n, block_r, elem_size, has_bias, backward, then per
// operand (x, w, p, q, out) swizzle, box rows, box columns, then the number of parameters and their codes. Returns
// the kernel's id.
int64_t lora_gemm_kernel_register(at::IntArrayRef desc) {
  const char* op = "balora::lora_gemm_kernel_register";
#ifndef BK_WITH_CUDA_THIN
  TORCH_CHECK(false, bk::msg(op, ": this build has no CUDA sources (the Triton GEMM runs on CUDA tensors only)"));
#endif
  constexpr int64_t head = 10 + 3 * BK_TG_OPERANDS + 1;
  TORCH_CHECK(desc.size() >= (size_t)head && desc[head - 1] >= 0 && desc[head - 1] <= BK_TG_MAX_PARAMS &&
                  desc.size() == (size_t)(head + desc[head - 1]),
              bk::msg(op, ": a description of ", head, " values and then as many parameter codes as it says (at most ",
                      (int64_t)BK_TG_MAX_PARAMS, "), got ", (int64_t)desc.size(), " values"));
  bk_tg_kernel k{};
  k.function = (unsigned long long)desc[0];
  k.device = (int)desc[1];
  k.num_warps = (int)desc[2];
  k.shared = (int)desc[3];
  k.block_m = (int)desc[4];
  k.block_n = (int)desc[5];
  k.block_r = (int)desc[6];
  k.elem_size = (int)desc[7];
  k.has_bias = (int)desc[8];
  k.backward = (int)desc[9];
  for (int i = 0; i < BK_TG_OPERANDS; ++i) {
    k.swizzle[i] = (int)desc[10 + 3 * i];
    k.box[i][0] = (int)desc[11 + 3 * i];
    k.box[i][1] = (int)desc[12 + 3 * i];
  }
  k.n_params = (int)desc[head - 1];
  for (int j = 0; j < k.n_params; ++j) k.param[j] = (int)desc[head + j];
  TORCH_CHECK(k.function != 0 && k.num_warps > 0 && k.block_m > 0 && k.block_n > 0 && k.block_r > 0 &&
                  k.elem_size == 2,
              bk::msg(op, ": not a loaded kernel of 16-bit operands (function, warps, tiles, element size)"));
  std::lock_guard<std::mutex> lock(g_gemm_mutex);
  const int64_t id = g_gemm_count.load();
  TORCH_CHECK(id < kMaxGemmKernels, bk::msg(op, ": ", kMaxGemmKernels, " kernels are registered already"));
  g_gemm_kernels[id] = k;
  g_gemm_count.store(id + 1, std::memory_order_release);
  return id;
}

// The registered kernel gemm[which], or null when the list has no such entry or it is -1.
const bk_tg_kernel* gemm_kernel(at::IntArrayRef gemm, size_t which) {
  if (which >= gemm.size() || gemm[which] < 0) return nullptr;
  TORCH_CHECK(gemm[which] < g_gemm_count.load(std::memory_order_acquire),
              bk::msg("balora::lora_linear: gemm kernel ", gemm[which], " was never registered"));
  return &g_gemm_kernels[gemm[which]];
}

// A 2-D tensor a tensor map can address as it is: unit column stride, rows apart, 16-byte aligned start and rows.
bool tma_ready(const at::Tensor& t) {
  return t.dim() == 2 && t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1)) &&
         (t.stride(0) * t.element_size()) % 16 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// out [M, N] = a w' + s p q' (+ bias) by the registered kernel k, where the forward's kernel reads w [N, K] and
// q [N, r] transposed (the weight and B as stored) and the backward's w [K, N] and q [r, N] (the weight and A);
// p [M, r]. p and a q with rows of r values are copied into zero-padded rows of the kernel's rank block when their
// rows are not 16-byte aligned. An undefined tensor when the kernel cannot take the operands (the caller runs
// cuBLAS instead).
at::Tensor gemm_by_kernel(const bk_tg_kernel* k, const at::Tensor& a, const at::Tensor& w, at::Tensor p,
                          at::Tensor q, double s, const c10::optional<at::Tensor>& bias) {
#ifdef BK_WITH_CUDA_THIN
  if (k == nullptr || !a.is_cuda() || at::GradMode::is_enabled()) return at::Tensor();
  const auto dt = a.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kHalf) || p.scalar_type() != dt || q.scalar_type() != dt ||
      w.scalar_type() != dt)
    return at::Tensor();
  const bool fwd = k->backward == 0;
  const int64_t M = a.size(0), K = a.size(1), N = fwd ? w.size(0) : w.size(1), r = p.size(1);
  const int64_t lim = INT32_MAX;
  if (M == 0 || N == 0 || K == 0 || M > lim || N > lim || K > lim || a.get_device() != k->device) return at::Tensor();
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(has_bias == (k->has_bias != 0) && r <= k->block_r,
              bk::msg("balora::lora_linear: registered gemm kernel for ", k->has_bias ? "a" : "no", " bias and rank <= ",
                      k->block_r, " given ", has_bias ? "a" : "no", " bias and rank ", r));
  at::Tensor out = at::empty({M, N}, a.options());
  if (!tma_ready(a) || !tma_ready(w) || !tma_ready(out)) return at::Tensor();
  const int64_t br = k->block_r;
  auto padded = [&](const at::Tensor& t) {   // [n, r] -> [n, br], zeros past column r
    at::Tensor z = at::zeros({t.size(0), br}, t.options());
    z.narrow(1, 0, t.size(1)).copy_(t);
    return z;
  };
  if (!tma_ready(p)) p = padded(p);
  if (!tma_ready(q)) q = fwd ? padded(q) : q.contiguous();
  if (!tma_ready(q)) return at::Tensor();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  c10::DeviceGuard guard(a.device());
  const bk_tg_operand ops[BK_TG_OPERANDS] = {
      {a.data_ptr(), a.size(0), a.size(1), a.stride(0)},   {w.data_ptr(), w.size(0), w.size(1), w.stride(0)},
      {p.data_ptr(), p.size(0), p.size(1), p.stride(0)},   {q.data_ptr(), q.size(0), q.size(1), q.stride(0)},
      {out.data_ptr(), out.size(0), out.size(1), out.stride(0)}};
  const int err = bk_tg_launch(k, thin_dtype(a), ops, has_bias ? b.data_ptr() : nullptr, M, N, K, (float)s,
                               stream_of(a));
  TORCH_CHECK(err == 0, bk::msg("balora::lora_linear: the Triton GEMM failed to launch: ", bk_tg_error_string(err)));
  return out;
#else
  (void)k, (void)a, (void)w, (void)p, (void)q, (void)s, (void)bias;
  return at::Tensor();
#endif
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && a.dim() == 2 && b.dim() == 2, bk::msg(op,
              ": x, weight, lora_A, lora_B must be 2-D, got ", x.sizes(), ", ", w.sizes(), ", ", a.sizes(), ", ",
              b.sizes()));
  const int64_t in_f = x.size(1), out_f = w.size(0), r = a.size(0);
  TORCH_CHECK(w.size(1) == in_f && a.size(1) == in_f && b.size(0) == out_f && b.size(1) == r, bk::msg(op,
              ": shapes do not chain: x ", x.sizes(), ", weight ", w.sizes(), ", lora_A ", a.sizes(), ", lora_B ",
              b.sizes()));
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), bk::msg(op, ": weight dtype ", w.scalar_type(), " != x dtype ",
              x.scalar_type()));
  TORCH_CHECK(w.device() == x.device() && a.device() == x.device() && b.device() == x.device(), bk::msg(op,
              ": operands must be on x's device ", x.device(), ", got weight ", w.device(), ", lora_A ", a.device(),
              ", lora_B ", b.device()));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_f && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                bk::msg(op, ": bias must be [", out_f, "] in x's dtype on x's device, got ", bias->sizes(), " ",
                        bias->scalar_type(), " on ", bias->device()));
  }
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->sizes() == x.sizes() && mask->scalar_type() == x.scalar_type() && mask->device() == x.device(),
                bk::msg(op, ": dropout mask must match x (", x.sizes(), ", ", x.scalar_type(), ", ", x.device(),
                        "), got ", mask->sizes(), " ", mask->scalar_type(), " on ", mask->device()));
  }
}

// Which gradients a backward forms: dx, dW, db, dA, dB (the op's input order, bias before the adapters).
using Needs = std::array<bool, 5>;
using Grads = std::array<at::Tensor, 5>;

// The backward's products in `mode` (after the forward's fallback: 2, 3 and 5 only where the thin kernels apply);
// a gradient not needed is an undefined tensor. dB and dA come back in the adapters' dtypes. With create_graph
// (grad mode on) the gradients must be differentiable: the kernels of modes 2 to 5 are not, so their products
// run mode 1's ATen ones then, and u is recomputed from x (and m) and A (the saved u is a constant to autograd,
// so dB's graph would not reach them).
Grads backward_products(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& u, const at::Tensor& weight,
                        const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& m, double s,
                        int64_t mode, const Needs& need, const bk_tg_kernel* dx_kernel = nullptr) {
  if (mode >= 2 && at::GradMode::is_enabled()) mode = 1;
  const auto dt = x.scalar_type();
  const at::Tensor a = as_dtype(lora_A, dt);
  const bool need_x = need[0], need_a = need[3], need_b = need[4];
  const bool need_v = need_x || need_a;   // v = dy B
  at::Tensor dx, dw, db, da, dbB;
  if (mode == 2 || mode == 3 || mode == 5) {
#ifdef BK_WITH_CUDA_THIN
    c10::DeviceGuard guard(x.device());
    // v by cuBLAS in modes 2 and 3 (as u, forward), by the row kernel in mode 5 (one launch: less host time)
    const at::Tensor b = as_dtype(lora_B, dt);
    const at::Tensor v = !need_v    ? at::Tensor()
                         : mode == 5 ? thin_row(rows(dy), at::Tensor(), b.t())
                                     : at::mm(dy, b);
    if (mode >= 3) {
      std::tie(dbB, da) = thin_col_grads(dy, rows(u), x, m, v, s, need_b, need_a, lora_B.scalar_type(),
                                         lora_A.scalar_type());
    } else {
      if (need_b) dbB = as_dtype(scaled_mm(dy.t(), u, s), lora_B.scalar_type());
      if (need_a) da = as_dtype(scaled_mm(v.t(), m.defined() ? x * m : x, s), lora_A.scalar_type());
    }
    if (need_x && mode == 5 && !m.defined()) dx = gemm_by_kernel(dx_kernel, dy, weight, v, a, s, c10::nullopt);
    if (need_x && !dx.defined())
      dx = thin_lowrank(v, a, s, c10::nullopt, m.defined() ? rows(m) : m).addmm_(dy, weight);
#endif
  } else {
    const at::Tensor v = need_v ? at::mm(dy, as_dtype(lora_B, dt)) : at::Tensor();
    if (need_b) {
      const at::Tensor u_b = at::GradMode::is_enabled() ? at::mm(m.defined() ? x * m : x, a.t()) : u;
      dbB = as_dtype(scaled_mm(dy.t(), u_b, s), lora_B.scalar_type());
    }
    if (need_a) da = as_dtype(scaled_mm(v.t(), m.defined() ? x * m : x, s), lora_A.scalar_type());
    if (need_x && mode == 4 && !m.defined()) dx = gemm_by_kernel(dx_kernel, dy, weight, v, a, s, c10::nullopt);
    if (need_x && !dx.defined()) {
      if (!m.defined()) {
        dx = big_plus_lowrank(dy, weight, v, a, s, c10::nullopt, mode >= 1);
      } else {  // the rank-r term is masked before the big GEMM accumulates onto it
        dx = at::addmm(at::mm(v, a).mul_(m), dy, weight, /*beta=*/s, /*alpha=*/1);
      }
    }
  }
  if (need[1]) dw = at::mm(dy.t(), x);
  if (need[2]) db = dy.sum(0);
  return {dx, dw, db, da, dbB};
}

class LoRALinearFn : public torch::autograd::Function<LoRALinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, const c10::optional<at::Tensor>& mask,
                            int64_t mode, at::IntArrayRef gemm) {
    const auto dt = x.scalar_type();
    const at::Tensor m = mask.has_value() ? *mask : at::Tensor();
    const bool thin = (mode == 2 || mode == 3 || mode == 5) && thin_kernels_apply(x, lora_A.size(0));
    const bool has_bias = bias.has_value() && bias->defined();
    const at::Tensor a = as_dtype(lora_A, dt), b = as_dtype(lora_B, dt);
    at::Tensor u, y;
    if (thin) {
#ifdef BK_WITH_CUDA_THIN
      c10::DeviceGuard guard(x.device());
      // u by cuBLAS without a mask in modes 2 and 3 (the row kernel took 19 us where cuBLAS takes 5 at 1024 x 4096,
      // r = 16, and 42 against 21 at 8192 tokens on the H200); with one, and always in mode 5 (one launch where
      // cuBLAS costs the host ~40 us), the row kernel, which reads the mask (x * m never formed).
      u = m.defined() || mode == 5 ? thin_row(rows(x), m.defined() ? rows(m) : m, a) : at::mm(x, a.t());
      if (mode == 5) y = gemm_by_kernel(gemm_kernel(gemm, has_bias ? 1 : 0), x, weight, u, b, scaling, bias);
      if (!y.defined()) y = thin_lowrank(u, b.t(), scaling, bias, at::Tensor()).addmm_(x, weight.t());
#endif
    } else {
      u = at::mm(m.defined() ? x * m : x, a.t());
      if (mode >= 4) y = gemm_by_kernel(gemm_kernel(gemm, has_bias ? 1 : 0), x, weight, u, b, scaling, bias);
      if (!y.defined()) y = big_plus_lowrank(x, weight.t(), u, b.t(), scaling, bias, mode >= 1);
    }
    ctx->save_for_backward({x, u, weight, lora_A, lora_B, m});
    ctx->saved_data["scaling"] = scaling;
    // (mode 5 without the thin kernels keeps mode 4's GEMMs)
    ctx->saved_data["mode"] = thin ? mode : mode >= 4 ? 4 : std::min<int64_t>(mode, 1);
    ctx->saved_data["dx_kernel"] = mode >= 4 && gemm.size() > 2 ? gemm[2] : (int64_t)-1;
    ctx->saved_data["has_bias"] = has_bias;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts tensor inputs only (x, weight, [bias], lora_A, lora_B, [mask]).
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t edge_a = has_bias ? 3 : 2;
    Grads g = backward_products(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                ctx->saved_data["scaling"].toDouble(), ctx->saved_data["mode"].toInt(),
                                {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                 has_bias && ctx->needs_input_grad(2), ctx->needs_input_grad(edge_a),
                                 ctx->needs_input_grad(edge_a + 1)},
                                gemm_kernel({ctx->saved_data["dx_kernel"].toInt()}, 0));
    return {g[0], g[1], g[2], g[3], g[4], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                       const c10::optional<at::Tensor>& dropout_mask, int64_t mode, at::IntArrayRef gemm) {
  // Checked before the autograd node exists, so a bad call records nothing (messages: csrc/messages.h).
  TORCH_CHECK(mode >= 0 && mode <= 5, bk::msg("balora::lora_linear: mode must be 0 (ext), 1 (ext_prefill), 2 ",
                                              "(ext_thin), 3 (ext_allthin), 4 (ext_triton) or 5 (ext_triton_thin), ",
                                              "got ", mode));
  check_inputs("balora::lora_linear", x, weight, bias, lora_A, lora_B, dropout_mask);
  TORCH_CHECK(gemm.size() <= 3, bk::msg("balora::lora_linear: gemm names at most 3 kernels (forward without bias, ",
                                        "forward with bias, backward), got ", (int64_t)gemm.size()));
  for (size_t i = 0; i < gemm.size(); ++i) gemm_kernel(gemm, i);   // (an unregistered id fails here, first)
  return LoRALinearFn::apply(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, mode, gemm);
}

// The backward's products alone, for a forward run elsewhere (the Python implementation "triton_ext": the
// Triton forward, then this backward in one call): u = (x * m) A^T as that forward saved it, the gradients
// needed as [dx, dW, db, dA, dB] (undefined, None in Python, where not needed). Modes as the op's (2 and 3 run
// mode 1 where the thin kernels do not apply). Meant to be called with grad mode off, as inside a backward: with it
// on (a direct call from Python, or a backward with create_graph) the products are mode 1's differentiable ATen
// ones with u recomputed from x (and m) and A, the given u unread (see backward_products). Checked first; nothing
// is written on an error.
std::vector<at::Tensor> lora_linear_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
                                             const at::Tensor& weight, const at::Tensor& lora_A,
                                             const at::Tensor& lora_B, double scaling,
                                             const c10::optional<at::Tensor>& dropout_mask, bool need_x,
                                             bool need_weight, bool need_bias, bool need_lora_A, bool need_lora_B,
                                             int64_t mode) {
  const char* op = "balora::lora_linear_backward";
  TORCH_CHECK(mode >= 0 && mode <= 3, bk::msg(op, ": mode must be 0 (ext), 1 (ext_prefill), 2 (ext_thin) or 3 ",
                                              "(ext_allthin), got ", mode));
  check_inputs(op, x, weight, c10::nullopt, lora_A, lora_B, dropout_mask);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0) &&
                  grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              bk::msg(op, ": grad_y must be [", x.size(0), ", ", weight.size(0), "] in x's dtype on x's device, got ",
                      grad_y.sizes(), " ", grad_y.scalar_type(), " on ", grad_y.device()));
  TORCH_CHECK(u.dim() == 2 && u.size(0) == x.size(0) && u.size(1) == lora_A.size(0) &&
                  u.scalar_type() == x.scalar_type() && u.device() == x.device(),
              bk::msg(op, ": u must be [", x.size(0), ", ", lora_A.size(0), "] in x's dtype on x's device, got ",
                      u.sizes(), " ", u.scalar_type(), " on ", u.device()));
  if (mode >= 2 && !thin_kernels_apply(x, lora_A.size(0))) mode = 1;   // (as the op's forward falls back)
  const Grads g = backward_products(grad_y, x, u, weight, lora_A, lora_B,
                                    dropout_mask.has_value() ? *dropout_mask : at::Tensor(), scaling, mode,
                                    {need_x, need_weight, need_bias, need_lora_A, need_lora_B});
  return {g.begin(), g.end()};
}

// Whether modes 2, 3 and 5 run the thin kernels for this activation and rank (else mode 1's cuBLAS products, mode
// 4's for mode 5).
bool lora_linear_thin_kernels(const at::Tensor& x, int64_t r) { return thin_kernels_apply(x, r); }

}  // namespace

// A function registered with m.def is the op's CompositeImplicitAutograd kernel: eager calls on any
// device run it, and the C++ autograd node above records the backward.
TORCH_LIBRARY_FRAGMENT(BK_OP_NAMESPACE, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "Tensor? dropout_mask, int mode, int[] gemm=[]) -> Tensor",
        &lora_linear);
  m.def("lora_linear_backward(Tensor grad_y, Tensor x, Tensor u, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "float scaling, Tensor? dropout_mask, bool need_x, bool need_weight, bool need_bias, bool need_lora_A, "
        "bool need_lora_B, int mode) -> Tensor[]",
        &lora_linear_backward);
  m.def("lora_linear_thin_kernels(Tensor x, int r) -> bool", &lora_linear_thin_kernels);
  m.def("lora_gemm_kernel_register(int[] desc) -> int", &lora_gemm_kernel_register);
}
