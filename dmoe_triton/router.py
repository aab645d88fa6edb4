"""`route_hidden()`: a MoE layer's router from its hidden states, the fp32 GEMM included.

The model's MoE layers route `hidden @ gate_weight^T` (fp32 logits, docs/routing.md). On the
Triton path the GEMM is torch's fp32 matmul by default, or (RouterLaunch.use_kernel, off until
it is measured faster) kernels/router.py's `router_logits_kernel` (reads the bf16 hidden and
the fp32 weights as they are: no hidden.float() copy, no cuBLAS fp32 GEMM) and the routing is
`route_triton` (one launch for block policies, launch.RouteLaunch.fused). The reference path
is the published order of operations: `hidden.float() @ gate_weight.T`, then route_reference.

Logits differ from torch's fp32 matmul only by the order of the fp32 sum (a few ulps); the
routing of given logits is exact (tests/test_router.py holds both).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .config import RouterConfig, RoutingPolicy
from .launch import RouterLaunch, router_launch
from .routing import RouteResult, check_route_inputs, check_windows, resolve_backend, route

HIDDEN_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_router_inputs(hidden, gate_weight, num_experts: int) -> None:
    """hidden float [..., L, H] (L >= 1) and gate_weight fp32 [E, H] on hidden's device."""
    for name, t in (("hidden", hidden), ("gate_weight", gate_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in HIDDEN_TYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if hidden.dim() < 2 or hidden.shape[-2] < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., L, H] with L, H >= 1, got "
                         f"{tuple(hidden.shape)}")
    if tuple(gate_weight.shape) != (num_experts, hidden.shape[-1]):
        raise ValueError(f"gate_weight must have shape [{num_experts}, {hidden.shape[-1]}] "
                         f"(num_experts, H from hidden), got {tuple(gate_weight.shape)}")
    if gate_weight.dtype != torch.float32:
        raise TypeError(f"gate_weight must be float32 (the router runs in fp32), got "
                        f"{gate_weight.dtype}")
    if gate_weight.device != hidden.device:
        raise TypeError(f"gate_weight is on {gate_weight.device} but hidden on {hidden.device}")


def router_logits(hidden: torch.Tensor, gate_weight: torch.Tensor, out: torch.Tensor,
                  launch: Optional[RouterLaunch] = None) -> torch.Tensor:
    """out fp32 [T, E] = hidden [T, H] @ gate_weight [E, H]^T in fp32 (router_logits_kernel).

    Inputs already checked; hidden and gate_weight are read with their row strides (a view
    without unit stride along H is copied). Returns out.
    """
    from .kernels.router import router_logits_kernel

    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    gate_weight = gate_weight if gate_weight.stride(-1) == 1 else gate_weight.contiguous()
    T, H = hidden.shape
    E = gate_weight.shape[0]
    shapes = launch or router_launch(T, E)
    grid = (triton.cdiv(T, shapes.block_t), triton.cdiv(E, shapes.block_e), shapes.split_k)
    # Each split sums a whole number of reduction steps; the last split may get fewer columns.
    chunk = triton.cdiv(triton.cdiv(H, shapes.split_k), shapes.block_k) * shapes.block_k
    partial = arrivals = None
    if shapes.split_k > 1:  # fp32 partials and per-tile arrival counters (zero at launch)
        partial = torch.empty(shapes.split_k, T, E, dtype=torch.float32, device=out.device)
        arrivals = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=out.device)
    router_logits_kernel[grid](
        x_ptr=hidden, stride_xt=hidden.stride(0), w_ptr=gate_weight,
        stride_we=gate_weight.stride(0), logits_ptr=out, partial_ptr=partial,
        arrivals_ptr=arrivals, T=T, H=H, chunk=chunk, E=E, BLOCK_T=shapes.block_t,
        BLOCK_E=shapes.block_e, BLOCK_K=shapes.block_k, SPLIT_K=shapes.split_k,
        num_warps=shapes.warps)
    return out


def route_hidden(hidden: torch.Tensor, gate_weight: torch.Tensor,
                 expert_bias: Optional[torch.Tensor], cfg: RouterConfig, policy: RoutingPolicy,
                 backend: str = "auto", *, first_position: Optional[torch.Tensor] = None,
                 row_valid: Optional[torch.Tensor] = None,
                 row_masked: Optional[torch.Tensor] = None) -> RouteResult:
    """Route hidden states: `route(hidden.float() @ gate_weight.T, ...)` (docs/routing.md).

    hidden: fp32/fp16/bf16 [..., L, H], any strides; gate_weight: fp32 [E, H] (E =
    cfg.num_experts); expert_bias, first_position, row_valid, row_masked, backend: as `route`'s.
    Returns route's RouteResult. Errors: route's, plus a TypeError/ValueError naming hidden or
    gate_weight (dtype, shape, device), all raised before any kernel runs.
    Launch shapes: launch.router_launch (the GEMM) and launch.route_launch.
    """
    if not isinstance(cfg, RouterConfig):
        raise TypeError(f"cfg must be a RouterConfig, got {type(cfg).__name__}")
    check_router_inputs(hidden, gate_weight, cfg.num_experts)
    backend = resolve_backend(backend, hidden.device)
    logits = torch.empty(*hidden.shape[:-1], cfg.num_experts, dtype=torch.float32,
                         device=hidden.device)
    # route's own checks, before the GEMM launches (route repeats them: host work only)
    check_route_inputs(logits, expert_bias, cfg, policy)
    check_windows(logits, first_position, row_valid, row_masked)
    shapes = router_launch(logits.numel() // cfg.num_experts, cfg.num_experts)
    if backend == "reference" or not shapes.use_kernel:  # torch's fp32 GEMM (RouterLaunch)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = hidden.float() @ gate_weight.T
    else:
        router_logits(hidden.reshape(-1, hidden.shape[-1]), gate_weight,
                      logits.view(-1, cfg.num_experts), shapes)
    return route(logits, expert_bias, cfg, policy, backend, first_position=first_position,
                 row_valid=row_valid, row_masked=row_masked)


__all__ = ["route_hidden", "router_logits", "check_router_inputs"]
