// The LoRA linear op with its autograd node in C++: `torch.ops.balora.lora_linear`.
//
//   y = x W^T + b + s ((x * m) A^T) B^T        x [N, in], W [out, in], b [out] or none,
//                                              A [r, in], B [out, r], m [N, in] or none
//
// Issued from C++: the forward is one Python -> C++ call and the backward none (the autograd engine
// runs it), which is what the op costs when the host, not the GPU, sets the pace (short sequences,
// small layers). `mode` picks how the products are issued (the Python implementations "ext",
// "ext_prefill", "ext_fused" in balora_kernels/ops/lora_linear.py, whose docstring of
// LoRALinearFunction gives the derivation):
//   0 (ext)          every product one cuBLAS call through ATen, the big GEMM written first;
//   1 (ext_prefill)  the same, the rank-r term written first and the big GEMM accumulating onto it;
//   2 (ext_fused)    mode 1's order, with the thin products done by the CUDA kernels of
//                    csrc/lora_thin.cu (one launch for u and the rank-r term, one for v and dx's
//                    rank-r part, one for dA and dB): three launches forward and backward fewer.
//                    It needs a CUDA build (BK_WITH_CUDA), CUDA bf16/fp16 activations, adapters in
//                    that dtype or fp32 and r <= 128; any other call runs mode 1 (same math).
//
//   u  = x_l A^T,  x_l = x * m                  (saved for backward with x and m; W, A, B by reference)
//   mode 0:     y = x W^T (+ b), then y += s u B^T (a K = r GEMM into y)
//   mode 1, 2:  y = s u B^T (+ b), then y += x W^T (the big GEMM accumulates, beta = 1)
//   v  = dy B
//   dB = s dy^T u,   dA = s v^T x_l              (alpha = s, in the adapters' dtypes)
//   dx = dy W + s (v A) * m                      (same two orders as the forward)
//   dW = dy^T x,     db = sum_n dy               (only when they require grad)
//
// Adapters may be float32 with 16-bit activations: they are cast to x's dtype for the products and
// their gradients come back in their own dtype (mode 2 reads them in their own dtype). Without
// BK_WITH_CUDA the file is pure ATen: it builds for CPU tensors, which is how CI tests it
// (tests/test_lora_linear_ext.py); BK_OP_NAMESPACE names the operator namespace (balora by default;
// the device probes in bench/probe/ build it under their own).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "messages.h"

#ifdef BK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "lora_thin.h"
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

void check_inputs(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& a,
                  const at::Tensor& b, const c10::optional<at::Tensor>& mask) {
  const char* op = "balora::lora_linear";
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

#ifdef BK_WITH_CUDA
int thin_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? BK_THIN_BF16 : t == at::kHalf ? BK_THIN_F16 : t == at::kFloat ? BK_THIN_F32 : -1;
}

void check_launch(int err, const char* pass, const at::Tensor& x, const at::Tensor& a) {
  TORCH_CHECK(err == 0, bk::msg("balora::lora_linear: the ", pass, " kernel failed for x ", x.sizes(), ", lora_A ",
                                a.sizes(), ": ", cudaGetErrorString(static_cast<cudaError_t>(err))));
}
#endif

// Whether mode 2 runs its CUDA kernels for these operands (else it runs mode 1's math).
bool fused_kernels(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B) {
#ifdef BK_WITH_CUDA
  const int act = thin_dtype(x.scalar_type()), ad = thin_dtype(lora_A.scalar_type());
  return x.is_cuda() && (act == BK_THIN_BF16 || act == BK_THIN_F16) && (ad == act || ad == BK_THIN_F32) &&
         lora_B.scalar_type() == lora_A.scalar_type() && x.size(0) > 0 && lora_A.size(0) <= BK_THIN_MAX_RANK;
#else
  (void)x, (void)lora_A, (void)lora_B;
  return false;
#endif
}

class LoRALinearFn : public torch::autograd::Function<LoRALinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, const c10::optional<at::Tensor>& mask,
                            int64_t mode) {
    const auto dt = x.scalar_type();
    const bool has_bias = bias.has_value() && bias->defined();
    const bool fused = mode == 2 && fused_kernels(x, lora_A, lora_B);
    at::Tensor xs = x, m = mask.has_value() ? *mask : at::Tensor(), u, y;
    if (fused) {
#ifdef BK_WITH_CUDA
      // u = x_l A^T and y = s u B^T + b in one launch (lora_thin.h), then y += x W^T (beta = 1).
      c10::cuda::CUDAGuard guard(x.device());
      xs = x.contiguous();
      if (m.defined()) m = m.contiguous();
      const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
      const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
      const int64_t N = x.size(0), K = x.size(1), O = weight.size(0), r = A.size(0);
      u = at::empty({N, r}, x.options());
      y = at::empty({N, O}, x.options());
      BkRowPass p{};
      p.X = xs.data_ptr(), p.XM = m.defined() ? m.data_ptr() : nullptr, p.ldx = K, p.N = N, p.K = K;
      p.rm = A.data_ptr(), p.rs_k = 1, p.rs_j = K, p.em = B.data_ptr(), p.es_o = r, p.es_j = 1;
      p.r = r, p.O = O, p.bias = has_bias ? b.data_ptr() : nullptr, p.OM = nullptr, p.ldo = O;
      p.s = static_cast<float>(scaling), p.t_out = u.data_ptr(), p.out = y.data_ptr();
      check_launch(bk_lora_row_pass(&p, thin_dtype(dt), thin_dtype(A.scalar_type()),
                                    c10::cuda::getCurrentCUDAStream(x.get_device())), "forward row pass", x, lora_A);
      y.addmm_(xs, weight.t());
#endif
    } else {
      const at::Tensor x_l = m.defined() ? x * m : x;
      u = at::mm(x_l, as_dtype(lora_A, dt).t());
      y = big_plus_lowrank(x, weight.t(), u, as_dtype(lora_B, dt).t(), scaling, bias, mode != 0);
    }
    ctx->save_for_backward({xs, u, weight, lora_A, lora_B, m});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["fused"] = fused;
    ctx->saved_data["has_bias"] = has_bias;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &u = saved[1], &weight = saved[2], &lora_A = saved[3], &lora_B = saved[4],
                     &m = saved[5];
    const double s = ctx->saved_data["scaling"].toDouble();
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const at::Tensor& dy = grads[0];
    // needs_input_grad counts tensor inputs only (x, weight, [bias], lora_A, lora_B, [mask]).
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t edge_a = has_bias ? 3 : 2, edge_b = edge_a + 1;
    const bool need_x = ctx->needs_input_grad(0), need_a = ctx->needs_input_grad(edge_a),
               need_b = ctx->needs_input_grad(edge_b);
    at::Tensor dx, dw, db, da, dbB;
    if (ctx->saved_data["fused"].toBool()) {
#ifdef BK_WITH_CUDA
      // v = dy B and dx = s (v A) * m in one launch, dA and dB in another, then dx += dy W (beta = 1).
      c10::cuda::CUDAGuard guard(x.device());
      const at::Tensor dyc = dy.contiguous(), A = lora_A.contiguous(), B = lora_B.contiguous();
      const int64_t N = x.size(0), K = x.size(1), O = weight.size(0), r = A.size(0);
      const int act = thin_dtype(x.scalar_type()), ad = thin_dtype(A.scalar_type());
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device());
      const at::Tensor v = at::empty({N, r}, x.options());
      if (need_x) dx = at::empty({N, K}, x.options());
      BkRowPass p{};
      p.X = dyc.data_ptr(), p.XM = nullptr, p.ldx = O, p.N = N, p.K = O;
      p.rm = B.data_ptr(), p.rs_k = r, p.rs_j = 1, p.em = A.data_ptr(), p.es_o = 1, p.es_j = K;
      p.r = r, p.O = K, p.bias = nullptr, p.OM = m.defined() ? m.data_ptr() : nullptr, p.ldo = K;
      p.s = static_cast<float>(s), p.t_out = v.data_ptr(), p.out = need_x ? dx.data_ptr() : nullptr;
      check_launch(bk_lora_row_pass(&p, act, ad, stream), "backward row pass", x, lora_A);
      if (need_a || need_b) {
        if (need_b) dbB = at::empty({O, r}, B.options());
        if (need_a) da = at::empty({r, K}, A.options());
        BkColPass c{};
        c.task[0] = need_b ? BkColTask{dyc.data_ptr(), nullptr, O, static_cast<int>(O), u.data_ptr(), dbB.data_ptr(), r, 1}
                           : BkColTask{};
        c.task[1] = need_a ? BkColTask{x.data_ptr(), m.defined() ? m.data_ptr() : nullptr, K, static_cast<int>(K),
                                       v.data_ptr(), da.data_ptr(), 1, K}
                           : BkColTask{};
        c.N = N, c.r = r, c.s = static_cast<float>(s);
        check_launch(bk_lora_col_pass(&c, act, ad, stream), "backward column pass", x, lora_A);
      }
      if (need_x) dx.addmm_(dyc, weight);
#endif
    } else {
      const auto dt = x.scalar_type();
      const at::Tensor a = as_dtype(lora_A, dt);
      const at::Tensor v = at::mm(dy, as_dtype(lora_B, dt));
      if (need_b) dbB = as_dtype(scaled_mm(dy.t(), u, s), lora_B.scalar_type());
      if (need_a) da = as_dtype(scaled_mm(v.t(), m.defined() ? x * m : x, s), lora_A.scalar_type());
      if (need_x) {
        if (!m.defined()) {
          dx = big_plus_lowrank(dy, weight, v, a, s, c10::nullopt, mode != 0);
        } else {  // the rank-r term is masked before the big GEMM accumulates onto it
          dx = at::addmm(at::mm(v, a).mul_(m), dy, weight, /*beta=*/s, /*alpha=*/1);
        }
      }
    }
    if (ctx->needs_input_grad(1)) dw = at::mm(dy.t(), x);
    if (has_bias && ctx->needs_input_grad(2)) db = dy.sum(0);
    return {dx, dw, db, da, dbB, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                       const c10::optional<at::Tensor>& dropout_mask, int64_t mode) {
  // Checked before the autograd node exists, so a bad call records nothing (messages: csrc/messages.h).
  check_inputs(x, weight, bias, lora_A, lora_B, dropout_mask);
  TORCH_CHECK(mode >= 0 && mode <= 2, bk::msg("balora::lora_linear: mode must be 0 (ext), 1 (ext_prefill) or 2 "
                                              "(ext_fused), got ", mode));
  return LoRALinearFn::apply(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, mode);
}

}  // namespace

// A function registered with m.def is the op's CompositeImplicitAutograd kernel: eager calls on any
// device run it, and the C++ autograd node above records the backward.
TORCH_LIBRARY_FRAGMENT(BK_OP_NAMESPACE, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "Tensor? dropout_mask, int mode) -> Tensor",
        &lora_linear);
}
