// Probe (device): which ways of raising an error from an extension op crash torch 2.11 there.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <sstream>
#include <stdexcept>
#include <string>
namespace {
at::Tensor lit(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "literal only"); return x; }
at::Tensor dev(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "device ", x.device()); return x; }
at::Tensor i64(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "int ", x.dim()); return x; }
at::Tensor sizes(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "sizes ", x.sizes()); return x; }
at::Tensor tostr(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, std::string("to_string ") + std::to_string(x.dim())); return x; }
at::Tensor stdexc(const at::Tensor& x) { if (x.dim() != 99) throw std::runtime_error("std::runtime_error " + std::to_string(x.dim())); return x; }
at::Tensor valerr(const at::Tensor& x) { TORCH_CHECK_VALUE(x.dim() == 99, "value int ", x.dim()); return x; }
at::Tensor oss(const at::Tensor& x) { std::ostringstream s; s << "oss " << x.dim(); TORCH_CHECK(x.dim() == 99, s.str()); return x; }
}
TORCH_LIBRARY_FRAGMENT(bkprobe, m) {
  m.def("lit(Tensor x) -> Tensor", &lit); m.def("dev(Tensor x) -> Tensor", &dev); m.def("i64(Tensor x) -> Tensor", &i64);
  m.def("sizes(Tensor x) -> Tensor", &sizes); m.def("tostr(Tensor x) -> Tensor", &tostr);
  m.def("stdexc(Tensor x) -> Tensor", &stdexc); m.def("valerr(Tensor x) -> Tensor", &valerr); m.def("oss(Tensor x) -> Tensor", &oss);
}
