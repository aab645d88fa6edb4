#!/usr/bin/env bash
# The 20-layer forward A/B (issue 13's measure), in one device call: main ("base") against
# trees of main with patches (bench/ab_tree.sh), given as NAME=PATCH[,PATCH...] (paths from the
# repository root), run alternately, `bench_e2e.py --quick` with token routing and dMoE p=0.6,
# until STOP_AT seconds (default 480) have passed. From the repository root:
#
#   STOP_AT=480 bash bench/ab_e2e.sh OUT_DIR ss=bench/results/.../split_sum_into_norm.patch
#
# Each run's tables go to OUT_DIR/<name><round>/, its log to OUT_DIR/<name><round>.log; the
# one-sequence rows of every run (ms per forward, byte floor ms, x floor) are printed last.
set -u
out=${1:?usage: bash bench/ab_e2e.sh OUT_DIR NAME=PATCH[,PATCH...] ...}
shift
mkdir -p "$out"
cd "$(git rev-parse --show-toplevel)"
trees=(base)
for arg in "$@"; do
  name=${arg%%=*} patches=${arg#*=}
  trees+=("$name")
  bash bench/ab_tree.sh "ab_$name" ${patches//,/ } || exit 1
done
round=1
while [ "$SECONDS" -lt "${STOP_AT:-480}" ]; do
  for t in "${trees[@]}"; do
    d=.; [ "$t" = base ] || d=ab_$t
    (cd "$d" && PYTHONPATH=$PWD timeout 100 python3 bench/bench_e2e.py --quick --budget-s 60 \
      --policies "token,dmoe p=0.6" --out "$out/$t$round" > "$out/$t$round.log" 2>&1)
    echo "$t$round rc=$? at ${SECONDS}s" | tee -a "$out/steps.txt"
  done
  round=$((round + 1))
done
for t in "${trees[@]}"; do [ "$t" = base ] || rm -rf "ab_$t"; done
shopt -s nullglob
for f in "$out"/*[0-9]; do
  echo "== $f"
  grep -E "^\| calibrated \| (token|dmoe p=0.6) \| 1 " "$f/e2e_quick.md" | cut -d"|" -f3,6,13,14
done
