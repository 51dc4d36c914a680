#!/bin/bash
python3 -m pip install -q --no-index --no-deps --target /tmp/site ../../.whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
make -C native -j16 GENCODE=-gencode=arch=compute_90a,code=sm_90a > $OUT/gemm_build2.log 2>&1 || { tail -30 $OUT/gemm_build2.log; exit 1; }
timeout 150 python3 diag_sm90.py 2>&1 | tee $OUT/gemm_diag.log
timeout 200 python3 -m pytest -q -m gpu tests/test_native_sm90.py 2>&1 | tee $OUT/gemm_test2.log | grep -v "^tests.*Error\|^E \|^$" | tail -30
for v in "128 1" "128 0" "192 0"; do set -- $v
  NUNCHAKU_LITE_WGMMA_BT=$1 NUNCHAKU_LITE_WGMMA_PIPE=$2 timeout 100 python3 -m nunchaku_lite.bench kernels --no-legacy --quick --json $OUT/gemm_quick2_bt$1_p$2.json 2>&1 | tee $OUT/gemm_quick2_bt$1_p$2.log | grep -A4 "^sm_90" 
done
