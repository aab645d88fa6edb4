#!/usr/bin/env bash
# Eighteenth session, device call A: the seventeenth session's planned call again, now with the
# patches in place (bench/ab_tree.sh; its trees were main): the down probe's 8 variants, the
# down-tables patch's GPU tests, the down's launch shapes on main and with the tables, and the
# coreset votes-as-a-tile patch against main (bench_routing --quick, alternating twice).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S17=bench/results/h200-2026-12-01-s17
bash bench/ab_tree.sh ab_parts $S17/probe_down_parts.patch || exit 1
bash bench/ab_tree.sh ab_tables $S17/down_tables.patch || exit 1
bash bench/ab_tree.sh ab_cs $S17/coreset_votes_tile.patch || exit 1
(cd ab_parts && PYTHONPATH=$PWD timeout 100 python3 $S17/probe_down_parts.py quick) \
  > $OUT/1_probe_parts.log 2>&1
(cd ab_tables && PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -m gpu tests/test_moe.py \
  tests/test_fp8.py tests/test_gpu_model.py) > $OUT/2_tables_gpu_tests.log 2>&1
timeout 90 python3 $S17/probe_down_configs.py > $OUT/3_configs_main.log 2>&1
(cd ab_tables && PYTHONPATH=$PWD timeout 90 python3 $S17/probe_down_configs.py) \
  > $OUT/4_configs_tables.log 2>&1
for i in 1 2; do
  timeout 60 python3 bench/bench_routing.py --quick --out $OUT/5_routing_base$i.md >/dev/null 2>&1
  (cd ab_cs && PYTHONPATH=$PWD timeout 60 python3 bench/bench_routing.py --quick \
    --out $OUT/6_routing_cs$i.md) > /dev/null 2>&1
done
rm -rf ab_parts ab_tables ab_cs
tail -n 5 $OUT/1_probe_parts.log; tail -n 2 $OUT/2_tables_gpu_tests.log
tail -n 8 $OUT/3_configs_main.log $OUT/4_configs_tables.log
for f in $OUT/5_* $OUT/6_*; do echo "== $f"; grep -E "^\| 1 " $f; done
