#!/usr/bin/env bash
# Is the down probe's switch inert on the GPU? (probe_inert.py, in a tree with the patch.)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S17=bench/results/h200-2026-12-01-s17; S=bench/results/h200-2026-12-01-s18
rm -rf ab_parts && mkdir ab_parts && git archive HEAD | tar -x -C ab_parts
cp -r $S ab_parts/$S
(cd ab_parts && git apply ../$S17/probe_down_parts.patch) || { echo "patch failed"; exit 1; }
rm -rf ab_parts/dmoe_triton/kernels && cp -r ab_parts/kernels ab_parts/dmoe_triton/kernels
(cd ab_parts && PYTHONPATH=$PWD timeout 200 python3 $S/probe_inert.py) > $OUT/1_inert.log 2>&1
rm -rf ab_parts
tail -n 30 $OUT/1_inert.log
