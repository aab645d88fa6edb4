#!/usr/bin/env bash
# The issue-15 run in one command: the expert-choice retrofit of models/arith-token, evaluated
# against token routing and the shipped dMoE model on the same held-out problems.
#
#   bash bench/train_ec.sh "$OUT"                   # H200: ~3.5 min (4 variants x 30 s training)
#   DMOE_SMOKE=1 bash bench/train_ec.sh /tmp/ec     # CPU smoke test: same steps, toy sizes
#
# Writes into OUT: ec.md (the table), ec.json, run.log (all that was printed) and
# ec-models.tar (models/arith-ec*/: each variant's checkpoint, its config declaring its routing,
# to unpack into models/ if it is on the frontier). Exit status: non-zero if the run failed.
set -uo pipefail

out=${1:?usage: bash bench/train_ec.sh OUT_DIR}
mkdir -p "$out"
exec > >(tee "$out/run.log") 2>&1
export PYTHONUNBUFFERED=1

if [ "${DMOE_SMOKE:-0}" = 1 ]; then
  # Every step of the real run at toy size: a wrong path, flag or file name fails here first.
  args=(--pool 2000 --test 24 --batch 8 --eval-batch 24 --router-steps 3 --full-steps 3
        --smoke)
else
  args=()
fi

start=$SECONDS
python3 bench/train_ec.py --out "$out" ${args[@]+"${args[@]}"}
rc=$?
echo "== expert-choice retrofit: exit $rc after $((SECONDS - start)) s"
if [ -d "$out/models" ]; then
  tar -C "$out" -cf "$out/ec-models.tar" models && rm -rf "$out/models"
fi
ls -l "$out"
exit $rc
