#!/usr/bin/env bash
# Standalone builds of csrc/grouped.cu with other launch macros, for bench/probe/grouped_cuda.py (no torch
# headers needed: runs on a machine with nvcc only; the libraries link the CUDA runtime statically).
# Usage: bench/probe/build_grouped_variants.sh [OUTDIR]   (default .build/variants)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-.build/variants}"
mkdir -p "$out"
build() {  # name, macros...
  local name="$1"; shift
  nvcc -shared -Xcompiler -fPIC -arch=sm_90 -O3 -std=c++17 "$@" csrc/grouped.cu -o "$out/$name.so"
}
build default
build gram_w4 -DBK_GRAM_WARPS=4
build resc_f32_t256 -DBK_RESCALE_THREADS_F32=256
ls -la "$out"
