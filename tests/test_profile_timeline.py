"""bench/profile_e2e.py --graph-timeline's accounting on the CPU (its profiling needs a GPU):
a graphed forward's span is split exactly into kernel time and the gaps before kernels,
overlaps (programmatic dependent launch) negative, per kernel name."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from profile_e2e import timeline  # noqa: E402  (bench/ holds scripts, not a package)


def replays_of(pattern, replays, pause=10.0):
    """[(name, start, end)] of `replays` runs of pattern [(name, duration, gap before)]."""
    kernels, t = [], 0.0
    for _ in range(replays):
        for name, duration, gap in pattern:
            t += gap
            kernels.append((name, t, t + duration))
            t += duration
        t += pause  # between replays: not part of any forward
    return kernels


def test_span_is_kernels_plus_gaps_per_name():
    pattern = [("gemm", 2.0, 0.0), ("route", 3.0, 1.0), ("gemm", 2.0, -0.5), ("down", 1.0, 2.0)]
    rows, span, idle, overlap = timeline(replays_of(pattern, 3), 3)
    want = {"gemm": (2, 4.0, -0.5), "route": (1, 3.0, 1.0), "down": (1, 1.0, 2.0)}
    assert rows.keys() == want.keys()
    for name, row in rows.items():
        assert row == pytest.approx(want[name]), name
    assert (span, idle, overlap) == pytest.approx((10.5, 3.0, -0.5))
    assert span == pytest.approx(sum(r[1] + r[2] for r in rows.values()))


def test_replays_that_differ_are_refused():
    kernels = replays_of([("a", 1.0, 0.0), ("b", 1.0, 0.0)], 2)
    with pytest.raises(RuntimeError, match="not one sequence each"):
        timeline(kernels[:-1], 2)
    kernels[3] = ("c",) + kernels[3][1:]
    with pytest.raises(RuntimeError, match="replay 1 launched other kernels"):
        timeline(kernels, 2)
