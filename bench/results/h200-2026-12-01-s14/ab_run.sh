#!/bin/bash
# A/B on the device: base (HEAD), gu (decode gate/up weights on M), C (working tree: + down on M)
ROOT=$PWD
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for t in ab_base ab_gu; do rm -rf $t/dmoe_triton/kernels; cp -r $t/kernels $t/dmoe_triton/kernels; done
echo "== tests on C"; timeout 200 python3 -m pytest -q -x tests/test_moe.py tests/test_top1_and_no_shared.py 2>&1 | tail -2
run_tree() {  # $1 dir, $2 label
  if [ "$1" = "." ]; then cd $ROOT; else cd $ROOT/$1; fi
  export PYTHONPATH=$PWD
  timeout 100 python3 bench/bench_e2e.py --quick --layers 4 --budget-s 40 --out /tmp/e2e_$2 \
     --policies "token,dmoe p=0.6" > /tmp/e2e_$2.log 2>&1
  echo "-- e2e $2 rc=$?"; grep -E "^\| calibrated \| (token|dmoe p=0.6) \| 1 \| 512" /tmp/e2e_$2/e2e_quick.md | cut -d"|" -f3,6,14
  grep -E "^\| routed \+ shared|^\| router GEMM|^\| attention \(" /tmp/e2e_$2/e2e_quick.md | cut -d'|' -f2,3 | head -6
  unset PYTHONPATH; cd $ROOT
}
for round in 1 2; do run_tree ab_base base$round; run_tree ab_gu gu$round; run_tree . C$round; done
for t in ab_base .; do cd $ROOT/$t; export PYTHONPATH=$PWD
  echo "== bench_moe quick $t"; timeout 80 python3 bench/bench_moe.py --quick --out /tmp/moe_$RANDOM 2>&1 | grep -E "exact|copy bandwidth"
  unset PYTHONPATH; cd $ROOT; done
