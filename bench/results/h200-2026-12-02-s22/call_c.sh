#!/usr/bin/env bash
# 22nd session, device call 3, from the repository root on the device:
#   STOP_AT=530 bash bench/results/h200-2026-12-02-s22/call_c.sh   (as run)
# coreset_in_route.patch (every route_kernel program finds its window's coreset from the vote
# shares: no block_coreset_kernel launch) in tree ab_cir:
# 1. its routing tests on CUDA (windows, routing, launch);
# 2. bench_routing --quick on main and on ab_cir (one block, graphed: votes + coreset + route);
# 3. the 20-layer forward A/B, main against ab_cir, until STOP_AT.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-02-s22
R=$OUT/c; mkdir -p $R
pack() { tar czf $OUT/0_c.tgz -C $OUT c; }
trap 'rm -rf ab_cir' EXIT
bash bench/ab_tree.sh ab_cir $S/coreset_in_route.patch > $R/ab_tree.log 2>&1 \
  || { cat $R/ab_tree.log; exit 1; }
(cd ab_cir && PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -x tests/test_windows.py \
  tests/test_routing.py tests/test_launch.py > $R/tests.log 2>&1)
echo "tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
timeout 60 python3 bench/bench_routing.py --quick --out $R/routing_base.md > $R/routing_base.log 2>&1
echo "routing base rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
(cd ab_cir && PYTHONPATH=$PWD timeout 60 python3 bench/bench_routing.py --quick \
  --out $R/routing_cir.md > $R/routing_cir.log 2>&1)
echo "routing cir rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
rm -rf ab_cir; pack
STOP_AT=$(( ${STOP_AT:-540} - SECONDS - 15 )) bash bench/ab_e2e.sh $R/e2e \
  cir=$S/coreset_in_route.patch > $R/e2e_console.log 2>&1
echo "e2e rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
rm -f $R/e2e/*/e2e_quick.png; pack
tail -n 3 $R/tests.log; grep -A8 "^| blocks" $R/routing_base.md $R/routing_cir.md
tail -n 24 $R/e2e_console.log
