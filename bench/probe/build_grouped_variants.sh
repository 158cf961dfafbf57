#!/usr/bin/env bash
# Standalone builds of csrc/grouped.cu (with csrc/grouped_mma.cu, which its entry points call) with other launch
# macros, for bench/probe/grouped_cuda.py (no torch headers needed: runs on a machine with nvcc only; the libraries
# link the CUDA runtime statically).
# Usage: bench/probe/build_grouped_variants.sh [OUTDIR] [SET]   (default .build/variants; SET small (default): the
# CUDA-core kernels' macros (ranks <= 16), mma: csrc/grouped_mma.cu's (float32, ranks 17 to 64), wg: its wgmma
# kernels against its mma.sync ones, both for sm_90a; EXTRA="name=-DX=1,-DY=2 ...": more builds there)
#
# Tried on an H200 in session 8 and removed again (bench/results/logs/session8-grouped-*-2026-12-01.*): the Gram's
# triangle split over 2 or 4 warps per tile (0.079 - 0.15 ms against 0.072 with prefetch, r = 16 float32), a
# register cap by __launch_bounds__ (spills), tiles of 512 rows (no better); for the rescale four output columns
# per shared-memory read of T for all rows of a thread (0.115 - 0.216 ms against 0.103), the kept prefetch with
# two rows per step, 64 / 256 threads or 512-row tiles (0.101 - 0.166), rows of B through shared memory so that
# every warp access covers whole lines (0.104 - 0.145). The rescale's limit is not understood (ncu: ~60% of DRAM
# bandwidth at 20 - 22 warps per SM).
# Kept: the Gram's prefetch (BK_GRAM_PREFETCH) and, for float32 at rank block 16 only, the rescale's prefetch with
# one row per thread and step (BK_RESCALE_PREFETCH_F32_16; no_prefetch = both as before session 8).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="$(realpath -m "${1:-.build/variants}")"
SET="${2:-small}"
mkdir -p "$out"
build() {  # name, macros...
  local name="$1"; shift
  if ! nvcc -shared -Xcompiler -fPIC ${ARCH:--arch=sm_90} -O3 -std=c++17 -Xptxas -v "$@" csrc/grouped.cu \
      csrc/grouped_mma.cu -o "$out/$name.so" > "$out/$name.ptxas.txt" 2>&1; then
    cat "$out/$name.ptxas.txt" >&2
    echo "build of variant $name failed" >&2
    return 1
  fi
  if [ "${SET:-}" = mma ] || [ "${SET:-}" = wg ]; then
    echo "$name: $(grep -A3 'Compiling entry.*\(mma_.*Li64\|wg_\)' "$out/$name.ptxas.txt" | grep -o 'Used [0-9]* registers\|[0-9]* bytes spill stores' | tr '\n' ' ')"
    return 0
  fi
  echo "$name: gram f32 r16 $(grep -A3 'Compiling entry.*grouped_gram_kernelIfLi16' "$out/$name.ptxas.txt" | grep -o 'Used [0-9]* registers')," \
    "rescale f32 r16 $(grep -A3 'Compiling entry.*grouped_rescale_kernelIfLi16' "$out/$name.ptxas.txt" | grep -o 'Used [0-9]* registers')," \
    "spill stores $(grep -o '[0-9]* bytes spill stores' "$out/$name.ptxas.txt" | sort -un | tr '\n' ' ')"
}
pair() {  # two builds side by side (2 cores); fails when either does
  build "$1" $2 & local p=$!   # $2, $4: macro lists, split on spaces
  build "$3" $4
  wait "$p"
}
if [ "$SET" = wg ]; then
  # The Hopper image as the extension builds it (sm_90a, BK_SM90A): the build's kernels (default: wgmma at rank
  # block 64) against its mma.sync ones (sync, BK_MMA_WGMMA=0), and the same two of git ref BASE's sources
  # (base, base_sync; BASE unset: none)
  ARCH="-arch=sm_90a -DBK_SM90A"
  pair default "" sync -DBK_MMA_WGMMA=0
  # EXTRA="name=-DA=1,-DB=2 name2=...": more builds of the working tree (macros comma-separated; session 23's
  # float64 Gram and register-streaming rescale variants were built so: see its not-kept patch in bench/results/logs)
  for item in ${EXTRA:-}; do
    build "${item%%=*}" $(echo "${item#*=}" | tr ',' ' ')
  done
  if [ -n "${BASE:-}" ]; then
    src=$(mktemp -d)
    git archive "$BASE" csrc | tar -x -C "$src"
    (cd "$src" && pair base "" base_sync -DBK_MMA_WGMMA=0)
    rm -rf "$src"
  fi
  # (session 19, on an H100: gram2, two blocks per SM with three ring stages, 0.380 ms against 0.355 for the default
  # three with two at r = 64; session 21: the Gram's early refill and a warp-specialised Gram,
  # bench/results/logs/session21-gram-experiments-not-kept.patch; other variants in csrc/grouped_mma.cu's header)
  ls -la "$out"
  exit 0
fi
if [ "${2:-small}" = mma ]; then
  # (session 16: these and a split-once / ldmatrix version, since removed; csrc/grouped_mma.cu's header has the numbers)
  pair default "" mregs1 -DBK_MMA_RESCALE_MREGS=1
  pair split_cvt -DBK_MMA_SPLIT_CVT=1 stages4 -DBK_MMA_STAGES=4
  ls -la "$out"
  exit 0
fi
pair default "" no_prefetch "-DBK_GRAM_PREFETCH=0 -DBK_RESCALE_PREFETCH_F32_16=0 -DBK_RESCALE_UNROLL_F32_16=2"
pair rescale_u2 "-DBK_RESCALE_PREFETCH_F32_16=0 -DBK_RESCALE_UNROLL_F32_16=2" rescale_pf_u2 -DBK_RESCALE_UNROLL_F32_16=2
ls -la "$out"
