"""greedy_pick (kernels/greedy_pick.py), the temperature-0 decision of a denoising step, against
its reference (torch's softmax and argmax): random logits in every dtype, several BLOCK_V steps
and slices per row, ties within and across steps and slices, NaN / +-inf rows, strided inputs,
bad input."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dmoe_triton import launch
from dmoe_triton.pick import greedy_pick
from dmoe_triton.reference import greedy_pick_reference
from dmoe_triton.testing import DEVICE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_against_reference(logits, block_v, slices=1):
    with launch.override(pick=launch.PickLaunch(block_v=block_v, warps=4, slices=slices,
                                                merge_rows=4)):
        tok, conf = greedy_pick(logits.to(DEVICE), backend="triton")
    want_tok, want_conf = greedy_pick_reference(logits)
    assert tok.dtype == torch.int64 and conf.dtype == torch.float32
    assert tok.shape == conf.shape == logits.shape[:-1]
    assert torch.equal(tok.cpu(), want_tok)
    torch.testing.assert_close(conf.cpu(), want_conf, rtol=2e-6, atol=0, equal_nan=True)


@given(rows=st.integers(0, 6), vocab=st.integers(1, 700), dtype=st.sampled_from(DTYPES),
       block_v=st.sampled_from([16, 64, 256]), slices=st.integers(1, 5),
       spread=st.sampled_from([0.01, 3.0, 300.0]),
       seed=st.integers(0, 2**31 - 1), ties=st.integers(0, 3),
       special=st.lists(st.sampled_from(["nan", "inf", "-inf", "all -inf", "one finite"]),
                        max_size=3))
def test_greedy_pick_matches_the_reference(rows, vocab, dtype, block_v, slices, spread, seed,
                                           ties, special):
    """Tokens equal, confidences within 2e-6 (the softmax sum's order and exp differ); the
    row maximum copied to `ties` other places (earlier and later steps of BLOCK_V and slices:
    the first index must win); rows in up to 5 slices, merged 4 rows a program; special rows:
    a NaN or +inf logit, -inf logits, every logit -inf, or a single finite one."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * spread).to(dtype)
    for r in range(rows):
        at = torch.randint(0, vocab, (ties,), generator=g)
        logits[r, at] = logits[r].max()
    for r, kind in zip(range(rows), special):
        spot = int(torch.randint(0, vocab, (1,), generator=g))
        if kind in ("nan", "inf", "-inf"):
            logits[r, spot] = float(kind)
        else:
            logits[r] = float("-inf")
            if kind == "one finite":
                logits[r, spot] = 1.5
    check_against_reference(logits, block_v, slices)


@pytest.mark.parametrize("slices", [1, 2, 5])
def test_a_tie_across_steps_and_slices_keeps_the_first_index(slices):
    """The maximum at index 33 (second step) and again at 3 (the first step, smaller before),
    40 and 100 (later steps; later slices when sliced): token 33 until index 3 rises to it."""
    logits = torch.zeros(1, 130)
    logits[0, [33, 40, 100]] = 5.0
    logits[0, 3] = 4.0
    for first in (33, 3):
        logits[0, 3] = 5.0 if first == 3 else 4.0
        with launch.override(pick=launch.PickLaunch(block_v=32, warps=4, slices=slices)):
            tok, conf = greedy_pick(logits.to(DEVICE), backend="triton")
        assert int(tok) == first
        torch.testing.assert_close(conf.cpu(), torch.softmax(logits, -1)[:, first])


def test_a_later_larger_step_moves_the_token_and_rescales_the_sum():
    """A larger maximum in the last step: the running sum of the earlier steps is rescaled."""
    logits = torch.full((2, 100), -2.0)
    logits[0, 10] = 1.0
    logits[0, 99] = 30.0
    logits[1, 0] = 0.5
    check_against_reference(logits, 16)
    check_against_reference(logits, 16, slices=3)  # ... and each slice's sum in the merge


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slices", [1, 3])
def test_special_rows_in_every_slice(dtype, slices):
    """Every kind of row the NaN rule names, in 3 slices of 2 steps of 16 (the property test
    draws them, CI's 12 examples may not): every logit -inf; -inf but one finite value in the
    last slice; a NaN in a later slice than the maximum; +inf in the first slice; a slice of
    NaN only; a plain row."""
    logits = torch.randn(6, 96, generator=torch.Generator().manual_seed(4)).to(dtype)
    logits[0] = float("-inf")
    logits[1] = float("-inf")
    logits[1, 90] = 2.0
    logits[2, 5] = 50.0
    logits[2, 70] = float("nan")
    logits[3, 1] = float("inf")
    logits[4, 32:64] = float("nan")
    check_against_reference(logits, 16, slices)
    tok, conf = greedy_pick(logits.to(DEVICE), backend="triton")
    assert tok.tolist()[:5] == [0, 90, 0, 0, 0] and int(tok[5]) == int(logits[5].argmax())
    assert torch.isnan(conf[[0, 2, 3, 4]].cpu()).all() and float(conf[1]) == 1.0


def test_row_stride_other_than_the_vocabulary():
    """Rows read through their stride: a 2-d view whose rows are 300 apart and start 50 in (no
    copy is made for it), and a [1, L, V] view sliced along L."""
    g = torch.Generator().manual_seed(5)
    check_against_reference(torch.randn(5, 300, generator=g)[:, 50:250], 32, slices=3)
    check_against_reference(torch.randn(1, 9, 200, generator=g)[:, 4:], 64, slices=2)


def test_strided_and_batched_logits():
    """[B, L, V] with a sliced row dimension (decoding without a cache slices the block)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 200, generator=g).to(torch.bfloat16)[:, 4:]
    check_against_reference(logits, 64)
    check_against_reference(logits.transpose(0, 1), 64, slices=3)


def test_bad_logits_are_named():
    with pytest.raises(TypeError, match="logits must be a float32, float16 or bfloat16"):
        greedy_pick(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits must be"):
        greedy_pick([1.0, 2.0])
    with pytest.raises(ValueError, match=r"logits must have shape \[..., V\] with V >= 1"):
        greedy_pick(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="logits must have shape"):
        greedy_pick(torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("sequences", [1, 64])
def test_greedy_pick_at_llada2_vocab_on_gpu_and_in_a_graph(sequences):
    """1 and 64 sequences x 32 rows of LLaDA2's 157184 logits in bf16, with the default launch
    (one sequence's rows in many slices, 64 sequences' in one): the reference's tokens, and a
    CUDA graph replay gives what the eager call gave."""
    g = torch.Generator(device="cuda").manual_seed(sequences)
    logits = (torch.randn(sequences, 32, 157184, device="cuda", generator=g) * 4).to(
        torch.bfloat16)
    tok, conf = greedy_pick(logits)
    want_tok, want_conf = greedy_pick_reference(logits)
    assert torch.equal(tok, want_tok)
    torch.testing.assert_close(conf, want_conf, rtol=2e-6, atol=0)
    static = logits.clone()
    graph = torch.cuda.CUDAGraph()
    greedy_pick(static)  # compile outside the capture
    with torch.cuda.graph(graph):
        out = greedy_pick(static)
    static.copy_(logits.flip(-1))
    graph.replay()
    flipped = greedy_pick(logits.flip(-1))
    assert torch.equal(out[0], flipped[0]) and torch.equal(out[1], flipped[1])
