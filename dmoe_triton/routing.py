"""`route()`: the public entry point of the routing layer (routing-spec.md).

Checks every input on the host (shapes, dtypes, devices: nothing that needs a sync), then either
launches the Triton kernels (`kernels/routing.py`: two launches per layer for block policies,
one for token policies) or runs the reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .config import RouterConfig, RoutingPolicy
from .reference import route_reference

BACKENDS = ("auto", "triton", "reference")
POLICY_CODE = {"token": 0, "topk_cap": 0, "dmoe": 1, "des_vote": 2}


@dataclass
class RouteResult:
    topk_ids: torch.Tensor        # int32 [..., L, k]; -1 marks an empty slot
    topk_weights: torch.Tensor    # float32 [..., L, k]; 0 in empty slots
    coreset: Optional[torch.Tensor]  # bool [..., n_blocks, E] for block policies, else None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" means the kernels on CUDA and the reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise TypeError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on the CPU set "
            "TRITON_INTERPRET=1 before importing dmoe_triton, or use backend='reference'"
        )
    return backend


def check_route_inputs(logits, expert_bias, cfg: RouterConfig, policy: RoutingPolicy):
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
          policy: RoutingPolicy, backend: str = "auto") -> RouteResult:
    """Route router logits [..., L, E] (fp32) to experts under `policy`.

    Leading dims are independent sequences; block policies cut each sequence's L rows into
    consecutive blocks of `policy.block_size` starting at row 0.
    """
    expert_bias = check_route_inputs(logits, expert_bias, cfg, policy)
    backend = resolve_backend(backend, logits.device)
    if backend == "reference":
        return RouteResult(*route_reference(logits, expert_bias, cfg, policy))
    return _route_triton(logits, expert_bias, cfg, policy)


@dataclass(frozen=True)
class RouteLaunch:
    """Launch shapes of the routing kernels (bench/bench_routing.py --sweep times variants)."""

    # Defaults: the fastest shapes of `bench_routing.py --sweep` on an H100 (E=256, 1 block).
    route_rows: int = 1        # route_kernel: rows per program
    route_warps: int = 1
    vote_rows: int = 16        # block_coreset_kernel: rows per chunk of the block's votes
    coreset_warps: int = 8


DEFAULT_LAUNCH = RouteLaunch()


def _route_triton(logits, expert_bias, cfg: RouterConfig, policy: RoutingPolicy,
                  launch: RouteLaunch = DEFAULT_LAUNCH) -> RouteResult:
    from .kernels.routing import block_coreset_kernel, route_kernel

    lead, (L, E) = logits.shape[:-2], logits.shape[-2:]
    x = logits.reshape(-1, L, E).contiguous()
    S = x.shape[0]
    k = policy.slots(cfg)
    ids = torch.empty(S, L, k, dtype=torch.int32, device=x.device)
    weights = torch.empty(S, L, k, dtype=torch.float32, device=x.device)
    # Token policies have no blocks: route_kernel then sees blocks of route_rows rows.
    bs = policy.block_size if policy.is_block else launch.route_rows
    n_blocks = triton.cdiv(L, bs)
    coreset = None
    if policy.is_block:
        coreset = torch.empty(S, n_blocks, E, dtype=torch.uint8, device=x.device)
        block_coreset_kernel[(S * n_blocks,)](
            x, expert_bias, coreset, L, n_blocks, bs,
            float(policy.top_p), policy.guard, policy.size,
            E=E, VOTE_K=cfg.top_k, POLICY=POLICY_CODE[policy.kind],
            BLOCK_T=min(launch.vote_rows, triton.next_power_of_2(bs)),
            E_PAD=triton.next_power_of_2(E), num_warps=launch.coreset_warps,
        )
    rows = min(launch.route_rows, triton.next_power_of_2(bs))
    chunks = triton.cdiv(bs, rows)
    route_kernel[(S * n_blocks * chunks,)](
        x, expert_bias, ids, weights, coreset if coreset is not None else ids,
        L, n_blocks, bs, chunks, float(cfg.routed_scaling_factor),
        E=E, N_GROUP=cfg.n_group, GROUP_SIZE=cfg.group_size, TOPK_GROUP=cfg.topk_group,
        TOP_K=k, HAS_CORESET=coreset is not None, BLOCK_T=rows,
        G_PAD=triton.next_power_of_2(cfg.n_group),
        GS_PAD=triton.next_power_of_2(cfg.group_size), K_PAD=triton.next_power_of_2(k),
        num_warps=launch.route_warps,
    )
    ids = ids.reshape(*lead, L, k)
    weights = weights.reshape(*lead, L, k)
    if coreset is None:
        return RouteResult(ids, weights, None)
    return RouteResult(ids, weights, coreset.view(torch.bool).reshape(*lead, n_blocks, E))
