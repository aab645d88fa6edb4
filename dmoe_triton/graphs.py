"""CUDA graphs of generate()'s decoding step, kept between calls (issue 18).

A captured graph replays kernels on fixed addresses with the launch parameters of its capture.
So a graph stays right as long as (a) the tensors it reads live at the same addresses with the
same shapes, strides and dtypes, and (b) the Python choices baked into its launches are the same.
`graph_key` names both: (a) the address, shape, stride and dtype of every parameter and buffer of
the model (weights changed IN PLACE, as `load_state_dict` and the router calibration do, need no
new graph: the replay reads the new values; weights REPLACED, as `patch_model`, `.to()` or
`param.data = ...` do, move and change the key), and (b) the routing policy and backend of every
MoE layer (`set_policy` changes them, so a graph of the old policy is not used; setting it back
finds that graph again), the launch overrides in force (`launch.override`), autocast, and the
decoding layout the caller passes (batch, span, cache capacity, block length, sampling, ...).
Not in the key: values of the model config read at capture time (e.g. rope_theta); after
mutating a config, call `clear_graph_cache()`. Reading every tensor's address costs well under a
millisecond per call for LLaDA2.0-mini (~300 tensors).

Memory is bounded: `graph_cache` keeps at most `max_entries` graph sets (default 4), least
recently used out first; each holds its static KV cache (batch x capacity rows per layer) and
its graphs' private memory pools (one step's activations, e.g. the logits [B, span, vocab]).
Entries of a model are dropped when the model is garbage collected. `clear_graph_cache()` frees
them all; `graph_cache.max_entries = 0` turns reuse off (every call captures afresh).
A kept entry's buffers serve one call at a time: do not run generate() on one model from two
threads at once.
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Optional, Sequence

import torch

from . import launch
from .modules import moe_layers

DEFAULT_MAX_ENTRIES = 4


def tensor_layout(model: torch.nn.Module) -> tuple:
    """(address, shape, stride, dtype, device) of every parameter and buffer, in module order:
    what a graph's kernels read besides their inputs (values may change in place)."""
    out = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        out.append((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device))
    return tuple(out)


def routing_choices(model: torch.nn.Module) -> tuple:
    """(module id, policy, backend) of every MoE layer: the Python choices its launches bake in."""
    return tuple((id(m), getattr(m, "policy", None), getattr(m, "backend", None))
                 for m in moe_layers(model))


def graph_key(model: torch.nn.Module, **layout: Hashable) -> tuple:
    """Everything a decoding step's graph depends on besides the values it reads (module
    docstring); `layout`: the caller's shapes and Python scalars (batch, span, capacity, ...),
    hashable. Two calls that may share a graph give equal keys; any change that could make a
    replay read other addresses or run other launches gives a different one."""
    device = next(model.parameters()).device
    return (id(model), tensor_layout(model), routing_choices(model), launch.override_key(),
            torch.is_autocast_enabled(device.type), tuple(sorted(layout.items())))


class GraphCache:
    """An LRU of captured graph sets, each tied to its model by a weak reference.

    `get(key, model)` -> the entry or None (a hit moves it to the front); `put(key, model,
    entry)` inserts it and evicts the least recently used beyond `max_entries`; `clear()`
    empties it. `captures` counts puts (the graph sets generate() captured), `hits` the reuses.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.max_entries = max_entries
        self.captures = 0
        self.hits = 0
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._watched = set()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple, model) -> Optional[object]:
        if self.max_entries <= 0:  # reuse off, even for entries kept before it was turned off
            return None
        kept = self._entries.get(key)
        if kept is None:
            return None
        ref, entry = kept
        if ref() is not model:  # the id of a collected model, reused by another one
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple, model, entry: object) -> None:
        self.captures += 1
        if self.max_entries < 1:
            return
        self._entries[key] = (weakref.ref(model), entry)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if id(model) not in self._watched:  # free its graphs and caches with the model
            self._watched.add(id(model))
            weakref.finalize(model, self._forget, id(model))

    def _forget(self, model_id: int) -> None:
        self._watched.discard(model_id)
        for key in [k for k in self._entries if k[0] == model_id]:
            del self._entries[key]

    def clear(self) -> None:
        """Drop every entry (their graphs and static caches are freed once unreferenced)."""
        self._entries.clear()


graph_cache = GraphCache()


def clear_graph_cache() -> None:
    """Free every decoding graph generate() keeps (graph_cache.clear())."""
    graph_cache.clear()


def capture(step: Callable[[], object], state: Sequence[torch.Tensor] = (),
            warmup: int = 2) -> Callable[[], None]:
    """Warm up `step` on a side stream, capture it in a CUDA graph, restore the `state` tensors
    it touched; returns the replay (the graph lives as long as the replay does)."""
    saved = [t.clone() for t in state]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # compiles kernels, settles allocations
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t, s in zip(state, saved):
        t.copy_(s)
    return graph.replay


__all__ = ["GraphCache", "graph_cache", "clear_graph_cache", "graph_key", "capture",
           "tensor_layout", "routing_choices", "DEFAULT_MAX_ENTRIES"]
