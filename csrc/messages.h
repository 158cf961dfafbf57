// Error messages of the extension's ops, built from strings only.
//
// On the H200 machine (torch 2.11.0+cu130, g++ 13.3) streaming an integer into a std::ostream from inside
// this library crashed the process (segmentation fault; bench/probe/errors.py: TORCH_CHECK(cond, "int ", 1)
// and a plain std::ostringstream << 1 crashed, while string-only messages and c10::Device, formatted inside
// libc10, raised RuntimeError as they should). So every message piece is converted here, with
// std::to_string and c10's own formatting, and TORCH_CHECK receives one std::string.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <string>
#include <type_traits>

namespace bk {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string piece(T v) {
  return std::to_string(v);
}

template <typename... Parts>
std::string msg(const Parts&... parts) {
  std::string s;
  ((s += piece(parts)), ...);
  return s;
}

}  // namespace bk
