#!/usr/bin/env bash
# A/B trees for device calls: DIR = a copy of the working tree (less .git and other ab_*
# trees) with each PATCH applied, its
# kernels/ copied into the package (what `pip install -e .` maps), so that
#   (cd DIR && PYTHONPATH=$PWD python3 bench/...)
# runs the patched code beside main. From the repository root:
#
#   bash bench/ab_tree.sh DIR [PATCH ...]     # PATCH paths from the repository root
#
# Why not `(cd DIR && git apply PATCH)`: DIR lies inside the repository, and git apply run from
# a subdirectory skips every path outside it without a word and exits 0 (git-apply(1),
# --directory). The seventeenth session's A/B trees were built so: each was main. Here the patch
# is applied from the root into DIR, and checked to be in place (it must reverse cleanly); any
# failure exits non-zero. The copy is of the files, not of `git archive HEAD`: the device gets
# this machine's working tree, but its .git may name an older HEAD (the eighteenth session's
# smoke header read 27e1db9 with 2b5b19f checked out here).
set -euo pipefail
dir=${1:?usage: bash bench/ab_tree.sh DIR [PATCH ...]}
shift
cd "$(git rev-parse --show-toplevel)"
rm -rf "$dir" && mkdir -p "$dir"
tar -c --exclude=./.git --exclude='./ab_*' . | tar -x -C "$dir"
for patch in "$@"; do
  git apply --directory="$dir" "$patch" || { echo "ab_tree: $patch does not apply to the working tree"; exit 1; }
  git apply --directory="$dir" --reverse --check "$patch" \
    || { echo "ab_tree: $patch is not in place in $dir after applying"; exit 1; }
  echo "ab_tree: $dir += $patch ($(git apply --numstat "$patch" | wc -l) files)"
done
rm -rf "$dir/dmoe_triton/kernels"
cp -r "$dir/kernels" "$dir/dmoe_triton/kernels"
