"""Sampling as the published LLaDA2 sampler does it (issue 12 item 6): temperature first, then
top-k and top-p; temperature 1 with a seed draws what the published order draws."""
import pytest
import torch

from dmoe_triton.decoding import pick_tokens
from dmoe_triton.testing import DEVICE


def published_order(logits, temperature, top_k, top_p, generator):
    """The rule written out: divide, keep the top-k, keep the smallest top-p set (with the
    token that crosses it), softmax, one multinomial draw per row of the flattened logits."""
    x = logits.reshape(-1, logits.shape[-1]).double() / temperature
    if top_k:
        x[x < x.topk(top_k, dim=-1).values[:, -1:]] = float("-inf")
    if top_p < 1:
        for row in x:
            order = row.argsort(descending=True)
            mass = row[order].softmax(-1).cumsum(-1)
            crossed = (mass > top_p).nonzero()
            if len(crossed):
                row[order[crossed[0, 0] + 1:]] = float("-inf")
    probs = x.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 1.0), (2.0, None, 0.5),
                                                       (0.5, 7, 0.9), (3.0, 5, 1.0)])
def test_the_published_order_draws_the_same_tokens(temperature, top_k, top_p):
    logits = torch.randn(4, 6, 50, generator=torch.Generator().manual_seed(1)) * 3
    ours, conf = pick_tokens(logits, temperature, top_k, top_p,
                             torch.Generator().manual_seed(7))
    want = published_order(logits, temperature, top_k or 0, top_p, torch.Generator().manual_seed(7))
    assert torch.equal(ours, want)
    assert ((conf > 0) & (conf <= 1)).all()


def test_temperature_before_top_p_changes_what_survives():
    # One dominant token: at temperature 1 the top-0.5 set is that token alone; tempered by 10
    # the distribution flattens and the top-0.5 set holds more than one token.
    logits = torch.tensor([[4.0, 1.0, 0.9, 0.8, 0.7, 0.6]])
    seen = {int(pick_tokens(logits, 10.0, None, 0.5, torch.Generator().manual_seed(s))[0])
            for s in range(40)}
    assert len(seen) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temperature_zero_is_the_argmax_with_the_plain_softmax_as_confidence(dtype):
    """Any float dtype, as at other temperatures (float64 is upcast to fp32 for the pick)."""
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2)).to(dtype)
    tok, conf = pick_tokens(logits, 0.0, 3, 0.2)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(conf, logits.float().softmax(-1).max(-1).values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 1.0), (0.5, 7, 0.9)])
def test_sampling_from_logits_in_the_model_dtype_draws_what_their_fp32_copy_draws(
        dtype, temperature, top_k, top_p):
    """The decoding loop hands pick_tokens lm_head's output in the model's dtype
    (float_logits=False): sampling upcasts it first, so the draws and confidences are those
    of the fp32 copy, bit for bit. (Temperature 0 reads the logits in their dtype:
    tests/test_pick.py.)"""
    logits = torch.randn(4, 6, 3000, generator=torch.Generator().manual_seed(3)) * 4
    logits = logits.to(DEVICE, dtype)
    seeded = lambda: torch.Generator(DEVICE).manual_seed(5)  # noqa: E731
    ours = pick_tokens(logits, temperature, top_k, top_p, seeded())
    want = pick_tokens(logits.float(), temperature, top_k, top_p, seeded())
    assert torch.equal(ours[0], want[0]) and torch.equal(ours[1], want[1])
