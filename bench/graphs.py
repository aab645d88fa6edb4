"""CUDA-graph capture shared by the benchmarks (run as `python bench/<script>.py`)."""
import torch


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
