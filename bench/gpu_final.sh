#!/usr/bin/env bash
# The GPU run of the final code, as two back-to-back device calls (kind nvidia-h200; each under the
# tool's 10-minute limit; the extension built by part 1 is reused by part 2 from .bkcache while the
# machine stays warm). Most important first in each (a cut call still returns $OUT).
#   device run: bash bench/gpu_final.sh 1    # build, LoRA-linear GPU tests + benchmark, projection GPU tests
#   device run: bash bench/gpu_final.sh 2    # projection benchmark, balora check / bench, the rest of the suite
#   device run: bash bench/gpu_final.sh proj # build, projection GPU tests + benchmark (projection-only changes)
#   device run: bash bench/gpu_final.sh projcheck # build, projection GPU tests, balora check (host-side csrc changes)
#   device run: bash bench/gpu_final.sh final # LoRA-linear GPU tests, projection benchmark, balora check (no build
#                                             # when .bkcache/prev is carried from a call run with SAVE_SO=1)
#   device run: bash bench/gpu_final.sh mmavar  # variants of the tensor-core Gram / rescale beside the build (carry
#                                            # .build/variants from bench/probe/build_grouped_variants.sh .build/variants
#                                            # mma, or wg) and ncu (kernels MMA_NCU_K, default regex:mma_) of variant
#                                            # MMA_ONCE (default: default), then the projection GPU tests
#                                            # selected by MMA_TESTS (a pytest -k expression; default the ones
#                                            # of the tensor-core kernels and the plan's choice of kernels)
#   device run: bash bench/gpu_final.sh mmafinal  # as mmavar (MMA_K_CHUNKS: the probe's tile sizes), then the
#                                            # projection GPU tests and benchmark (until MMAFINAL_END s, default 520)
#   device run: bash bench/gpu_final.sh lora # build (beside it the thin-kernel sweep of bench/probe/lora_profile.py),
#                                            # LoRA-linear GPU tests, GPU/host profile per implementation (LoRA-only changes)
#   device run: bash bench/gpu_final.sh loratests  # build, LoRA-linear GPU tests and the C++ op's tests only
#                                                  # (LORA_K=expr: only the GPU tests pytest -k expr selects)
#   device run: bash bench/gpu_final.sh lorabench  # then the LoRA benchmark (writes the tuning table), then (while
#                                                  # the call has time left) bench/probe/host_entry.py
#   device run: bash bench/gpu_final.sh thin # build, LoRA-linear GPU tests and the C++ op's tests, then (while the
#                                            # call has time left) the GPU/host profile per implementation; NCU_THIN=1:
#                                            # first ncu of csrc/lora_thin.cu's kernels (bench/probe/thin_once.py)
#                                            # after the tests bench/probe/host_entry.py; NO_PROFILE=1: no profile;
#                                            # PROJ_AFTER=1: then the projection GPU tests (while time is left).
#                                            # Run the benchmark and probes through this script (or export
#                                            # BALORA_KERNELS_CACHE_DIR=$PWD/.bkcache as it does): without it a
#                                            # new process JIT-builds the extension again (~220 s) elsewhere
#   device run: bash bench/gpu_final.sh grouped  # build, projection GPU tests, CUDA Gram/rescale probe (carry
#                                                # .build/variants from bench/probe/build_grouped_variants.sh),
#                                                # projection benchmark, balora check
#   device run: bash bench/gpu_final.sh probe    # build, the CUDA Gram/rescale probe only
#   device run: bash bench/gpu_final.sh gram     # CUDA Gram variants + ncu beside the build (carry .build/variants
#                                                # from bench/probe/build_grouped_variants.sh), then as "grouped"
#                                                # without its probe
#   device run: bash bench/gpu_final.sh tune64   # the Triton Gram / rescale at r = 64 (fp32, bf16): the kernels of
#                                                # git ref BASE (default HEAD: run it before committing the change;
#                                                # git archive, no extension) beside the working tree's, then the
#                                                # working tree's launch-parameter search (bench/tune_projection.py)
#   device run: bash bench/gpu_final.sh setup    # the extension built by `python3 setup.py build_ext --inplace` (log:
#                                                # $OUT/setup_build.log; the library returned in $OUT/so/so_part_*, its
#                                                # name and checksum in $OUT/so/meta),
#                                                # projection benchmark, balora check, then (while the call has time
#                                                # left) the LoRA GPU tests selected by LORA_K
#   device run: bash bench/gpu_final.sh suite    # the whole test suite, GPU tests included, in one pytest run
#                                                # (-n SUITE_WORKERS processes, default 8, when pytest-xdist is
#                                                # installed; junit XML in $OUT), on the prebuilt library when
#                                                # balora_kernels/_C*.so is carried (put together from a setup call's
#                                                # parts), else on a JIT build; with SUITE_END (s) the suite
#                                                # stops by then and bench/probe/projection_after_steps.py follows
#   device run: bash bench/gpu_final.sh rxr      # the r x r kernel's phase probe and launch variants (carry
#                                                # .bkcache/eig_phases from bench/probe/eig_phases.py --build-only,
#                                                # run beside the build; NCU_TRITON=1: then ncu of the Triton Gram
#                                                # and rescale at r = 64), then as "grouped" without its probe
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore BALORA_KERNELS_CACHE_DIR=$PWD/.bkcache PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/balora-out}
PART=${1:-1}
mkdir -p "$OUT/bench"
# The extension's slowest object (balance.cuda.o, ~3 min of nvcc) is reused from .bkcache/prev (carried from an
# earlier call's $OUT/prev) when csrc/balance.cu and balance_math.cuh are unchanged: ninja then rebuilds only the
# rest. Nothing is reused otherwise (a plain JIT build).
balance_sha() { cat csrc/balance.cu csrc/balance_math.cuh | sha256sum | cut -c1-64; }
seed_build() {
  # A whole library built by an earlier call of the same sources, torch and flags (.bkcache/prev/so_part_*, so.sha
  # and build_tag, returned by a call run with SAVE_SO=1) is used as it is: no build at all on a fresh machine.
  local t; t=$(python3 -c "from balora_kernels import _ext; print(_ext._build_tag())")
  [ -n "$t" ] || return 0
  if [ -f .bkcache/prev/so_part_00 ] && [ "$(cat .bkcache/prev/build_tag 2>/dev/null)" = "$t" ] &&
     [ ! -e ".bkcache/$t/balora_kernels_C.so" ]; then
    # (a part lost on the way back, or a cut copy, is caught by the checksum: then a plain build)
    mkdir -p ".bkcache/$t" && cat .bkcache/prev/so_part_* > ".bkcache/$t/so.tmp" &&
      [ "$(sha256sum < ".bkcache/$t/so.tmp" | cut -c1-64)" = "$(cat .bkcache/prev/so.sha 2>/dev/null)" ] &&
      mv ".bkcache/$t/so.tmp" ".bkcache/$t/balora_kernels_C.so" && echo "reusing .bkcache/prev's library ($t)" &&
      return 0
    rm -f ".bkcache/$t/so.tmp"; echo "not reusing .bkcache/prev's library: its parts do not add up"
  fi
  [ -f .bkcache/prev/balance.cuda.o ] && [ "$(cat .bkcache/prev/balance.sha 2>/dev/null)" = "$(balance_sha)" ] || return 0
  local d=.bkcache/$t
  [ -e "$d/balora_kernels_C.so" ] && return 0
  mkdir -p "$d" && cp .bkcache/prev/balance.cuda.o .bkcache/prev/.ninja_log .bkcache/prev/.ninja_deps "$d/" || return 0
  touch -d 2020-01-01 csrc/balance.cu csrc/balance_math.cuh   # older than the object: ninja keeps it
  python3 -c "import os, sys; m = [l.split() for l in open(sys.argv[1] + '/.ninja_log') if l.split()[3:4] == ['balance.cuda.o']][-1][2]; os.utime(sys.argv[1] + '/balance.cuda.o', ns=(int(m), int(m)))" "$d" || true
  echo "seeded $d with balance.cuda.o from .bkcache/prev"
}
save_build() {
  local d; d=.bkcache/$(python3 -c "from balora_kernels import _ext; print(_ext._build_tag())")
  mkdir -p "$OUT/prev"
  if [ -n "${SAVE_SO:-}" ] && [ -f "$d/balora_kernels_C.so" ] &&
     [ "$(stat -c %s "$d/balora_kernels_C.so")" -le $((45 * 1024 * 1024)) ]; then
    # The whole library, in parts under the 16 MiB a returned file may have (the call returns at most 8 files:
    # this replaces the balance.cuda.o seed), with its checksum
    split -b 15M -d "$d/balora_kernels_C.so" "$OUT/prev/so_part_" && basename "$d" > "$OUT/prev/build_tag" &&
      sha256sum < "$d/balora_kernels_C.so" | cut -c1-64 > "$OUT/prev/so.sha"
    return 0
  fi
  cp "$d/balance.cuda.o" "$d/.ninja_log" "$d/.ninja_deps" "$OUT/prev/" 2>/dev/null && balance_sha > "$OUT/prev/balance.sha"
}
projection_tests() {
  echo "== GPU tests (projection)"
  timeout 260 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests/test_projection_kernels.py; echo "rc=$?"
}
lora_tests() {   # time limit (s) of the kernels' tests (LORA_K: only the GPU tests that pytest -k LORA_K selects)
  echo "== GPU tests (LoRA linear: every implementation, the C++ op included)${LORA_K:+ selected by -k $LORA_K}"
  timeout "$1" python3 -m pytest -q -p no:cacheprovider -m gpu -rfE ${LORA_K:+-k "$LORA_K"} \
    tests/test_lora_linear_kernels.py; echo "rc=$?"
  timeout 60 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_lora_linear_ext.py; echo "rc=$?"
}
projection_bench_check() {
  echo "== projection benchmark"
  timeout 240 python3 bench/bench_projection.py --quick --out "$OUT"; echo "rc=$?"
  echo "== balora check"
  timeout 60 python3 -m balora_kernels check --json "$OUT/check.json" | tail -3; echo "rc=$?"
}
seed_build
{
  if [ "$PART" = gram ] && [ -d .build/variants ]; then   # GPU-only probe (no extension needed), beside the build
    { timeout 150 python3 bench/probe/grouped_cuda.py --variants .build/variants --ranks 8,16 --out "$OUT"
      echo "probe rc=$?"
      for v in default no_prefetch; do
        timeout 40 ncu --clock-control none -k regex:grouped_ --section SpeedOfLight --section Occupancy \
          --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats \
          python3 bench/probe/grouped_cuda.py --variants .build/variants --once $v > "$OUT/ncu_$v.txt" 2>&1
      done; } > "$OUT/grouped_probe.log" 2>&1 &
    probe_pid=$!
  fi
  if { [ "$PART" = mmavar ] || [ "$PART" = mmafinal ]; } && [ -d .build/variants ]; then   # GPU-only probe, beside
    { timeout 240 python3 bench/probe/grouped_cuda.py --variants .build/variants --ranks 32,64 --dtypes float32 \
        --k-chunks "${MMA_K_CHUNKS:-1024,2048}" --out "$OUT"
      echo "probe rc=$?"
      timeout 60 ncu --clock-control none -k ${MMA_NCU_K:-regex:mma_} --section SpeedOfLight --section Occupancy \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis \
        python3 bench/probe/grouped_cuda.py --variants .build/variants --once ${MMA_ONCE:-default} --once-rank 64 \
        --once-k-chunk 2048 > "$OUT/ncu_mma.txt" 2>&1
      echo "ncu rc=$?"; } > "$OUT/grouped_probe.log" 2>&1 &
    probe_pid=$!
  fi
  if [ "$PART" = rxr ] && [ -d .bkcache/eig_phases ]; then   # GPU-only probes, beside the CPU-bound build
    { timeout 150 python3 bench/probe/eig_phases.py --lib .bkcache/eig_phases --ranks 16,48,64,128 --pairs 224,112 \
        --json "$OUT/eig_phases.json" > "$OUT/eig_phases.log" 2>&1
      echo "eig_phases.py rc=$?" >> "$OUT/eig_phases.log"
      if [ -n "${NCU_TRITON:-}" ]; then   # the Triton Gram and rescale at r = 64 under ncu (no extension needed)
        for dt in float32 bfloat16; do
          BALORA_KERNELS_DISABLE_EXT=1 timeout 100 ncu --clock-control none -k 'regex:_gram_partial_kernel|_rescale_kernel' \
            --launch-skip 2 --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats \
            --section MemoryWorkloadAnalysis --section LaunchStats python3 bench/probe/triton_once.py --rank 64 \
            --dtype $dt > "$OUT/ncu_triton_r64_$dt.txt" 2>&1
        done
      fi; } &
    probe_pid=$!
  fi
  if [ "$PART" = lora ]; then   # GPU-bound thin-kernel sweep (no extension needed), beside the CPU-bound build
    { mkdir -p "$OUT/thin" && timeout 240 python3 bench/probe/lora_profile.py --no-ext --cases none \
        --out "$OUT/thin" > "$OUT/thin/thin.log" 2>&1
      echo "lora_profile.py (thin sweep) rc=$?" >> "$OUT/thin/thin.log"; } &
    probe_pid=$!
  fi
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  if [ "$PART" = setup ]; then   # as `pip install --no-build-isolation .` builds it (MAX_JOBS: ninja's parallelism)
    echo "== python3 setup.py build_ext --inplace"
    MAX_JOBS=${MAX_JOBS:-16} /usr/bin/time -f "setup.py build_ext: %e s" python3 setup.py build_ext --inplace \
      > "$OUT/setup_build.log" 2>&1; echo "rc=$?"
    tail -2 "$OUT/setup_build.log"; ls -l balora_kernels/_C*.so
  fi
  if [ "$PART" != tune64 ]; then   # (tune64 times Triton kernels only)
    /usr/bin/time -f "extension ready in %e s" python3 -c "from balora_kernels import _ext; _ext.load(); print('extension:', _ext.how(), _ext.error())"
  fi
  if [ "$PART" = lora ]; then
    lora_tests 220
    echo "== thin-kernel sweep (ran beside the build)"
    [ -n "${probe_pid:-}" ] && wait "$probe_pid"; cat "$OUT/thin/thin.log"
    echo "== GPU kernels and host time per implementation"
    timeout 150 python3 bench/probe/lora_profile.py --no-thin --out "$OUT" \
      --cases ${LORA_CASES:-8k_4096x4096_r16,8k_4096to11008_r16,8k_11008to4096_r16,8k_4096x4096_r64}; echo "rc=$?"
  elif [ "$PART" = loratests ]; then
    lora_tests 400
  elif [ "$PART" = thin ]; then
    echo "== GPU tests (LoRA linear: every implementation, ext_thin's kernels included)"
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests/test_lora_linear_kernels.py; echo "rc=$?"
    timeout 60 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_lora_linear_ext.py; echo "rc=$?"
    if [ -n "${NCU_THIN:-}" ]; then   # 8192 x 4096 -> 4096, r = 16: u, y, v, dx kernels of the second call
      timeout 120 ncu --clock-control none -k 'regex:row_kernel|lowrank_kernel' --launch-skip 4 --launch-count 4 \
        --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section LaunchStats python3 bench/probe/thin_once.py > "$OUT/ncu_thin.txt" 2>&1
      echo "ncu rc=$?"; grep -E "row_kernel|lowrank_kernel|Duration|DRAM Throughput|Achieved Occupancy" "$OUT/ncu_thin.txt" | head -24
    fi
    echo "== host time per entry point (1024 tokens, bench/probe/host_entry.py)"
    timeout 90 python3 bench/probe/host_entry.py --out "$OUT"; echo "rc=$?"
    if [ -n "${PROJ_AFTER:-}" ]; then
      if [ "$SECONDS" -lt 320 ]; then projection_tests; else echo "(projection tests skipped: ${SECONDS} s used)"; fi
    fi
    if [ -z "${NO_PROFILE:-}" ] && [ "$SECONDS" -lt 390 ]; then
      echo "== GPU kernels and host time per implementation"
      timeout $((540 - SECONDS)) python3 bench/probe/lora_profile.py --no-thin --out "$OUT" \
        --cases ${LORA_CASES:-8k_4096x4096_r16,1k_4096x4096_r16,8k_4096to11008_r16,8k_4096x4096_r64}; echo "rc=$?"
    else
      echo "(profile skipped: ${SECONDS} s used)"
    fi
  elif [ "$PART" = lorabench ]; then
    echo "== LoRA linear benchmark (writes the tuning table)"
    # (the call's 600 s include a fresh machine's build, ~210-235 s; save_build needs ~30 s at the end)
    left=$((560 - SECONDS)); [ "$left" -gt 60 ] || left=60   # (timeout 0 would mean no limit)
    timeout $left python3 bench/bench_lora_linear.py --out "$OUT" --write-tuning; echo "rc=$?"
    cp balora_kernels/ops/lora_linear_tuning.json "$OUT/" 2>/dev/null
    if [ "$SECONDS" -lt 500 ]; then   # with the table just written (its "plan (auto)" line)
      echo "== host time per entry point (1024 tokens, bench/probe/host_entry.py)"
      timeout $((560 - SECONDS)) python3 bench/probe/host_entry.py; echo "rc=$?"   # (> 60 s left here)
    else
      echo "(host_entry.py skipped: ${SECONDS} s used)"
    fi
  elif [ "$PART" = grouped ]; then
    projection_tests
    echo "== CUDA Gram / rescale against Triton, launch variants"
    timeout 150 python3 bench/probe/grouped_cuda.py --variants .build/variants --out "$OUT"; echo "rc=$?"
    projection_bench_check
  elif [ "$PART" = rxr ]; then
    echo "== r x r kernel: phases and launch variants (bench/probe/eig_phases.py)"
    if [ -n "${probe_pid:-}" ]; then wait "$probe_pid"; echo "rc=$?"; cat "$OUT/eig_phases.log"
    else echo "(not run: no probe builds in .bkcache/eig_phases)"; fi
    projection_tests
    projection_bench_check
  elif [ "$PART" = gram ]; then
    echo "== CUDA Gram variants (bench/probe/grouped_cuda.py, beside the build) and ncu"
    [ -n "${probe_pid:-}" ] && wait "$probe_pid"   # (its rc is the last ncu run's; the probe's own is in the log)
    sed -n '/GPU ms/,$p' "$OUT/grouped_probe.log"
    projection_tests
    projection_bench_check
  elif [ "$PART" = tune64 ]; then
    cases=gram:float32:64,rescale:float32:64,gram:bfloat16:64,rescale:bfloat16:64
    base=${BASE:-HEAD}
    rm -rf /tmp/bk_head && mkdir -p /tmp/bk_head && git archive "$base" | tar -x -C /tmp/bk_head
    cp bench/tune_projection.py /tmp/bk_head/bench/    # this tree's script (--cases) on the base's package
    echo "== $base ($(git rev-parse --short "$base")): Triton Gram / rescale at r = 64 (its launch parameters only)"
    (cd /tmp/bk_head && BALORA_KERNELS_DISABLE_EXT=1 PYTHONPATH=/tmp/bk_head timeout 150 python3 bench/tune_projection.py \
      --cases "$cases" --budget-s 0 --out "$OUT/head"); echo "rc=$?"
    echo "== the working tree's, then its launch-parameter search (per case)"
    BALORA_KERNELS_DISABLE_EXT=1 timeout 330 python3 bench/tune_projection.py --cases "$cases" --budget-s 60 \
      --out "$OUT"; echo "rc=$?"
  elif [ "$PART" = probe ]; then
    echo "== CUDA Gram / rescale against Triton, launch variants"
    timeout 150 python3 bench/probe/grouped_cuda.py --variants .build/variants --out "$OUT"; echo "rc=$?"
  elif [ "$PART" = mmavar ]; then
    echo "== GPU tests (projection: ${MMA_TESTS:=mma or kernels_option or extension_errors})"
    timeout 260 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests/test_projection_kernels.py -k "$MMA_TESTS"
    echo "rc=$?"
    echo "== tensor-core Gram / rescale variants (bench/probe/grouped_cuda.py, beside the build) and ncu"
    [ -n "${probe_pid:-}" ] && wait "$probe_pid"
    sed -n '/GPU ms/,$p' "$OUT/grouped_probe.log"
    grep -E "mma_|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Compute \(SM\) Throughput|Issue Slots Busy" \
      "$OUT/ncu_mma.txt" | head -40
  elif [ "$PART" = mmafinal ]; then
    [ -n "${probe_pid:-}" ] && wait "$probe_pid"
    projection_tests
    echo "== projection benchmark"
    left=$((${MMAFINAL_END:-520} - SECONDS)); [ "$left" -gt 60 ] || left=60
    timeout $left python3 bench/bench_projection.py --quick --out "$OUT"; echo "rc=$?"
    echo "== tensor-core Gram / rescale variants (bench/probe/grouped_cuda.py, beside the build) and ncu"
    sed -n '/GPU ms/,$p' "$OUT/grouped_probe.log"
    grep -E "mma_|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy" "$OUT/ncu_mma.txt" | head -20
  elif [ "$PART" = final ]; then   # (a build first, when no library is carried: ~175 s of the call's 600)
    lora_tests 200
    if [ "$SECONDS" -lt 300 ]; then projection_bench_check; else echo "(benchmark skipped: ${SECONDS} s used)"; fi
  elif [ "$PART" = setup ]; then
    projection_bench_check
    so=$(ls balora_kernels/_C*.so 2>/dev/null | head -1)
    if [ -n "$so" ]; then   # (at most 3 parts of 15 MiB come back: 8 files per call)
      mkdir -p "$OUT/so" && split -b 15M -d "$so" "$OUT/so/so_part_" &&
        { basename "$so"; sha256sum < "$so" | cut -c1-64; } > "$OUT/so/meta"; ls -l "$OUT/so"
    fi
    if [ "$SECONDS" -lt 450 ]; then
      lora_tests $((540 - SECONDS))
    else
      echo "(LoRA GPU tests skipped: ${SECONDS} s used)"
    fi
  elif [ "$PART" = suite ]; then
    echo "== the whole test suite (pytest tests, GPU tests included)"
    xd=""; python3 -c "import xdist" 2>/dev/null && xd="-n ${SUITE_WORKERS:-8}"
    timeout $((${SUITE_END:-570} - SECONDS)) python3 -m pytest -q -p no:cacheprovider -rfEs $xd --durations=25 \
      --junitxml="$OUT/junit.xml" tests; echo "rc=$?"
    python3 -c "import balora_kernels, json; print(json.dumps(balora_kernels.backend_info(), default=str))"
    if [ -n "${SUITE_END:-}" ] && [ "$SECONDS" -lt $((SUITE_END + 10)) ]; then   # then, in the time left
      echo "== projection after optimizer-like updates (bench/probe/projection_after_steps.py)"
      timeout $((SUITE_END + 80 - SECONDS)) python3 bench/probe/projection_after_steps.py --out "$OUT"; echo "rc=$?"
    fi
  elif [ "$PART" = projcheck ]; then
    projection_tests
    echo "== balora check"
    timeout 60 python3 -m balora_kernels check --json "$OUT/check.json" | tail -3; echo "rc=$?"
  elif [ "$PART" = proj ]; then
    projection_tests
    echo "== projection benchmark"
    timeout 240 python3 bench/bench_projection.py --quick --out "$OUT"; echo "rc=$?"
  elif [ "$PART" = 1 ]; then
    lora_tests 150
    echo "== LoRA linear benchmark (writes the tuning table)"
    timeout 200 python3 bench/bench_lora_linear.py --out "$OUT" --write-tuning; echo "rc=$?"
    cp balora_kernels/ops/lora_linear_tuning.json "$OUT/" 2>/dev/null
    echo "== GPU tests (projection)"
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests/test_projection_kernels.py; echo "rc=$?"
  else
    echo "== projection benchmark"
    timeout 220 python3 bench/bench_projection.py --quick --out "$OUT"; echo "rc=$?"
    echo "== balora check"
    timeout 45 python3 -m balora_kernels check --json "$OUT/check.json"; echo "rc=$?"
    echo "== balora bench"
    timeout 80 python3 -m balora_kernels bench --shapes llama2-7b --rank 16 --reps 10 --out "$OUT/bench" --no-plot; echo "rc=$?"
    echo "== the rest of the suite, GPU present"
    timeout 170 python3 -m pytest -q -p no:cacheprovider -m "not gpu" -n 12 -rfE tests; echo "rc=$?"
    python3 -c "import balora_kernels, json; print(json.dumps(balora_kernels.backend_info(), default=str))"
  fi
} 2>&1 | tee "$OUT/log.txt"
save_build
