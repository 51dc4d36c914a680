#!/bin/bash
# device run: build (sm_90a), GPU tests of the wgmma GEMM, quick bench
set -x
python3 -m pip install -q --no-index --no-deps --target /tmp/site ../../.whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
make -C native -j16 GENCODE=-gencode=arch=compute_90a,code=sm_90a > $OUT/gemm_build.log 2>&1 || { tail -30 $OUT/gemm_build.log; exit 1; }
cuobjdump -sass nunchaku_lite/lib/libnunchaku_lite.so 2>/dev/null | awk '/Function : .*w4a4_fp8_kernelILi128E13__nv_bfloat16/{f=1;print;next} /Function :/{f=0} f' > $OUT/gemm_sass128.txt
grep -c HGMMA $OUT/gemm_sass128.txt; grep -n "HGMMA\|WARPGROUP\|SYNCS\|BAR" $OUT/gemm_sass128.txt | head -40
timeout 240 python3 -m pytest -x -q -m gpu tests/test_native_sm90.py 2>&1 | tee $OUT/gemm_test.log | tail -25
for bt in 128 192; do
  NUNCHAKU_LITE_WGMMA_BT=$bt timeout 150 python3 -m nunchaku_lite.bench kernels --no-legacy --quick --json $OUT/gemm_quick_bt$bt.json 2>&1 | tee $OUT/gemm_quick_bt$bt.log | tail -8
done
