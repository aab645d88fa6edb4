#!/usr/bin/env bash
# A planned measurement call (not yet run), from the repository root on the device: the FP8
# kernels' scales loaded one step ahead (fp8_prefetch_scales.patch). Its GPU FP8 tests, then
# bench_moe --fp8 on main and on the patch, alternating, two rounds. Logs: $OUT/<n>_*.log.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-01-s17
rm -rf ab_fp8 && mkdir ab_fp8 && git archive HEAD | tar -x -C ab_fp8
(cd ab_fp8 && git apply ../$S/fp8_prefetch_scales.patch) || { echo "patch failed"; exit 1; }
rm -rf ab_fp8/dmoe_triton/kernels && cp -r ab_fp8/kernels ab_fp8/dmoe_triton/kernels
(cd ab_fp8 && PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -m gpu tests/test_fp8.py) \
  > $OUT/1_fp8_gpu_tests.log 2>&1
for i in 1 2; do
  timeout 150 python3 bench/bench_moe.py --fp8 --out $OUT/main$i > $OUT/2_main$i.log 2>&1
  (cd ab_fp8 && PYTHONPATH=$PWD timeout 150 python3 bench/bench_moe.py --fp8 --out $OUT/new$i) \
    > $OUT/3_new$i.log 2>&1
done
rm -rf ab_fp8
tail -n 2 $OUT/1_fp8_gpu_tests.log
for f in $OUT/main* $OUT/new*; do echo "== $f"; grep "^| " $f/moe_fp8.md | head -8; done
