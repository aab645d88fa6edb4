"""Every launch choice of every kernel, in one place (issue 10; triton_kernels' opt_flags.py idea).

One function per kernel family turns shapes, dtype and device into a frozen dataclass:

    route_launch(num_experts, device, windows)   -> RouteLaunch     (kernels/routing.py, router.py)
    norm_launch(hidden)                          -> NormLaunch      (kernels/add_norm.py)
    moe_launch(tokens, top_k, num_experts, ...)  -> MoeLaunch       (kernels/moe_matmul.py)
    align_launch(slots, num_experts)             -> AlignLaunch     (the align's counting sort)
    attention_launch(batch, n_keys)              -> AttentionLaunch (kernels/block_attention.py)
    prep_launch(head_dim)                        -> PrepLaunch      (kernels/attention_prep.py)

and `override(...)` replaces any of them inside a `with` block (tests and benches force a
launch shape or a path this way, never through private functions):

    with launch.override(route=RouteLaunch(route_rows=4), moe_path="grouped"):
        ...

Overrides nest (the innermost wins per key, outer keys stay) and are thread-local. Every
number below is a measured default; its comment says where it was measured. Changing one
changes speed only, never results (the kernels' numerics do not depend on tile shapes, except
where a comment says so).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from typing import Optional

import torch

import triton


FP8_DOTS = ("fp16", "fp8", "model")  # DecodeConfig.dot's choices
MAX_WARPS = 32  # 1024 threads, a CUDA program's most


def _check_shape(launch, powers_of_two=(), at_least=None) -> None:
    """Every field a positive int (bool where the field is one); those named in `powers_of_two`
    powers of two (Triton's tl.arange needs them); `at_least` {field: minimum} (tl.dot needs
    16 rows); a field whose name holds "warps" at most MAX_WARPS (a CUDA program has at most
    1024 threads). A ValueError naming the class and the field, raised when the shape is
    built, not inside a kernel (or a compiler)."""
    name = type(launch).__name__
    for f in dataclasses.fields(launch):
        value = getattr(launch, f.name)
        if f.name == "dot":
            if value not in FP8_DOTS:
                raise ValueError(f"{name}.dot must be one of {FP8_DOTS}, got {value!r}")
            continue
        if f.type in (bool, "bool"):  # a truthy 0 / "no" would pick a kernel variant silently
            if not isinstance(value, bool):
                raise ValueError(f"{name}.{f.name} must be a bool, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}.{f.name} must be an int >= 1, got {value!r}")
        if f.name in powers_of_two and value & (value - 1):
            raise ValueError(f"{name}.{f.name} must be a power of two, got {value}")
        if "warps" in f.name and value > MAX_WARPS:
            raise ValueError(f"{name}.{f.name} must be <= {MAX_WARPS}, got {value}")
        if at_least and value < at_least.get(f.name, 1):
            raise ValueError(f"{name}.{f.name} must be >= {at_least[f.name]}, got {value}")


# ---------------------------------------------------------------------------------------------
# routing (kernels/routing.py)

@dataclass(frozen=True)
class RouteLaunch:
    """Launch shapes of the routing kernels (bench/bench_routing.py --sweep times variants).

    Defaults: the fastest shapes of `bench_routing.py --sweep` (E=256, 1 block): route_* on an
    H100; the vote and coreset shapes on the H200 (2026-11-30, fifth session: dMoE votes +
    coreset + route 10.8 us, against 15.0 with the votes in the coreset program).
    """

    route_rows: int = 1        # route_kernel: rows per program
    route_warps: int = 1       # route_kernel: warps per program
    vote_rows: int = 32        # block_votes/coreset_kernel: rows per chunk of the votes
    coreset_warps: int = 4     # block_coreset_kernel: warps per program
    # block_votes_kernel and block_coreset_kernel: experts per slice of a row in the vote
    # tile [vote_rows, E / vote_cols, vote_cols] (kernels/routing.py _window_scores). Triton
    # 3.6 (sm_90) keeps each row inside one warp when vote_rows * vote_cols >= 128 * warps
    # (fp32 loads of 4 per thread). Timed (H200, bench_routing --sweep, 1 block, graphed):
    # 32 rows x 32 columns 15.0 us, 32 x 64 17.1, 16 x 64 18.6 (dMoE coreset + route).
    vote_cols: int = 32
    # block_votes_kernel: programs per window sharing its rows' votes (1: block_coreset_kernel
    # votes alone), and their warps. A row's top-k votes are a chain of reductions whose
    # instructions kept one SM busy: the vote took 6 of the coreset kernel's 12.1 us on one
    # 32-row window (H200, 2026-11-30, fifth session; 1.5 for the sort, 1.0 an empty launch).
    # Timed (bench_routing --sweep, 1 window, graphed, votes + coreset + route): a row per
    # program on one warp 10.8 us, 2 rows 11.0, 4 rows 12.8; one program 15.0 (fourth session).
    vote_split: int = 32
    vote_warps: int = 1
    # expert_choice_kernel: warps per program (one window's rows x experts tile); not yet
    # measured: 4 holds a 32 x 256 tile of int64 keys in registers (64 per thread).
    expert_choice_warps: int = 4

    def __post_init__(self):
        _check_shape(self, powers_of_two=("route_rows", "vote_rows", "route_warps",
                                          "coreset_warps", "expert_choice_warps", "vote_cols",
                                          "vote_warps"))

    def vote_cols_for(self, num_experts: int) -> int:
        """vote_cols for E = num_experts (at most E padded to a power of two)."""
        return min(self.vote_cols, triton.next_power_of_2(num_experts))


DEFAULT_ROUTE = RouteLaunch()


def route_launch(num_experts: int, device: torch.device) -> RouteLaunch:
    """The routing kernels' launch for E = num_experts experts on `device` (measured at E =
    256, LLaDA2.0-mini's count)."""
    forced = _current("route")
    if forced is not None:
        return forced
    if device.type != "cuda":  # the interpreter runs programs one by one: one per window
        return dataclasses.replace(DEFAULT_ROUTE, route_rows=32, vote_split=1)
    return DEFAULT_ROUTE


# ---------------------------------------------------------------------------------------------
# routed experts (kernels/moe_matmul.py)

@dataclass(frozen=True)
class DecodeConfig:
    """The decode path (T <= DECODE_MAX_TOKENS): two launches, used experts found in-kernel.

    gate/up: persistent programs over (used expert, block_i intermediate columns) items;
    down + combine: one program per (block_h hidden columns, share of the (used expert, I
    step) pairs; FP8 weights: of the used experts).
    """

    block_i: int = 64          # defaults: bench_moe.py --sweep on an H100, 15 and 70 experts
    k_tile_gate_up: int = 128  # reduction step along H (elements)
    warps_gate_up: int = 4
    stages_gate_up: int = 4
    # gate/up grid = SMs x this (at most what fits on an SM: tests/test_fit.py). 1 since the
    # fifteenth session: a program of the default takes 163840 bytes of shared memory at 32
    # tokens, so a second one per SM only waited for the first. Timed (H200, the gate/up with
    # the shared expert, 32 tokens): 21.5 / 80.7 us at 15 / 70 experts against 22.4 / 81.8 for
    # 2 (bench/results/h200-2026-12-01-s15/probe_decode_configs.py); bench_moe's sweep the
    # same day: 21.4 / 81.3 against 21.8 / 82.5. k steps of 64 (two programs fit) took 24.0 /
    # 83.6 there.
    programs_per_sm: int = 1
    # Past one full wave of items (more than SMs x programs_per_sm), the last, partial wave's
    # items are cut into pieces of this many columns when the pieces fit in one more wave
    # (block_i: never cut; ignored with FP8 weights). Whole, at 16 coreset experts and the
    # shared one (136 items on the H200's 132 SMs) the gate/up took 31.0 us against 22.1 at 15
    # (128 items): the 4 SMs with a second item set the launch's time. Pieces of 16: 28.6 at
    # 16, 28.8 at 17 (31.1 whole); of 32: no gain. Cut where the pieces make a second wave
    # they were slower: 34.4 against 30.9 at 20 experts, 41.3 against 34.6 at 24
    # (bench/results/h200-2026-12-01-s15/probe_waves*.log). A lone item still takes about 9
    # us on its SM (512 KB), so cutting along H (with a sum across programs) is the next step.
    tail_cols: int = 16
    # The pieces' reduction step along H. A piece of 16 columns with k steps of 128 keeps a
    # quarter of a whole item's weight bytes in flight per stage; 256 keeps half, in no more
    # shared memory than the whole items' loop (which the pieces' loop reuses: gate/up 163840
    # bytes at 32 tokens, 196608 at 33-64, compiled offline for sm_90; 512 would take 196608
    # at 32 and 294912, too many, at 64). 256 timed the same as 128 (sixteenth session,
    # probe_waves.py: the gate/up 27.7 / 28.3 / 28.2 us at 16 / 17 / 18 experts against 28.1 /
    # 28.2 / 28.2; bench/results/h200-2026-12-01-s16/probe_waves.log), so 128 stays.
    tail_k_tile: int = 128
    # block_h 64 with 8 warps, since the fourteenth session put the down's weight tile on the
    # MMA's M side (wgmma from 64 rows there): bench_moe's sweep on the H200, 32 tokens, timed
    # the down with the shared expert at 18.0 / 51.0 us at 15 / 70 experts against 19.7 / 57.4
    # for the old tile (block_h 32, 4 warps, tokens on M). The transposed tile alone gained
    # nothing at 4 warps (19.6 / 60.1); the old tile at 8 warps was not timed
    # (bench/results/h200-2026-12-01-s14/).
    # Before, 32 was kept because the layer was slower at 64 (fifth session: 40.3 / 143.0 us
    # against 38.1 / 135.4).
    block_h: int = 64
    k_tile_down: int = 256     # reduction step along I (elements)
    warps_down: int = 8
    # 3 stages since the fifteenth session: as fast as 4 at 32 tokens (the down with the shared
    # expert 18.4 / 52.4 us at 15 / 70 experts against 18.9 / 52.3), and from 33 tokens, where
    # the tokens pad to 64 and the act tile doubles, 4 would not fit in shared memory (262400
    # bytes against the 232448 a program may take on sm_90; 3 take 197120, tests/test_fit.py).
    # So one config serves 1-64 tokens. The fourteenth session's config for 33-64 tokens, k
    # steps of 128 with 4 stages, took 53.5 / 167.4 us for this down at 64 tokens (29 / 115
    # experts) against 38.0 / 110.2 (probe_decode_configs.py, as above).
    # 5 since the sixteenth session, when the down began to read each step's expert from the
    # gate/up's list: that load feeds the weight tile's address, and Triton's pipeliner gives it
    # a stage of its own, so 5 stages keep the 3 weight tiles (and act tiles) of the 3 before
    # (147592 bytes at 32 tokens, 196872 at 33-64, compiled offline for sm_90, Triton 3.6;
    # 147464 at 32 tokens since the twentieth session's act rows by expert). At 3 stages
    # the list was slower than the search it replaced (2 tiles: 23.5 against 18.1 us at 15
    # experts); at 5, 17.7 against 18.1, 50.3 against 51.9 at 70 (the down alone with the
    # shared expert, 32 tokens; bench/results/h200-2026-12-01-s16/probe_down_list.log).
    stages_down: int = 5
    # Down programs per block_h columns, each walking a contiguous share of the (used expert,
    # I step) pairs (FP8 weights: of the used experts).
    # 1: cdiv(H, block_h) programs (32 at H = 2048 and block_h 64), writing out directly.
    # n > 1: n times the programs (n times the weight bytes in flight, 1/n of the steps each)
    # for an fp32 partial per share, summed in share order by the last program to finish.
    down_splits: int = 4
    # FP8 weights with bf16 activations only (ignored otherwise), the dot's operand type
    # (kernels/moe_fp8.py): "fp16", weights converted exactly, activations scaled exactly into
    # fp16's range; "fp8", activations quantized to e4m3 per token and group (FP8 tensor cores,
    # no conversion of the weights: W8A8, as DeepSeek-V3's 1 x 128 groups); "model", weights
    # converted to bf16. FP8 weights' defaults (DEFAULT_*_FP8) take "fp8"; a config built
    # without it (e.g. one forced through override) takes "fp16".
    dot: str = "fp16"
    # With the fp16 dot, or the fp8 dot whose gate/up k step is the scale block's width (its
    # quantization groups): the activations scaled and converted once, by one more launch
    # (scaled_rows_kernel), instead of in every gate/up program's every k step. The fp8 dot
    # with a narrower k step always takes the launch (fit_scale_blocks); both ways quantize
    # the same groups the same way, to the same e4m3 values.
    x_prepass: bool = True
    # FP8 weights: the gate/up's weight tiles by the tensor memory accelerator (a tensor
    # descriptor per work item, one copy instruction a tile) instead of every thread's copies,
    # where the launch can (takes_tma: sm_90+, aligned rows; the same values either way).
    # On for DEFAULT_DECODE_FP8 since the 24th session (H200, 32 tokens, with the shared
    # expert): the gate/up 18.0-18.6 us against 19.6-19.8 at 8 experts, 19.6-19.9 against
    # 20.2-20.3 at 15, within 0.3 us at 30 and 70 (bench/probe_decode_shapes.py --fp8); the
    # 20-layer step with FP8 experts, dMoE p=0.6, 1.688-1.692 ms against 1.700-1.707 over 6 / 7
    # alternating runs, token routing 2.486-2.493 against 2.478-2.489 (bench/ab_e2e.sh, FP8=1;
    # bench/results/h200-2026-12-02-s24).
    tma: bool = False

    def __post_init__(self):
        # block_i and block_h are the weight tiles' rows, the M side of the kernels' tl.dot
        # since the fourteenth session: 16 at least. (The k steps are not held to it here:
        # fit_scale_blocks shrinks them to divide an FP8 checkpoint's scale blocks, all but
        # the fp8 dot's down step.)
        _check_shape(self, powers_of_two=("block_i", "k_tile_gate_up", "warps_gate_up",
                                          "tail_cols", "tail_k_tile", "block_h",
                                          "k_tile_down", "warps_down"),
                     at_least=dict(block_i=16, tail_cols=16, tail_k_tile=16, block_h=16))
        if self.tail_cols > self.block_i:
            raise ValueError(f"DecodeConfig.tail_cols must be <= block_i ({self.block_i}), got "
                             f"{self.tail_cols}")


@dataclass(frozen=True)
class GroupedConfig:
    """The grouped path (more tokens): align, gate/up, down (per-slot partials), combine.

    Work items are (used expert, slice of block_i / block_h columns, tile of block_m of its
    slots), the tiles of one slice consecutive, so neighbouring programs run them side by side
    and the slice is read from HBM once (kernels/moe_matmul.py, _work_item).
    """

    # Defaults: `bench_moe.py --sweep-grouped --cases "x32 tok"` on the H200 (2026-11-30,
    # eighth session), after the align became a counting sort and items became one tile each:
    # 116 / 307 / 433 / 711 us at 4x32 exact 15 / 16x32 exact 15 / 16x32 uniform / 64x32 exact
    # 15 (65 / 77 / 89 / 52% of copy bandwidth; before those two changes 132 / 501 / 541 / 1276).
    # The kernels put the weight tile on the MMA's M side (W @ x^T, wgmma on Hopper): 320
    # against 348 us at 16x32 exact 15 for x @ W^T with the rest equal.
    block_m: int = 32          # tokens of one expert per tile (tl.dot needs >= 16)
    block_i: int = 64          # gate/up: intermediate columns per work item
    k_tile_gate_up: int = 64   # gate/up: reduction step along H (elements)
    warps_gate_up: int = 4
    stages_gate_up: int = 4
    block_h: int = 128         # down: hidden columns per work item
    k_tile_down: int = 64      # down: reduction step along I (elements)
    warps_down: int = 8
    stages_down: int = 4
    programs_per_sm: int = 2   # persistent grids = SMs x this (at most what fits on an SM)
    dot: str = "fp16"          # as DecodeConfig.dot
    x_prepass: bool = True     # as DecodeConfig.x_prepass

    def __post_init__(self):
        _check_shape(self, powers_of_two=("block_m", "block_i", "k_tile_gate_up",
                                          "warps_gate_up", "block_h", "k_tile_down",
                                          "warps_down"),
                     at_least=dict(block_m=16, block_i=16, block_h=16, k_tile_gate_up=16,
                                   k_tile_down=16))


ALIGN_MAX_CHUNK = 512


@dataclass(frozen=True)
class AlignLaunch:
    """The grouped path's align: a counting sort of the slots by expert in three launches
    (kernels/moe_matmul.py). It replaced one program that sorted every slot with tl.sort, which
    took 99 us of a 16 x 32-token layer call on the H200 (4096 slots), and torch ops above
    8192 slots (about 110 us at 16384)."""

    chunk: int = 128  # slots per program of the count and scatter steps
    rows: int = 32    # chunk histograms per loop step of the lists step
    warps: int = 4

    def __post_init__(self):
        _check_shape(self, powers_of_two=("chunk", "rows", "warps"))
        if self.chunk > ALIGN_MAX_CHUNK:  # the scatter compares its chunk's slots pairwise
            raise ValueError(f"AlignLaunch.chunk must be <= {ALIGN_MAX_CHUNK}, got {self.chunk}")


@dataclass(frozen=True)
class CombineLaunch:
    """moe_combine_kernel: one program per block_t tokens x block_h hidden columns."""

    block_t: int = 8
    block_h: int = 256
    warps: int = 4
    # Slots per token unrolled in one step of the kernel's loop; a token with at most this many
    # slots is unrolled whole (its k partial loads in flight together). Expert choice's [T, E]
    # layout has 256 slots: unrolled whole, Triton 3.6 took minutes to compile it on the H200
    # (bench_moe --cases EC, 2026-11-30). The sum's order (slot order) does not depend on it.
    unroll: int = 16

    def __post_init__(self):
        _check_shape(self, powers_of_two=("block_t", "block_h", "warps"))


@dataclass(frozen=True)
class MoeLaunch:
    """Everything moe_forward's Triton path launches for one call."""

    path: str                  # "decode" (two launches) or "grouped" (six)
    decode: DecodeConfig
    grouped: GroupedConfig
    combine: CombineLaunch


DECODE_MAX_TOKENS = 64  # the decode path computes every token row for each used expert
MOE_PATHS = ("decode", "grouped")
DEFAULT_DECODE = DecodeConfig()
DEFAULT_GROUPED = GroupedConfig()
# From GROUPED_WIDE_FROM tokens (64 blocks of 32) an expert gets about 66 slots: tiles of 64 slots
# measured 631 against 772 us at 64x32 exact 15 (H200, eighth session; at 16x32 the two were even:
# 315 / 320 us exact 15, 473 / 451 uniform), so the grouped path takes DEFAULT_GROUPED_WIDE there.
GROUPED_WIDE_FROM = 2048
DEFAULT_GROUPED_WIDE = dataclasses.replace(DEFAULT_GROUPED, block_m=64)
DEFAULT_COMBINE = CombineLaunch()
DEFAULT_ALIGN = AlignLaunch()

# FP8 e4m3 weights (issue 16): half the bytes of a bf16 tile per element and a transposed
# product (kernels/moe_fp8.py), so their own shapes: the best of `bench_moe.py --fp8 --sweep`
# on the H200 (2026-11-30, sixth session). The fp8 dot (W8A8: activations quantized per token
# and 128 columns, no conversion of the weights) is the default: 36.2 / 100.1 us at 15 / 70
# unique experts, 32 tokens (31 / 52% of copy bandwidth counting FP8 bytes; the fp16 dot took
# 51.9 / 140.1 in the same run) and 392 us at 16 x 32 tokens (30%; fp16 dot 542). The down
# still reads at a fraction of the bandwidth (a per-kernel profile: 17 us at 15 experts, whose
# bytes need 3.7), partly because each k step waits on small loads (block scale, act scales,
# routing weights) that the pipeliner does not run ahead (docs/moe.md). The decode down's 3
# stages: 34.7 / 96.5 us against 6 stages' 37.2 / 102.6 (H200, 2026-12-01, twelfth session;
# 35.4 / 97.6 against 37.1 / 101.8 in the eleventh). Gate/up items of 64 or 32 columns (act
# groups finer than the scale block) were slower there: 40.0 / 104.6 and 45.3 / 143.5.
# The down's k steps of 256 on 4 stages since the 23rd session (a step of two scale blocks, one
# dot per act group: fit_scale_blocks): bench_moe's sweep 32.9 / 90.2 us against 33.4 / 93.1
# for 128 on 3; the 20-layer step with FP8 experts, two alternating rounds, token routing
# 2.480 / 2.481 ms against 2.557 / 2.550, dMoE p=0.6 1.701 / 1.703 against 1.700 / 1.700
# (bench/results/h200-2026-12-02-s23/). Steps of 512 (the whole I) were no faster: 34.5 /
# 94.8 on 2 stages, 36.1 / 99.2 on 3.
DEFAULT_DECODE_FP8 = DecodeConfig(block_i=128, k_tile_gate_up=128, warps_gate_up=4,
                                  stages_gate_up=4, programs_per_sm=2, block_h=64,
                                  k_tile_down=256, warps_down=4, stages_down=4, down_splits=8,
                                  dot="fp8", tma=True)
DEFAULT_GROUPED_FP8 = GroupedConfig(block_m=64, block_i=128, k_tile_gate_up=128, warps_gate_up=8,
                                    stages_gate_up=3, block_h=64, k_tile_down=128, warps_down=4,
                                    stages_down=6, programs_per_sm=2, dot="fp8")


def moe_launch(tokens: int, top_k: int, num_experts: int, dtype: torch.dtype,
               device: torch.device, fp8: bool = False) -> MoeLaunch:
    """moe_forward's launches for T = tokens rows of top_k slots over num_experts experts:
    the decode path for T <= DECODE_MAX_TOKENS (DEFAULT_DECODE), else the grouped one (wider
    tiles from GROUPED_WIDE_FROM tokens); with no routed slot (top_k 0: a shared expert alone)
    always the grouped one, whose slot lists the shared expert joins (the decode kernels need a
    routed slot). fp8: the experts' weights are FP8 (their own default shapes; an override
    applies to both kinds). ValueError: the decode path forced (override) for more than
    DECODE_MAX_TOKENS tokens."""
    if top_k == 0:
        path = "grouped"
    else:
        path = _current("moe_path") or ("decode" if tokens <= DECODE_MAX_TOKENS else "grouped")
    if path == "decode" and tokens > DECODE_MAX_TOKENS:  # only a forced path gets here
        raise ValueError(f"moe_path 'decode' takes at most DECODE_MAX_TOKENS = "
                         f"{DECODE_MAX_TOKENS} tokens (its kernels hold every token row in one "
                         f"tile of shared memory), got {tokens}")
    if fp8:
        decode, grouped = DEFAULT_DECODE_FP8, DEFAULT_GROUPED_FP8
    else:
        decode = DEFAULT_DECODE
        grouped = DEFAULT_GROUPED if tokens < GROUPED_WIDE_FROM else DEFAULT_GROUPED_WIDE
    return MoeLaunch(path=path, decode=_current("decode") or decode,
                     grouped=_current("grouped") or grouped,
                     combine=_current("combine") or DEFAULT_COMBINE)


def align_launch(slots: int, num_experts: int) -> AlignLaunch:
    """The align's launch shape (one for every size: its grids grow with the slots; the
    arguments keep the shape of the other launch choices, for a policy that needs them)."""
    forced = _current("align")
    return forced if forced is not None else DEFAULT_ALIGN


# FP8 experts (issue 16): how the kernels read e4m3 weights, and their k steps.
FP8_NATIVE_CAPABILITY = (8, 9)  # Triton's float8e4nv (e4m3) type exists from sm_89 on


def fp8_bits(device: torch.device) -> bool:
    """True: read FP8 expert weights as uint8 bytes and decode them with integer ops (exact),
    because Triton has no e4m3 type below sm_89 (a float8e4nv pointer does not compile there);
    False: native e4m3 loads and conversions (sm_89+: Ada, Hopper; and Triton's interpreter,
    which loads torch.float8_e4m3fn tensors). FP8 experts run on any GPU; the byte reads take
    the fp16 dot (exact activations), so where the native reads run the fp8 dot (W8A8, the
    default) the values differ by its activation rounding (moe.scaled_dot). The choice is
    forced with override(fp8_bits=...)."""
    forced = _current("fp8_bits")
    if forced is not None:
        return forced
    return device.type == "cuda" and not cuda_at_least(device, FP8_NATIVE_CAPABILITY)


def cuda_at_least(device: torch.device, capability: tuple) -> bool:
    """Whether `device` is a CUDA device of compute capability `capability` (major, minor) or
    more (False for the CPU: Triton's interpreter)."""
    return device.type == "cuda" and tuple(torch.cuda.get_device_capability(device)) >= capability


TMA_CAPABILITY = (9, 0)  # the tensor memory accelerator: Hopper and later


def takes_tma(weights, config: "DecodeConfig", device: torch.device) -> bool:
    """Whether the FP8 decode gate/up reads `weights` (its routed [E, 2I, H] and shared [2I, H]
    e4m3 weights) through TMA descriptors (config.tma): on a CUDA device of compute capability
    9.0 or more (or in Triton's interpreter, on the CPU), where the descriptor's rules hold
    (CUDA's cuTensorMapEncodeTiled): unit stride along H, the start and every other stride
    16-byte aligned, a tile's row (config.k_tile_gate_up, fitted) of 16 bytes or more and each
    side of the tile at most 256 elements. Else the threads' copies read them, to the same
    values."""
    if not config.tma:
        return False
    if device.type == "cuda" and not cuda_at_least(device, TMA_CAPABILITY):
        return False
    if not (config.block_i <= 256 and 16 <= config.k_tile_gate_up <= 256):
        return False
    return all(w.stride(-1) == 1 and w.element_size() == 1 and w.data_ptr() % 16 == 0
               and all(stride % 16 == 0 for stride in w.stride()[:-1]) for w in weights)


PDL_CAPABILITY = (9, 0)  # programmatic dependent launch: Hopper and later


def pdl(device: torch.device) -> dict:
    """The launch arguments of programmatic dependent launch for a kernel that calls
    kernels/pdl.py's wait_previous_kernel first: {"PDL": on, "launch_pdl": on}, on for CUDA
    devices of compute capability 9.0 or more (about 0.5 us saved per kernel boundary on the
    H200, graphed), off elsewhere (the interpreter; older GPUs have no such launch). Forced
    with override(pdl=...)."""
    able = cuda_at_least(device, PDL_CAPABILITY)
    on = _current("pdl")
    if on is None:
        on = able
    elif on and not able:
        raise ValueError(f"override(pdl=True) needs a CUDA device of compute capability "
                         f"{PDL_CAPABILITY[0]}.{PDL_CAPABILITY[1]} or more, got {device}")
    return dict(PDL=on, launch_pdl=on)


FP8_DOT_MIN_K = 32  # an e4m3 wgmma takes k in steps of 32
# The widest scale block the fp8 dot takes: published checkpoints use 128, the only width its
# launches were tuned and timed at (wider blocks take the fp16 dot: fit_scale_blocks).
FP8_DOT_MAX_GROUP = 128


def fit_scale_blocks(config, block_k: int):
    """`config` (DecodeConfig / GroupedConfig) fitted to FP8 weights' scale blocks of block_k
    columns (kernels/moe_fp8.py). A correctness rule, not a speed choice: it applies to forced
    configs too.

    - Each k step shrinks to a divisor of block_k (the largest power of two <= the step that
      divides it), so a k step lies in one scale block; except the down's with the fp8 dot,
      which is kept: its dots are the act groups (below), each in one scale block
      (kernels/moe_fp8.fp8_down_step), so a step of several scale blocks keeps that many
      tiles in flight in one pipeline stage (the down launches cut it to the block where the
      launch runs another dot after all: moe._down_step).
    - The fp8 dot quantizes x per token in groups of block_k columns (DeepSeek-V3's 1 x 128)
      and the act rows in groups of the gate/up's block_i columns (each work item writes its
      own), so block_i becomes min(block_i, block_k), at least FP8_DOT_MIN_K (a down dot is
      one act group wide): powers of two both, a divisor of block_k. A group narrower than
      block_k is finer, never coarser, than the scale block. Where block_k is no power of two
      in [FP8_DOT_MIN_K, FP8_DOT_MAX_GROUP], or a fitted k step is under FP8_DOT_MIN_K (a
      forced config's), the fp8 dot cannot run and the config takes the fp16 dot instead
      (exact activations: more precise, not less).
    - The fp8 dot quantizes x in the gate/up's k loop (x_prepass off) only where a k step is
      one group (k_tile_gate_up == block_k); else x_prepass is turned on.
    """
    def fit(step: int) -> int:
        while block_k % step:
            step //= 2
        return step

    changes = dict(k_tile_gate_up=fit(config.k_tile_gate_up), k_tile_down=fit(config.k_tile_down))
    if config.dot == "fp8":
        group_ok = FP8_DOT_MIN_K <= block_k <= FP8_DOT_MAX_GROUP and not block_k & (block_k - 1)
        if group_ok and min(changes.values()) >= FP8_DOT_MIN_K:
            changes["block_i"] = max(FP8_DOT_MIN_K, min(config.block_i, block_k))
            changes["k_tile_down"] = config.k_tile_down  # a power of two >= the fitted one
            if isinstance(config, DecodeConfig):  # tail_cols (ignored with FP8) <= block_i
                changes["tail_cols"] = min(config.tail_cols, changes["block_i"])
            changes["x_prepass"] = config.x_prepass or changes["k_tile_gate_up"] != block_k
        else:
            changes["dot"] = "fp16"
    return dataclasses.replace(config, **changes)


def pipeline_stages(stages: int, dtype: torch.dtype) -> int:
    """The decode and grouped configs are tuned for 2-byte weights; fp32 tiles are twice as
    large, and the tuned pipeline depth would not fit an H100's or H200's shared memory (228 KB
    per SM: the grouped gate/up's 4 stages of fp32 tiles asked for 240 KB on the H200)."""
    return stages if dtype != torch.float32 else max(2, stages // 2)


# The float dtypes the kernels read as they are (their loads and tl.dot): fp32, and the two half
# types of the tensor cores. Inputs of any other dtype get a clear error, or are cast first.
KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: fp32 inputs get exact fp32 products; half types use the tensor
    cores' native precision (this one does change numerics: it is fixed, never overridden)."""
    return "ieee" if dtype == torch.float32 else "tf32"


_SM_COUNT = {}


def persistent_grid(device: torch.device, programs_per_sm: int, max_items: int) -> tuple:
    """(programs,) for a persistent kernel: SMs x programs_per_sm, at most max_items, at least 1.
    Off CUDA (the interpreter runs programs one after another) 4: a few exercise the loop."""
    programs = 4 if device.type != "cuda" else sm_count(device) * programs_per_sm
    return (max(1, min(programs, max_items)),)


def sm_count(device: torch.device) -> int:
    """The CUDA device's streaming multiprocessors (cached per device index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# ---------------------------------------------------------------------------------------------
# attention (kernels/block_attention.py, kernels/attention_prep.py)

@dataclass(frozen=True)
class AttentionLaunch:
    """Launch shape of block_attention_kernel (bench/bench_attention.py --sweep times variants)."""

    block_m: int = 16    # stacked query rows per program
    block_n: int = 128   # keys per step
    warps: int = 4
    stages: int = 3
    # Programs per row tile along the keys (flash-decoding): > 1 writes partial outputs that
    # attention_combine_kernel merges (one more launch), so a long prefix is walked by more
    # programs than 4 KV heads x 8 row tiles.
    key_splits: int = 1

    def __post_init__(self):
        _check_shape(self, powers_of_two=("block_m", "block_n", "warps"),
                     at_least=dict(block_m=16, block_n=16))


# The fastest shapes of `bench_attention.py --sweep` on an H100 (prefix 512): with few
# sequences, small row tiles give enough programs (4 KV heads x 8 per sequence), each walking
# keys in long steps; with many, larger row tiles read each K/V tile for more rows.
FEW_SEQUENCES = AttentionLaunch(block_m=16, block_n=128, warps=4, stages=3)   # 8.7 us at 1
MANY_SEQUENCES = AttentionLaunch(block_m=64, block_n=64, warps=4, stages=3)   # 11.6 us at 16
MANY_FROM = 8  # sequences


# Split the keys from SPLIT_FROM_KEYS keys on, into KEY_SPLITS // batch splits (few sequences
# only: many fill the GPU already). Timed on the H200 (bench_attention --sweep, 2026-11-30,
# fifth session; 1 sequence, combine launch included): 1 / 2 / 4 / 8 splits took 8.8 / 8.6 /
# 7.7 / 9.4 us at prefix 512 and 23.6 / 16.3 / 11.6 / 14.7 us at prefix 2048; at 16
# sequences one split was fastest (11.9 us at 512, 36.0 at 2048).
SPLIT_FROM_KEYS = 512
KEY_SPLITS = 4


def attention_launch(batch: int, n_keys: int = 0) -> AttentionLaunch:
    """block_attention's tile shape for `batch` sequences attending to n_keys keys (ints >= 0,
    else a ValueError naming the argument; no sequence: no split)."""
    for name, value in (("batch", batch), ("n_keys", n_keys)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    forced = _current("attention")
    if forced is not None:
        return forced
    if batch >= MANY_FROM:
        return MANY_SEQUENCES
    if n_keys >= SPLIT_FROM_KEYS and 0 < batch < KEY_SPLITS:
        return dataclasses.replace(FEW_SEQUENCES, key_splits=KEY_SPLITS // batch)
    return FEW_SEQUENCES


@dataclass(frozen=True)
class PrepLaunch:
    """attention_prep_kernel: one program per (token, head), BLOCK_D = head dims padded."""

    block_d: int
    warps: int


def prep_launch(head_dim: int) -> PrepLaunch:
    """One warp holds a head of up to 128 dims (LLaDA2.0-mini's), two above."""
    forced = _current("prep")
    if forced is not None:
        return forced
    return PrepLaunch(block_d=triton.next_power_of_2(head_dim), warps=1 if head_dim <= 128 else 2)


@dataclass(frozen=True)
class NormLaunch:
    """add_rms_norm_kernel (kernels/add_norm.py): one program per row, block_h = H padded."""

    block_h: int
    warps: int


@dataclass(frozen=True)
class SkinnyLaunch:
    """skinny_gemm_kernel (kernels/skinny_gemm.py): block_n output columns a program (tl.dot's
    left operand: at least 16), k steps of block_k, a pipeline of `stages`, on `warps` warps."""

    block_n: int
    block_k: int
    stages: int
    warps: int

    def __post_init__(self):
        _check_shape(self, powers_of_two=("block_n", "block_k", "warps"),
                     at_least={"block_n": 16, "block_k": 16})


# skinny_gemm's rows (tokens); more rows take cuBLAS. On the H200 (bench/probe_skinny.py, the
# router's [256, 2048] bf16 weights from HBM, 21st session) skinny_gemm took 4.5 us at 32 rows
# against cuBLAS's 5.8, but 6.2 at 64 against 5.8; sizes between were not timed.
SKINNY_MAX_ROWS = 32
# Hopper (compute capability 9.x) only: timed there, and its shared memory holds the widest
# default shape (64 columns at 32 rows: 196608 bytes of the 232448 a program may take; offline
# compile, Triton 3.6, tests/test_fit.py). Other GPUs take cuBLAS: an A100 has 166912 bytes, an
# sm_120 (RTX 50xx) about 99 KB, and a Blackwell data-centre part was not timed.
SKINNY_ARCH = 9  # compute capability major
# k steps of 256 in 4 stages: the 20-layer forward's router GEMM with it was 1.0% (token
# routing) and 2.7% (dMoE) faster than with cuBLAS (bench/ab_e2e.sh, H200, 21st session).
# Other shapes probed were slower (bench/results/h200-2026-12-02-s21), and so was a split over K
# (2-16 ranges summed by the last arrival: 9.4 against 7.0 us for QKV at 16 tokens). The
# attention's projections stay on cuBLAS: through skinny_gemm the dense projection alone was
# faster (6.0 against 6.6 us) but the forward slower, 1.810 against 1.795 ms with dMoE
# (bench/results/h200-2026-12-02-s22).
DEFAULT_SKINNY = SkinnyLaunch(block_n=16, block_k=256, stages=4, warps=4)


def takes_skinny(rows: int, device: torch.device) -> bool:
    """Whether a GEMM of `rows` rows on `device` runs skinny_gemm: 1..SKINNY_MAX_ROWS rows on a
    CUDA device of compute capability SKINNY_ARCH.x (caller: router.gate_logits)."""
    return (0 < rows <= SKINNY_MAX_ROWS and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] == SKINNY_ARCH)


def skinny_block_n(columns: int, sms: int) -> int:
    """The fewest output columns a program (a power of two, 16 to 64) that cover `columns` in
    one wave of `sms` programs: the router's 256 -> 16 programs of 16 on 132 SMs."""
    block_n = triton.next_power_of_2(triton.cdiv(columns, sms))
    return min(64, max(DEFAULT_SKINNY.block_n, block_n))


def skinny_launch(columns: int, device: torch.device) -> SkinnyLaunch:
    """The skinny GEMM's shape for [T, K] x [columns, K]^T: DEFAULT_SKINNY with
    skinny_block_n's columns on CUDA (DEFAULT_SKINNY off it), or override(skinny=...)'s."""
    forced = _current("skinny")
    if forced is not None:
        return forced
    if device.type != "cuda":
        return DEFAULT_SKINNY
    return dataclasses.replace(DEFAULT_SKINNY,
                               block_n=skinny_block_n(columns, sm_count(device)))


def norm_launch(hidden: int) -> NormLaunch:
    """A row of up to 2048 values (LLaDA2.0-mini's) on 4 warps (16 per thread), 8 above
    (not yet measured: the kernel is a few bytes a row, its time is its launch)."""
    forced = _current("norm")
    if forced is not None:
        return forced
    return NormLaunch(block_h=triton.next_power_of_2(hidden), warps=4 if hidden <= 2048 else 8)


@dataclass(frozen=True)
class PickLaunch:
    """greedy_pick (kernels/greedy_pick.py): each row's vocabulary in at most `slices` programs
    of whole steps (fewer where fewer steps of block_v logits cover it), each on `warps`
    warps; the merge takes merge_rows rows a program on merge_warps warps."""

    block_v: int
    warps: int
    slices: int = 1
    merge_rows: int = 16
    merge_warps: int = 4

    def __post_init__(self):
        _check_shape(self, powers_of_two=("block_v", "warps", "merge_rows", "merge_warps"))

    def slice_v(self, vocab: int) -> int:
        """Logits per slice: whole steps of block_v, as many as `slices` programs need."""
        steps = triton.cdiv(vocab, self.block_v)
        return triton.cdiv(steps, self.slices) * self.block_v


def pick_launch(rows: int, vocab: int, device: torch.device) -> PickLaunch:
    """4096 logits a step on 8 warps (16 a thread), and as many slices per row as give about
    8 programs per SM (LLaDA2's 157184 logits, 39 steps, on 132 SMs: one sequence's 32 rows in
    20 slices of 2 steps, 16 sequences in 3, 64 in 1). Off CUDA, 4 programs (the interpreter
    runs them one after another). Not swept."""
    forced = _current("pick")
    if forced is not None:
        return forced
    block_v = min(4096, triton.next_power_of_2(vocab))
    steps = triton.cdiv(vocab, block_v)
    programs = 8 * sm_count(device) if device.type == "cuda" else 4
    wanted = max(1, min(steps, triton.cdiv(programs, max(rows, 1))))
    return PickLaunch(block_v=block_v, warps=8,
                      slices=triton.cdiv(steps, triton.cdiv(steps, wanted)))


# ---------------------------------------------------------------------------------------------
# scoped override

_KINDS = {"route": RouteLaunch, "decode": DecodeConfig, "grouped": GroupedConfig,
          "align": AlignLaunch, "combine": CombineLaunch, "attention": AttentionLaunch,
          "prep": PrepLaunch, "norm": NormLaunch, "pick": PickLaunch, "skinny": SkinnyLaunch,
          "moe_path": str,
          "fp8_bits": bool, "pdl": bool}
_state = threading.local()


def _stack() -> list:
    if not hasattr(_state, "stack"):
        _state.stack = [{}]
    return _state.stack


def _current(key: str):
    return _stack()[-1].get(key)


def override_key() -> tuple:
    """The overrides in force, hashable (the launch choices a captured CUDA graph bakes in:
    part of graphs.graph_key)."""
    return tuple(sorted(_stack()[-1].items()))


@contextlib.contextmanager
def override(route: Optional[RouteLaunch] = None, decode: Optional[DecodeConfig] = None,
             grouped: Optional[GroupedConfig] = None, align: Optional[AlignLaunch] = None,
             combine: Optional[CombineLaunch] = None, attention: Optional[AttentionLaunch] = None,
             prep: Optional[PrepLaunch] = None, moe_path: Optional[str] = None,
             norm: Optional[NormLaunch] = None, pick: Optional[PickLaunch] = None,
             skinny: Optional[SkinnyLaunch] = None, fp8_bits: Optional[bool] = None,
             pdl: Optional[bool] = None):
    """Within the block, the launch functions return these instead of their choice (None keeps
    the enclosing choice). moe_path: "decode" or "grouped" whatever the token count; fp8_bits:
    how FP8 weights are read (fp8_bits()); pdl: programmatic dependent launch on or off
    (pdl()). A value of the wrong type is a TypeError naming the argument; leaving the block
    restores the choices."""
    given = dict(route=route, decode=decode, grouped=grouped, align=align,
                 combine=combine, attention=attention, prep=prep, moe_path=moe_path, norm=norm,
                 pick=pick, skinny=skinny, fp8_bits=fp8_bits, pdl=pdl)
    frame = dict(_stack()[-1])
    for name, value in given.items():
        if value is None:
            continue
        if not isinstance(value, _KINDS[name]):
            raise TypeError(f"{name} must be a {_KINDS[name].__name__} or None, "
                            f"got {type(value).__name__}")
        if name == "moe_path" and value not in MOE_PATHS:
            raise ValueError(f"moe_path must be one of {MOE_PATHS}, got {value!r}")
        frame[name] = value
    _stack().append(frame)
    try:
        yield
    finally:
        _stack().pop()


__all__ = ["RouteLaunch", "NormLaunch", "norm_launch", "PickLaunch", "pick_launch",
           "SkinnyLaunch", "skinny_launch", "skinny_block_n", "takes_skinny", "DEFAULT_SKINNY",
           "SKINNY_MAX_ROWS", "SKINNY_ARCH",
           "DecodeConfig", "GroupedConfig",
           "AlignLaunch", "CombineLaunch",
           "MoeLaunch", "AttentionLaunch", "PrepLaunch", "route_launch", "moe_launch",
           "align_launch", "attention_launch", "prep_launch", "override", "override_key",
           "persistent_grid", "pipeline_stages", "dot_precision", "fp8_bits", "pdl",
           "fit_scale_blocks", "KERNEL_FLOATS",
           "DEFAULT_DECODE_FP8", "DEFAULT_GROUPED_FP8",
           "DECODE_MAX_TOKENS",
           "GROUPED_WIDE_FROM", "DEFAULT_GROUPED_WIDE", "FEW_SEQUENCES",
           "MANY_SEQUENCES", "MANY_FROM"]
