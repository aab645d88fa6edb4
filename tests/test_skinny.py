"""skinny_gemm (kernels/skinny_gemm.py: the router's logits GEMM for a decode step's rows)
against the fp64 product: random inputs, tails of every side, strided and transposed operands,
exact sums, NaN and inf, bad inputs, its launch rule, and on the GPU bf16 operands and CUDA-graph
replay."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dmoe_triton.launch import (SKINNY_MAX_ROWS, SkinnyLaunch, override, skinny_block_n,
                                takes_skinny)
from dmoe_triton.skinny import skinny_gemm
from dmoe_triton.testing import DEVICE

# The interpreter's tl.dot on bf16 gives garbage (the project's known trap): bf16 on the GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# unit roundoff (half an ulp): rounding to nearest is within it, truncation is not
ROUND = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def within_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """|y - x w^T| <= K u32 sum_k |x_k w_k| (an fp32 sum of K exact products, any order) + one
    rounding to nearest of y's dtype."""
    exact = x.double().cpu() @ w.double().cpu().T
    abs_sum = x.double().cpu().abs() @ w.double().cpu().abs().T
    sum_bound = 2 * x.shape[1] * ROUND[torch.float32] * abs_sum
    bound = sum_bound + ROUND[y.dtype] * (exact.abs() + sum_bound) + 1e-30
    return bool(((y.double().cpu() - exact).abs() <= bound).all())


@settings(max_examples=30, deadline=None)
@given(T=st.sampled_from([1, 5, 16, 17, 31, SKINNY_MAX_ROWS]),
       N=st.sampled_from([1, 15, 16, 40]), K=st.sampled_from([1, 7, 64, 300]),
       dtype=st.sampled_from(DTYPES), out_fp32=st.booleans(),
       layout=st.sampled_from(["contiguous", "wide rows", "transposed"]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_the_fp64_product(T, N, K, dtype, out_fp32, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype)
    if layout == "wide rows":  # views whose row strides are not K (the kernel takes them)
        x = torch.cat([x, torch.full((T, 5), 1e4, dtype=dtype)], 1)[:, :K]
        w = torch.cat([w, torch.full((N, 3), 1e4, dtype=dtype)], 1)[:, :K]
    elif layout == "transposed":  # column strides != 1 (the wrapper copies them)
        x, w = x.T.contiguous().T, w.T.contiguous().T
    out_dtype = torch.float32 if out_fp32 else dtype
    y = skinny_gemm(x.to(DEVICE), w.to(DEVICE), out_dtype)
    assert y.shape == (T, N) and y.dtype == out_dtype and y.is_contiguous()
    assert torch.isfinite(y).all()
    assert within_bound(y, x, w)


@pytest.mark.parametrize("shape", [SkinnyLaunch(16, 16, 2, 4), SkinnyLaunch(32, 64, 3, 4),
                                   SkinnyLaunch(64, 256, 4, 8)])
def test_every_launch_shape_gives_the_exact_sum(shape):
    """Dyadic values (multiples of 2**-5 below 2**4, K = 200) make every product and partial sum
    exact in fp32, so any order of the sum gives the same bits: y equals the fp64 product."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randint(-16, 17, (31, 200), generator=gen) * 2.0 ** -5).half()
    w = (torch.randint(-16, 17, (70, 200), generator=gen) * 2.0 ** -5).half()
    with override(skinny=shape):
        y = skinny_gemm(x.to(DEVICE), w.to(DEVICE), torch.float32)
    assert torch.equal(y.cpu(), (x.double() @ w.double().T).float())


def test_nan_and_inf_stay_in_their_row_and_column():
    """A NaN in token t's x makes row t NaN; an inf weight makes its column +-inf and nothing
    else NaN (the padded tokens' zero columns, inf x 0 = NaN, are outside y)."""
    x, w = torch.rand(5, 40) + 0.1, torch.rand(20, 40) + 0.1
    x[3, 7] = float("nan")
    w[17, 2] = float("inf")
    y = skinny_gemm(x.to(DEVICE), w.to(DEVICE), torch.float32).cpu()
    assert torch.isnan(y[3]).all()
    rest = torch.ones(5, dtype=torch.bool)
    rest[3] = False
    assert torch.isposinf(y[rest, 17]).all()
    others = torch.ones(20, dtype=torch.bool)
    others[17] = False
    assert torch.isfinite(y[rest][:, others]).all()


@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.ones(2, 4, dtype=torch.int32), torch.ones(3, 4), torch.float32),
     TypeError, "x must"),
    (lambda: (torch.ones(SKINNY_MAX_ROWS + 1, 4), torch.ones(3, 4), torch.float32),
     ValueError, "at most"),
    (lambda: (torch.ones(0, 4), torch.ones(3, 4), torch.float32), ValueError, "x must"),
    (lambda: (torch.ones(2, 4), torch.ones(3, 5), torch.float32), ValueError, "weight must"),
    (lambda: (torch.ones(2, 4), torch.ones(3, 4).half(), torch.float32), TypeError,
     "weight must"),
    (lambda: (torch.ones(2, 4), torch.ones(3, 4), torch.int32), TypeError, "out_dtype"),
    (lambda: (torch.ones(2, 4).numpy(), torch.ones(3, 4), torch.float32), TypeError,
     "x must be a torch.Tensor, got ndarray"),
    (lambda: (torch.ones(2, 4, requires_grad=True), torch.ones(3, 4), torch.float32),
     TypeError, "no backward"),
])
def test_bad_inputs_are_named(make, error, match):
    with pytest.raises(error, match=match):
        skinny_gemm(*make())


@pytest.mark.parametrize("fields, match", [(dict(block_n=8), "block_n"),
                                           (dict(block_k=48), "block_k"),
                                           (dict(warps=0), "warps")])
def test_bad_launch_shapes_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        SkinnyLaunch(**{**dict(block_n=16, block_k=64, stages=2, warps=4), **fields})


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's refusals")
def test_bf16_is_refused_under_the_interpreter():
    """bf16 products come out wrong there, and a bf16 output truncated (not rounded)."""
    x = torch.ones(2, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x is bfloat16"):
        skinny_gemm(x, torch.ones(3, 16, dtype=torch.bfloat16), torch.float32)
    with pytest.raises(TypeError, match="out_dtype bfloat16"):
        skinny_gemm(torch.ones(2, 16), torch.ones(3, 16), torch.bfloat16)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TypeError, match="x must be a CUDA tensor"):
        skinny_gemm(torch.ones(2, 16), torch.ones(3, 16), torch.float32)


@pytest.mark.parametrize("capability, rows, takes", [
    ((9, 0), 32, True), ((9, 0), 1, True), ((9, 0), 33, False), ((9, 0), 0, False),
    ((8, 0), 32, False), ((10, 0), 32, False), ((12, 0), 32, False)])
def test_takes_skinny_on_hopper_up_to_its_rows(monkeypatch, capability, rows, takes):
    """Hopper only (timed there; sm_120's shared memory does not hold the widest shape), 1 to
    SKINNY_MAX_ROWS rows; the capability is stubbed, so this runs without a GPU."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert takes_skinny(rows, torch.device("cuda", 0)) is takes
    assert SKINNY_MAX_ROWS == 32  # the rows timed (launch.py's note)


def test_launch_rule_covers_the_columns_in_one_wave():
    """skinny_block_n: the fewest columns a program (16..64) for one wave of programs."""
    assert skinny_block_n(256, 132) == 16      # the router: 16 programs
    assert skinny_block_n(3072, 132) == 32     # 96 programs
    assert skinny_block_n(3072, 78) == 64      # on 78 SMs (H20)
    assert skinny_block_n(10 ** 6, 132) == 64 and skinny_block_n(1, 132) == 16
    assert not takes_skinny(32, torch.device("cpu")) and not takes_skinny(0, torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_bf16_matches_cublas_within_the_bound_and_replays_in_a_graph():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32, 2048, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(256, 2048, device="cuda", generator=gen) * 0.02).bfloat16()
    eager = skinny_gemm(x, w, torch.float32)
    assert within_bound(eager, x, w)
    assert within_bound(torch.mm(x, w.T, out_dtype=torch.float32), x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = skinny_gemm(x, w, torch.float32)
    for _ in range(2):
        captured.fill_(float("nan"))  # poison: the replay must write every entry
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
