"""`route_hidden()`: a MoE layer's router from its hidden states: the logits GEMM, then `route`.

The model's MoE layers route the fp32 logits `hidden.float() @ gate_weight.float().T`
(docs/routing.md). LLaDA2 checkpoints store the gate weight in the model dtype (bf16), and
DMoEBlock keeps a bf16 copy of its fp32 gate weight when the two hold the same numbers. With bf16
hidden and a bf16 weight on CUDA, the GEMM is a bf16 GEMM with fp32 accumulation and fp32
output, one launch reading half the weight bytes, where the fp32 GEMM needs a hidden.float()
copy, an fp32 sgemm and its split-K reduction (cuBLAS: 5.4 against 12.6 us for one 32-row block
on the H200, weights from DRAM: bench_routing --router). For a decode step's rows on Hopper
(launch.takes_skinny) it is skinny_gemm's (kernels/skinny_gemm.py: 4.5 us against cuBLAS's
5.8 for 32 rows, weights from HBM, bench/probe_skinny.py on the H200), else cuBLAS's
(`torch.mm(..., out_dtype=torch.float32)`).
It is the same sum: a bf16 x bf16 product is exact in fp32 (8 x 8 significant bits), so the
logits are the spec's sum of the same fp32 terms, accumulated in fp32 in another order.
Everything else (fp32 or fp16 hidden, an fp32 weight, CPU tensors: torch's mm has no CPU
out_dtype kernel; autograd: mm with out_dtype has no derivative; backend "reference") runs the
spec's fp32 GEMM. tests/test_router.py holds the ties and the rounding bound.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import RouterConfig, RoutingPolicy
from .launch import KERNEL_FLOATS, takes_skinny
from .routing import RouteResult, check_route_inputs, check_windows, resolve_backend, route
from .skinny import skinny_gemm

WEIGHT_TYPES = (torch.float32, torch.bfloat16)


def check_router_inputs(hidden, gate_weight, num_experts: int) -> None:
    """hidden float [..., L, H] (L >= 1) and gate_weight fp32 or bf16 [E, H] on hidden's
    device; else a TypeError (type, dtype, device) or ValueError (shape) naming the argument."""
    for name, t in (("hidden", hidden), ("gate_weight", gate_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in KERNEL_FLOATS:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if hidden.dim() < 2 or hidden.shape[-2] < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., L, H] with L, H >= 1, got "
                         f"{tuple(hidden.shape)}")
    if tuple(gate_weight.shape) != (num_experts, hidden.shape[-1]):
        raise ValueError(f"gate_weight must have shape [{num_experts}, {hidden.shape[-1]}] "
                         f"(num_experts, H from hidden), got {tuple(gate_weight.shape)}")
    if gate_weight.dtype not in WEIGHT_TYPES:
        raise TypeError(f"gate_weight must be float32 or bfloat16 (the router sums in fp32), "
                        f"got {gate_weight.dtype}")
    if gate_weight.device != hidden.device:
        raise TypeError(f"gate_weight is on {gate_weight.device} but hidden on {hidden.device}")


def uses_bf16_gemm(hidden: torch.Tensor, gate_weight: torch.Tensor, backend: str) -> bool:
    """Whether `gate_logits` runs the bf16 GEMM (module docstring): bf16 hidden and weight
    on CUDA, backend "triton" (resolved), and no gradient asked for (mm with out_dtype has
    none in torch 2.11)."""
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or gate_weight.requires_grad)
    return (backend == "triton" and hidden.is_cuda and not wants_grad
            and hidden.dtype == gate_weight.dtype == torch.bfloat16)


def gate_logits(hidden: torch.Tensor, gate_weight: torch.Tensor, backend: str) -> torch.Tensor:
    """The router logits fp32 [..., L, E] = hidden [..., L, H] @ gate_weight [E, H]^T, summed
    in fp32 (inputs checked by check_router_inputs, backend resolved: "triton"/"reference").

    The bf16 GEMM with fp32 output where uses_bf16_gemm says so (skinny_gemm where
    launch.takes_skinny says so, else cuBLAS's), else the spec's
    `hidden.float() @ gate_weight.float().T`; both with autocast off (the router runs in fp32,
    and autocast would cast the GEMM's inputs to its own dtype)."""
    with torch.autocast(hidden.device.type, enabled=False):
        if uses_bf16_gemm(hidden, gate_weight, backend):
            rows = hidden.reshape(-1, hidden.shape[-1])
            if takes_skinny(rows.shape[0], rows.device):
                logits = skinny_gemm(rows, gate_weight, torch.float32)
            else:
                logits = torch.mm(rows, gate_weight.T, out_dtype=torch.float32)
            return logits.view(*hidden.shape[:-1], gate_weight.shape[0])
        return hidden.float() @ gate_weight.float().T


def route_hidden(hidden: torch.Tensor, gate_weight: torch.Tensor,
                 expert_bias: Optional[torch.Tensor], cfg: RouterConfig, policy: RoutingPolicy,
                 backend: str = "auto", *, first_position: Optional[torch.Tensor] = None,
                 row_valid: Optional[torch.Tensor] = None,
                 row_masked: Optional[torch.Tensor] = None) -> RouteResult:
    """Route hidden states: `route(hidden.float() @ gate_weight.float().T, ...)`
    (docs/routing.md).

    hidden: fp32/fp16/bf16 [..., L, H], any strides; gate_weight: fp32 or bf16 [E, H] (E =
    cfg.num_experts), holding the gate's values: pass a bf16 weight only when it equals the
    fp32 gate exactly (DMoEBlock.gate_weight_for does); expert_bias, first_position,
    row_valid, row_masked, backend: as `route`'s. The logits GEMM is gate_logits': a bf16
    GEMM with fp32 accumulation for bf16 hidden and weight on CUDA (backend "triton"/"auto",
    no grad), the spec's fp32 GEMM otherwise; the same fp32 terms either way (module
    docstring), so the logits differ only by the order of the fp32 sum.
    Returns route's RouteResult. Errors: route's, plus a TypeError/ValueError naming hidden or
    gate_weight (dtype, shape, device), all raised before any kernel runs.
    """
    if not isinstance(cfg, RouterConfig):
        raise TypeError(f"cfg must be a RouterConfig, got {type(cfg).__name__}")
    check_router_inputs(hidden, gate_weight, cfg.num_experts)
    backend = resolve_backend(backend, hidden.device)
    # route's own checks, before the GEMM runs (route repeats them: host work only), on a
    # stand-in for the logits: their shape, dtype and device, no memory
    stand_in = torch.empty((), dtype=torch.float32, device=hidden.device).expand(
        *hidden.shape[:-1], cfg.num_experts)
    check_route_inputs(stand_in, expert_bias, cfg, policy)
    check_windows(stand_in, first_position, row_valid, row_masked)
    logits = gate_logits(hidden, gate_weight, backend)
    return route(logits, expert_bias, cfg, policy, backend, first_position=first_position,
                 row_valid=row_valid, row_masked=row_masked)


__all__ = ["route_hidden", "gate_logits", "uses_bf16_gemm", "check_router_inputs"]
