#!/usr/bin/env bash
# The 21st session's third call, from the repository root on the device:
#   STOP_AT=640 bash bench/results/h200-2026-12-02-s21/call_c.sh
# On the landed skinny router GEMM: the unmarked tests that run on CUDA and cover it (test_skinny,
# test_router: ties through skinny_gemm at 32 rows and cuBLAS at 64) and test_moe's table test
# (its tolerance fix), then the GPU smoke's part 1 as time allows. Packed into 0_c.tgz.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/c; mkdir -p $R
pack() { tar czf $OUT/0_c.tgz -C $OUT c; }
timeout 200 python3 -m pytest -q tests/test_skinny.py tests/test_router.py \
  "tests/test_moe.py::test_decode_gate_up_writes_every_table_entry_the_down_reads" \
  > $R/tests.log 2>&1
echo "tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
left=$(( ${STOP_AT:-640} - SECONDS - 15 ))
timeout $left bash bench/smoke_gpu.sh $R/smoke1 1 > $R/smoke1.log 2>&1
echo "smoke part 1 rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
tail -n 3 $R/tests.log; cat $R/smoke1/summary.md; cat $R/smoke1/moe/*.md 2>/dev/null | head -30
