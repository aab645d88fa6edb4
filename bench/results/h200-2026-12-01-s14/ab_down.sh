#!/bin/bash
ROOT=$PWD
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
rm -rf ab_base/dmoe_triton/kernels; cp -r ab_base/kernels ab_base/dmoe_triton/kernels
run_tree() {
  if [ "$1" = "." ]; then cd $ROOT; else cd $ROOT/$1; fi
  export PYTHONPATH=$PWD
  timeout 80 python3 bench/bench_e2e.py --quick --layers 4 --budget-s 30 --out /tmp/e2e_$2 \
     --policies "token,dmoe p=0.6" > /tmp/e2e_$2.log 2>&1
  echo "-- e2e $2 rc=$?"; grep -E "^\| calibrated \| (token|dmoe p=0.6) \| 1 \| 512" /tmp/e2e_$2/e2e_quick.md | cut -d"|" -f3,6,14
  grep -E "^\| routed \+ shared" /tmp/e2e_$2/e2e_quick.md | cut -d'|' -f2,3
  unset PYTHONPATH; cd $ROOT
}
run_tree ab_base base1; run_tree . down1
echo "== gpu moe tests"; timeout 100 python3 -m pytest -q -m gpu tests/test_moe.py 2>&1 | tail -2
