"""generate()'s inputs (issue 11): padded tensors with an attention_mask, eos_token_id as a list,
the position limit, and the honest token count of GenerationStats; its time split (issue 18:
prefill and cache-write times) and sequences that end at different blocks."""
import pytest
import torch

from dmoe_triton.decoding import generate
from dmoe_triton.models import LLaDA2MoeModelLM
from dmoe_triton.testing import small_model

PAD = 1  # SMALL: pad == eos == 1, as LLaDA2.0-mini
KW = dict(gen_length=12, block_length=4, steps=4, threshold=0.9)
PROMPTS = [[5, 9, 11, 7, 30], [40, 12, 8]]


@pytest.fixture(scope="module")
def model():
    return small_model(seed=3)


def padded(prompts, side):
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(P - len(p), P) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = torch.tensor(p), 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensor_with_attention_mask_decodes_as_the_ragged_list(model, side):
    want = generate(model, PROMPTS, **KW).tokens
    ids, mask = padded(PROMPTS, side)
    assert generate(model, ids, attention_mask=mask, **KW).tokens == want
    assert generate(model, ids, attention_mask=mask.bool(), **KW).tokens == want
    assert generate(model, ids.tolist(), attention_mask=mask.tolist(), **KW).tokens == want


def test_padded_tensor_without_attention_mask_is_refused(model):
    for side in ("left", "right"):
        ids, _ = padded(PROMPTS, side)
        with pytest.raises(ValueError, match="attention_mask") as err:
            generate(model, ids, **KW)
        assert "list of lists" in str(err.value)  # says how to pass ragged prompts
    # Unpadded tensors, and lists, still decode.
    same = torch.tensor([[5, 9, 11], [40, 12, 8]])
    assert generate(model, same, **KW).tokens == generate(model, same.tolist(), **KW).tokens
    generate(model, [[PAD, 5, 9]], **KW)  # a list is never taken for padding


def test_attention_mask_errors_name_it(model):
    ids, mask = padded(PROMPTS, "left")
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        generate(model, ids, attention_mask=mask[:, 1:], **KW)
    with pytest.raises(ValueError, match="attention_mask must hold 0"):
        generate(model, ids, attention_mask=mask * 2, **KW)
    with pytest.raises(ValueError, match=r"input_ids\[1\] is empty"):
        generate(model, ids, attention_mask=torch.stack([mask[0], torch.zeros_like(mask[1])]), **KW)


def test_eos_list_stops_at_any_listed_id(model):
    base = generate(model, PROMPTS, eos_id=90, **KW).tokens  # 90: a token it does not emit
    assert all(len(t) == KW["gen_length"] for t in base)
    stop = base[0][5]  # a token the first sequence really emits, at position 5
    first = base[0].index(stop)
    out = generate(model, PROMPTS, eos_id=[90, stop], **KW)
    assert out.tokens[0] == base[0][: first + 1]  # cut at the first listed id
    assert out.tokens == generate(model, PROMPTS, eos_id=stop, **KW).tokens
    assert out.stats.generated_tokens == sum(map(len, out.tokens))
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, PROMPTS, eos_id=[], **KW)
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, PROMPTS, eos_id=["x"], **KW)


def test_eos_token_id_list_in_a_saved_config(model, tmp_path):
    base = generate(model, PROMPTS, eos_id=90, **KW).tokens
    stop = base[0][5]
    model.config.eos_token_id = [90, stop]
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.config.eos_token_id = PAD
    loaded = LLaDA2MoeModelLM.from_pretrained(tmp_path).eval()
    assert loaded.config.eos_token_id == [90, stop]
    out = generate(loaded, PROMPTS, **KW)
    assert out.tokens[0] == base[0][: base[0].index(stop) + 1]
    # The fill is the first listed id: a sequence that stopped is padded with 90, not `stop`.
    out_one = generate(loaded, [PROMPTS[0]], **KW)
    assert out_one.tokens == out.tokens[:1]


def test_prompt_past_max_position_embeddings_is_refused():
    model = small_model(max_position_embeddings=16)
    generate(model, [[5] * 4], **KW)  # 4 + 12 = 16: fits
    with pytest.raises(ValueError, match="max_position_embeddings 16") as err:
        generate(model, [[5] * 3, [5] * 5], **KW)
    assert "input_ids[1]" in str(err.value) and "gen_length 12" in str(err.value)


def test_tokens_are_counted_up_to_the_first_eos(model):
    base = generate(model, [PROMPTS[0]], eos_id=90, **KW).tokens[0]
    stop = base[2]
    out = generate(model, [PROMPTS[0]], eos_id=stop, **KW)
    st = out.stats
    assert out.tokens[0][-1] == stop and len(out.tokens[0]) < KW["gen_length"]
    assert st.generated_tokens == len(out.tokens[0])
    assert st.committed_tokens >= st.generated_tokens  # commits include the fill after EOS
    assert st.tokens_per_s == pytest.approx(st.generated_tokens / st.wall_time_s)
    assert st.tokens_per_forward == pytest.approx(st.generated_tokens / st.forwards)


def test_prefill_and_cache_write_times_are_those_of_work_that_ran(model):
    st = generate(model, [PROMPTS[0]], **KW).stats  # 5 prompt tokens: block 0 is prefilled
    assert st.cache_writes >= 2  # the prefill and at least one finished span
    assert st.prefill_time_s > 0 and st.cache_write_time_s > 0
    parts = st.forwards * st.time_per_forward_s + st.prefill_time_s + st.cache_write_time_s
    assert parts < st.wall_time_s
    # A prompt inside the only block: nothing to prefill, no span written after it.
    st = generate(model, [[5, 9]], gen_length=2, block_length=4, steps=4).stats
    assert st.cache_writes == 0 and st.forwards > 0
    assert st.prefill_time_s == 0.0 and st.cache_write_time_s == 0.0
    # No cache at all.
    st = generate(model, [PROMPTS[0]], use_cache=False, **KW).stats
    assert st.cache_writes == 0 and st.prefill_time_s == 0.0 == st.cache_write_time_s


def test_sequences_ending_at_other_blocks_decode_and_commit_as_alone(model):
    """Own last blocks 3, 4, 4 (prompts of 4, 7, 2 tokens), and an EOS ending the first in an
    earlier block: batched, each decodes as alone and commits no token more (the done flags
    live on the device; a sequence still running after its end would commit its fill)."""
    prompts = [[5, 9, 11, 7], [40, 12, 8, 3, 17, 22, 6], [30, 31]]
    base = [generate(model, [p], eos_id=90, **KW).tokens[0] for p in prompts]
    stop = base[0][7]
    assert stop not in base[0][:7] and all(stop not in t for t in base[1:])
    for eos in (90, stop):
        alone = [generate(model, [p], eos_id=eos, **KW) for p in prompts]
        batched = generate(model, prompts, eos_id=eos, **KW)
        assert batched.tokens == [a.tokens[0] for a in alone]
        assert batched.stats.committed_tokens == sum(a.stats.committed_tokens for a in alone)
    assert len(batched.tokens[0]) == 8 < len(batched.tokens[1])


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("nan"), True, "0.9"])
def test_a_threshold_outside_0_1_is_an_error(model, threshold):
    """A break test found threshold=1.5 accepted: confidences are probabilities, so it only
    ever committed the quota, without a word."""
    kw = {**KW, "threshold": threshold}
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\]"):
        generate(model, PROMPTS, **kw)
