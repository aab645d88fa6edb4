#!/usr/bin/env bash
# A/B trees for device calls: ab_NAME/ at the repository root = a copy of the working tree
# (less .git and other ab_* trees; git ignores them) with each PATCH applied and its kernels/
# copied into the package (what `pip install -e .` maps), so that
#   (cd ab_NAME && PYTHONPATH=$PWD python3 bench/...)
# runs the patched code beside main. From anywhere in the repository:
#
#   bash bench/ab_tree.sh ab_NAME [PATCH ...]     # PATCH paths from the current directory
#
# Why not `(cd ab_NAME && git apply PATCH)`: ab_NAME lies inside the repository, and git apply
# run from a subdirectory skips every path outside it without a word and exits 0 (git-apply(1),
# --directory). The seventeenth session's A/B trees were built so: each was main. Here each
# patch is applied from the root into the tree and checked to be in place (it must reverse
# cleanly). Any failure removes the tree and exits non-zero. The copy is of the files, not of
# `git archive HEAD`: the device gets this machine's working tree, but its .git may name an
# older HEAD (the eighteenth session's smoke header read 27e1db9 with 2b5b19f checked out here).
set -euo pipefail
usage="usage: bash bench/ab_tree.sh ab_NAME [PATCH ...]"
dir=${1:?$usage}
shift
case "$dir" in
  ab_*/*|ab_) echo "ab_tree: the tree must be ab_NAME at the repository root, got '$dir'"; exit 2;;
  ab_*) ;;
  *) echo "ab_tree: the tree must be named ab_NAME (git ignores ab_*), got '$dir'"; exit 2;;
esac
patches=()
for patch in "$@"; do  # absolute paths, checked, before leaving the caller's directory
  [ -f "$patch" ] || { echo "ab_tree: no patch file '$patch'"; exit 2; }
  patches+=("$(cd "$(dirname "$patch")" && pwd)/$(basename "$patch")")
done
cd "$(git rev-parse --show-toplevel)"
rm -rf "$dir" && mkdir "$dir"
trap 'rm -rf "$dir"' ERR
tar -c --exclude=./.git --exclude='./ab_*' . | tar -x -C "$dir"
for patch in "${patches[@]}"; do
  files=$( (git apply --numstat "$patch" 2>/dev/null || true) | wc -l)
  [ "$files" -gt 0 ] || { echo "ab_tree: $patch is not a patch of any file"; false; }
  git apply --directory="$dir" "$patch" || {
    echo "ab_tree: $patch does not apply to the working tree (plus the patches before it)"
    false
  }
  git apply --directory="$dir" --reverse --check "$patch" \
    || { echo "ab_tree: $patch is not in place in $dir after applying"; false; }
  echo "ab_tree: $dir += $patch ($files files)"
done
rm -rf "$dir/dmoe_triton/kernels"
cp -r "$dir/kernels" "$dir/dmoe_triton/kernels"
