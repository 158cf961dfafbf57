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
build gram_u16_1 -DBK_GRAM_UNROLL_16=1
build gram_w8 -DBK_GRAM_WARPS=8
build gram_w2 -DBK_GRAM_WARPS=2
build gram_us8 -DBK_GRAM_UNROLL_SMALL=8
build resc_t128 -DBK_RESCALE_THREADS=128
build resc_u1 -DBK_RESCALE_UNROLL_SMALL=1 -DBK_RESCALE_UNROLL_16=1
build resc_u8 -DBK_RESCALE_UNROLL_SMALL=8 -DBK_RESCALE_UNROLL_16=4
ls -la "$out"
