// The LoRA linear op with its autograd node in C++: `torch.ops.balora.lora_linear`.
//
//   y = x W^T + b + s ((x * m) A^T) B^T        x [N, in], W [out, in], b [out] or none,
//                                              A [r, in], B [out, r], m [N, in] or none
//
// Every product is one cuBLAS call through ATen, issued from C++: the forward is one Python -> C++
// call and the backward none (the autograd engine runs it), which is what the op costs when the
// host, not the GPU, sets the pace (short sequences, small layers). The math is that of the Python
// implementations "cublas_mm" (prefill = false) and its prefilled variant (prefill = true) in
// balora_kernels/ops/lora_linear.py, whose docstring of LoRALinearFunction gives the derivation:
//
//   u  = x_l A^T,  x_l = x * m                  (saved for backward with x and m; W, A, B by reference)
//   prefill = false:  y = x W^T (+ b), then y += s u B^T (a K = r GEMM into y)
//   prefill = true:   y = s u B^T (+ b), then y += x W^T (the big GEMM accumulates, beta = 1)
//   v  = dy B
//   dB = s dy^T u,   dA = s v^T x_l              (alpha = s, in the adapters' dtypes)
//   dx = dy W + s (v A) * m                      (same two orders as the forward)
//   dW = dy^T x,     db = sum_n dy               (only when they require grad)
//
// Adapters may be float32 with 16-bit activations: they are cast to x's dtype for the products and
// their gradients come back in their own dtype. Pure ATen (no CUDA code): the same file builds for
// CPU tensors, which is how CI tests it (tests/test_lora_linear_ext.py); BK_OP_NAMESPACE names the
// operator namespace (balora by default; the device probes in bench/probe/ build it under their own).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "messages.h"

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

class LoRALinearFn : public torch::autograd::Function<LoRALinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, const c10::optional<at::Tensor>& mask,
                            bool prefill) {
    const auto dt = x.scalar_type();
    const at::Tensor m = mask.has_value() ? *mask : at::Tensor();
    const at::Tensor x_l = m.defined() ? x * m : x;
    const at::Tensor u = at::mm(x_l, as_dtype(lora_A, dt).t());
    at::Tensor y = big_plus_lowrank(x, weight.t(), u, as_dtype(lora_B, dt).t(), scaling, bias, prefill);
    ctx->save_for_backward({x, u, weight, lora_A, lora_B, m});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["prefill"] = prefill;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &u = saved[1], &weight = saved[2], &lora_A = saved[3], &lora_B = saved[4],
                     &m = saved[5];
    const double s = ctx->saved_data["scaling"].toDouble();
    const bool prefill = ctx->saved_data["prefill"].toBool();
    const at::Tensor& dy = grads[0];
    const auto dt = x.scalar_type();
    const at::Tensor a = as_dtype(lora_A, dt);
    const at::Tensor v = at::mm(dy, as_dtype(lora_B, dt));
    // needs_input_grad counts tensor inputs only (x, weight, [bias], lora_A, lora_B, [mask]).
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t edge_a = has_bias ? 3 : 2, edge_b = edge_a + 1;
    at::Tensor dx, dw, db, da, dbB;
    if (ctx->needs_input_grad(edge_b)) dbB = as_dtype(scaled_mm(dy.t(), u, s), lora_B.scalar_type());
    if (ctx->needs_input_grad(edge_a)) da = as_dtype(scaled_mm(v.t(), m.defined() ? x * m : x, s), lora_A.scalar_type());
    if (ctx->needs_input_grad(0)) {
      if (!m.defined()) {
        dx = big_plus_lowrank(dy, weight, v, a, s, c10::nullopt, prefill);
      } else {  // the rank-r term is masked before the big GEMM accumulates onto it
        dx = at::addmm(at::mm(v, a).mul_(m), dy, weight, /*beta=*/s, /*alpha=*/1);
      }
    }
    if (ctx->needs_input_grad(1)) dw = at::mm(dy.t(), x);
    if (has_bias && ctx->needs_input_grad(2)) db = dy.sum(0);
    return {dx, dw, db, da, dbB, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                       const c10::optional<at::Tensor>& dropout_mask, bool prefill) {
  // Checked before the autograd node exists, so a bad call records nothing (messages: csrc/messages.h).
  check_inputs(x, weight, bias, lora_A, lora_B, dropout_mask);
  return LoRALinearFn::apply(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, prefill);
}

}  // namespace

// A function registered with m.def is the op's CompositeImplicitAutograd kernel: eager calls on any
// device run it, and the C++ autograd node above records the backward.
TORCH_LIBRARY_FRAGMENT(BK_OP_NAMESPACE, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "Tensor? dropout_mask, bool prefill) -> Tensor",
        &lora_linear);
}
