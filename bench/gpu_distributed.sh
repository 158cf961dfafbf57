#!/usr/bin/env bash
# Integration tests on the 2-GPU device kind (nvidia-h200-x2): the multi-process tests with NCCL on
# CUDA (and gloo on CPU), and the PEFT / Trainer integration tests with CUDA available.
#   device run, kind nvidia-h200-x2:  bash bench/gpu_distributed.sh
# Writes $OUT/log.txt (everything), $OUT/junit.xml, $OUT/dist_{gloo,nccl}.json (per-rank numbers).
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # keep NVLink multicast off
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-bench/results/gpu_distributed}
mkdir -p "$OUT"
export BALORA_DIST_KEEP="$OUT"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rA --durations=8 --junitxml "$OUT/junit.xml" \
    tests/test_distributed.py tests/test_integrations_peft.py tests/test_integrations_trainer.py
  rc=$?
  python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
for be in ("gloo", "nccl"):
    p = os.path.join(out, f"dist_{be}.json")
    if not os.path.exists(p):
        print(f"{be}: no results"); continue
    r0 = json.load(open(p))[0]
    print(f"{be:5s} torch {r0['torch']}: ddp bitwise={r0['ddp']['bitwise_equal']} proj={r0['ddp']['projections']} "
          f"gap_after={r0['ddp']['gap_after']:.2e}")
    for k in ("fsdp_long", "fsdp_default"):
        f = r0[k]
        print(f"      {k:12s} kinds={f['kinds']} collectives={ {c: n for c, n in f['collectives'].items() if n} } "
              f"proj_err={f['proj_err']:.2e} train_err={f['train_err']:.2e}")
    mp = r0["fsdp_mp"]
    print(f"      fsdp_mp      masters={mp['master_dtypes']} gap_after={mp['gap_after']:.2e} "
          f"product_err={mp['product_err']:.2e} bf16_copy_carries={mp['bf16_copy_carries']}")
    print(f"      layouts      err={r0['layouts']['err']:.2e}")
PY
  exit $rc
} 2>&1 | tee "$OUT/log.txt"
