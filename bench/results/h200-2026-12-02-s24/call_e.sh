#!/usr/bin/env bash
# 24th session, call E, on the landed tree: smoke part 1 less its routing tests (the routing
# kernels are untouched; the device time left did not hold both), then the FP8 probe at the
# new default.
#   bash bench/results/h200-2026-12-02-s24/call_e.sh
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/e; mkdir -p $R/moe
pack() { tar czf $OUT/0_e.tgz -C $OUT e; }
step() {  # step NAME TIMEOUT COMMAND...
  local name=$1 limit=$2 start=$SECONDS; shift 2
  PYTHONUNBUFFERED=1 CI=true timeout $limit "$@" > $R/$name.log 2>&1
  echo "| $name | $? | $((SECONDS - start)) | \`$*\` |" | tee -a $R/summary.md; pack
}
printf "| step | exit | seconds | command |\n|---|---|---|---|\n" > $R/summary.md
step gpu_tests 280 python3 -m pytest -q -m gpu tests
step cli 60 python3 -m dmoe_triton generate
step moe 70 python3 bench/bench_moe.py --quick --out $R/moe
step probe_fp8 60 python3 bench/probe_decode_shapes.py --fp8 --experts 15,70 --rounds 1
cat $R/summary.md; tail -3 $R/gpu_tests.log; tail -4 $R/probe_fp8.log
