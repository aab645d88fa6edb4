"""dmoe_triton.profiling.graph_timeline (bench/profile_e2e.py --graph-timeline's accounting) on
the CPU, its profiling needing a GPU: a graphed forward's span is split exactly into the idle
before kernels and what each kernel's run added past the ones before it."""
import pytest

from dmoe_triton.profiling import graph_timeline


def replays_of(pattern, replays, pause=10.0):
    """[(name, start, end)] of `replays` runs of pattern [(name, start, end)] (one replay's
    times), each replay `pause` after the previous one's last end."""
    kernels, t0 = [], 0.0
    for _ in range(replays):
        kernels += [(name, t0 + start, t0 + end) for name, start, end in pattern]
        t0 = max(k[2] for k in kernels) + pause
    return kernels


def check(pattern, want, span, replays=3):
    rows, got_span = graph_timeline(replays_of(pattern, replays), replays)
    assert rows.keys() == want.keys()
    for name, row in rows.items():
        assert row == pytest.approx(want[name]), name
    assert got_span == pytest.approx(span)
    assert got_span == pytest.approx(sum(r[2] + r[3] for r in rows.values()))


def test_idle_and_pdl_overlap():
    # gemm 0-2; idle 1; route 3-6; gemm starts 0.5 early (PDL) 5.5-7.5; idle 2; down 9.5-10.5
    pattern = [("gemm", 0, 2), ("route", 3, 6), ("gemm", 5.5, 7.5), ("down", 9.5, 10.5)]
    check(pattern, {"gemm": (2, 4.0, 0.0, 3.5), "route": (1, 3.0, 1.0, 3.0),
                    "down": (1, 1.0, 2.0, 1.0)}, span=10.5)


def test_a_kernel_inside_another_adds_nothing():
    # b and c run inside a (concurrent graph branches): the GPU is never idle; span 10
    check([("a", 0, 10), ("b", 2, 4), ("c", 6, 8)],
          {"a": (1, 10.0, 0.0, 10.0), "b": (1, 2.0, 0.0, 0.0), "c": (1, 2.0, 0.0, 0.0)},
          span=10.0)


def test_bad_replays_and_replays_that_differ_are_refused():
    kernels = replays_of([("a", 0, 1), ("b", 1, 2)], 2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="replays must be an int >= 1"):
            graph_timeline(kernels, bad)
    with pytest.raises(RuntimeError, match="not one sequence each"):
        graph_timeline(kernels[:-1], 2)
    with pytest.raises(RuntimeError, match="not one sequence each"):
        graph_timeline([], 3)
    kernels[3] = ("c",) + kernels[3][1:]
    with pytest.raises(RuntimeError, match="replay 1 launched other kernels"):
        graph_timeline(kernels, 2)
