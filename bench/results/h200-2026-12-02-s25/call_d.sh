#!/usr/bin/env bash
# 25th session, call D, from the repository root on the device: the GPU smoke's bench steps on
# the tree whose benches time graphs by common.graph_ms (part 2 whole; part 1's moe and pick,
# which the bench change touches; part 1's routing and attention ran in call C).
#   bash bench/results/h200-2026-12-02-s25/call_d.sh
set -u
R=$OUT/d; mkdir -p $R
bash bench/smoke_gpu.sh $R/smoke2 2 > $R/smoke2.log 2>&1
echo "smoke2 rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
PYTHONUNBUFFERED=1 timeout 150 python3 bench/bench_moe.py --quick --out $R/moe > $R/moe.log 2>&1
echo "moe rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
PYTHONUNBUFFERED=1 timeout 90 python3 bench/bench_pick.py --out $R/pick.md > $R/pick.log 2>&1
echo "pick rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
rm -rf $R/smoke2/train_and_eval/*.safetensors $R/smoke2/train_and_eval/*/ 2>/dev/null
tar czf $OUT/0_d.tgz -C $OUT d
cat $R/steps.txt $R/smoke2/summary.md; tail -25 $R/moe.log; tail -8 $R/pick.log
