"""generate() under routing windows by absolute position (docs/routing.md, issues 11.3 and
12.3): the same tokens with and without the KV cache, alone or batched, for a diffusion
block_length that divides, equals or is a multiple of the routing window."""
import pytest
import torch

from dmoe_triton import RoutingPolicy, generate, patch_model
from dmoe_triton.testing import small_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26],
           [30, 31, 32]]


def decode(model, prompts, bl, **kw):
    return generate(model, prompts, gen_length=24, block_length=bl, steps=bl, threshold=0.6,
                    stats=False, **kw).tokens


@pytest.fixture(scope="module", params=[0, 1])
def model(request):
    m = small_model(request.param)
    return patch_model(m, RoutingPolicy.dmoe(0.5, 1, block_size=8), backend="reference")


@pytest.mark.parametrize("bl", [2, 4, 8, 16])
def test_cache_batching_and_padding_change_no_token(model, bl):
    alone = [decode(model, [p], bl)[0] for p in PROMPTS]
    assert [decode(model, [p], bl, use_cache=False)[0] for p in PROMPTS] == alone
    assert decode(model, PROMPTS, bl) == alone
    assert decode(model, PROMPTS[::-1], bl, use_cache=False) == alone[::-1]


def test_block_length_that_does_not_fit_the_window_is_named(model):
    with pytest.raises(ValueError, match="block_length"):
        decode(model, PROMPTS[:1], 3)
