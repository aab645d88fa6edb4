"""FP8 (e4m3) routed experts with block scales (issue 16): quantize/dequantize, the kernels
(both paths, native e4m3 and byte-decoded reads) against the dequantize-then-reference oracle,
bad scales, the capability rule, and fine-grained FP8 checkpoints (save, load, errors)."""
import copy
import dataclasses
import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dmoe_triton import RoutingPolicy, launch, moe_forward
from dmoe_triton import moe as moe_module
from dmoe_triton.kernels import moe_matmul
from dmoe_triton.launch import DECODE_MAX_TOKENS, DecodeConfig, GroupedConfig
from dmoe_triton.models import LLaDA2MoeConfig, LLaDA2MoeModelLM
from dmoe_triton.moe import ActRows, DMoEBlock, _down_step, fp8_activation_groups
from dmoe_triton.patch import patch_model
from dmoe_triton.quant import (FP8_DTYPE, Fp8Scales, dequantize_blocks, dequantize_experts,
                               dequantize_shared, quantize_activations, quantize_blocks,
                               quantize_experts, quantize_shared)
from dmoe_triton.reference import moe_forward_reference
from dmoe_triton.testing import DEVICE, SMALL, build_fp8_model, small_model

HAS_CUDA = torch.cuda.is_available()
BLOCKS = [(128, 128), (16, 16), (32, 48), (8, 32)]


def on_dev(x):
    """x with its tensors on DEVICE (a tensor, Fp8Scales, a tuple of them, or anything else as is):
    the Triton backend takes CUDA tensors where there is a GPU, CPU ones under the interpreter."""
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE)
    if isinstance(x, Fp8Scales):  # every tensor field, a new one included
        return replace(x, **{f.name: on_dev(getattr(x, f.name)) for f in dataclasses.fields(x)})
    if isinstance(x, tuple):
        return tuple(map(on_dev, x))
    return x


def run_moe(*args, **kwargs):
    """moe_forward on DEVICE with CPU inputs, its output back on the CPU (tests compare there)."""
    return moe_forward(*map(on_dev, args), **{k: on_dev(v) for k, v in kwargs.items()}).cpu()


# ---------------------------------------------------------------------------------------------
# quant.py


@given(n=st.integers(1, 150), k=st.integers(1, 150), block=st.sampled_from(BLOCKS),
       seed=st.integers(0, 2**31 - 1), spread=st.sampled_from([1e-3, 1.0, 300.0]))
def test_quantize_dequantize_within_e4m3_rounding(n, k, block, seed, spread):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, n, k, generator=g) * spread * torch.rand(2, n, 1, generator=g)
    q, s = quantize_blocks(w, block)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert s.shape == (2, math.ceil(n / block[0]), math.ceil(k / block[1]))
    back = dequantize_blocks(q, s, block, torch.float64)
    # Half an e4m3 ulp: 2**-4 of the value (normal), 2**-10 of the block scale (subnormal).
    scale = s.double().repeat_interleave(block[0], 1)[:, :n].repeat_interleave(block[1], 2)[..., :k]
    bound = torch.maximum(w.double().abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((back - w.double()).abs() <= bound).all()
    # No block saturates: its largest element maps to +-448 (within rounding), none beyond.
    assert q.float().abs().max() <= 448


def test_zero_block_has_unit_scale_and_zero_weights():
    w = torch.zeros(4, 40)
    w[:, 32:] = 1.0
    q, s = quantize_blocks(w, (16, 16))
    assert torch.equal(s[:, :2], torch.ones(1, 2)) and torch.equal(q.float()[:, :32], w[:, :32])


def test_layout_matches_transformers_dequantize():
    """Our weight_scale_inv convention is transformers' (W = W_fp8 * scale_inv per block)."""
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(fp8, "_dequantize_fp8_weight"):
        pytest.skip("this transformers has no _dequantize_fp8_weight")
    w = torch.randn(200, 300)
    q, s = quantize_blocks(w, (128, 128))
    theirs = fp8._dequantize_fp8_weight(q, s, [128, 128], torch.float32)
    torch.testing.assert_close(dequantize_blocks(q, s, (128, 128)), theirs)


def test_nan_codes_are_found_exactly():
    """Of the 256 e4m3 bytes, S.1111.111 (0x7F, 0xFF) and no other is a NaN code; one anywhere
    in a tensor is found (check_scale refuses such weights)."""
    from dmoe_triton.quant import _has_nan_codes

    for byte in range(256):
        w = torch.full((3, 5), 0x7E, dtype=torch.uint8)  # 448
        w[2, 4] = byte
        nan = bool(torch.isnan(w.view(FP8_DTYPE).float()).any())
        assert _has_nan_codes(w.view(FP8_DTYPE)) == nan == (byte in (0x7F, 0xFF)), byte
    assert not _has_nan_codes(torch.empty(0, 4, dtype=FP8_DTYPE))


def test_quantize_refuses_non_finite_and_bad_blocks():
    with pytest.raises(ValueError, match="w_down holds non-finite"):
        quantize_blocks(torch.tensor([[1.0, float("nan")]]), (16, 16), name="w_down")
    with pytest.raises(ValueError, match="bk a multiple of 16"):
        quantize_blocks(torch.ones(4, 4), (16, 8))
    with pytest.raises(ValueError, match="two positive ints"):
        quantize_blocks(torch.ones(4, 4), (0, 16))


# ---------------------------------------------------------------------------------------------
# kernels against the oracle


def make_fp8_layer(E, H, I, block, g):
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    w_down = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    w_gate_up[0, :, : H // 2] *= 50  # blocks of very different ranges
    return quantize_experts(w_gate_up, w_down, block)


def make_fp8_shared(H, I, block, g):
    """An FP8 shared expert (gate_up, down) and its scales (Fp8Scales.shared)."""
    gate_up, down, scales = quantize_shared(torch.randn(2 * I, H, generator=g) / math.sqrt(H),
                                            torch.randn(H, I, generator=g) / math.sqrt(I), block)
    return (gate_up, down), scales


def fp8_oracle(hidden, ids, weights, w_gate_up, w_down, scales, groups=None, shared=None):
    """Dequantize exactly (float64), then the reference in float64; groups: the fp8 dot's
    activation groups (moe.fp8_activation_groups), or None; shared: the FP8 shared expert
    (its scales in scales.shared), or None."""
    gu, d = dequantize_experts(w_gate_up, w_down, scales, torch.float64)
    if shared is not None:
        shared = dequantize_shared(shared, scales, torch.float64)
    return moe_forward_reference(hidden.double(), ids, weights.double(), gu, d, shared,
                                 activation_groups=groups)


def launched_groups(hidden, path, scales):
    """The activation groups of the launch moe_forward takes on `path` (its FP8 config under
    the current launch.override; fp8_bits matters too), for fp8_oracle."""
    hidden, scales = on_dev(hidden), on_dev(scales)
    plan = launch.moe_launch(hidden.shape[0], 1, 1, hidden.dtype, hidden.device, fp8=True)
    return fp8_activation_groups(hidden, plan.decode if path == "decode" else plan.grouped,
                                 scales)


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@st.composite
def fp8_cases(draw):
    E = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(E, 3)))
    path = draw(st.sampled_from(["decode", "grouped"]))
    T = draw(st.integers(1, 20)) if path == "decode" else draw(st.integers(1, 80))
    # 200 and 72: K and N tails past the FP8 defaults' 128- and 64-wide tiles; 144 such a
    # tail that TMA descriptors read (launch.takes_tma: 40 and 200 are not 16-byte rows).
    H = draw(st.sampled_from([16, 40, 64, 144, 200]))
    I = draw(st.sampled_from([8, 20, 48, 72]))
    block = draw(st.sampled_from(BLOCKS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(torch.int32)
    ids[torch.rand(T, k, generator=g) < 0.2] = -1
    weights = torch.where(ids >= 0, torch.rand(T, k, generator=g), 0.0)
    bits = draw(st.booleans())
    # None: the FP8 default launches (launch.DEFAULT_*_FP8, the fp8 dot); else a forced decode
    # config: the fp16 dot at the bf16 default's shapes (tiles narrower than the wgmma's 64
    # rows too), or the fp8 dot (blocks narrower than 32 columns make it the fp16 dot) with act
    # groups of block_i columns (fitted to divide the block: finer than it, or as wide).
    splits = draw(st.integers(1, 3))
    forced = draw(st.sampled_from([
        None, DecodeConfig(down_splits=splits, k_tile_down=256, x_prepass=draw(st.booleans())),
        DecodeConfig(dot="fp8", down_splits=splits, block_h=64,
                     block_i=draw(st.sampled_from([32, 64, 128])),
                     k_tile_down=draw(st.sampled_from([64, 256, 512])),
                     tma=draw(st.booleans()))]))
    shared = make_fp8_shared(H, I, block, g) if draw(st.booleans()) else (None, None)
    return T, H, I, E, ids, weights, block, g, path, bits, forced, shared


# bf16 activations take the fp8 or the fp16 dot (kernels/moe_fp8.py), which the interpreter
# runs right (its bf16 tl.dot does not).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@given(case=fp8_cases())
def test_fp8_kernels_match_the_dequantized_reference(dtype, case):
    """Both paths, native e4m3 and byte-decoded reads, the FP8 default launches and forced
    ones, k steps larger than a scale block (the decode down step 256 is fitted to the block),
    any I and H (partial blocks and tiles), scales one per tile or a vector over its rows; with
    the fp8 dot the oracle quantizes the activations as the launch does (a W8A8 result is
    about 5% off the unquantized oracle: the bound 1e-2 tells them apart); with or without an
    FP8 shared expert (one more expert of either path's launches); with the fp8 dot the down's
    k step may span several scale blocks and run past I (launch.fit_scale_blocks keeps it)."""
    T, H, I, E, ids, weights, block, g, path, bits, forced, (shared, shared_scales) = case
    w_gate_up, w_down, scales = make_fp8_layer(E, H, I, block, g)
    scales = replace(scales, shared=shared_scales)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    out = torch.full((T, H), float("nan"), dtype=dtype)  # poisoned: every row must be written
    with launch.override(moe_path=path, fp8_bits=bits, decode=forced):
        y = run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton", out=on_dev(out),
                    shared=shared, scales=scales)
        groups = launched_groups(hidden, path, scales)
    assert torch.isfinite(y).all()
    ref = fp8_oracle(hidden, ids, weights, w_gate_up, w_down, scales, groups, shared)
    assert rel_err(y, ref) <= (1e-4 if dtype == torch.float32 else 1e-2)


def random_routing(T, E, k, g):
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(torch.int32)
    return ids, torch.rand(T, k, generator=g)


def fp8_defaults(**change):
    """launch.override's arguments: both FP8 default configs with `change`."""
    return {name: dataclasses.replace(config, **change) for name, config in
            (("decode", launch.DEFAULT_DECODE_FP8), ("grouped", launch.DEFAULT_GROUPED_FP8))}


# The scaled dots (kernels/moe_fp8.py): fp16 with the activations prepared by one more launch
# or scaled in the k loop, and fp8 (always prepared).
DOTS = [dict(dot="fp16", x_prepass=True), dict(dot="fp16", x_prepass=False), dict(dot="fp8"),
        dict(dot="fp8", x_prepass=False)]
DOT_IDS = ["fp16", "fp16 in loop", "fp8", "fp8 in loop"]


@pytest.mark.parametrize("dot", DOTS, ids=DOT_IDS)
@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_scaled_dots_keep_activations_outside_their_range(path, dot):
    """bf16 activations whose rows lie far outside fp16's and e4m3's ranges (1e8 and 1e12:
    fp16 overflows at 65504, e4m3 at 448; 1e-8: under fp16's smallest subnormal) still run the
    scaled dots: each row's group is scaled by a power of two first. Every token matches the
    oracle (with the fp8 dot's quantization of the activations) to its own size; a plain
    conversion gives inf or 0."""
    g = torch.Generator().manual_seed(7)
    E, H, I, T = 4, 200, 72, 12
    w_gate_up, w_down, scales = make_fp8_layer(E, H, I, (128, 128), g)
    size = torch.tensor([1e8, 1e-8, 1.0, 3e4, 1e-5, 1e12] * 2)[:, None]
    hidden = (torch.randn(T, H, generator=g) * size).to(torch.bfloat16)
    ids, weights = random_routing(T, E, 2, g)
    with launch.override(moe_path=path, **fp8_defaults(**dot)):
        y = run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton", scales=scales)
        groups = launched_groups(hidden, path, scales)
    assert (groups is not None) == (dot["dot"] == "fp8")
    ref = fp8_oracle(hidden, ids, weights, w_gate_up, w_down, scales, groups)
    row_err = (y.double() - ref).norm(dim=1) / ref.norm(dim=1)
    # The fp8 dot quantizes the act rows the kernel computes in fp32 (wgmma sums, fast exp);
    # the oracle quantizes its float64 ones. Most likely (not traced): where a group's largest
    # act lies at a power of two the two pick scales a factor 2 apart and round the group on
    # different grids, and the row differs by about e4m3's rounding noise (3.7% seen on the
    # H200, one row of twelve). A plain conversion's inf or 0 is off by 100%. So with the fp8
    # dot one row may reach 5%, the others keep 1% (a kernel error on every row still fails).
    assert (row_err <= 5e-2).all(), row_err
    assert int((row_err > 1e-2).sum()) <= (1 if dot["dot"] == "fp8" else 0), row_err


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_fp8_dot_act_groups_are_the_gate_up_items_columns(path):
    """With the fp8 dot the act rows are quantized per block_i columns (32, 64 or 128 inside a
    128-column scale block: launch.fit_scale_blocks). A layer whose act columns 0-31 are about
    2**17 below columns 32-127, and whose down weights give both parts the same weight, tells
    the widths apart: a 128-column group rounds the small columns to e4m3's last steps (the
    oracles of the three widths lie 13-28% apart), so each launch must match its own width's
    oracle and no other. Own: within 4% (0.3% seen on the CPU, 1.3% on the H200, whose act
    rows come from wgmma sums and a fast exp, so some land on the other side of an e4m3
    rounding edge: one step is 6-12% of that entry); the others: more than 8% away."""
    g = torch.Generator().manual_seed(0)
    H = I = 128
    gate_up = torch.randn(1, 2 * I, H, generator=g) / math.sqrt(H)
    down = torch.randn(1, H, I, generator=g) / math.sqrt(I)
    for small in (slice(0, 32), slice(I, I + 32)):  # gate and up rows of act columns 0-31
        gate_up[0, small] *= 2.0 ** -4
    for large in (slice(32, I), slice(I + 32, 2 * I)):
        gate_up[0, large] *= 2.0 ** 4
    down[0, :, :32] *= 2.0 ** 8
    down[0, :, 32:] *= 2.0 ** -8
    w_gate_up, w_down, scales = quantize_experts(gate_up, down, (32, 128))
    hidden = torch.randn(8, H, generator=g).to(torch.bfloat16)
    ids, weights = torch.zeros(8, 1, dtype=torch.int32), torch.ones(8, 1)
    oracles = {width: fp8_oracle(hidden, ids, weights, w_gate_up, w_down, scales, (128, width))
               for width in (32, 64, 128)}
    base = launch.DEFAULT_DECODE_FP8 if path == "decode" else launch.DEFAULT_GROUPED_FP8
    for width in oracles:
        with launch.override(moe_path=path, **{path: replace(base, block_i=width)}):
            y = run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton",
                        scales=scales)
            assert launched_groups(hidden, path, scales) == (128, width)
        for other, ref in oracles.items():
            err = rel_err(y, ref)
            assert err < 4e-2 if other == width else err > 8e-2, (width, other, err)


@pytest.mark.parametrize("dot", DOTS, ids=DOT_IDS)
@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_scaled_dots_keep_rows_apart(path, dot):
    """A NaN in one token's activations makes that token's output NaN and no other's; with
    the fp8 dot an inf does too (e4m3 has no inf: never a finite value); a token of zeros
    outputs zeros."""
    g = torch.Generator().manual_seed(8)
    E, H, I, T = 3, 64, 40, 6
    w_gate_up, w_down, scales = make_fp8_layer(E, H, I, (32, 32), g)
    hidden = torch.randn(T, H, generator=g)
    hidden[1, 5] = float("nan")
    hidden[2] = 0.0
    hidden[3, 40] = float("inf") if dot["dot"] == "fp8" else 1.0
    ids, weights = random_routing(T, E, 2, g)
    with launch.override(moe_path=path, **fp8_defaults(**dot)):
        y = run_moe(hidden.to(torch.bfloat16), ids, weights, w_gate_up, w_down,
                    backend="triton", scales=scales)
        groups = launched_groups(hidden.to(torch.bfloat16), path, scales)
    assert torch.isnan(y[1]).all() and torch.equal(y[2], torch.zeros_like(y[2]))
    if dot["dot"] == "fp8":
        assert torch.isnan(y[3]).all()
    keep = [0, 4, 5]
    ref = fp8_oracle(hidden.to(torch.bfloat16)[keep], ids[keep], weights[keep], w_gate_up,
                     w_down, scales, groups)
    assert rel_err(y[keep], ref) <= 1e-2


def test_fp8_weights_get_their_own_launch_defaults():
    """moe_launch gives FP8 weights DEFAULT_*_FP8 (an override still wins, for both kinds), and
    those already satisfy the FP8 fit rules at 128-wide scale blocks."""
    cpu = torch.device("cpu")
    plan = launch.moe_launch(32, 8, 256, torch.bfloat16, cpu, fp8=True)
    assert (plan.decode, plan.grouped) == (launch.DEFAULT_DECODE_FP8, launch.DEFAULT_GROUPED_FP8)
    plan = launch.moe_launch(32, 8, 256, torch.bfloat16, cpu)
    assert (plan.decode, plan.grouped) == (launch.DEFAULT_DECODE, launch.DEFAULT_GROUPED)
    forced = DecodeConfig(block_i=16)
    with launch.override(decode=forced):
        assert launch.moe_launch(32, 8, 256, torch.bfloat16, cpu, fp8=True).decode == forced
    for config in (launch.DEFAULT_DECODE_FP8, launch.DEFAULT_GROUPED_FP8):
        assert launch.fit_scale_blocks(config, 128) == config


def test_byte_decoding_equals_native_reads():
    """FP8_BITS (GPUs below sm_89) gives the native path's values bit for bit."""
    g = torch.Generator().manual_seed(5)
    w_gate_up, w_down, scales = make_fp8_layer(3, 32, 24, (16, 16), g)
    hidden = torch.randn(6, 32, generator=g)
    ids = torch.tensor([[0, 1], [2, -1], [1, 0], [2, 1], [0, 2], [1, -1]], dtype=torch.int32)
    weights = torch.rand(6, 2, generator=g)
    runs = []
    for bits in (False, True):
        with launch.override(fp8_bits=bits):
            runs.append(run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton",
                                scales=scales))
    assert torch.equal(runs[0], runs[1])


def test_every_e4m3_byte_decodes_exactly():
    """All 254 finite e4m3 bytes (subnormals, +-0, +-448) as weights of one expert with unit
    scales: the byte-decoded and the native kernels give the exact products."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE)
    codes = codes[~torch.isnan(codes)]
    w_down = torch.zeros(1, 16, 16, dtype=FP8_DTYPE)
    w_down.view(-1)[: codes.numel()] = codes
    w_gate_up = torch.ones(1, 32, 16).to(FP8_DTYPE)
    scales = Fp8Scales(torch.ones(1, 2, 1), torch.ones(1, 1, 1), (16, 16))
    hidden = torch.ones(1, 16) / 16
    ref = fp8_oracle(hidden, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1), w_gate_up,
                     w_down, scales)
    for bits in (False, True):
        with launch.override(fp8_bits=bits, moe_path="decode"):
            y = run_moe(hidden.double().float(), torch.zeros(1, 1, dtype=torch.int32),
                        torch.ones(1, 1), w_gate_up, w_down, backend="triton", scales=scales)
        torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_fp8_shared_expert_is_one_more_expert(path):
    """The FP8 shared expert is a routed expert that every token uses with weight 1 (same dot,
    same activation groups): the layer with it as expert E in an extra slot gives the same."""
    g = torch.Generator().manual_seed(2)
    w_gate_up, w_down, scales = make_fp8_layer(4, 32, 16, (16, 16), g)
    (shared_gu, shared_d), shared_scales = make_fp8_shared(32, 16, (16, 16), g)
    hidden = torch.randn(5, 32, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 4, (5, 2), generator=g).to(torch.int32)
    weights = torch.rand(5, 2, generator=g)
    with launch.override(moe_path=path):
        y = run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton",
                    shared=(shared_gu, shared_d), scales=replace(scales, shared=shared_scales))
        as_routed = run_moe(
            hidden, torch.cat((ids, torch.full((5, 1), 4, dtype=torch.int32)), 1),
            torch.cat((weights, torch.ones(5, 1)), 1), torch.cat((w_gate_up, shared_gu[None])),
            torch.cat((w_down, shared_d[None])), backend="triton",
            scales=Fp8Scales(torch.cat((scales.gate_up, shared_scales[0][None])),
                             torch.cat((scales.down, shared_scales[1][None])), scales.block))
    assert torch.equal(y, as_routed)  # the same launches with it as expert 4 last: same sum
    with launch.override(moe_path=path):
        groups = launched_groups(hidden, path, scales)
    ref = fp8_oracle(hidden, ids, weights, w_gate_up, w_down,
                     replace(scales, shared=shared_scales), groups, (shared_gu, shared_d))
    assert rel_err(y, ref) <= 1e-2


def test_shared_expert_beside_fp8_experts_must_be_fp8():
    hidden, ids, weights, w_gate_up, w_down, scales = fp8_inputs()
    model_dtype = (torch.randn(32, 32), torch.randn(32, 16))
    with pytest.raises(ValueError, match="shared expert must be FP8 too"):
        run_moe(hidden, ids, weights, w_gate_up, w_down, shared=model_dtype, scales=scales)
    (gu, d), shared_scales = make_fp8_shared(32, 16, (16, 16), torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="shared is None"):
        run_moe(hidden, ids, weights, w_gate_up, w_down,
                scales=replace(scales, shared=shared_scales))
    bad = replace(scales, shared=(shared_scales[0][:1], shared_scales[1]))
    with pytest.raises(ValueError, match=r"shared\[0\]_scale_inv has shape"):
        run_moe(hidden, ids, weights, w_gate_up, w_down, shared=(gu, d), scales=bad)
    nan = replace(scales, shared=(shared_scales[0], torch.full_like(shared_scales[1], math.nan)))
    with pytest.raises(ValueError, match=r"shared\[1\]_scale_inv holds non-finite"):
        # check_ids=True: scale values are checked on CUDA only when asked (a host sync)
        run_moe(hidden, ids, weights, w_gate_up, w_down, shared=(gu, d), scales=nan,
                check_ids=True)
    with pytest.raises(TypeError, match="scales.shared must be a pair"):
        run_moe(hidden, ids, weights, w_gate_up, w_down, shared=(gu, d),
                scales=replace(scales, shared=shared_scales[:1]))


def test_fp8_shared_expert_alone_takes_the_grouped_launch_and_its_reference_follows():
    """With no routed slot (top_k 0) the FP8 shared expert runs on the grouped path even for
    few tokens, so the reference must quantize its activations as the grouped launch does, not
    as the decode one (here forced to the fp16 dot, which quantizes none)."""
    g = torch.Generator().manual_seed(9)
    w_gate_up, w_down, scales = make_fp8_layer(4, 128, 64, (32, 32), g)
    (gu, d), shared_scales = make_fp8_shared(128, 64, (32, 32), g)
    scales = replace(scales, shared=shared_scales)
    hidden = torch.randn(8, 128, generator=g).to(torch.bfloat16)
    ids, weights = torch.empty(8, 0, dtype=torch.int32), torch.empty(8, 0)
    with launch.override(decode=DecodeConfig(dot="fp16")):
        y, ref = (run_moe(hidden, ids, weights, w_gate_up, w_down, backend=backend,
                          shared=(gu, d), scales=scales) for backend in ("triton", "reference"))
    assert rel_err(y, ref.double()) <= 1e-2


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_nan_rule_with_an_fp8_shared_expert(path):
    """docs/routing.md's NaN rule holds beside the FP8 shared expert: a NaN weight in a filled
    slot, or every slot empty with NaN weights, gives a NaN row; the other rows stay finite."""
    hidden, _, _, w_gate_up, w_down, scales = fp8_inputs()
    (gu, d), shared_scales = make_fp8_shared(32, 16, (16, 16), torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 1], [1, -1], [-1, -1]], dtype=torch.int32)
    weights = torch.tensor([[0.5, float("nan")], [0.3, 0.0], [float("nan"), float("nan")]])
    for backend in ("triton", "reference"):
        with launch.override(moe_path=path):
            y = run_moe(hidden, ids, weights, w_gate_up, w_down, backend=backend,
                        shared=(gu, d), scales=replace(scales, shared=shared_scales))
        assert torch.isnan(y[0]).all() and torch.isnan(y[2]).all(), backend
        assert torch.isfinite(y[1]).all(), backend


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_broadcast_routed_scales_take_a_shared_expert(path):
    """Routed scales given as a broadcast view (zero strides: one scale for every block) with
    an FP8 shared expert: the same values as contiguous scales (a break test found a crash)."""
    hidden, ids, weights, w_gate_up, w_down, scales = fp8_inputs()
    (gu, d), shared_scales = make_fp8_shared(32, 16, (16, 16), torch.Generator().manual_seed(1))
    broadcast = Fp8Scales(torch.full((1, 1, 1), 0.01).expand(*scales.gate_up.shape),
                          torch.full((1, 1, 1), 0.02).expand(*scales.down.shape), scales.block,
                          shared_scales)
    dense = Fp8Scales(broadcast.gate_up.contiguous(), broadcast.down.contiguous(), scales.block,
                      shared_scales)
    with launch.override(moe_path=path):
        y = run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton",
                    shared=(gu, d), scales=broadcast)
        want = run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton",
                       shared=(gu, d), scales=dense)
    assert torch.equal(y, want)


# ---------------------------------------------------------------------------------------------
# bad input and the capability rule


def fp8_inputs():
    g = torch.Generator().manual_seed(0)
    w_gate_up, w_down, scales = make_fp8_layer(2, 32, 16, (16, 16), g)
    return torch.randn(3, 32), torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1), \
        w_gate_up, w_down, scales


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_scales_are_named(backend):
    hidden, ids, weights, w_gate_up, w_down, scales = fp8_inputs()
    run = lambda s, **kw: run_moe(hidden, ids, weights, w_gate_up, w_down,  # noqa: E731
                                  backend=backend, scales=s, **kw)
    with pytest.raises(ValueError, match="w_gate_up is float8_e4m3fn: pass its block scales"):
        run_moe(hidden, ids, weights, w_gate_up, w_down, backend=backend)
    with pytest.raises(ValueError, match=r"w_down_scale_inv has shape \(2, 2, 1\), expected "
                                         r"\(2, 1, 1\).*weight_block_size \[32, 16\]"):
        run(Fp8Scales(scales.gate_up, scales.down, (32, 16)))  # another block size
    with pytest.raises(ValueError, match="w_gate_up_scale_inv has shape"):
        run(Fp8Scales(scales.gate_up[:, :1], scales.down, scales.block))
    bad = scales.down.clone()
    bad[1, 1, 0] = float("inf")
    with pytest.raises(ValueError, match="w_down_scale_inv holds non-finite"):
        # check_ids=True: scale values are checked on CUDA only when asked (a host sync)
        run(Fp8Scales(scales.gate_up, bad, scales.block), check_ids=True)
    with pytest.raises(TypeError, match="w_gate_up_scale_inv must be a float32"):
        run(Fp8Scales(scales.gate_up.half(), scales.down, scales.block))
    for code in (0x7F, 0xFF):  # e4m3 NaN, both signs: the kernels would read a finite value
        nan_byte = w_gate_up.clone()
        nan_byte.view(torch.uint8)[1, 3, 2] = code
        with pytest.raises(ValueError, match="w_gate_up holds float8_e4m3fn NaN codes"):
            run_moe(hidden, ids, weights, nan_byte, w_down, backend=backend, scales=scales,
                    check_ids=True)
    with pytest.raises(TypeError, match="w_gate_up must be float8_e4m3fn"):
        run_moe(hidden, ids, weights, w_gate_up.float(), w_down.float(), backend=backend,
                scales=scales)


def test_fp8_reads_follow_the_capability(monkeypatch):
    """Below sm_89 (no e4m3 type in Triton) the kernels read bytes and decode them; from sm_89
    on they read e4m3 natively; an override wins. (No GPU needed: the capability is faked.)"""
    cuda = torch.device("cuda", 0)
    for capability, bits in (((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert launch.fp8_bits(cuda) is bits
    with launch.override(fp8_bits=False):
        assert launch.fp8_bits(cuda) is False
    assert launch.fp8_bits(torch.device("cpu")) is False  # the interpreter reads e4m3


def tma_against_copies(E, H, I, T, with_shared, monkeypatch):
    """The FP8 decode layer's output with the gate/up's weight tiles by TMA and by the threads'
    copies (DEFAULT_DECODE_FP8 with tma on and off), after checking that the TMA launch's
    gate/up loop got a tensor descriptor and the other one pointers."""
    g = torch.Generator().manual_seed(24)
    w_gate_up, w_down, scales = make_fp8_layer(E, H, I, (128, 128), g)
    hidden = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids, weights = random_routing(T, E, 2, g)
    ids[1, 1] = -1
    kwargs = dict(scales=scales)
    if with_shared:
        shared, shared_scales = make_fp8_shared(H, I, (128, 128), g)
        kwargs = dict(shared=shared, scales=replace(scales, shared=shared_scales))
    silu_gate_up = moe_matmul.fp8_silu_gate_up
    weights_read = []  # what each item's loop read its weights through (the interpreter's)
    if not HAS_CUDA:
        monkeypatch.setattr(moe_matmul, "fp8_silu_gate_up", lambda *a: weights_read.append(
            type(a[4]).__name__) or silu_gate_up(*a))
    ys = {}
    for tma in (True, False):
        with launch.override(moe_path="decode",
                             decode=replace(launch.DEFAULT_DECODE_FP8, tma=tma)):
            ys[tma] = run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton",
                              **kwargs)
        if not HAS_CUDA:
            assert weights_read and set(weights_read) == {
                "tensor_descriptor" if tma else "tensor"}, (tma, weights_read)
            weights_read.clear()
    return ys[True], ys[False]


@pytest.mark.parametrize("with_shared", [False, True])
def test_tma_gate_up_reads_the_same_values(with_shared, monkeypatch):
    """The decode gate/up's weight tiles through in-kernel TMA descriptors (DecodeConfig.tma,
    the FP8 default) give the threads' copies' output bit for bit: I = 192 leaves the last
    128-column item's gate rows reading up rows (and the up rows past the expert, zeros by
    the descriptor's shape), which only the columns past I take; H = 272 a k step past H (zeros
    by the shape); an empty slot; the shared expert's own descriptor."""
    assert launch.DEFAULT_DECODE_FP8.tma
    with_tma, with_copies = tma_against_copies(6, 272, 192, 9, with_shared, monkeypatch)
    assert torch.isfinite(with_tma).all() and torch.equal(with_tma, with_copies)


@pytest.mark.gpu
@pytest.mark.parametrize("I", [512, 192])
def test_tma_gate_up_reads_the_same_values_on_gpu(I, monkeypatch):
    """As above with the GPU's own TMA copies: LLaDA2.0-mini's expert shape (H 2048, I 512,
    32 tokens, the shared expert) and I = 192."""
    with_tma, with_copies = tma_against_copies(32, 2048, I, 32, True, monkeypatch)
    assert torch.isfinite(with_tma).all() and torch.equal(with_tma, with_copies)


def test_tma_follows_the_capability_and_alignment(monkeypatch):
    """TMA descriptors where the config asks for them (DecodeConfig.tma), from sm_90 (and in
    the interpreter), for e4m3 weights whose rows are contiguous and whose strides and start
    are 16-byte aligned, with tiles of 16-256 columns and at most 256 rows; else the threads'
    copies (the same values: a launch choice, not an error). (No GPU needed: the capability is
    faked, CPU tensors stand in.)"""
    w = torch.empty(4, 64, 256, dtype=FP8_DTYPE)
    config = launch.DEFAULT_DECODE_FP8
    cuda = torch.device("cuda", 0)
    for capability, able in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert launch.takes_tma([w], config, cuda) is able
    cpu = torch.device("cpu")
    assert launch.takes_tma([w, w[0]], config, cpu)
    assert not launch.takes_tma([w], replace(config, tma=False), cpu)
    assert not launch.takes_tma([torch.empty(4, 64, 200, dtype=FP8_DTYPE)], config, cpu)
    assert not launch.takes_tma([w.transpose(1, 2)], config, cpu)  # columns not contiguous
    offset = w.view(-1)[8:8 + 16 * 256].view(16, 256)  # starts 8 bytes past an aligned one
    assert not launch.takes_tma([w, offset], config, cpu)
    assert not launch.takes_tma([w], replace(config, k_tile_gate_up=8), cpu)  # 8-byte rows
    assert not launch.takes_tma([w], replace(config, block_i=512), cpu)


def test_descriptor_scratch_leaves_the_callers_allocator():
    """A TMA launch on CUDA runs with its scratch allocator set in a copy of the caller's
    context: an allocator the caller set (triton.set_allocator) is the caller's again after.
    (No GPU needed: the launch is a stand-in that records the allocator it would get.)"""
    from triton.runtime import _allocation  # the allocator's ContextVar: no public getter

    def callers(size, alignment, stream):
        raise AssertionError("not for this launch")

    token = _allocation._allocator.set(callers)
    try:
        seen = []
        moe_module._with_descriptor_scratch(
            True, torch.device("cuda"), lambda **kwargs: seen.append(_allocation._allocator.get()))
        assert seen == [moe_module._descriptor_scratch]
        assert _allocation._allocator.get() is callers
    finally:
        _allocation._allocator.reset(token)


def test_down_step_follows_the_dot_that_runs():
    """A down step wider than the scale block, kept by fit_scale_blocks for the fp8 dot, stays
    with e4m3 act rows and is cut to the block where the launch runs another dot (fp16 or
    model-dtype act rows: 2-4x the shared memory a tile takes)."""
    config = launch.fit_scale_blocks(DecodeConfig(dot="fp8", k_tile_down=512), 64)
    fp8 = (None, (128, 64), False)
    for act_dtype, step in ((FP8_DTYPE, 512), (torch.float16, 64), (torch.float32, 64),
                            (torch.bfloat16, 64)):
        assert _down_step(config, ActRows(torch.empty(1, 1, dtype=act_dtype)), fp8) == step
    assert _down_step(DecodeConfig(), ActRows(torch.empty(1, 1)), None) == 256  # bf16 weights


def test_k_steps_fit_the_scale_blocks():
    """Each k step shrinks to a divisor of the scale block's width, except the down's with the
    fp8 dot (its dots are the act groups, divisors of the width: fp8_down_step)."""
    fitted = launch.fit_scale_blocks(DecodeConfig(k_tile_gate_up=128, k_tile_down=256), 128)
    assert (fitted.k_tile_gate_up, fitted.k_tile_down) == (128, 128)
    fitted = launch.fit_scale_blocks(GroupedConfig(), 48)
    assert (fitted.k_tile_gate_up, fitted.k_tile_down) == (16, 16)
    for config in (DecodeConfig(dot="fp8", k_tile_gate_up=256, k_tile_down=512),
                   GroupedConfig(dot="fp8", k_tile_gate_up=256, k_tile_down=512)):
        fitted = launch.fit_scale_blocks(config, 64)
        assert (fitted.dot, fitted.k_tile_gate_up, fitted.k_tile_down) == ("fp8", 64, 512)
        fitted = launch.fit_scale_blocks(config, 48)  # no fp8 dot: every step fitted
        assert (fitted.dot, fitted.k_tile_gate_up, fitted.k_tile_down) == ("fp16", 16, 16)


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_fp8_dot_quantizes_x_in_the_loop_as_the_prepass_does(path):
    """With x_prepass off the fp8 dot quantizes each k step's x tile in the gate/up's loop: a
    step of one scale block's columns is one group, so the e4m3 values and the output are
    exactly the prepass launch's. A k step narrower than the block (a group spans several
    steps) keeps the prepass: launch.fit_scale_blocks turns it back on."""
    g = torch.Generator().manual_seed(12)
    E, H, I, T = 4, 200, 72, 12
    w_gate_up, w_down, scales = make_fp8_layer(E, H, I, (32, 32), g)
    hidden = (torch.randn(T, H, generator=g) * torch.logspace(-3, 3, H)).to(torch.bfloat16)
    ids, weights = random_routing(T, E, 2, g)
    ys = []
    for prepass in (True, False):
        with launch.override(moe_path=path, **fp8_defaults(x_prepass=prepass)):
            ys.append(run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton",
                              scales=scales))
    assert torch.isfinite(ys[0]).all() and torch.equal(ys[0], ys[1])
    for config in (DecodeConfig(dot="fp8", x_prepass=False, k_tile_gate_up=32),
                   GroupedConfig(dot="fp8", x_prepass=False, k_tile_gate_up=32)):
        assert launch.fit_scale_blocks(config, 32).x_prepass is False
        assert launch.fit_scale_blocks(config, 64).x_prepass is True  # two steps per group
        assert launch.fit_scale_blocks(config, 48).x_prepass is False  # the fp16 dot: any step


@pytest.mark.parametrize("I", [72, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_wide_down_steps_read_no_scale_past_their_blocks(path, dtype, I):
    """Down k steps of 256 in scale blocks of 32 (the fp8 dot's act groups of 32 columns with
    bf16 activations), over I = 72 columns (one step: three groups inside I, five past it) and
    300 (two steps, the second partial): the groups past I must not read weight or act scales
    past their last columns. The down's scales sit in a larger tensor whose column past them is
    NaN: one read there makes its rows NaN. fp32 activations take the model dot, whose down
    launch cuts the step to the block (moe._down_step)."""
    g = torch.Generator().manual_seed(11)
    E, H, T = 4, 200, 12
    w_gate_up, w_down, scales = make_fp8_layer(E, H, I, (32, 32), g)
    padded = torch.full(scales.down.shape[:2] + (scales.down.shape[2] + 1,), float("nan"))
    padded[..., :-1] = scales.down
    scales = replace(scales, down=padded[..., :-1])
    hidden = torch.randn(T, H, generator=g).to(dtype)
    ids, weights = random_routing(T, E, 2, g)
    with launch.override(moe_path=path, **fp8_defaults(k_tile_down=256, block_i=32)):
        y = run_moe(hidden, ids, weights, w_gate_up, w_down, backend="triton", scales=scales)
        groups = launched_groups(hidden, path, scales)
    assert (groups is not None) == (dtype == torch.bfloat16)
    ref = fp8_oracle(hidden, ids, weights, w_gate_up, w_down, scales, groups)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= (1e-4 if dtype == torch.float32 else 1e-2)


def test_fp8_dot_groups_follow_the_scale_blocks():
    """The fp8 dot's act groups are the gate/up items' columns, so block_i becomes a divisor
    of the scale block's width, at least 32 (an e4m3 wgmma's k); a width that is no power of
    two >= 32 takes the fp16 dot; a bad dot name is refused where the config is built."""
    for block_i, width, group in ((32, 128, 32), (64, 128, 64), (16, 128, 32), (256, 128, 128),
                                  (128, 64, 64), (64, 32, 32)):
        fitted = launch.fit_scale_blocks(DecodeConfig(dot="fp8", block_i=block_i), width)
        assert (fitted.dot, fitted.block_i) == ("fp8", group), (block_i, width)
    for width in (16, 48, 96, 256):  # the widest group is 128: a wider tile would not fit
        assert launch.fit_scale_blocks(GroupedConfig(dot="fp8"), width).dot == "fp16"
    # a forced k step under 32 (an e4m3 wgmma's k) too
    assert launch.fit_scale_blocks(DecodeConfig(dot="fp8", k_tile_down=16), 128).dot == "fp16"
    hidden = torch.zeros(4, 256, dtype=torch.bfloat16)
    scales = Fp8Scales(torch.ones(1, 2, 2), torch.ones(1, 2, 1), (128, 128))
    assert fp8_activation_groups(hidden, DecodeConfig(dot="fp8", block_i=128), scales) == (128, 128)
    assert fp8_activation_groups(hidden, DecodeConfig(dot="fp8", block_i=64), scales) == (128, 64)
    assert fp8_activation_groups(hidden.float(), DecodeConfig(dot="fp8"), scales) is None
    assert fp8_activation_groups(hidden, DecodeConfig(dot="fp16"), scales) is None
    with launch.override(fp8_bits=True):  # no FP8 tensor cores below sm_89
        assert fp8_activation_groups(hidden, DecodeConfig(dot="fp8"), scales) is None
    with pytest.raises(ValueError, match="DecodeConfig.dot must be one of"):
        DecodeConfig(dot="int8")


def e4m3_nearest(v: torch.Tensor) -> torch.Tensor:
    """Round float64 v (|v| <= 448) to the nearest finite e4m3 value, ties to the even code,
    by searching all 254 of them (the oracle of the rounding, independent of torch's cast)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(FP8_DTYPE).double()
    ok = ~torch.isnan(values)
    codes, values = codes[ok].long(), values[ok]
    gap = (v[:, None] - values[None, :]).abs()
    best = gap.min(dim=1, keepdim=True).values
    # Among the nearest (two at a tie), the even code; +-0 are both even and both zero.
    pick = torch.where(gap == best, codes[None, :] % 2, 2).argmin(dim=1)
    return values[pick]


@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([16, 32, 128]),
       spread=st.sampled_from([1e-30, 1e-3, 1.0, 1e20]))
def test_quantize_activations_rounds_to_e4m3_per_group(seed, group, spread):
    """quant.quantize_activations (the fp8 dot's activations as a reference): each group
    scaled by the power of two that puts its largest |x| in [128, 256), rounded to the nearest
    e4m3 value (ties to even), scaled back; ties and the subnormal range included."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 2 * group + 5, generator=g) * spread).to(torch.bfloat16).double()
    x[0, :8] = torch.tensor([2.5, 3.5, 136.0, -2 ** -10, 2 ** -9 * 1.5, 0.0, 2.0 ** 7, 7.81])
    got = quantize_activations(x, group)
    for row in range(x.shape[0]):
        for start in range(0, x.shape[1], group):
            chunk = x[row, start:start + group]
            amax = chunk.abs().max()
            p = min(8 - int(torch.frexp(amax).exponent), 126)
            want = e4m3_nearest(chunk * 2.0 ** p) * 2.0 ** -p
            assert torch.equal(got[row, start:start + group], want), (row, start)


def test_quantize_activations_of_no_rows():
    assert quantize_activations(torch.empty(0, 96, dtype=torch.bfloat16), 32).shape == (0, 96)


def test_quantized_group_with_inf_or_nan_is_nan():
    x = torch.ones(2, 64)
    x[0, 3], x[1, 40] = float("inf"), float("nan")
    q = quantize_activations(x, 32)
    assert torch.isnan(q[0, :32]).all() and torch.equal(q[0, 32:], x[0, 32:])
    assert torch.isnan(q[1, 32:]).all() and torch.equal(q[1, :32], x[1, :32])


def test_kernel_rounding_to_e4m3_matches_the_reference():
    """The kernels' scaled_rows_kernel with the fp8 dot, on every e4m3 value, every midpoint
    between two of them and its neighbours, and random values over the whole range, gives
    quantize_activations' values exactly (the interpreter's own cast rounds 7.81 to 4)."""
    from dmoe_triton.kernels.moe_fp8 import scaled_rows_kernel

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
    grid = codes[~torch.isnan(codes) & (codes >= 0) & (codes < 256)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    cols = torch.cat([grid, mids, mids.nextafter(torch.tensor(1e9)),
                      mids.nextafter(torch.tensor(0.0)), torch.rand(200) * 255])
    x = torch.cat([cols, -cols]).reshape(-1, 2)  # every group's largest: 255 and change
    x = torch.cat([x, torch.full((x.shape[0], 1), 255.5)], 1).contiguous().to(DEVICE)
    T, H = x.shape
    xs = torch.empty(T, H, dtype=FP8_DTYPE, device=DEVICE)
    inverse = torch.empty(T, 1, device=DEVICE)
    scaled_rows_kernel[(T, 1)](x_ptr=x, stride_xt=H, stride_xh=1, xs_ptr=xs, inverse_ptr=inverse,
                               H=H, CHUNK=H, CHUNK_PAD=4, DOT="fp8")
    got = (xs.float() * inverse).cpu()
    assert torch.equal(got, quantize_activations(x.cpu(), H))


# ---------------------------------------------------------------------------------------------
# the model: patch, .to(), save, load


def fp8_logits(model, ids):
    for m in model.modules():
        if isinstance(m, DMoEBlock):
            m.backend = "reference"
    with torch.no_grad():
        return model(ids).logits


def test_patch_model_quantizes_and_to_keeps_fp8():
    model = small_model()
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    patch_model(model, RoutingPolicy.token(), backend="reference", expert_dtype="fp8")
    block = model.model.layers[1].mlp
    assert block.w_gate_up.dtype == FP8_DTYPE and block.w_down_scale.dtype == torch.float32
    assert model.config.quantization_config["weight_block_size"] == [128, 128]
    y = fp8_logits(model, ids)
    assert rel_err(y, ref.double()) < 0.05 and (y.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    model.to(torch.float16)
    assert block.w_gate_up.dtype == FP8_DTYPE and block.w_gate_up_scale.dtype == torch.float32
    shared = block.shared_expert  # FP8 too, still views of one stack; the model dtype follows
    assert shared.down_proj.weight.dtype == FP8_DTYPE and block.dense_dtype == torch.float16
    assert shared.gate_proj.weight_scale_inv.dtype == torch.float32
    assert shared.gate_proj.weight.data_ptr() == block.shared_gate_up.data_ptr()
    with pytest.raises(ValueError, match="expert_dtype must be one of"):
        patch_model(small_model(), expert_dtype="int4")


def test_build_fp8_model_stacks_its_shared_experts():
    """The random FP8 model (the flash bench's) is built on meta then given memory tensor by
    tensor; its shared experts are stacks again, with positive scales, and both backends
    agree."""
    model = build_fp8_model(LLaDA2MoeConfig(**SMALL), torch.device(DEVICE), seed=3)
    block = model.model.layers[1].mlp
    assert block.shared_gate_up.dtype == FP8_DTYPE
    assert block.shared_expert.gate_proj.weight.data_ptr() == block.shared_gate_up.data_ptr()
    assert all(bool((s > 0).all()) for s in block.fp8_scales().shared)
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    patch_model(model, RoutingPolicy.token(), backend="triton")
    with torch.no_grad():
        y = model(ids).logits.float().cpu()
    assert torch.isfinite(y).all()
    assert rel_err(y, fp8_logits(model, ids).float().cpu().double()) < 1e-2


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """A small model quantized at load time and saved: (directory, its logits on `ids`, ids)."""
    path = tmp_path_factory.mktemp("fp8") / "model"
    model = patch_model(small_model(), RoutingPolicy.token(), expert_dtype="fp8")
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(1))
    model.save_pretrained(str(path))
    return path, fp8_logits(model, ids), ids, model.state_dict()


def test_saved_fp8_checkpoint_has_the_published_layout(fp8_checkpoint):
    path, _, _, _ = fp8_checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                             "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    state = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert state[name].dtype == FP8_DTYPE and state[name].shape == (32, 64)
    assert state[name + "_scale_inv"].dtype == torch.float32
    assert state[name + "_scale_inv"].shape == (1, 1)
    assert state["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    for proj in ("gate", "up", "down"):  # the shared expert is FP8 too, under its own names
        name = f"model.layers.1.mlp.shared_experts.{proj}_proj.weight"
        assert state[name].dtype == FP8_DTYPE and state[name + "_scale_inv"].shape == (1, 1)


def test_fp8_checkpoint_round_trip(fp8_checkpoint):
    path, logits, ids, state = fp8_checkpoint
    model = LLaDA2MoeModelLM.from_pretrained(str(path))
    block = model.model.layers[1].mlp
    assert isinstance(block, DMoEBlock) and block.w_gate_up.dtype == FP8_DTYPE
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    again = model.state_dict()
    assert set(again) == set(state)
    assert all(torch.equal(again[k].float(), state[k].float()) for k in state)
    assert torch.equal(fp8_logits(model, ids), logits)
    # The shared expert is one stack again, its projections views of it (restack_shared).
    shared = block.shared_expert
    assert block.shared_gate_up.dtype == FP8_DTYPE
    assert shared.up_proj.weight.data_ptr() == block.shared_gate_up[32:].data_ptr()
    assert shared.up_proj.weight_scale_inv.data_ptr() == block.shared_gate_up_scale[1:].data_ptr()


def test_shared_expert_left_unquantized_is_quantized_at_load(fp8_checkpoint, tmp_path):
    """A checkpoint with FP8 routed experts but a float shared expert (published FP8 builds
    may leave it out) loads with the shared expert quantized as patch_model would."""
    prefix = "model.layers.1.mlp.shared_experts."
    unquantized = {}

    def dequantize_shared_expert(state):
        for proj in ("gate", "up", "down"):
            name = f"{prefix}{proj}_proj.weight"
            unquantized[name] = dequantize_blocks(state[name], state.pop(name + "_scale_inv"),
                                                  (128, 128), torch.bfloat16)
            state[name] = unquantized[name]

    path = break_checkpoint(fp8_checkpoint[0], tmp_path / "float_shared", dequantize_shared_expert)
    state = LLaDA2MoeModelLM.from_pretrained(str(path)).state_dict()
    for name, weight in unquantized.items():
        q, scale = quantize_blocks(weight.float(), (128, 128))
        assert state[name].dtype == FP8_DTYPE
        assert torch.equal(state[name].float(), q.float())
        assert torch.equal(state[name + "_scale_inv"], scale)


def test_fp8_checkpoint_with_a_shared_expert_too_wide_to_stack(tmp_path):
    """Two shared experts' width (no routed expert's shape: it runs apart in the model's
    dtype): its FP8 weights in a checkpoint load dequantized (a break test found them
    refused as 'not FP8')."""
    model = patch_model(small_model(num_shared_experts=2), RoutingPolicy.token(),
                        expert_dtype="fp8")
    model.save_pretrained(str(tmp_path / "base"))
    kept = {}

    def quantize_shared_expert(state):
        for name in [k for k in state if ".shared_experts." in k and k.endswith("proj.weight")]:
            state[name], state[name + "_scale_inv"] = quantize_blocks(state[name], (128, 128))
            kept[name] = dequantize_blocks(state[name], state[name + "_scale_inv"], (128, 128))

    path = break_checkpoint(tmp_path / "base", tmp_path / "wide", quantize_shared_expert)
    state = LLaDA2MoeModelLM.from_pretrained(str(path)).state_dict()
    assert kept and all(torch.equal(state[name], want) for name, want in kept.items())


def test_assigning_load_of_a_shared_scale_reaches_the_kernels():
    """load_state_dict(assign=True) of one shared scale gives the same logits as a copying
    load (restack_shared compares the scales too; a break test found them stale)."""
    model = patch_model(small_model(), RoutingPolicy.token(), backend="reference",
                        expert_dtype="fp8")
    name = "model.layers.1.mlp.shared_expert.gate_proj.weight_scale_inv"
    new = model.state_dict()["model.layers.1.mlp.shared_experts.gate_proj.weight_scale_inv"] * 4
    twin = copy.deepcopy(model)
    model.load_state_dict({name: new}, strict=False, assign=True)
    twin.load_state_dict({name: new.clone()}, strict=False, assign=False)
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)


def break_checkpoint(src, dst, edit_state=None, **config_fields):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.update(config_fields)
    (dst / "config.json").write_text(json.dumps(config))
    state = load_file(str(src / "model.safetensors"))
    if edit_state:
        edit_state(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


EXPERT = "model.layers.2.mlp.experts.5.down_proj.weight"
SHARED = "model.layers.2.mlp.shared_experts.up_proj.weight"


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop(EXPERT + "_scale_inv"),
     "experts.5.down_proj.weight is float8_e4m3fn but its weight_scale_inv is missing"),
    (lambda s: s.update({EXPERT + "_scale_inv": torch.ones(2, 1)}),
     r"experts.5.down_proj.weight_scale_inv has shape \(2, 1\), expected \(1, 1\)"),
    (lambda s: s[EXPERT + "_scale_inv"].fill_(float("nan")),
     "experts.5.down_proj.weight_scale_inv holds non-finite"),
    (lambda s: s[EXPERT + "_scale_inv"].fill_(-1.0),
     r"experts.5.down_proj.weight_scale_inv holds values outside \[0, "),
    (lambda s: s[EXPERT + "_scale_inv"].fill_(1e38),
     r"experts.5.down_proj.weight_scale_inv holds values outside \[0, "),
    (lambda s: s.update({EXPERT: s[EXPERT].float()}),
     "experts.5.down_proj.weight is torch.float32, expected float8_e4m3fn"),
    (lambda s: s[EXPERT].view(torch.uint8).view(-1)[-1:].fill_(0xFF),
     "experts.5.down_proj.weight holds float8_e4m3fn NaN codes"),
    (lambda s: s.pop(SHARED + "_scale_inv"),
     "shared_experts.up_proj.weight is float8_e4m3fn but its weight_scale_inv is missing"),
    (lambda s: s[SHARED + "_scale_inv"].fill_(float("inf")),
     "shared_experts.up_proj.weight_scale_inv holds non-finite"),
    (lambda s: s.update({SHARED: s[SHARED].float()}),
     "shared_experts.up_proj.weight has a weight_scale_inv but is torch.float32"),
    (lambda s: [s.pop(SHARED), s.pop(SHARED + "_scale_inv")], "missing tensors: .*shared_expert"),
])
def test_broken_fp8_checkpoints_are_named(fp8_checkpoint, tmp_path, edit, needle):
    path = break_checkpoint(fp8_checkpoint[0], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=needle):
        LLaDA2MoeModelLM.from_pretrained(str(path))


def test_block_size_other_than_the_scales_is_named(fp8_checkpoint, tmp_path):
    qc = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    path = break_checkpoint(fp8_checkpoint[0], tmp_path / "bad", quantization_config=qc)
    with pytest.raises(ValueError, match=r"gate_proj.weight_scale_inv has shape \(1, 1\), "
                                         r"expected \(2, 4\).*weight_block_size \[16, 16\]"):
        LLaDA2MoeModelLM.from_pretrained(str(path))
    qc = {"quant_method": "fp8", "weight_block_size": [128]}
    path = break_checkpoint(fp8_checkpoint[0], tmp_path / "bad2", quantization_config=qc)
    with pytest.raises(ValueError, match="quantization_config.weight_block_size"):
        LLaDA2MoeModelLM.from_pretrained(str(path))


def test_other_fp8_weights_are_dequantized_at_load(fp8_checkpoint, tmp_path):
    """A checkpoint that quantized attention and a dense MLP too (as published FP8 builds do)
    loads them dequantized to the model's dtype; the experts stay FP8."""
    names = ["model.layers.1.attention.query_key_value.weight",
             "model.layers.0.mlp.down_proj.weight"]
    kept = {}

    def quantize_more(state):
        for name in names:
            state[name], state[name + "_scale_inv"] = quantize_blocks(state[name], (16, 16))
            kept[name] = dequantize_blocks(state[name], state[name + "_scale_inv"], (16, 16))

    # Experts in 16 x 16 blocks too, so that every scale matches the config's block size.
    model = patch_model(small_model(), RoutingPolicy.token())
    for block in model.modules():
        if isinstance(block, DMoEBlock):
            block.quantize_((16, 16))
    model.config.quantization_config = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    model.save_pretrained(str(tmp_path / "base"))
    path = break_checkpoint(tmp_path / "base", tmp_path / "more", quantize_more)
    loaded = LLaDA2MoeModelLM.from_pretrained(str(path))
    state = loaded.state_dict()
    for name in names:
        assert state[name].dtype == torch.float32 and torch.equal(state[name], kept[name])
    assert loaded.model.layers[1].mlp.w_gate_up.dtype == FP8_DTYPE


@pytest.mark.gpu
@pytest.mark.parametrize("T", [32, DECODE_MAX_TOKENS + 64])
def test_fp8_bf16_kernels_match_reference_on_gpu(T):
    """bf16 activations, LLaDA2.0-mini's expert shape, 128 x 128 blocks, native and bytes, the
    FP8 default launches (the fp8 dot, W8A8; the byte-decoding GPUs take the fp16 dot), the
    fp16 dot with the activations prepared or scaled in the k loop, and the weights converted
    to bf16; the oracle quantizes the activations where the launch does. With and without
    the FP8 shared expert."""
    g = torch.Generator().manual_seed(0)
    E, H, I, k = 32, 2048, 512, 8
    w_gate_up, w_down, scales = make_fp8_layer(E, H, I, (128, 128), g)
    shared, shared_scales = make_fp8_shared(H, I, (128, 128), g)
    hidden = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.argsort(torch.rand(T, E, generator=g), 1)[:, :k].to(torch.int32)
    weights = torch.rand(T, k, generator=g)
    path = "decode" if T <= DECODE_MAX_TOKENS else "grouped"
    for with_shared in (False, True):
        scales = replace(scales, shared=shared_scales if with_shared else None)
        cuda = Fp8Scales(scales.gate_up.cuda(), scales.down.cuda(), scales.block,
                         scales.shared and tuple(t.cuda() for t in scales.shared))
        on_gpu = tuple(t.cuda() for t in shared) if with_shared else None
        for bits in (False, True):
            for change in (dict(), *DOTS, dict(dot="model")):
                with launch.override(fp8_bits=bits, **fp8_defaults(**change)):
                    y = moe_forward(hidden.cuda(), ids.cuda(), weights.cuda(), w_gate_up.cuda(),
                                    w_down.cuda(), backend="triton", shared=on_gpu, scales=cuda)
                    groups = launched_groups(hidden.cuda(), path, cuda)
                ref = fp8_oracle(hidden, ids, weights, w_gate_up, w_down, scales, groups,
                                 shared if with_shared else None)
                assert rel_err(y.cpu(), ref) <= 1e-2, (with_shared, bits, change)
