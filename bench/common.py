"""Helpers shared by the benchmarks (run as `python bench/<script>.py`, so bench/ is on
sys.path): timing (CUDA events, median), CUDA-graph capture, and the copy bandwidth, in bytes/s,
that every byte floor divides by."""
import statistics
import time
from typing import Callable

import torch


def time_ms(run: Callable[[], object], per_call: int, trials: int, device) -> float:
    """Median over trials of the time of `run` / per_call, in ms (events on CUDA)."""
    times = []
    for _ in range(trials):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / per_call)
        else:
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1e3 / per_call)
    return statistics.median(times)


# Cycles of the spin that starts every timed graph trial (about 1 ms at the H200's 1.98 GHz):
# longer than the host takes to launch the trial's replays, so the GPU never waits for them.
SPIN_CYCLES = 2_000_000


def graph_ms(graph: torch.cuda.CUDAGraph, calls: int, trials: int = 30,
             replays: int = 10) -> float:
    """ms per call of `graph`, a CUDA graph of `calls` calls: the median over `trials` of
    `replays` back-to-back replays, events around them, all queued behind a spin kernel.

    Why the spin: timed from an idle GPU, one replay between the events also times the host's
    launch of the graph, which a forward pays once for hundreds of kernels (H200: a graph of
    one empty kernel took 9.2 us per replay that way and 1.4 us this way; the FP8 MoE pair at
    15 experts, a graph of 4 layer calls, 33.0-33.4 against 31.9 us per call:
    bench/results/h200-2026-12-02-s25). Behind the spin the host has queued every replay
    before the GPU reaches the start event."""
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)
        a.record()
        for _ in range(replays):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / (replays * calls))
    return statistics.median(times)


def capture(fn, reps: int = 1, warmup: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `reps` calls of fn, after `warmup` calls on a side stream (compiles
    kernels and settles allocations, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph


def fmt(v, spec=".2f") -> str:
    """v formatted, or "n/a" for None and NaN (table cells)."""
    return "n/a" if v is None or v != v else format(v, spec)


def random_tokens(config, shape, gen):
    """Random token ids [shape] (CPU) avoiding the mask and EOS tokens."""
    ids = torch.randint(0, config.vocab_size - 8, shape, generator=gen)
    return torch.where((ids == config.mask_token_id) | (ids == config.eos_token_id), ids + 3, ids)


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, bytes read + written (median of 20)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)
