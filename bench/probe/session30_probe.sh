# Session 30's device call for bench/probe/wgmma_gemm.{cu,py} (the library built here and carried: .bkcache/wgmma).
# BALORA_KERNELS_DISABLE_EXT: the probe needs no extension (no JIT build); SIGABRT at the timeout: faulthandler
# prints where Python was.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore BALORA_KERNELS_DISABLE_EXT=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
P="python3 -X faulthandler bench/probe/wgmma_gemm.py --lib .bkcache/wgmma/wgmma_gemm.so"
mkdir -p $OUT/coop $OUT/ping
date; timeout -s ABRT ${T1:-150} $P --out $OUT/coop --variants 1114 1001114 1001104 1001214 2>&1 \
  | tee $OUT/coop/probe.txt | grep -v "^grids\|checking"
date; timeout -s ABRT ${T2:-150} $P --out $OUT/ping --variants 1001114 1101114 1100114 1101104 1101214 2>&1 \
  | tee $OUT/ping/probe.txt | grep -v "^grids\|checking"
date
