#!/usr/bin/env bash
# 25th session, call C, from the repository root on the device (bench timing by graph_ms):
#   bash bench/results/h200-2026-12-02-s25/call_c.sh
# 1. probe_skinny.py: the attention projections through skinny_gemm at more programs;
# 2. bench_moe.py --fp8 (issue 16's expert-kernel table) and the routing / attention benches.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/c; mkdir -p $R
pack() { tar czf $OUT/0_c.tgz -C $OUT c; }
PYTHONUNBUFFERED=1 timeout 150 python3 bench/probe_skinny.py '{"block_n": 16}' \
  '{"block_n": 16, "stages": 6}' '{"block_n": 16, "block_k": 128, "stages": 8}' \
  '{"block_n": 32, "stages": 6}' '{"block_n": 16, "warps": 2}' > $R/probe_skinny.log 2>&1
echo "probe_skinny rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
PYTHONUNBUFFERED=1 timeout 200 python3 bench/bench_moe.py --fp8 --out $R/moe_fp8 \
  > $R/moe_fp8.log 2>&1
echo "moe fp8 rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
PYTHONUNBUFFERED=1 timeout 100 python3 bench/bench_attention.py --quick --out $R/attention.md \
  > $R/attention.log 2>&1
echo "attention rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
PYTHONUNBUFFERED=1 timeout 100 python3 bench/bench_routing.py --quick --router \
  --out $R/routing.md > $R/routing.log 2>&1
echo "routing rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
cat $R/steps.txt $R/probe_skinny.log; tail -30 $R/moe_fp8.log
