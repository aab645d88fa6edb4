"""LLaDA2.1 token editing (issue 12 item 4): generate(editing_threshold=...) against a plain
decoding reference written from the rules of ../shared/docs/llada2-family.md, on a tiny random
model where edits really happen (counted)."""
import pytest
import torch

from dmoe_triton import generate
from dmoe_triton.decoding import editing_decision
from dmoe_triton.testing import small_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [30, 31, 32]]


def reference_editing(model, prompt, gen_length, bl, threshold, editing_threshold,
                      max_post_steps):
    """One sequence, greedy, every forward recomputing the whole canvas up to the block's end.
    Returns (tokens cut after the first EOS, forwards, edits)."""
    mask, eos = model.config.mask_token_id, model.config.eos_token_id
    P = len(prompt)
    x = prompt + [mask] * (-(-(P + gen_length) // bl) * bl - P)
    forwards = edits = 0
    for b in range(P // bl, len(x) // bl):
        lo, hi = b * bl, (b + 1) * bl
        post = 0
        while True:
            masked = [i for i in range(lo, hi) if x[i] == mask]
            if not masked and post >= max_post_steps:
                break
            with torch.no_grad():
                probs = model(torch.tensor([x[:hi]]), block_length=bl).logits[0].softmax(-1)
            conf, tok = probs.max(-1)
            forwards += 1
            commit = [i for i in masked if conf[i] > threshold]
            if masked and not commit:  # the single most confident (ties: lower position)
                commit = [max(masked, key=lambda i: (float(conf[i]), -i))]
            edit = [i for i in range(max(lo, P), hi)
                    if x[i] != mask and int(tok[i]) != x[i] and conf[i] > editing_threshold]
            for i in commit + edit:
                x[i] = int(tok[i])
            edits += len(edit)
            if not masked:
                post += 1
                if not edit:
                    break
        if eos in x[P:hi]:
            break
    out = x[P:P + gen_length]
    return (out[:out.index(eos) + 1] if eos in out else out), forwards, edits


@pytest.fixture(scope="module")
def model():
    return small_model(1, num_hidden_layers=2)


@pytest.mark.parametrize("threshold, editing_threshold, max_post_steps",
                         [(0.95, 0.0, 2), (0.015, 0.016, 3), (0.0, 0.0, 0)])
def test_generate_edits_as_the_reference(model, threshold, editing_threshold, max_post_steps):
    kw = dict(gen_length=8, block_length=4, threshold=threshold,
              editing_threshold=editing_threshold, max_post_steps=max_post_steps)
    refs = [reference_editing(model, p, 8, 4, threshold, editing_threshold, max_post_steps)
            for p in PROMPTS]
    for p, (tokens, forwards, edits) in zip(PROMPTS, refs):
        alone = generate(model, [p], **kw)
        assert alone.tokens == [tokens]
        assert (alone.stats.forwards, alone.stats.edits) == (forwards, edits)
        uncached = generate(model, [p], use_cache=False, **kw)  # statistics on: they count
        assert uncached.tokens == [tokens]                     # the block's rows only
        assert torch.equal(uncached.stats.unique_experts, alone.stats.unique_experts)
    batched = generate(model, PROMPTS, **kw)
    assert batched.tokens == [r[0] for r in refs]
    assert batched.stats.edits == sum(r[2] for r in refs)
    if editing_threshold < threshold:
        assert batched.stats.edits > 0  # edits really happen (and are counted)


def test_steps_does_not_bound_editing(model):
    kw = dict(gen_length=8, block_length=4, threshold=0.015, editing_threshold=0.016)
    assert generate(model, PROMPTS[:1], steps=1, **kw).tokens == \
        generate(model, PROMPTS[:1], steps=4, **kw).tokens


def test_no_edit_and_no_post_step_is_llada20_at_one_token_a_step(model):
    # editing_threshold 1 never edits (a probability is never > 1); LLaDA2.0 with steps ==
    # block_length commits above threshold, else the top one: the same rule.
    kw = dict(gen_length=8, block_length=4, threshold=0.3)
    plain = generate(model, PROMPTS, steps=4, **kw)
    edited = generate(model, PROMPTS, editing_threshold=1.0, max_post_steps=0, **kw)
    assert edited.tokens == plain.tokens and edited.stats.edits == 0
    assert edited.stats.forwards == plain.stats.forwards


def test_decision_by_hand():
    tok = torch.tensor([[4, 5, 6, 7, 8]])
    conf = torch.tensor([[0.2, 0.3, 0.9, 0.3, 0.6]])
    block = torch.tensor([[2, 2, 6, 9, 9]])  # 2 = mask
    masked = block == 2
    written = torch.tensor([[False, False, True, True, True]])
    commit, edit = editing_decision(tok, conf, block, masked, written, 0.5, 0.4)
    assert commit.tolist() == [[False, True, False, False, False]]  # none > 0.5: the top one
    assert edit.tolist() == [[False, False, False, False, True]]   # differs and 0.6 > 0.4
    commit, _ = editing_decision(tok, conf, block, masked, written, 0.1, 0.4)
    assert commit.tolist() == [[True, True, False, False, False]]


@pytest.mark.parametrize("kw, needle", [
    (dict(editing_threshold=-0.1), "editing_threshold"),
    (dict(editing_threshold=1.5), "editing_threshold"),
    (dict(editing_threshold=float("nan")), "editing_threshold"),
    (dict(editing_threshold="0.5"), "editing_threshold"),
    (dict(editing_threshold=0.5, max_post_steps=-1), "max_post_steps"),
    (dict(max_post_steps=1.5), "max_post_steps"),
])
def test_bad_editing_arguments_are_named(model, kw, needle):
    with pytest.raises(ValueError, match=needle):
        generate(model, PROMPTS, gen_length=4, block_length=4, **kw)
