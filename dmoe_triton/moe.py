"""The routed-expert MLP of a MoE layer: `moe_forward()` and `DMoEBlock` (docs/moe.md).

`moe_forward` checks its inputs on the host (shapes, dtypes, devices: nothing that needs a sync),
then runs either the Triton kernels of `kernels/moe_matmul.py` or the reference. `DMoEBlock` is a
whole LLaDA2 MoE MLP: fp32 router GEMM, `route`, `moe_forward` and the shared expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .config import RouterConfig, RoutingPolicy
from .reference import moe_forward_reference
from .routing import resolve_backend, route

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
ID_TYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_moe_inputs(hidden, topk_ids, topk_weights, w_gate_up, w_down) -> None:
    """Shapes, dtypes and devices only: a ValueError/TypeError naming the argument."""
    named = dict(hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights,
                 w_gate_up=w_gate_up, w_down=w_down)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [T, H], got {_shape(hidden)}")
    if hidden.dtype not in FLOAT_TYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    T, H = hidden.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must have shape [{T}, k] (T from hidden), got {_shape(topk_ids)}")
    if topk_ids.dtype not in ID_TYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if _shape(topk_weights) != _shape(topk_ids):
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {_shape(topk_ids)}, "
            f"got {_shape(topk_weights)}"
        )
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}")
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2 != 0:
        raise ValueError(f"w_gate_up must have shape [E, 2*I, {H}] (H from hidden), "
                         f"got {_shape(w_gate_up)}")
    E, two_i = w_gate_up.shape[:2]
    if E < 1 or two_i < 2:
        raise ValueError(f"w_gate_up must hold at least one expert and I >= 1, got {_shape(w_gate_up)}")
    if _shape(w_down) != (E, H, two_i // 2):
        raise ValueError(f"w_down must have shape [{E}, {H}, {two_i // 2}] (E, H, I from "
                         f"w_gate_up and hidden), got {_shape(w_down)}")
    for name in ("w_gate_up", "w_down"):
        if named[name].dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {named[name].dtype}")
    for name, t in named.items():
        if t.device != hidden.device:
            raise TypeError(f"{name} is on {t.device} but hidden on {hidden.device}")


def check_out(out, hidden) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if _shape(out) != _shape(hidden) or (out.numel() and out.stride(1) != 1):
        raise ValueError(f"out must have hidden's shape {_shape(hidden)} with unit stride along H, "
                         f"got shape {_shape(out)} strides {out.stride()}")
    if out.dtype != hidden.dtype or out.device != hidden.device:
        raise TypeError(f"out must be {hidden.dtype} on {hidden.device}, got {out.dtype} on "
                        f"{out.device}")


def check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Host check of the id values (a sync on CUDA, so only where asked or free)."""
    bad = (topk_ids < -1) | (topk_ids >= num_experts)
    if bool(bad.any()):
        value = int(topk_ids[bad][0])
        raise ValueError(
            f"topk_ids must hold expert ids in [0, {num_experts}) or -1 (empty slot), got {value}"
        )


def check_shared(shared, w_gate_up, w_down) -> None:
    if not (isinstance(shared, (tuple, list)) and len(shared) == 2
            and all(isinstance(t, torch.Tensor) for t in shared)):
        raise TypeError("shared must be None or a pair of tensors (gate_up [2I, H], down [H, I])")
    gate_up, down = shared
    for name, t, like in (("shared[0] (gate_up)", gate_up, w_gate_up[0]),
                          ("shared[1] (down)", down, w_down[0])):
        if t.shape != like.shape or t.stride() != like.stride():
            raise ValueError(f"{name} must have the routed experts' per-expert shape "
                             f"{_shape(like)} and strides {like.stride()}, got {_shape(t)} "
                             f"strides {t.stride()}")
        if t.dtype != like.dtype or t.device != like.device:
            raise TypeError(f"{name} must be {like.dtype} on {like.device}, got {t.dtype} on "
                            f"{t.device}")


def moe_forward(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                w_gate_up: torch.Tensor, w_down: torch.Tensor, backend: str = "auto",
                check_ids: Optional[bool] = None,
                out: Optional[torch.Tensor] = None, shared=None) -> torch.Tensor:
    """Routed experts of one MoE layer: y[t] = sum_j w[t, j] * down(silu(gate(x)) * up(x)).

    hidden [T, H] (fp32/fp16/bf16); topk_ids [T, k] int32/int64, -1 = empty slot; topk_weights
    [T, k] fp32; w_gate_up [E, 2I, H] (gate rows, then up rows) and w_down [E, H, I] in hidden's
    dtype. Returns [T, H] in hidden's dtype, accumulated in fp32.

    check_ids: None (default) checks id values on the host only where that is free (CPU
    tensors); True checks on CUDA too (a host sync: not allowed under CUDA-graph capture);
    False never checks. Unchecked, the kernels skip any id outside [0, E) like an empty slot and
    never read out of bounds.
    out: optional [T, H] tensor of hidden's dtype and device with unit stride along H, written
    in place and returned (a fixed buffer for CUDA graphs).
    shared: optional (gate_up [2I, H], down [H, I]) of a shared expert with the routed experts'
    per-expert strides: every token adds it with weight 1, inside the same fp32 sum (on the
    decode path, one more expert of the same two launches instead of three more kernels).
    """
    check_moe_inputs(hidden, topk_ids, topk_weights, w_gate_up, w_down)
    if shared is not None:
        check_shared(shared, w_gate_up, w_down)
    if out is not None:
        check_out(out, hidden)
    backend = resolve_backend(backend, hidden.device)
    if check_ids is None:
        check_ids = hidden.device.type != "cuda"
    if check_ids:
        if hidden.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("check_ids=True needs a host sync; pass check_ids=None or False "
                             "under CUDA-graph capture")
        check_ids_in_range(topk_ids, w_gate_up.shape[0])
    if backend == "reference":
        y = moe_forward_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, shared)
        return y if out is None else out.copy_(y)
    return moe_forward_triton(hidden, topk_ids, topk_weights, w_gate_up, w_down, out=out,
                              shared=shared)


@dataclass(frozen=True)
class DecodeConfig:
    """The decode path (T <= DECODE_MAX_TOKENS): two launches, used experts found in-kernel.

    gate/up: persistent programs over (used expert, block_i intermediate columns) items;
    down + combine: one program per (block_h hidden columns, share of the used experts).
    """

    block_i: int = 64          # defaults: bench_moe.py --sweep on an H100, 15 and 70 experts
    k_gate_up: int = 128       # step along H
    warps_gate_up: int = 4
    stages_gate_up: int = 4
    programs_per_sm: int = 2   # gate/up grid = SMs x this (at most what fits on an SM)
    block_h: int = 32
    k_down: int = 256          # step along I
    warps_down: int = 4
    stages_down: int = 4
    # Down programs per block_h columns, each walking a contiguous share of the used experts.
    # 1: cdiv(H, block_h) = 128 programs at H = 2048, one per SM, writing out directly.
    # n > 1: n times the programs (n times the weight bytes in flight, 1/n of the steps each)
    # for an fp32 partial per share, summed in share order by the last program to finish.
    down_splits: int = 4

    def __post_init__(self):
        if not isinstance(self.down_splits, int) or self.down_splits < 1:
            raise ValueError(f"down_splits must be an int >= 1, got {self.down_splits!r}")


@dataclass(frozen=True)
class GroupedConfig:
    """The grouped path (more tokens): align, gate/up, down (per-slot partials), combine.

    Work items are (used expert, slice); an expert's tokens are walked in block_m tiles inside
    the item, so slices are kept small enough (block_i, block_h) for the re-reads of a slice by
    its later tiles to hit L2.
    """

    block_m: int = 32          # tokens of one expert per tile (tl.dot needs >= 16)
    block_i: int = 16          # gate/up: intermediate columns per work item
    k_gate_up: int = 128       # gate/up: step along H
    warps_gate_up: int = 4
    stages_gate_up: int = 4
    block_h: int = 32          # down: hidden columns per work item
    k_down: int = 128          # down: step along I
    warps_down: int = 4
    stages_down: int = 4
    programs_per_sm: int = 2   # persistent grids = SMs x this (at most what fits on an SM)


DECODE_MAX_TOKENS = 64  # the decode path computes every token row for each used expert
DEFAULT_DECODE = DecodeConfig()
DEFAULT_GROUPED = GroupedConfig()
ALIGN_MAX_SLOTS = 8192  # above this, the one-program sort of the align kernel gets too big
_SM_COUNT = {}


def _persistent_programs(device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return 4  # the interpreter runs programs one after another; a few exercise the loop
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index] * per_sm


def align_slots(flat_ids: torch.Tensor, num_experts: int):
    """Slots sorted by expert and the list of used experts, on the device, no sync.

    Returns (sorted_slots, used_expert, used_start, used_count, n_used), int32: for u < n_used,
    expert used_expert[u] owns slots sorted_slots[used_start[u] : used_start[u] + used_count[u]].
    """
    from .kernels.moe_matmul import moe_align_kernel

    S, E = flat_ids.numel(), num_experts
    dev = flat_ids.device
    used = [torch.empty(E, dtype=torch.int32, device=dev) for _ in range(3)]
    n_used = torch.empty(1, dtype=torch.int32, device=dev)
    s_pad = triton.next_power_of_2(S)
    if s_pad <= ALIGN_MAX_SLOTS and (E + 1) * s_pad < 2**31:
        sorted_slots = torch.empty(s_pad, dtype=torch.int32, device=dev)
        moe_align_kernel[(1,)](flat_ids, sorted_slots, *used, n_used, S, E, S_PAD=s_pad,
                               NUM_BINS=triton.next_power_of_2(E + 1), num_warps=4)
        return (sorted_slots, *used, n_used)
    return _align_slots_torch(flat_ids, E, used, n_used)


def _align_slots_torch(flat_ids, E, used, n_used):
    """The align step in torch ops for many slots (prefill): the same outputs, still no sync."""
    ids = flat_ids.long()
    bucket = torch.where((ids >= 0) & (ids < E), ids, E)
    sorted_slots = torch.sort(bucket, stable=True).indices.to(torch.int32)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    counts = counts[:E]
    starts = torch.cumsum(counts, 0) - counts
    is_used = counts > 0
    # Used experts first, in expert order: a stable sort on "unused".
    order = torch.sort((~is_used).to(torch.int8), stable=True).indices
    used[0].copy_(order)
    used[1].copy_(starts[order])
    used[2].copy_(counts[order])
    n_used.copy_(is_used.sum().reshape(1))
    return (sorted_slots, *used, n_used)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; half types use the tensor cores' native precision.
    return "ieee" if dtype == torch.float32 else "tf32"


def _persistent_grid(device, config, max_items: int) -> tuple:
    return (max(1, min(_persistent_programs(device, config.programs_per_sm), max_items)),)


def expert_gate_up(hidden, w_gate_up, lists, top_k: int, config: GroupedConfig):
    """act [T*k, I] in hidden's dtype: silu(x W_gate^T) * (x W_up^T) for every filled slot."""
    from .kernels.moe_matmul import moe_gate_up_kernel

    T, H = hidden.shape
    E, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    act = torch.empty(T * top_k, inter, dtype=hidden.dtype, device=hidden.device)
    c = config
    grid = _persistent_grid(hidden.device, c, min(E, T * top_k) * triton.cdiv(inter, c.block_i))
    moe_gate_up_kernel[grid](
        hidden, hidden.stride(0), hidden.stride(1),
        w_gate_up, *w_gate_up.stride(), act, act.stride(0), *lists, H, inter, top_k,
        BLOCK_M=c.block_m, BLOCK_I=c.block_i, BLOCK_K=c.k_gate_up,
        PRECISION=_precision(hidden.dtype), num_warps=c.warps_gate_up,
        num_stages=c.stages_gate_up)
    return act


def expert_down(act, w_down, lists, config: GroupedConfig):
    """partial [T*k, H] fp32: act W_down^T for every filled slot (other rows unwritten)."""
    from .kernels.moe_matmul import moe_down_kernel

    slots, inter = act.shape
    E, H = w_down.shape[:2]
    partial = torch.empty(slots, H, dtype=torch.float32, device=act.device)
    c = config
    grid = _persistent_grid(act.device, c, min(E, slots) * triton.cdiv(H, c.block_h))
    moe_down_kernel[grid](
        act, act.stride(0), w_down, *w_down.stride(), partial, partial.stride(0), *lists, H, inter,
        BLOCK_M=c.block_m, BLOCK_H=c.block_h, BLOCK_K=c.k_down, PRECISION=_precision(act.dtype),
        num_warps=c.warps_down, num_stages=c.stages_down)
    return partial


def combine_slots(partial, ids, weights, out, num_experts: int):
    """out[t] = sum_j w[t, j] * partial[t*k + j] over filled slots, in slot order."""
    from .kernels.moe_matmul import moe_combine_kernel

    T, H = out.shape
    block_t, block_h = 8, 256
    moe_combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        partial, partial.stride(0), ids, weights, out, out.stride(0), T, H, num_experts,
        ids.shape[1], BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return out


def _decode_pads(T, k, E, dtype) -> dict:
    return dict(T_PAD=max(16, triton.next_power_of_2(T)), K_PAD=triton.next_power_of_2(k),
                S_PAD=triton.next_power_of_2(T * k), NUM_BINS=triton.next_power_of_2(E + 1),
                PRECISION=_precision(dtype))


def _stages(stages: int, dtype: torch.dtype) -> int:
    # The decode configs are tuned for 2-byte weights; fp32 tiles are twice as large, and the
    # tuned pipeline depth would not fit an H100's shared memory (228 KB per SM).
    return stages if dtype != torch.float32 else max(2, stages // 2)


def _down_arrivals(H, device, config: DecodeConfig):
    """The down launch's arrival counters (one per block_h columns), or None with one split."""
    if config.down_splits == 1:
        return None
    return torch.empty(triton.cdiv(H, config.block_h), dtype=torch.int32, device=device)


def decode_gate_up(hidden, ids, w_gate_up, arrivals, config: DecodeConfig, shared_gate_up=None):
    """act [T*k (+ T with a shared expert), I] in hidden's dtype for the filled slots (then the
    shared expert's rows); also zeroes `arrivals` (if any)."""
    from .kernels.moe_matmul import moe_gate_up_decode_kernel

    T, H = hidden.shape
    k = ids.shape[1]
    E, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    has_shared = shared_gate_up is not None
    act = torch.empty(T * k + T * has_shared, inter, dtype=hidden.dtype, device=hidden.device)
    c = config
    experts = min(E, T * k) + has_shared
    grid = _persistent_grid(hidden.device, c, experts * triton.cdiv(inter, c.block_i))
    counters = (ids, 0) if arrivals is None else (arrivals, arrivals.numel())  # ids: unused
    moe_gate_up_decode_kernel[grid](
        hidden, hidden.stride(0), hidden.stride(1), w_gate_up, *w_gate_up.stride(),
        act, act.stride(0), ids, *counters, shared_gate_up if has_shared else w_gate_up,
        T, H, inter, E, k, BLOCK_I=c.block_i, BLOCK_K=c.k_gate_up, num_warps=c.warps_gate_up,
        num_stages=_stages(c.stages_gate_up, hidden.dtype), HAS_SHARED=has_shared,
        **_decode_pads(T, k, E, hidden.dtype))
    return act


def decode_down_combine(act, ids, weights, w_down, out, arrivals, config: DecodeConfig,
                        shared_down=None):
    """out = sum over slots of weight * act W_down^T (+ the shared expert's rows of act times
    shared_down^T); `arrivals` must hold zeros (or be None with one split): decode_gate_up
    zeroes them, and the launch leaves them zeroed."""
    from .kernels.moe_matmul import moe_down_combine_decode_kernel

    T, H = out.shape
    k = ids.shape[1]
    E, inter = w_down.shape[0], w_down.shape[2]
    c = config
    if c.down_splits == 1:
        partial, arrivals = out, ids  # unused by the one-split kernel
    else:
        partial = torch.empty(c.down_splits, T, H, dtype=torch.float32, device=out.device)
    moe_down_combine_decode_kernel[(triton.cdiv(H, c.block_h), c.down_splits)](
        act, act.stride(0), w_down, *w_down.stride(), ids, weights, out, out.stride(0),
        partial, arrivals, w_down if shared_down is None else shared_down, T, H, inter, E, k,
        BLOCK_H=c.block_h, BLOCK_K=c.k_down, EXPERT_SPLITS=c.down_splits,
        HAS_SHARED=shared_down is not None, num_warps=c.warps_down,
        num_stages=_stages(c.stages_down, act.dtype), **_decode_pads(T, k, E, act.dtype))
    return out


def decode_forward(hidden, ids, weights, w_gate_up, w_down, out, config: DecodeConfig,
                   shared=None):
    """Two launches: gate/up into act [T*k (+T), I], then down + weighted sum straight into out
    (the shared expert, if any, as one more expert that every token uses with weight 1)."""
    shared_gate_up, shared_down = shared if shared is not None else (None, None)
    arrivals = _down_arrivals(hidden.shape[1], hidden.device, config)
    act = decode_gate_up(hidden, ids, w_gate_up, arrivals, config, shared_gate_up)
    return decode_down_combine(act, ids, weights, w_down, out, arrivals, config, shared_down)


def grouped_forward(hidden, ids, weights, w_gate_up, w_down, out, config: GroupedConfig,
                    shared=None):
    """Four launches: align, gate/up, down into per-slot partials, combine; a shared expert (many
    tokens: prefill, not the decoding step) runs as torch GEMMs and is added after, in fp32."""
    E = w_gate_up.shape[0]
    lists = align_slots(ids.view(-1), E)
    act = expert_gate_up(hidden, w_gate_up, lists, ids.shape[1], config)
    partial = expert_down(act, w_down, lists, config)
    out = combine_slots(partial, ids, weights, out, E)
    if shared is not None:
        out.copy_(out.float() + shared_expert_fp32(hidden, *shared))
    return out


def shared_expert_fp32(hidden, shared_gate_up, shared_down):
    """down(silu(gate(x)) * up(x)) with fp32 products and activation (the kernels' numerics)."""
    inter = shared_gate_up.shape[0] // 2
    gate_up = hidden.float() @ shared_gate_up.float().T
    act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    return act.to(hidden.dtype).float() @ shared_down.float().T


def moe_forward_triton(hidden, topk_ids, topk_weights, w_gate_up, w_down, out=None,
                       path: str = "auto", decode: DecodeConfig = DEFAULT_DECODE,
                       grouped: GroupedConfig = DEFAULT_GROUPED, shared=None) -> torch.Tensor:
    """The Triton path of `moe_forward` (inputs already checked).

    path "auto" takes the decode path for T <= DECODE_MAX_TOKENS, else the grouped one.
    """
    T, k = topk_ids.shape
    out = torch.empty_like(hidden) if out is None else out
    if T == 0:
        return out
    if k == 0:  # no routed slot: zeros, or the shared expert alone
        return out.zero_() if shared is None else out.copy_(shared_expert_fp32(hidden, *shared))
    ids, weights = topk_ids.contiguous(), topk_weights.contiguous()
    if path == "auto":
        path = "decode" if T <= DECODE_MAX_TOKENS else "grouped"
    if path == "decode":
        return decode_forward(hidden, ids, weights, w_gate_up, w_down, out, decode, shared)
    return grouped_forward(hidden, ids, weights, w_gate_up, w_down, out, grouped, shared)


def _required(obj, path: str):
    """getattr along a dotted path, with an error naming what is missing."""
    for part in path.split("."):
        if not hasattr(obj, part) or getattr(obj, part) is None:
            raise ValueError(f"the official MoE module has no `{path}` (missing `{part}`)")
        obj = getattr(obj, part)
    return obj


class DMoEBlock(torch.nn.Module):
    """One LLaDA2 MoE MLP: fp32 router GEMM, `route`, routed experts, plus the shared expert.

    Expert weights are stacked in transformers 5's layout (w_gate_up [E, 2I, H], w_down [E, H, I]).
    The routing policy can be switched at run time with `set_policy` (no repacking).
    After each forward, `self.last_route` holds the RouteResult (tensors only, no sync).
    """

    def __init__(self, router_cfg: RouterConfig, policy: RoutingPolicy, gate_weight: torch.Tensor,
                 expert_bias: Optional[torch.Tensor], w_gate_up: torch.Tensor, w_down: torch.Tensor,
                 shared_expert: Optional[torch.nn.Module] = None, backend: str = "auto"):
        super().__init__()
        if not isinstance(router_cfg, RouterConfig):
            raise TypeError(f"router_cfg must be a RouterConfig, got {type(router_cfg).__name__}")
        E = router_cfg.num_experts
        if _shape(gate_weight) != (E, w_gate_up.shape[-1]):
            raise ValueError(f"gate_weight must have shape [{E}, H={w_gate_up.shape[-1]}], "
                             f"got {_shape(gate_weight)}")
        if w_gate_up.shape[0] != E:
            raise ValueError(f"w_gate_up must hold num_experts={E} experts, got {_shape(w_gate_up)}")
        if expert_bias is not None and _shape(expert_bias) != (E,):
            raise ValueError(f"expert_bias must have shape ({E},), got {_shape(expert_bias)}")
        self.router_cfg = router_cfg
        self.backend = backend
        self.set_policy(policy)
        # The router runs in fp32; keep an fp32 copy so a forward does not cast it every time.
        self.register_buffer("gate_weight", gate_weight.detach().float())
        bias = None if expert_bias is None else expert_bias.detach().float()
        self.register_buffer("expert_bias", bias)
        self.w_gate_up = torch.nn.Parameter(w_gate_up.detach(), requires_grad=False)
        self.w_down = torch.nn.Parameter(w_down.detach(), requires_grad=False)
        self.shared_expert = shared_expert
        self.register_buffer("shared_gate_up", self._stack_shared(shared_expert), persistent=False)
        self.last_route = None

    def _stack_shared(self, mlp) -> Optional[torch.Tensor]:
        """The shared expert's gate|up rows stacked like a routed expert's, with the module's
        gate/up weights turned into views of them (no second copy), so moe_forward runs it as
        one more expert of its launches; None (module called apart) if its shape differs."""
        gate = getattr(getattr(mlp, "gate_proj", None), "weight", None)
        up = getattr(getattr(mlp, "up_proj", None), "weight", None)
        down = getattr(getattr(mlp, "down_proj", None), "weight", None)
        like_gu, like_d = self.w_gate_up[0], self.w_down[0]
        if any(t is None for t in (gate, up, down)) or any(
                getattr(getattr(mlp, n), "bias", None) is not None
                for n in ("gate_proj", "up_proj", "down_proj")):
            return None
        if (gate.shape[0] * 2, gate.shape[1]) != like_gu.shape or up.shape != gate.shape \
                or down.shape != like_d.shape or down.stride() != like_d.stride() \
                or gate.dtype != like_gu.dtype:
            return None
        stacked = torch.cat((gate.detach(), up.detach()), 0)
        inter = gate.shape[0]
        mlp.gate_proj.weight = torch.nn.Parameter(stacked[:inter], requires_grad=False)
        mlp.up_proj.weight = torch.nn.Parameter(stacked[inter:], requires_grad=False)
        return stacked

    def shared_weights(self):
        """(gate_up, down) for moe_forward's `shared`, or None when not stacked."""
        if self.shared_gate_up is None:
            return None
        return self.shared_gate_up, self.shared_expert.down_proj.weight

    @classmethod
    def from_official(cls, mlp: torch.nn.Module, config, policy: RoutingPolicy,
                      backend: str = "auto") -> "DMoEBlock":
        """Build from an official LLaDA2 MoE MLP (`mlp.gate`, `mlp.experts`, `mlp.shared_experts`).

        Per-expert Linear weights are copied into stacked tensors expert by expert, and each
        expert's weights are released (set to None) as soon as they are copied, so the extra
        memory at any time is one layer's experts, never a second copy of the model. Experts
        already stacked in transformers 5's layout (`experts.gate_up_proj`, `experts.down_proj`)
        are used as they are.
        """
        cfg = RouterConfig.from_hf(config)
        gate_weight = _required(mlp, "gate.weight")
        expert_bias = getattr(mlp.gate, "expert_bias", None)
        experts = _required(mlp, "experts")
        shared = getattr(mlp, "shared_experts", None)
        if hasattr(experts, "gate_up_proj"):
            return cls(cfg, policy, gate_weight, expert_bias, experts.gate_up_proj.data,
                       experts.down_proj.data, shared, backend)
        if len(experts) != cfg.num_experts:
            raise ValueError(f"mlp.experts holds {len(experts)} experts, config says "
                             f"num_experts={cfg.num_experts}")
        first_gate = _required(experts[0], "gate_proj.weight")
        inter, H = first_gate.shape
        like = dict(dtype=first_gate.dtype, device=first_gate.device)
        w_gate_up = torch.empty(cfg.num_experts, 2 * inter, H, **like)
        w_down = torch.empty(cfg.num_experts, H, inter, **like)
        with torch.no_grad():
            for e, expert in enumerate(experts):
                for name, rows in (("gate_proj", w_gate_up[e, :inter]),
                                   ("up_proj", w_gate_up[e, inter:]), ("down_proj", w_down[e])):
                    weight = _required(expert, f"{name}.weight")
                    if weight.shape != rows.shape:
                        raise ValueError(f"mlp.experts.{e}.{name}.weight has shape "
                                         f"{_shape(weight)}, expected {_shape(rows)}")
                    rows.copy_(weight)
                    setattr(getattr(expert, name), "weight", None)  # release as we go
        return cls(cfg, policy, gate_weight, expert_bias, w_gate_up, w_down, shared, backend)

    def set_policy(self, policy: RoutingPolicy) -> None:
        if not isinstance(policy, RoutingPolicy):
            raise TypeError(f"policy must be a RoutingPolicy, got {type(policy).__name__}")
        policy.check(self.router_cfg)
        self.policy = policy

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, H] -> [B, L, H]; B independent sequences, blocks cut along L from row 0."""
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [B, L, H], got {_shape(hidden)}")
        B, L, H = hidden.shape
        with torch.autocast(hidden.device.type, enabled=False):  # the router runs in fp32
            logits = hidden.float() @ self.gate_weight.T
        r = route(logits, self.expert_bias, self.router_cfg, self.policy, self.backend)
        self.last_route = r
        k = r.topk_ids.shape[-1]
        shared = self.shared_weights()
        y = moe_forward(hidden.reshape(B * L, H), r.topk_ids.reshape(B * L, k),
                        r.topk_weights.reshape(B * L, k), self.w_gate_up, self.w_down,
                        backend=self.backend, check_ids=False, shared=shared).view(B, L, H)
        if self.shared_expert is not None and shared is None:
            y = y + self.shared_expert(hidden)
        return y

    def extra_repr(self) -> str:
        E, two_i, H = self.w_gate_up.shape
        return f"experts={E}, hidden={H}, intermediate={two_i // 2}, policy={self.policy}"


__all__ = ["moe_forward", "DMoEBlock", "DecodeConfig", "GroupedConfig", "check_moe_inputs"]
