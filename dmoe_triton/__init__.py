"""dmoe-triton: block-routed (dMoE) Mixture-of-Experts inference on Triton kernels.

    from dmoe_triton import RouterConfig, RoutingPolicy, route, moe_forward
"""
from importlib import import_module

from .config import RouterConfig, RoutingPolicy
from .routing import RouteResult, route

__version__ = "0.1.0"

# Heavier parts load on first use, so `import dmoe_triton` stays cheap.
_LAZY = {
    "moe_forward": "dmoe_triton.moe",
    "DMoEBlock": "dmoe_triton.moe",
    "patch_model": "dmoe_triton.patch",
    "set_policy": "dmoe_triton.patch",
    "generate": "dmoe_triton.decoding",
    "GenerationResult": "dmoe_triton.decoding",
}

__all__ = ["RouterConfig", "RoutingPolicy", "RouteResult", "route", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmoe_triton' has no attribute {name!r}")
