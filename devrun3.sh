#!/bin/bash
python3 -m pip install -q --no-index --no-deps --target /tmp/site ../../.whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
make -C native -j16 GENCODE=-gencode=arch=compute_90a,code=sm_90a > $OUT/gemm_build3.log 2>&1 || { tail -30 $OUT/gemm_build3.log; exit 1; }
timeout 120 python3 diag_sm90.py 2>&1 | tee $OUT/gemm_diag3.log | cut -c1-150
timeout 200 python3 -m pytest -q -m gpu tests/test_native_sm90.py 2>&1 | tee $OUT/gemm_test3.log | tail -4
for v in "128 64" "128 128" "192 64" "192 192" "256 64"; do set -- $v
  NUNCHAKU_LITE_WGMMA_BT=$1 NUNCHAKU_LITE_WGMMA_SUB=$2 timeout 100 python3 -m nunchaku_lite.bench kernels --no-legacy --quick --json $OUT/gemm_quick3_bt$1_s$2.json 2>&1 > $OUT/gemm_quick3_bt$1_s$2.log
  echo "BT=$1 SUB=$2"; grep -A4 "^sm_90" $OUT/gemm_quick3_bt$1_s$2.log | tail -2
done
timeout 240 python3 -m pytest -q -m gpu tests/test_native_gpu.py 2>&1 | tee $OUT/gemm_test_legacy3.log | tail -3
timeout 150 compute-sanitizer --tool memcheck python3 -m nunchaku_lite.bench smoke > $OUT/gemm_memcheck.log 2>&1; tail -3 $OUT/gemm_memcheck.log
