"""Router configuration and routing policies (docs/routing.md, ../shared/docs/routing-spec.md).

Every parameter is validated here, on the host, before any kernel runs: a bad value is a
ValueError that names the parameter and the allowed range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        upper = "" if hi is None else f" and <= {hi}"
        raise ValueError(f"{name} must be >= {lo}{upper}, got {value}")
    return value


@dataclass(frozen=True)
class RouterConfig:
    """The gate of one MoE layer: sigmoid scores, group-limited top-k, scaled weights."""

    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        E = _check_int("num_experts", self.num_experts, 2)
        _check_int("top_k", self.top_k, 1, E)
        _check_int("n_group", self.n_group, 1, E)
        if E % self.n_group != 0:
            raise ValueError(f"num_experts ({E}) must be divisible by n_group ({self.n_group})")
        if E // self.n_group < 2:
            raise ValueError(
                f"n_group ({self.n_group}) must leave at least two experts per group "
                f"(num_experts={E})"
            )
        _check_int("topk_group", self.topk_group, 1, self.n_group)
        if self.topk_group * self.group_size < self.top_k:
            raise ValueError(
                f"topk_group * num_experts / n_group ({self.topk_group * self.group_size}) "
                f"must be >= top_k ({self.top_k})"
            )
        f = self.routed_scaling_factor
        if not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"routed_scaling_factor must be a finite float > 0, got {f!r}")

    @property
    def group_size(self) -> int:
        return self.num_experts // self.n_group

    @classmethod
    def from_hf(cls, config) -> "RouterConfig":
        """Read a LLaDA2 (`llada2_moe`) config object or dict."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        n_group = get("n_group") or 1
        return cls(
            num_experts=get("num_experts"),
            top_k=get("num_experts_per_tok"),
            n_group=n_group,
            topk_group=get("topk_group") or n_group,
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0) or 1.0),
        )


_KINDS = ("token", "dmoe", "des_vote", "topk_cap")


@dataclass(frozen=True)
class RoutingPolicy:
    """How tokens choose experts. Build with the class methods, not the constructor."""

    kind: str
    top_p: float = 1.0
    guard: int = 0
    block_size: int = 32
    size: int = 0
    k: int = 0

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"policy kind must be one of {_KINDS}, got {self.kind!r}")
        _check_int("block_size", self.block_size, 1)
        if self.kind == "dmoe":
            p = self.top_p
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0 < p <= 1):
                raise ValueError(f"top_p must be in (0, 1], got {p!r}")
            _check_int("guard", self.guard, 0)
        if self.kind == "des_vote":
            _check_int("size", self.size, 1)
        if self.kind == "topk_cap":
            _check_int("k", self.k, 1)

    @classmethod
    def token(cls) -> "RoutingPolicy":
        """The model's own gate: every token picks its top-k among all experts."""
        return cls("token")

    @classmethod
    def dmoe(cls, top_p: float = 0.6, guard: int = 16, block_size: int = 32) -> "RoutingPolicy":
        """dMoE: tokens choose inside the block's top-p coreset of summed expert votes."""
        return cls("dmoe", top_p=top_p, guard=guard, block_size=block_size)

    @classmethod
    def des_vote(cls, size: int = 38, block_size: int = 32) -> "RoutingPolicy":
        """DES-Vote: tokens choose inside the block's top-`size` experts by votes."""
        return cls("des_vote", size=size, block_size=block_size)

    @classmethod
    def topk_cap(cls, k: int = 4) -> "RoutingPolicy":
        """Token routing with top_k replaced by k (the paper's "Top-4" baseline)."""
        return cls("topk_cap", k=k)

    @property
    def is_block(self) -> bool:
        return self.kind in ("dmoe", "des_vote")

    def check(self, cfg: RouterConfig) -> None:
        """Validate the parameters that depend on the number of experts."""
        E = cfg.num_experts
        if self.kind == "dmoe":
            _check_int("guard", self.guard, 0, E)
        elif self.kind == "des_vote":
            _check_int("size", self.size, 1, E)
        elif self.kind == "topk_cap":
            _check_int("k", self.k, 1, E)

    def slots(self, cfg: RouterConfig) -> int:
        """Experts per token in the output (`topk_ids.shape[-1]`)."""
        return self.k if self.kind == "topk_cap" else cfg.top_k

    def __str__(self) -> str:
        if self.kind == "dmoe":
            return f"dmoe(top_p={self.top_p}, guard={self.guard}, block_size={self.block_size})"
        if self.kind == "des_vote":
            return f"des_vote(size={self.size}, block_size={self.block_size})"
        if self.kind == "topk_cap":
            return f"topk_cap(k={self.k})"
        return "token()"
