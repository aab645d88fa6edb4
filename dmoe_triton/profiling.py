"""The accounting behind `bench/profile_e2e.py --graph-timeline`: a graphed forward's span split
among its kernels (here so that the tests can check it: bench/ holds scripts only)."""
from __future__ import annotations

import collections


def graph_timeline(kernels: list, replays: int) -> tuple:
    """Attribute the span of each of `replays` graph replays to its kernels.

    kernels: [(name, start us, end us)] in start order, every replay's kernels in turn (the
    same names in the same order each time). Walking a replay's kernels, the frontier is the
    latest end so far; a kernel adds the GPU idle between the frontier and its start ("idle
    before") and the stretch of its own run past the frontier ("advance": its run minus what
    overlapped earlier kernels, programmatic dependent launch or concurrent branches). So the
    span (last end - first start) is exactly the sum of idle and advance over the kernels.

    Returns ({name: [launches, own us, idle-before us, advance us]} per forward, span us per
    forward). ValueError for replays not an int >= 1; RuntimeError if the kernels do not split
    into `replays` equal sequences."""
    if not isinstance(replays, int) or isinstance(replays, bool) or replays < 1:
        raise ValueError(f"replays must be an int >= 1, got {replays!r}")
    per = len(kernels) // replays
    if per == 0 or per * replays != len(kernels):
        raise RuntimeError(f"{len(kernels)} kernels in {replays} replays: not one sequence each")
    names = [k[0] for k in kernels[:per]]
    rows = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    span = 0.0
    for r in range(replays):
        seq = kernels[r * per:(r + 1) * per]
        if [k[0] for k in seq] != names:
            raise RuntimeError(f"replay {r} launched other kernels than replay 0")
        frontier = seq[0][1]
        for name, start, end in seq:
            row = rows[name]
            row[0] += 1 / replays
            row[1] += (end - start) / replays
            row[2] += max(0.0, start - frontier) / replays
            row[3] += max(0.0, end - max(start, frontier)) / replays
            frontier = max(frontier, end)
        span += (frontier - seq[0][1]) / replays
    return dict(rows), span
