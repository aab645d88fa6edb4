#!/usr/bin/env bash
# The next session's first measurement call (planned here, not yet run), from the repository
# root on the device, after the GPU smoke: the down probe's variants 5-7, the down-tables
# patch's GPU tests, and the down's launch shapes on main and with the tables. Logs go to
# $OUT/<n>_*.log (the device brings back 8 files of $OUT, in name order).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-01-s17
mk() {  # mk DIR PATCH: main with PATCH applied, kernels copied into the package
  rm -rf "$1" && mkdir "$1" && git archive HEAD | tar -x -C "$1"
  (cd "$1" && git apply "../$2") || { echo "patch $2 failed"; exit 1; }
  rm -rf "$1/dmoe_triton/kernels" && cp -r "$1/kernels" "$1/dmoe_triton/kernels"
}
mk ab_parts $S/probe_down_parts.patch
mk ab_tables $S/down_tables.patch
(cd ab_parts && PYTHONPATH=$PWD timeout 100 python3 $S/probe_down_parts.py quick) \
  > $OUT/1_probe_parts.log 2>&1
(cd ab_tables && PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -m gpu tests/test_moe.py \
  tests/test_fp8.py tests/test_gpu_model.py) > $OUT/2_tables_gpu_tests.log 2>&1
timeout 120 python3 $S/probe_down_configs.py > $OUT/3_configs_main.log 2>&1
(cd ab_tables && PYTHONPATH=$PWD timeout 120 python3 $S/probe_down_configs.py) \
  > $OUT/4_configs_tables.log 2>&1
rm -rf ab_parts ab_tables
tail -n 6 $OUT/1_probe_parts.log; tail -n 2 $OUT/2_tables_gpu_tests.log
tail -n 8 $OUT/3_configs_main.log $OUT/4_configs_tables.log
