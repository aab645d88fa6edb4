"""block_attention (kernels/block_attention.py) against its fp32 reference."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dmoe_triton.attention import block_attention
from dmoe_triton.launch import AttentionLaunch
from dmoe_triton.models.llada2 import grouped_query_attention
from dmoe_triton.reference import block_attention_reference
from dmoe_triton.testing import DEVICE

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=3e-3, atol=3e-3)}
SMALL = AttentionLaunch(block_m=16, block_n=16)  # several programs and key steps, even when tiny


def kernel(q, keys, values, mask, scale, launch=SMALL):
    """The Triton path on DEVICE, result back on the CPU."""
    args = [t.to(DEVICE) for t in (q, keys, values, mask)]
    return block_attention(*args, scale, backend="triton", launch=launch).cpu()


def make_inputs(B, L, nkv, group, hd, cached, dtype, seed, see_prob=0.7):
    """q, keys/values as strided views of a larger NaN-poisoned buffer (rows past n and a
    second sequence slot must never be read), and a random additive mask in which every query
    row sees at least its own key (as the model's block-causal mask guarantees)."""
    g = torch.Generator().manual_seed(seed)
    nh, n = nkv * group, cached + L
    q = (2 * torch.randn(B, nh, L, hd, generator=g)).to(dtype)
    buf = torch.full((2, B, nkv, n + 5, hd), float("nan"), dtype=dtype)
    buf[:, :, :, :n] = (2 * torch.randn(2, B, nkv, n, hd, generator=g)).to(dtype)
    keys, values = buf[0, :, :, :n], buf[1, :, :, :n]
    sees = torch.rand(B, 1, group * L, n, generator=g) < see_prob
    own = cached + torch.arange(group * L) % L
    sees[:, :, torch.arange(group * L), own] = True
    mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, float("-inf"))
    return q, keys, values, mask


@given(B=st.integers(1, 2), L=st.integers(1, 9), nkv=st.integers(1, 2),
       group=st.sampled_from([1, 2, 4]), hd=st.sampled_from([8, 16, 24]),
       cached=st.integers(0, 70), dtype=st.sampled_from([torch.float32, torch.float16]),
       small=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_matches_reference(B, L, nkv, group, hd, cached, dtype, small, seed):
    q, keys, values, mask = make_inputs(B, L, nkv, group, hd, cached, dtype, seed)
    scale = hd ** -0.5
    want = block_attention_reference(q, keys, values, mask, scale)
    launch = SMALL if small else AttentionLaunch()
    got = kernel(q, keys, values, mask, scale, launch)
    assert got.shape == (B, L, nkv * group * hd) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_reference_matches_the_models_sdpa_path():
    q, keys, values, mask = make_inputs(2, 5, 2, 4, 16, 11, torch.float32, 3)
    sdpa = grouped_query_attention(q, keys, values, mask, 0.25)
    want = sdpa.transpose(1, 2).reshape(2, 5, -1)
    torch.testing.assert_close(block_attention_reference(q, keys, values, mask, 0.25), want,
                               rtol=1e-5, atol=1e-5)


def test_masked_keys_are_ignored_even_if_huge():
    """Keys a row does not see may hold anything: huge scores and values change nothing for it
    (no leak through the running max), bit for bit."""
    q, keys, values, mask = make_inputs(1, 4, 1, 2, 16, 40, torch.float32, 5, see_prob=0.5)
    hidden = torch.isinf(mask[0, 0, 0])  # the keys stacked row 0 does not see
    keys2, values2 = keys.clone(), values.clone()
    keys2[:, :, hidden] = 1e4
    values2[:, :, hidden] = 1e6
    a = kernel(q, keys, values, mask, 0.25)
    b = kernel(q, keys2, values2, mask, 0.25)
    blind = torch.isinf(mask[0, 0][:, hidden]).all(1).view(2, 4)  # [head, query]
    a, b = a.view(4, 2, 16), b.view(4, 2, 16)
    assert blind[0, 0] and bool(hidden.any())
    for h, i in blind.nonzero().tolist():
        assert torch.equal(a[i, h], b[i, h])


def test_a_row_that_sees_nothing_is_nan_not_zero():
    q, keys, values, mask = make_inputs(1, 3, 1, 2, 16, 20, torch.float32, 7)
    mask[0, 0, 4] = float("-inf")  # stacked row 4 = query 1 of head 1
    got = kernel(q, keys, values, mask, 0.25)
    want = block_attention_reference(q, keys, values, mask, 0.25)
    got, want = got.view(3, 2, 16), want.view(3, 2, 16)
    assert torch.isnan(got[1, 1]).all() and torch.isnan(want[1, 1]).all()
    assert torch.isfinite(got[[0, 2]]).all() and torch.isfinite(got[1, 0]).all()
    torch.testing.assert_close(got[1, 0], want[1, 0], rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    q, keys, values, mask = make_inputs(1, 3, 2, 2, 8, 4, torch.float32, 0)
    with pytest.raises(ValueError, match="mask must have shape"):
        block_attention(q, keys, values, mask[:, :, :3], 0.3)
    with pytest.raises(ValueError, match="keys must have shape"):
        block_attention(q, keys[:, :1].expand(1, 3, 7, 8), values, mask, 0.3)
    with pytest.raises(ValueError, match="values must have keys' shape"):
        block_attention(q, keys, values[:, :, :5], mask, 0.3)
    with pytest.raises(TypeError, match="keys and values must have q's dtype"):
        block_attention(q, keys.half(), values, mask, 0.3)
    with pytest.raises(TypeError, match="mask must be additive"):
        block_attention(q, keys, values, mask.bool(), 0.3)
    with pytest.raises(ValueError, match="q must be 4-d"):
        block_attention(q[0], keys, values, mask, 0.3)


@pytest.mark.gpu
def test_bf16_on_gpu_matches_reference_and_sdpa():
    dev = torch.device("cuda")
    q, keys, values, mask = (t.to(dev) for t in make_inputs(2, 32, 4, 4, 128, 545, torch.bfloat16, 1))
    want = block_attention_reference(q, keys, values, mask, 128 ** -0.5)
    got = block_attention(q, keys, values, mask, 128 ** -0.5)
    sdpa = grouped_query_attention(q, keys, values, mask, 128 ** -0.5).transpose(1, 2).reshape_as(got)
    # bf16 output rounding (2^-8 relative) plus p rounded to bf16 before p @ v, as flash does.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    err_kernel = (got.float() - want.float()).abs().mean()
    err_sdpa = (sdpa.float() - want.float()).abs().mean()
    assert err_kernel <= 1.5 * err_sdpa + 1e-4, (err_kernel, err_sdpa)


# ---------------------------------------------------------------------------------------------
# split over the keys (flash-decoding: partial softmax per key chunk, then a combine)

@pytest.mark.parametrize("cached", [0, 1, 31, 33, 2040])
@pytest.mark.parametrize("splits", [2, 3, 8])
def test_key_splits_match_the_reference(cached, splits):
    L, see_prob = 4, (0.02 if cached > 1000 else 0.5)  # some splits see no key for a row
    q, keys, values, mask = make_inputs(1, L, 2, 2, 8, cached, torch.float32, cached + splits,
                                        see_prob)
    want = block_attention_reference(q, keys, values, mask, 0.3)
    got = kernel(q, keys, values, mask, 0.3, AttentionLaunch(block_m=16, block_n=16,
                                                            key_splits=splits))
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_a_row_that_sees_no_key_in_any_split_is_nan():
    q, keys, values, mask = make_inputs(1, 3, 1, 1, 8, 40, torch.float32, 0)
    mask[:, :, 1] = float("-inf")  # row 1 sees nothing
    got = kernel(q, keys, values, mask, 0.3, AttentionLaunch(block_m=16, block_n=16,
                                                            key_splits=3))
    want = block_attention_reference(q, keys, values, mask, 0.3)
    assert got[:, 1].isnan().all() and not got[:, [0, 2]].isnan().any()
    torch.testing.assert_close(got[:, [0, 2]], want[:, [0, 2]], **TOL[torch.float32])


def test_long_prefixes_split_over_the_keys():
    from dmoe_triton import launch
    assert launch.attention_launch(1, 288).key_splits == 1      # prefix 256: one launch
    assert launch.attention_launch(1, 544).key_splits == 4      # prefix 512: split (H200)
    assert launch.attention_launch(2, 2080).key_splits == 2     # fewer per sequence
    assert launch.attention_launch(4, 2080).key_splits == 1     # 4 sequences fill the GPU
    assert launch.attention_launch(16, 2080).key_splits == 1    # many sequences fill the GPU


@pytest.mark.gpu
def test_gpu_split_keys_at_prefix_2048_replay_in_a_graph():
    q, keys, values, mask = make_inputs(1, 32, 4, 4, 128, 2048, torch.bfloat16, 5)
    q, keys, values, mask = (t.cuda() for t in (q, keys, values, mask))
    from dmoe_triton import launch
    assert launch.attention_launch(1, keys.shape[2]).key_splits > 1
    eager = block_attention(q, keys, values, mask, 128 ** -0.5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = block_attention(q, keys, values, mask, 128 ** -0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    want = block_attention_reference(q, keys, values, mask, 128 ** -0.5)
    torch.testing.assert_close(eager, want, rtol=2e-2, atol=2e-2)
