#!/usr/bin/env bash
# Build check for csrc/ (CI, no GPU): compile every CUDA source for sm_90 with nvcc (the r x r kernels' for sm_80
# too, the wgmma kernels' file for sm_90a), and the host-side emulation of the kernel math with the host compiler.
# Fails on any compile error. Nothing is run.
# The .cu files need only the CUDA toolkit; bindings.cpp (torch side) is syntax-checked against torch's
# headers when torch and the CUDA toolkit's library headers (cusparse.h, ...) are present; lora_linear.cpp
# (pure ATen, and with -DBK_WITH_CUDA_THIN as the extension builds it) against torch's headers wherever torch
# is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for f in csrc/*.cu; do
  echo "nvcc -arch=sm_90 -c $f"
  "$NVCC" -arch=sm_90 -O3 -std=c++17 -Werror all-warnings -c "$f" -o "$out/$(basename "$f").o"
done
# The extension's Hopper image (sm_90a, BK_SM90A as in balora_kernels/_ext.py's flags): csrc/grouped_mma.cu's
# wgmma kernels exist only there.
echo "nvcc -arch=sm_90a -DBK_SM90A -c csrc/grouped_mma.cu"
"$NVCC" -arch=sm_90a -DBK_SM90A -O3 -std=c++17 -Werror all-warnings -c csrc/grouped_mma.cu -o "$out/grouped_mma.sm90a.o"
# The r x r kernels choose their float64 mma shape by architecture (m8n8k4 below sm_90, which the extension also
# builds for): those two files for sm_80 too.
for f in csrc/balance.cu csrc/balance_fixed.cu; do
  echo "nvcc -arch=sm_80 -c $f"
  "$NVCC" -arch=sm_80 -O3 -std=c++17 -Werror all-warnings -c "$f" -o "$out/$(basename "$f").sm80.o"
done
CXX="${CXX:-g++}"
echo "$CXX -DBK_HOST_EMULATION csrc/host_emulation.cc"
"$CXX" -O2 -std=c++17 -Wall -Werror -shared -fPIC -DBK_HOST_EMULATION csrc/host_emulation.cc -o "$out/libbk_host.so"
inc="$(python3 -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null || true)"
if [ -n "$inc" ]; then
  # csrc/lora_linear.cpp is pure ATen (no CUDA headers): checked against torch's headers wherever torch is.
  echo "$CXX -fsyntax-only csrc/lora_linear.cpp"
  # shellcheck disable=SC2086
  "$CXX" -std=c++20 -fsyntax-only $inc csrc/lora_linear.cpp
  echo "$CXX -fsyntax-only -DBK_WITH_CUDA_THIN csrc/lora_linear.cpp   (the extension's build, calling csrc/lora_thin.cu)"
  # shellcheck disable=SC2086
  "$CXX" -std=c++20 -fsyntax-only -Wall -Werror -DBK_WITH_CUDA_THIN $inc csrc/lora_linear.cpp
  cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
  [ -f "$cuda_inc/cuda_runtime_api.h" ] || cuda_inc="$(dirname "$(readlink -f "$(command -v "$NVCC")")")/../include"
  py_inc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  if [ ! -f "$cuda_inc/cusparse.h" ]; then
    echo "skip bindings.cpp syntax check: no CUDA math-library headers in $cuda_inc"; echo "csrc build check: OK"; exit 0
  fi
  echo "$CXX -fsyntax-only csrc/bindings.cpp"
  # shellcheck disable=SC2086
  "$CXX" -std=c++17 -fsyntax-only $inc -I"$cuda_inc" -I"$py_inc" -DTORCH_EXTENSION_NAME=_C csrc/bindings.cpp
fi
echo "csrc build check: OK"
