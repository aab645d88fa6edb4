"""dmoe-triton: block-routed (dMoE) Mixture-of-Experts inference on Triton kernels.

    from dmoe_triton import RouterConfig, RoutingPolicy, route, moe_forward

Importing the package registers the LLaDA2 model (`model_type "llada2_moe"`) with transformers'
AutoConfig / AutoModel / AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(DIR)`
works after a plain `import dmoe_triton`. That needs transformers, the bulk of the import time.
"""
from importlib import import_module

from .config import RouterConfig, RoutingPolicy
from .routing import RouteResult, route
from . import models  # noqa: E402,F401  (registers llada2_moe with the Auto classes)

__version__ = "0.1.0"

# The kernels and decoding load on first use.
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
