"""`route()`: the public entry point of the routing layer (docs/routing.md).

Checks every input on the host (shapes, dtypes, devices: nothing that needs a sync), then either
launches the Triton kernels (`kernels/routing.py`: three launches per layer for block policies,
the votes split over programs, the coreset, the picks; one for token policies) or runs the
reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .config import RouterConfig, RoutingPolicy
from .launch import RouteLaunch, pdl, route_launch
from .reference import route_reference

BACKENDS = ("auto", "triton", "reference")


@dataclass
class RouteResult:
    """What `route` returns (docs/routing.md, Outputs)."""

    topk_ids: torch.Tensor        # int32 [..., L, k]; -1 marks an empty slot
    topk_weights: torch.Tensor    # float32 [..., L, k]; 0 in empty slots
    coreset: Optional[torch.Tensor]  # bool [..., n_blocks, E] for block policies, else None


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET set): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_interpreted_dot(name: str, t: torch.Tensor) -> None:
    """Under Triton's interpreter (TRITON_INTERPRET=1) tl.dot on bfloat16 operands returns wrong
    values, not rounded ones (about 1e10 off on outputs near 10 in the MoE kernels; Triton 3.6
    and 3.9), so a kernel whose products would take bf16 operands refuses `t` there with a
    TypeError naming it instead of returning them. bf16 runs right on CUDA devices."""
    if interpreting() and t.dtype == torch.bfloat16:
        raise TypeError(
            f"{name} is bfloat16, whose products Triton's interpreter (TRITON_INTERPRET=1) "
            "computes wrongly; on the CPU use float32 or float16 tensors, or "
            "backend='reference'")


def check_kernel_device(subject: str, device: torch.device, alternative: str = "") -> None:
    """Triton's kernels run on CUDA tensors, or on CPU tensors under the interpreter; else a
    TypeError: `subject` (what needs CUDA tensors), the device got, how to run on the CPU, and
    `alternative` after it."""
    if device.type != "cuda" and not interpreting():
        raise TypeError(f"{subject} (got {device.type}); on the CPU set TRITON_INTERPRET=1 "
                        f"before importing dmoe_triton{alternative}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """backend: one of BACKENDS; device: the inputs' device. Returns "triton" or "reference":
    "auto" means the kernels on CUDA and the reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton":
        check_kernel_device("backend='triton' needs CUDA tensors", device,
                            ", or use backend='reference'")
    return backend


def check_route_inputs(logits, expert_bias, cfg: RouterConfig, policy: RoutingPolicy):
    """Host checks of route's arguments; returns expert_bias (zeros [E] fp32 if None)."""
    if not isinstance(cfg, RouterConfig):
        raise TypeError(f"cfg must be a RouterConfig, got {type(cfg).__name__}")
    if not isinstance(policy, RoutingPolicy):
        raise TypeError(f"policy must be a RoutingPolicy, got {type(policy).__name__}")
    policy.check(cfg)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32 (the router runs in fp32), got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[-1] != cfg.num_experts:
        raise ValueError(
            f"logits must have shape [..., L, {cfg.num_experts}], got {tuple(logits.shape)}"
        )
    if logits.shape[-2] < 1:
        raise ValueError(f"logits must hold at least one row (L >= 1), got {tuple(logits.shape)}")
    if expert_bias is None:
        return torch.zeros(cfg.num_experts, dtype=torch.float32, device=logits.device)
    if not isinstance(expert_bias, torch.Tensor):
        raise TypeError(f"expert_bias must be a torch.Tensor or None, got {type(expert_bias)}")
    if tuple(expert_bias.shape) != (cfg.num_experts,):
        raise ValueError(
            f"expert_bias must have shape ({cfg.num_experts},), got {tuple(expert_bias.shape)}"
        )
    if expert_bias.dtype != torch.float32:
        raise TypeError(f"expert_bias must be float32, got {expert_bias.dtype}")
    if expert_bias.device != logits.device:
        raise TypeError(
            f"expert_bias is on {expert_bias.device} but logits on {logits.device}"
        )
    return expert_bias


def route(logits: torch.Tensor, expert_bias: Optional[torch.Tensor], cfg: RouterConfig,
          policy: RoutingPolicy, backend: str = "auto", *,
          first_position: Optional[torch.Tensor] = None,
          row_valid: Optional[torch.Tensor] = None,
          row_masked: Optional[torch.Tensor] = None) -> RouteResult:
    """Route router logits to experts under `policy` (docs/routing.md).

    logits: fp32 [..., L, E], E = cfg.num_experts; leading dims are independent sequences.
    expert_bias: fp32 [E] on logits' device, or None (zeros).
    first_position: int32/int64 [...] on logits' device, or None (0): the absolute position of
    each sequence's row 0 (a KV cache or left padding before it). Block policies cut windows
    of `policy.block_size` by absolute position: row i is in window
    (first_position + i) // block_size. A device tensor, so a CUDA graph can replay it.
    row_valid: bool [..., L] or None (all real): padding rows never vote; a window without a
    real row has an empty coreset (its rows take no expert).
    row_masked: bool [..., L] or None (no row masked): the rows that hold the mask token; the
    expert-choice capacity schedules read the window's mask ratio from it (required by the
    "linear" and "linear_reverse" schedules, a ValueError without it), the others ignore it.
    backend: "auto" (kernels on CUDA), "triton" or "reference".
    Returns RouteResult: topk_ids int32 [..., L, slots] (-1 = empty), topk_weights fp32
    [..., L, slots], coreset bool [..., n_windows, E] or None (slot j = absolute window
    first_position // block_size + j; n_windows = cdiv(L, block_size), or
    cdiv(L + block_size - 1, block_size) with first_position); slots = policy.slots(cfg)
    (expert choice: E, slot e holds e or -1).
    Launch shapes: dmoe_triton.launch (route_launch, override).
    """
    expert_bias = check_route_inputs(logits, expert_bias, cfg, policy)
    check_windows(logits, first_position, row_valid, row_masked)
    if policy.is_expert_choice and policy.schedule != "fixed" and row_masked is None:
        raise ValueError(f"row_masked is required by schedule {policy.schedule!r} (the window's "
                         "mask ratio sets its capacity); got None")
    backend = resolve_backend(backend, logits.device)
    if backend == "reference":
        return RouteResult(*route_reference(logits, expert_bias, cfg, policy, first_position,
                                            row_valid, row_masked))
    if policy.is_expert_choice:
        return expert_choice_triton(logits, expert_bias, cfg, policy, first_position=first_position,
                                    row_valid=row_valid, row_masked=row_masked)
    return route_triton(logits, expert_bias, cfg, policy, first_position=first_position,
                        row_valid=row_valid)


def check_windows(logits, first_position, row_valid, row_masked=None) -> None:
    """Shapes, dtypes and devices of route's window arguments (no sync)."""
    lead, L = tuple(logits.shape[:-2]), logits.shape[-2]
    for name, t, shape, dtypes in (
            ("first_position", first_position, lead, (torch.int32, torch.int64)),
            ("row_valid", row_valid, lead + (L,), (torch.bool,)),
            ("row_masked", row_masked, lead + (L,), (torch.bool,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (logits' leading dims"
                             f"{'' if name == 'first_position' else ' and L'}), got "
                             f"{list(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if t.device != logits.device:
            raise TypeError(f"{name} is on {t.device} but logits on {logits.device}")


def route_triton(logits, expert_bias, cfg: RouterConfig, policy: RoutingPolicy,
                 launch: Optional[RouteLaunch] = None, *, first_position=None,
                 row_valid=None) -> RouteResult:
    """The Triton path of `route`, inputs already checked (benches time it without the checks).

    logits: fp32 [..., L, E] (E = cfg.num_experts); expert_bias: fp32 [E] on logits' device.
    launch: the kernels' shapes (default: launch.route_launch, or a `launch.override`).
    Returns a RouteResult shaped like `route`'s.
    """
    lead, (L, E) = logits.shape[:-2], logits.shape[-2:]
    # The kernels read logits [S, L, E] and the bias [E] densely: any view is made so (issue 11).
    x = logits.reshape(-1, L, E).contiguous()
    expert_bias = expert_bias.contiguous()
    S = x.shape[0]
    top_k = policy.slots(cfg)
    ids = torch.empty(S, L, top_k, dtype=torch.int32, device=x.device)
    weights = torch.empty(S, L, top_k, dtype=torch.float32, device=x.device)
    shapes = launch or route_launch(E, x.device)
    # Token policies have no blocks: route_kernel then sees blocks of route_rows rows.
    block_size = policy.block_size if policy.is_block else shapes.route_rows
    # Window slots: with first_position, a forward's rows may start mid-window (one more slot).
    windowed = policy.is_block and first_position is not None
    n_blocks = triton.cdiv(L + block_size - 1 if windowed else L, block_size)
    first_position = first_position.reshape(S).contiguous() if windowed else None
    row_valid = (row_valid.reshape(S, L).contiguous().view(torch.uint8)
                 if policy.is_block and row_valid is not None else None)
    coreset = None
    if policy.is_block:
        coreset = torch.empty(S, n_blocks, E, dtype=torch.uint8, device=x.device)
    if policy.is_block:
        size = policy.expert_capacity if policy.kind == "capacity" else policy.size
        block_coreset(x, expert_bias, coreset, first_position, row_valid, policy.code,
                      (float(policy.top_p), policy.guard, size), cfg.top_k, shapes, block_size)
    _route_rows(x, expert_bias, ids, weights, coreset, first_position, cfg, policy, shapes,
                n_blocks, block_size)
    ids = ids.reshape(*lead, L, top_k)
    weights = weights.reshape(*lead, L, top_k)
    if coreset is None:
        return RouteResult(ids, weights, None)
    return RouteResult(ids, weights, coreset.view(torch.bool).reshape(*lead, n_blocks, E))


def block_coreset(x, expert_bias, coreset, first_position, row_valid, code: int,
                  rule: tuple, top_k: int, shapes: RouteLaunch, block_size: int) -> None:
    """Every window's coreset into `coreset` (uint8 [S, n_blocks, E], in place).

    x: fp32 [S, L, E] logits, dense; first_position int [S] or None; row_valid uint8 [S, L] or
    None; code: kernels/policy_codes.py's policy code; rule: (top_p, guard, coreset_size) as
    block_coreset_kernel takes them; top_k: the votes per row. With shapes.vote_split > 1 the
    window's rows vote in that many programs first (block_votes_kernel: fp32 [S * n_blocks,
    split, E_PAD] shares), and the coreset program adds their shares.
    """
    from .kernels.policy_codes import CAPACITY
    from .kernels.routing import block_coreset_kernel, block_votes_kernel

    S, L, E = x.shape
    n_blocks = coreset.shape[1]
    e_pad = triton.next_power_of_2(E)
    window = dict(first_position_ptr=first_position, row_valid_ptr=row_valid, L=L,
                  n_blocks=n_blocks, block_size=block_size, E=E, VOTE_K=top_k, E_PAD=e_pad,
                  VOTE_COLS=shapes.vote_cols_for(E))
    split = min(shapes.vote_split, block_size)
    votes = real = None
    if split > 1:
        part_rows = triton.cdiv(block_size, split)
        votes = torch.empty(S * n_blocks, split, e_pad, dtype=torch.float32, device=x.device)
        real = torch.empty(S * n_blocks, split, dtype=torch.int32, device=x.device)
        block_votes_kernel[(S * n_blocks, split)](
            logits_ptr=x, bias_ptr=expert_bias, votes_ptr=votes, real_ptr=real, **window,
            part_rows=part_rows, MAX_SCORE=code == CAPACITY,
            BLOCK_T=min(shapes.vote_rows, triton.next_power_of_2(part_rows)),
            num_warps=shapes.vote_warps, **pdl(x.device))
    top_p, guard, coreset_size = rule
    block_coreset_kernel[(S * n_blocks,)](
        logits_ptr=x, bias_ptr=expert_bias, coreset_ptr=coreset, votes_ptr=votes,
        real_ptr=real, **window, parts=split, PARTS_PAD=triton.next_power_of_2(split),
        top_p=top_p, guard=guard, coreset_size=coreset_size, POLICY=code,
        BLOCK_T=min(shapes.vote_rows, triton.next_power_of_2(block_size)),
        num_warps=shapes.coreset_warps, **pdl(x.device))


def _route_rows(x, expert_bias, ids, weights, coreset, first_position, cfg, policy, shapes,
                n_blocks, block_size) -> None:
    """route_kernel over every row (after block_coreset_kernel for block policies)."""
    from .kernels.routing import route_kernel

    S, L, E = x.shape
    top_k = ids.shape[-1]
    rows = min(shapes.route_rows, triton.next_power_of_2(block_size))
    chunks = triton.cdiv(block_size, rows)
    cfg = policy.pick_config(cfg)  # capacity routing: a plain top-k (one group of all experts)
    route_kernel[(S * n_blocks * chunks,)](
        logits_ptr=x, bias_ptr=expert_bias, ids_ptr=ids, weights_ptr=weights,
        coreset_ptr=coreset, first_position_ptr=first_position, L=L, n_blocks=n_blocks,
        block_size=block_size,
        chunks_per_block=chunks, scaling=float(cfg.routed_scaling_factor),
        E=E, N_GROUP=cfg.n_group, GROUP_SIZE=cfg.group_size, TOPK_GROUP=cfg.topk_group,
        TOP_K=top_k, BLOCK_T=rows, G_PAD=triton.next_power_of_2(cfg.n_group),
        GS_PAD=triton.next_power_of_2(cfg.group_size), TOP_K_PAD=triton.next_power_of_2(top_k),
        num_warps=shapes.route_warps, **pdl(x.device),
    )


def _row_flags(flags, S: int, L: int):
    """A bool [..., L] window argument as the kernels read it: uint8 [S, L], dense; or None."""
    return None if flags is None else flags.reshape(S, L).contiguous().view(torch.uint8)


def expert_choice_triton(logits, expert_bias, cfg: RouterConfig, policy: RoutingPolicy,
                         launch: Optional[RouteLaunch] = None, *, first_position=None,
                         row_valid=None, row_masked=None) -> RouteResult:
    """The Triton path of `route` for the expert-choice policies (kernels/expert_choice.py),
    inputs already checked: for "ec_coreset" first the dMoE coreset of each window (the routing
    kernels' block_coreset, as dMoE computes it), then one expert-choice program per window.

    logits: fp32 [..., L, E]; expert_bias: fp32 [E]; row_masked: bool [..., L] or None.
    Returns a RouteResult: ids int32 / weights fp32 [..., L, E] (slot e: e or -1), coreset bool
    [..., n_windows, E] (the eligible experts of each window).
    """
    from .config import SCHEDULES
    from .kernels import policy_codes
    from .kernels.expert_choice import expert_choice_kernel
    lead, (L, E) = logits.shape[:-2], logits.shape[-2:]
    x = logits.reshape(-1, L, E).contiguous()  # the kernels read logits and bias densely
    expert_bias = expert_bias.contiguous()
    S, bs = x.shape[0], policy.block_size
    shapes = launch or route_launch(E, x.device)
    n_blocks = triton.cdiv(L if first_position is None else L + bs - 1, bs)
    first_position = None if first_position is None else first_position.reshape(S).contiguous()
    row_valid, row_masked = _row_flags(row_valid, S, L), _row_flags(row_masked, S, L)
    coreset = torch.empty(S, n_blocks, E, dtype=torch.uint8, device=x.device)
    window = dict(logits_ptr=x, bias_ptr=expert_bias, coreset_ptr=coreset,
                  first_position_ptr=first_position, row_valid_ptr=row_valid, L=L,
                  n_blocks=n_blocks, block_size=bs, E=E, E_PAD=triton.next_power_of_2(E))
    if policy.kind == "ec_coreset":
        block_coreset(x, expert_bias, coreset, first_position, row_valid, policy_codes.DMOE,
                      (float(policy.top_p), policy.guard, 0), cfg.top_k, shapes, bs)
    ids = torch.empty(S, L, E, dtype=torch.int32, device=x.device)
    weights = torch.empty(S, L, E, dtype=torch.float32, device=x.device)
    expert_choice_kernel[(S * n_blocks,)](
        **window, row_masked_ptr=row_masked, ids_ptr=ids, weights_ptr=weights,
        k_min=policy.k_min, k_max=policy.k_max, scaling=float(cfg.routed_scaling_factor),
        SCHEDULE=SCHEDULES.index(policy.schedule), HAS_CORESET=policy.kind == "ec_coreset",
        BLOCK_T=triton.next_power_of_2(bs), num_warps=shapes.expert_choice_warps,
        **pdl(x.device))
    return RouteResult(ids.reshape(*lead, L, E), weights.reshape(*lead, L, E),
                       coreset.view(torch.bool).reshape(*lead, n_blocks, E))

