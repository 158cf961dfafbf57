#!/usr/bin/env bash
# One device call (kind nvidia-h200) on the final code, most important first (a cut call still returns
# $OUT): the projection kernels' GPU tests and benchmark, `balora check`, `balora bench`, then the rest
# of the suite with a GPU present. (The LoRA-linear kernels' GPU tests and benchmark ran in their own
# call on the same code: bench/results/logs/lora_linear-2026-11-28.txt.)
#   device run: bash bench/gpu_final.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/balora-out}
mkdir -p "$OUT/bench"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "== GPU tests (projection)"
  # 36 tests took 123 s on the H200 host (a 120 s limit cut the 2026-11-28 run after 22): give them 240 s
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests/test_projection_kernels.py; echo "rc=$?"
  echo "== projection benchmark"
  timeout 150 python3 bench/bench_projection.py --quick --out "$OUT"; echo "rc=$?"
  echo "== balora check"
  timeout 45 python3 -m balora_kernels check --json "$OUT/check.json"; echo "rc=$?"
  echo "== balora bench"
  timeout 90 python3 -m balora_kernels bench --shapes llama2-7b --rank 16 --reps 10 --out "$OUT/bench" --no-plot; echo "rc=$?"
  echo "== the rest of the suite, GPU present"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m "not gpu" -n 12 -rfE tests; echo "rc=$?"
  python3 -c "import balora_kernels, json; print(json.dumps(balora_kernels.backend_info(), default=str))"
} 2>&1 | tee "$OUT/log.txt"
