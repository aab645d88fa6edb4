#!/usr/bin/env bash
# The 20-layer forward A/B (issue 13's measure), in one device call: main ("base") against
# trees of main with patches (bench/ab_tree.sh), given as NAME=PATCH[,PATCH...] (NAME: letters,
# digits, _; PATCH paths from the current directory), run alternately, `bench_e2e.py --quick`
# with token routing and dMoE p=0.6, until STOP_AT seconds (default 480) have passed:
#
#   STOP_AT=480 bash bench/ab_e2e.sh OUT_DIR ss=bench/results/.../split_sum_into_norm.patch
#
# Each run's tables go to OUT_DIR/<name><round>/, its log to OUT_DIR/<name><round>.log, the
# steps to OUT_DIR/steps.txt; the one-sequence rows of every run (ms per forward, byte floor ms,
# x floor) are printed last. The trees are removed at the end, or on any failure.
set -u
usage="usage: bash bench/ab_e2e.sh OUT_DIR NAME=PATCH[,PATCH...] ..."
out=${1:?$usage}
shift
[ $# -gt 0 ] || { echo "$usage"; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the runs start inside the trees
names=() patch_lists=()
for arg in "$@"; do
  name=${arg%%=*} list=${arg#*=}
  case "$arg" in *=*) ;; *) echo "ab_e2e: '$arg' is not NAME=PATCH[,PATCH...]"; exit 2;; esac
  [[ "$name" =~ ^[A-Za-z0-9_]+$ && "$name" != base ]] \
    || { echo "ab_e2e: NAME must be letters, digits or _ and not 'base', got '$name'"; exit 2; }
  [ -n "$list" ] || { echo "ab_e2e: '$name' names no patch (it would be main)"; exit 2; }
  for seen in "${names[@]}"; do
    [ "$seen" != "$name" ] || { echo "ab_e2e: '$name' given twice"; exit 2; }
  done
  names+=("$name") patch_lists+=("$list")
done
root=$(git rev-parse --show-toplevel)
cleanup() { for n in "${names[@]}"; do rm -rf "$root/ab_$n"; done; }
trap cleanup EXIT
for i in "${!names[@]}"; do
  IFS=, read -r -a patches <<< "${patch_lists[$i]}"
  bash "$root/bench/ab_tree.sh" "ab_${names[$i]}" "${patches[@]}" || exit 1
done
cd "$root"
round=1
# A run takes about 40 s on the H200: none starts after STOP_AT - 45, so the call ends in time
# for its caller to pack the results (the eighteenth session's next_call.sh ran past its limit).
last_start=$(( ${STOP_AT:-480} - 45 ))
while [ "$SECONDS" -lt "$last_start" ]; do
  for t in base "${names[@]}"; do
    [ "$SECONDS" -lt "$last_start" ] || break
    d=.; [ "$t" = base ] || d=ab_$t
    (cd "$d" && PYTHONPATH=$PWD timeout 100 python3 bench/bench_e2e.py --quick --budget-s 60 \
      --policies "token,dmoe p=0.6" --out "$out/$t$round" > "$out/$t$round.log" 2>&1)
    echo "$t$round rc=$? at ${SECONDS}s" | tee -a "$out/steps.txt"
  done
  round=$((round + 1))
done
shopt -s nullglob
for f in "$out"/*[0-9]; do
  echo "== $f"
  grep -E "^\| calibrated \| (token|dmoe p=0.6) \| 1 " "$f/e2e_quick.md" | cut -d"|" -f3,6,13,14
done
