#!/usr/bin/env bash
# 25th session, call E: the README's headline kernel tables again, timed by common.graph_ms
# (bench_moe.py and bench_routing.py --router whole, as the README gives them).
#   bash bench/results/h200-2026-12-02-s25/call_e.sh
set -u
python3 -c "import dmoe_triton.kernels" 2>/dev/null \
  || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/e; mkdir -p $R
PYTHONUNBUFFERED=1 timeout 330 python3 bench/bench_moe.py --out $R/moe > $R/moe.log 2>&1
echo "moe rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
PYTHONUNBUFFERED=1 timeout 200 python3 bench/bench_routing.py --router --out $R/routing.md \
  > $R/routing.log 2>&1
echo "routing rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
tar czf $OUT/0_e.tgz -C $OUT e
cat $R/steps.txt; tail -22 $R/moe.log; cat $R/routing.md | head -30
