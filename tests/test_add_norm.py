"""The residual add fused with the RMSNorm (dmoe_triton/norm.py) against the eager ops."""
import pytest
import torch
from hypothesis import given, strategies as st

from dmoe_triton.norm import add_rms_norm
from dmoe_triton.reference import add_rms_norm_reference
from dmoe_triton.testing import DEVICE

# y may differ by one rounding of the dtype: the kernel sums the squares in another order.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The interpreter casts fp32 to bf16 by truncation, not to nearest: bf16 is checked on the GPU.
DTYPES = list(TOL) if DEVICE == "cuda" else [torch.float32, torch.float16]


@given(rows=st.sampled_from([1, 3, 33]), H=st.sampled_from([1, 7, 64, 100]),
       dtype=st.sampled_from(DTYPES),
       with_delta=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_the_eager_ops(rows, H, dtype, with_delta, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, H, generator=gen) * 3).to(dtype)
    if strided:  # a transposed view: the wrapper copies it
        x = (torch.randn(H, rows, generator=gen) * 3).to(dtype).T
    delta = (torch.randn(rows, H, generator=gen)).to(dtype) if with_delta else None
    weight = (1 + 0.3 * torch.randn(H, generator=gen)).to(dtype)
    h, y = add_rms_norm(x.to(DEVICE), None if delta is None else delta.to(DEVICE),
                        weight.to(DEVICE), 1e-6, backend="triton")
    ref_h, ref_y = add_rms_norm_reference(x, delta, weight, 1e-6)
    assert y.is_contiguous() and (h.is_contiguous() if with_delta else h is not None)
    assert torch.equal(h.cpu(), ref_h)  # one rounding of the same fp32 sum
    torch.testing.assert_close(y.cpu(), ref_y, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("args, error, match", [
    ((torch.ones(2, 4, dtype=torch.int32), None, torch.ones(4)), TypeError, "x must"),
    ((torch.ones(2, 4), torch.ones(2, 5), torch.ones(4)), ValueError, "delta"),
    ((torch.ones(2, 4), None, torch.ones(5)), ValueError, "weight"),
    ((torch.ones(2, 4), torch.ones(2, 4).half(), torch.ones(4)), TypeError, "delta"),
])
def test_bad_inputs_are_named(args, error, match):
    with pytest.raises(error, match=match):
        add_rms_norm(*args, 1e-6, backend="triton")


@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager():
    x = torch.randn(32, 2048, device="cuda").bfloat16()
    delta = torch.randn(32, 2048, device="cuda").bfloat16()
    w = torch.randn(2048, device="cuda").bfloat16()
    h, y = add_rms_norm(x, delta, w, 1e-6)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gh, gy = add_rms_norm(x, delta, w, 1e-6)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(gh, h) and torch.equal(gy, y)
    ref_h, ref_y = add_rms_norm_reference(x, delta, w, 1e-6)
    assert torch.equal(h, ref_h)
    torch.testing.assert_close(y, ref_y, atol=1.6e-2, rtol=1.6e-2)
