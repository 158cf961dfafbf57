#!/usr/bin/env bash
# One device call (kind nvidia-h200) that checks and measures every kernel family on the final code:
# the GPU tests of the projection and LoRA-linear kernels, the projection benchmark, the rest of the
# suite with a GPU present, then the LoRA-linear benchmark. Writes $OUT/log.txt and the JSON results.
#   device run: bash bench/gpu_final.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/balora-out}
mkdir -p "$OUT"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "== GPU tests (projection, lora_linear)"
  timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests/test_projection_kernels.py tests/test_lora_linear_kernels.py
  echo "== projection benchmark"
  timeout 120 python3 bench/bench_projection.py --out "$OUT"
  echo "== the rest of the suite, GPU present"
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m "not gpu" -n 8 -rfE tests
  echo "== lora_linear benchmark"
  timeout 130 python3 bench/bench_lora_linear.py --out "$OUT"
  python3 -c "import balora_kernels, json; print(json.dumps(balora_kernels.backend_info(), default=str))"
} 2>&1 | tee "$OUT/log.txt"
