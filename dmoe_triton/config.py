"""Router configuration and routing policies (the routing contract: docs/routing.md).

Every parameter is validated here, on the host, before any kernel runs: a bad value is a
ValueError that names the parameter and the allowed range.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

from .kernels import policy_codes as codes


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


@dataclass(frozen=True)
class PolicyParam:
    """One parameter of a routing policy: a `RoutingPolicy` field and its allowed range."""

    name: str
    kind: type                 # int or float
    lo: float                  # smallest allowed value (excluded when lo_open)
    lo_open: bool = False
    hi: Optional[float] = None # largest allowed value, if fixed
    hi_experts: bool = False   # largest allowed value = num_experts (checked by policy.check)
    lo_top_k: bool = False     # smallest allowed value = the model's top_k (policy.check)

    def check(self, value, num_experts: Optional[int] = None, top_k: Optional[int] = None) -> None:
        hi = num_experts if (self.hi_experts and num_experts is not None) else self.hi
        lo = top_k if (self.lo_top_k and top_k is not None) else self.lo
        if self.kind is int:
            _check_int(self.name, value, int(lo), None if hi is None else int(hi))
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{self.name} must be a float, got {type(value).__name__}")
        ok = value > self.lo if self.lo_open else value >= self.lo
        if not ok or (hi is not None and value > hi):
            interval = f"{'(' if self.lo_open else '['}{self.lo:g}, {hi:g}]"
            raise ValueError(f"{self.name} must be in {interval}, got {value!r}")


@dataclass(frozen=True)
class PolicyKind:
    """One routing policy: its name, parameters, the code its kernels branch on, whether it
    routes by blocks (a coreset per block of `block_size` rows), and which parameter (if any)
    replaces the model's top_k as the number of slots per token. Adding a policy: one entry in
    POLICIES, a constructor on RoutingPolicy, a code in kernels/policy_codes.py and its branch."""

    name: str
    code: int
    is_block: bool
    params: Tuple[PolicyParam, ...] = ()
    slots_param: Optional[str] = None
    plain_top_k: bool = False  # tokens pick a plain (not group-limited) top-k in the coreset
    expert_slots: bool = False  # expert choice: one slot per expert (slot e holds e or -1)


_TOP_P = PolicyParam("top_p", float, 0.0, lo_open=True, hi=1.0)
_GUARD = PolicyParam("guard", int, 0, hi_experts=True)
_SIZE = PolicyParam("size", int, 1, hi_experts=True)
_K = PolicyParam("k", int, 1, hi_experts=True)
_BLOCK_SIZE = PolicyParam("block_size", int, 1)
_CAPACITY = PolicyParam("expert_capacity", int, 1, hi_experts=True, lo_top_k=True)
# Expert choice: the window's capacity is cdiv(rows * k, eligible experts), so k >= 1 keeps it
# >= 1 and k <= E keeps it <= rows (docs/routing.md, Expert choice).
_K_MIN = PolicyParam("k_min", int, 1, hi_experts=True)
_K_MAX = PolicyParam("k_max", int, 1, hi_experts=True)
# The capacity schedules of expert choice, by the window's mask ratio m (docs/routing.md).
SCHEDULES = ("fixed", "linear", "linear_reverse")


def _check_schedule(schedule) -> None:
    """A TypeError for a schedule that is not a str, a ValueError for one not in SCHEDULES."""
    if not isinstance(schedule, str):
        raise TypeError(f"schedule must be a str, one of {SCHEDULES}, got "
                        f"{type(schedule).__name__}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


POLICIES = {kind.name: kind for kind in (
    PolicyKind("token", codes.TOKEN.value, is_block=False),
    PolicyKind("dmoe", codes.DMOE.value, is_block=True, params=(_TOP_P, _GUARD)),
    PolicyKind("des_vote", codes.DES_VOTE.value, is_block=True, params=(_SIZE,)),
    PolicyKind("topk_cap", codes.TOKEN.value, is_block=False, params=(_K,), slots_param="k"),
    PolicyKind("capacity", codes.CAPACITY.value, is_block=True, params=(_CAPACITY,),
               plain_top_k=True),
    PolicyKind("expert_choice", codes.EXPERT_CHOICE.value, is_block=True,
               params=(_K_MIN, _K_MAX), expert_slots=True),
    PolicyKind("ec_coreset", codes.EXPERT_CHOICE.value, is_block=True,
               params=(_TOP_P, _GUARD, _K_MIN, _K_MAX), expert_slots=True),
)}
EXPERT_CHOICE_KINDS = ("expert_choice", "ec_coreset")
POLICY_NAMES = tuple(POLICIES)


@dataclass(frozen=True)
class RoutingPolicy:
    """How tokens choose experts. Build with the class methods, not the constructor.

    Fields: kind (a name in POLICY_NAMES) and the parameters its POLICIES entry lists; the
    others keep their defaults and are ignored. block_size: rows per routing block.
    """

    kind: str
    top_p: float = 1.0
    guard: int = 0
    block_size: int = 32
    size: int = 0
    k: int = 0
    expert_capacity: int = 0
    schedule: str = "fixed"
    k_min: int = 0
    k_max: int = 0

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"policy kind must be one of {POLICY_NAMES}, got {self.kind!r}")
        _BLOCK_SIZE.check(self.block_size)
        for param in self.spec.params:
            param.check(getattr(self, param.name))
        if self.is_expert_choice:
            _check_schedule(self.schedule)
            if self.k_min > self.k_max:
                raise ValueError(f"k_min ({self.k_min}) must be <= k_max ({self.k_max})")
            if self.schedule == "fixed" and self.k_min != self.k_max:
                raise ValueError(f"schedule 'fixed' takes one k (k_min == k_max), got k_min="
                                 f"{self.k_min}, k_max={self.k_max}")

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

    @classmethod
    def capacity(cls, expert_capacity: int = 48, block_size: int = 32) -> "RoutingPolicy":
        """LLaDA2.2's own block routing: each window keeps the `expert_capacity` experts with
        the largest maximum score over its rows; tokens take a plain top-k inside them."""
        return cls("capacity", expert_capacity=expert_capacity, block_size=block_size)

    @classmethod
    def expert_choice(cls, k: Optional[int] = None, schedule: str = "fixed",
                      k_min: Optional[int] = None, k_max: Optional[int] = None,
                      block_size: int = 32, coreset_top_p: Optional[float] = None,
                      guard: Optional[int] = None) -> "RoutingPolicy":
        """Expert choice (EC-DLM): each eligible expert takes its top-c rows of the window by
        affinity, c = min(rows, cdiv(rows * k, eligible experts)) with k from the schedule at
        the window's mask ratio (docs/routing.md, Expert choice).

        schedule "fixed" uses k (default 8); "linear" (k_min at no mask to k_max all masked)
        and "linear_reverse" (k_max at no mask to k_min all masked) use k_min and k_max, and
        a k given with them is an error (it would be ignored).
        coreset_top_p None: every expert is eligible (kind "expert_choice"); a float: only the
        window's dMoE coreset (top_p, guard; guard defaults to 16) is, kind "ec_coreset".
        ValueError (naming it) for an unknown schedule, k / k_min / k_max outside [1, E]
        (checked against E when routed), k_min > k_max, a missing k_min / k_max, a guard
        without coreset_top_p (it would be ignored); TypeError for a schedule not a str."""
        _check_schedule(schedule)  # first: the other errors depend on the schedule
        if schedule == "fixed":
            k = 8 if k is None else k  # LLaDA2's top-k
            _check_int("k", k, 1)
            if k_min is not None or k_max is not None:
                raise ValueError("k_min / k_max are for the linear schedules; schedule 'fixed' "
                                 f"takes k, got k_min={k_min!r}, k_max={k_max!r}")
            k_min = k_max = k
        elif k_min is None or k_max is None:
            raise ValueError(f"schedule {schedule!r} needs k_min and k_max, got k_min={k_min!r}, "
                             f"k_max={k_max!r}")
        elif k is not None:
            raise ValueError(f"k is for schedule 'fixed'; schedule {schedule!r} takes k_min and "
                             f"k_max, got k={k!r}")
        if coreset_top_p is None:
            if guard is not None:
                raise ValueError(f"guard is for expert choice inside the coreset; pass "
                                 f"coreset_top_p with it, got guard={guard!r} alone")
            return cls("expert_choice", schedule=schedule, k_min=k_min, k_max=k_max,
                       block_size=block_size)
        guard = 16 if guard is None else guard  # dMoE's guard
        return cls("ec_coreset", top_p=coreset_top_p, guard=guard, schedule=schedule,
                   k_min=k_min, k_max=k_max, block_size=block_size)

    @classmethod
    def from_config(cls, config) -> "RoutingPolicy":
        """The routing a checkpoint was trained for (docs/routing.md, "The checkpoint chooses"):
        capacity routing for `expert_capacity` > 0 (window `block_size`, default 32); expert
        choice for `expert_choice_schedule` (inside the dMoE coreset with `core_threshold`;
        _expert_choice_from_config); dMoE (top_p = `core_threshold`, default 0.6; guard 16
        scaled to the expert count) for a config with `core_threshold` or `mode ==
        "aggregate"`; token routing otherwise.
        config: a transformers config object or a dict. A ValueError names expert_capacity
        outside [num_experts_per_tok, num_experts], and block_size < 1."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        capacity = get("expert_capacity") or 0
        if capacity:
            top_k, E = get("num_experts_per_tok"), get("num_experts")
            if not isinstance(capacity, int) or not top_k <= capacity <= E:
                raise ValueError(f"expert_capacity must be an int in [num_experts_per_tok="
                                 f"{top_k}, num_experts={E}] (0 or absent: no capacity "
                                 f"routing), got {capacity!r}")
            window = get("block_size")  # 0 or below is an error naming it, never 32
            return cls.capacity(capacity, 32 if window is None else window)
        if get("expert_choice_schedule") is not None:
            return _expert_choice_from_config(get)
        if get("core_threshold") is not None or get("mode") == "aggregate":
            from .defaults import scaled_guard

            top_p = get("core_threshold")
            return cls.dmoe(0.6 if top_p is None else float(top_p),
                            scaled_guard(get("num_experts")), 32)
        return cls.token()

    @property
    def spec(self) -> PolicyKind:
        """This policy's entry in POLICIES."""
        return POLICIES[self.kind]

    @property
    def code(self) -> int:
        """The integer the routing kernels branch on (kernels/policy_codes.py)."""
        return self.spec.code

    @property
    def is_block(self) -> bool:
        return self.spec.is_block

    @property
    def is_expert_choice(self) -> bool:
        """Experts choose rows (kinds in EXPERT_CHOICE_KINDS), not rows experts."""
        return self.kind in EXPERT_CHOICE_KINDS

    def check(self, cfg: RouterConfig) -> None:
        """Validate the parameters that depend on the number of experts."""
        for param in self.spec.params:
            value = getattr(self, param.name)
            if self.is_expert_choice and self.schedule == "fixed" and param in (_K_MIN, _K_MAX):
                # the fixed schedule's one k is kept as k_min == k_max: name what was given
                param = dataclasses.replace(param, name="k")
            param.check(value, cfg.num_experts, cfg.top_k)

    def pick_config(self, cfg: RouterConfig) -> RouterConfig:
        """The gate tokens pick their experts with under this policy: cfg itself, or for a
        plain-top-k policy (capacity: groups not applied) one group of all experts."""
        if not self.spec.plain_top_k:
            return cfg
        return RouterConfig(cfg.num_experts, cfg.top_k, 1, 1, cfg.routed_scaling_factor)

    def slots(self, cfg: RouterConfig) -> int:
        """Experts per token in the output (`topk_ids.shape[-1]`)."""
        if self.spec.expert_slots:
            return cfg.num_experts
        name = self.spec.slots_param
        return cfg.top_k if name is None else getattr(self, name)

    def __str__(self) -> str:
        names = [p.name for p in self.spec.params] + (["block_size"] if self.is_block else [])
        if self.is_expert_choice:
            names.insert(0, "schedule")
        return f"{self.kind}({', '.join(f'{n}={getattr(self, n)!s}' for n in names)})"


def _expert_choice_from_config(get) -> RoutingPolicy:
    """RoutingPolicy.from_config for a checkpoint that declares expert choice:
    expert_choice_schedule, expert_choice_k_min / _k_max (each default num_experts_per_tok;
    schedule "fixed" takes one k: k_min, with k_max absent or equal), block_size (default 32),
    and core_threshold for expert choice inside the dMoE coreset (guard 16 scaled to E). A
    value out of range is an error naming it, never replaced by a default."""
    from .defaults import scaled_guard

    schedule, top_k = get("expert_choice_schedule"), get("num_experts_per_tok")
    k_min, k_max = get("expert_choice_k_min"), get("expert_choice_k_max")
    top_p, window = get("core_threshold"), get("block_size")
    for name, value in (("expert_choice_k_min", k_min), ("expert_choice_k_max", k_max)):
        if value is not None:
            _check_int(name, value, 1)
    core = dict(coreset_top_p=None if top_p is None else float(top_p),
                guard=None if top_p is None else scaled_guard(get("num_experts")),
                block_size=32 if window is None else window)
    if schedule == "fixed":
        k = top_k if k_min is None else k_min
        if k_max is not None and k_max != k:
            raise ValueError(f"expert_choice_schedule 'fixed' takes one k (expert_choice_k_min"
                             f", default num_experts_per_tok={top_k}), but expert_choice_k_max="
                             f"{k_max!r} differs from it ({k!r})")
        return RoutingPolicy.expert_choice(k, **core)
    return RoutingPolicy.expert_choice(None, schedule, top_k if k_min is None else k_min,
                                       top_k if k_max is None else k_max, **core)
