# Next device call for the two-loop (SPLIT) hang of bench/probe/wgmma_gemm.cu (docs/DEVLOG.md, session 30): each
# variant's checks in its own process with --diag (a wait that never ends traps and prints its barrier), then the
# variants that passed timed beside cuBLAS and the Triton GEMM. The library is built here and carried:
#   nvcc -gencode arch=compute_90a,code=sm_90a -O3 -std=c++17 -shared -Xcompiler -fPIC \
#        -o .bkcache/wgmma/wgmma_gemm.so bench/probe/wgmma_gemm.cu ;  device run, carry [".bkcache/wgmma"]:
#   bash bench/probe/wgmma_hang_tests.sh
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore BALORA_KERNELS_DISABLE_EXT=1
P="python3 -X faulthandler bench/probe/wgmma_gemm.py --lib .bkcache/wgmma/wgmma_gemm.so --out $OUT"
passed=""
for v in ${HANG_VARIANTS:-1114 1000114 2000114 3000114 4000114 1001114 2001114 3001114 4001114 1100114 1101114}; do
  echo "== $v"
  timeout -s ABRT 60 $P --diag --checks-only --variants "$v" 2>&1 | grep -v "^  checking" | tail -14
  [ "${PIPESTATUS[0]}" = 0 ] && passed="$passed $v"
done
echo "passed:$passed"
# shellcheck disable=SC2086
[ -n "$passed" ] && timeout -s ABRT 240 $P --variants $passed 2>&1 | grep -v "^grids\|^  checking" | tee $OUT/timing.txt
