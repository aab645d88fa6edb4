"""The launch heuristics of dmoe_triton/launch.py and its scoped override."""
import threading

import pytest
import torch

from dmoe_triton import launch
from dmoe_triton.config import POLICIES, POLICY_NAMES, RoutingPolicy
from dmoe_triton.kernels import policy_codes
from dmoe_triton.launch import (DECODE_MAX_TOKENS, FEW_SEQUENCES, MANY_FROM,
                                MANY_SEQUENCES, AlignLaunch, AttentionLaunch, DecodeConfig,
                                GroupedConfig, PrepLaunch, RouteLaunch)

CPU = torch.device("cpu")
GPU = torch.device("cuda")  # only its type is read: the rules run without a GPU


def moe_path(tokens):
    return launch.moe_launch(tokens, 8, 256, torch.bfloat16, CPU).path


def test_defaults_are_todays_measured_values():
    assert launch.route_launch(256, GPU) == RouteLaunch(route_rows=1, route_warps=1, vote_rows=32,
                                                        coreset_warps=4, vote_cols=32,
                                                        vote_split=32, vote_warps=1)
    assert RouteLaunch(vote_cols=64).vote_cols_for(40) == 64
    assert RouteLaunch().vote_cols_for(12) == 16
    # a row's votes stay inside one warp (launch.py, RouteLaunch.vote_cols)
    assert RouteLaunch().vote_rows * RouteLaunch().vote_cols >= 128 * RouteLaunch().coreset_warps
    plan = launch.moe_launch(32, 8, 256, torch.bfloat16, CPU)
    assert plan.decode == DecodeConfig() and plan.decode.down_splits == 4
    # one decode config for 1-64 tokens (5 down stages, 3 weight tiles in flight, fit at 64:
    # tests/test_fit.py)
    assert plan.decode.programs_per_sm == 1 and plan.decode.stages_down == 5
    for tokens in (1, 33, 64):
        assert launch.moe_launch(tokens, 8, 256, torch.bfloat16, CPU).decode == plan.decode
    assert plan.grouped == GroupedConfig() and plan.grouped.block_m == 32
    assert (plan.combine.block_t, plan.combine.block_h, plan.combine.warps) == (8, 256, 4)
    assert DECODE_MAX_TOKENS == 64 and MANY_FROM == 8
    assert launch.align_launch(2**20, 256) == AlignLaunch(chunk=128, rows=32, warps=4)
    assert FEW_SEQUENCES == AttentionLaunch(16, 128, 4, 3)
    assert MANY_SEQUENCES == AttentionLaunch(64, 64, 4, 3)


def test_grouped_tiles_widen_from_grouped_wide_from_tokens():
    def plan(tokens, fp8=False):
        return launch.moe_launch(tokens, 8, 256, torch.bfloat16, CPU, fp8).grouped

    assert plan(launch.GROUPED_WIDE_FROM - 1) == GroupedConfig()
    assert plan(launch.GROUPED_WIDE_FROM) == launch.DEFAULT_GROUPED_WIDE
    assert launch.DEFAULT_GROUPED_WIDE.block_m == 64
    assert plan(launch.GROUPED_WIDE_FROM, fp8=True) == launch.DEFAULT_GROUPED_FP8
    with launch.override(grouped=GroupedConfig(block_m=16)):
        assert plan(4096).block_m == 16


def test_no_routed_slot_takes_the_grouped_path_even_when_forced():
    """top_k 0 (a shared expert alone): only the grouped launches list it, whatever T or an
    override says."""
    assert launch.moe_launch(8, 0, 256, torch.bfloat16, CPU).path == "grouped"
    with launch.override(moe_path="decode"):
        assert launch.moe_launch(8, 0, 256, torch.bfloat16, CPU).path == "grouped"
        assert launch.moe_launch(8, 1, 256, torch.bfloat16, CPU).path == "decode"


def test_moe_path_switches_after_decode_max_tokens():
    assert moe_path(1) == moe_path(DECODE_MAX_TOKENS) == "decode"
    assert moe_path(DECODE_MAX_TOKENS + 1) == moe_path(4096) == "grouped"


def test_decode_path_forced_past_its_tokens_is_an_error():
    """The decode kernels hold every token row in one tile: past DECODE_MAX_TOKENS they would
    not fit in shared memory on the GPU (and the CPU interpreter would not notice)."""
    with launch.override(moe_path="decode"):
        assert launch.moe_launch(DECODE_MAX_TOKENS, 8, 256, torch.bfloat16, CPU).path == "decode"
        with pytest.raises(ValueError, match="moe_path 'decode' takes at most DECODE_MAX_TOKENS "
                                             "= 64 tokens .*, got 65"):
            launch.moe_launch(DECODE_MAX_TOKENS + 1, 8, 256, torch.bfloat16, CPU)


def test_attention_tiles_switch_at_many_from():
    assert launch.attention_launch(1) == launch.attention_launch(MANY_FROM - 1) == FEW_SEQUENCES
    assert launch.attention_launch(MANY_FROM) == launch.attention_launch(64) == MANY_SEQUENCES


def test_prep_warps_switch_above_128_head_dims():
    assert launch.prep_launch(128) == PrepLaunch(block_d=128, warps=1)
    assert launch.prep_launch(96) == PrepLaunch(block_d=128, warps=1)
    assert launch.prep_launch(129) == PrepLaunch(block_d=256, warps=2)


def test_align_shape_must_be_powers_of_two_and_chunks_bounded():
    with pytest.raises(ValueError, match="AlignLaunch.chunk must be a power of two"):
        AlignLaunch(chunk=96)
    with pytest.raises(ValueError, match="AlignLaunch.chunk must be <= 512"):
        AlignLaunch(chunk=1024)  # the scatter compares a chunk's slots pairwise


def test_fp32_halves_the_pipeline_depth_and_uses_exact_dots():
    assert launch.pipeline_stages(4, torch.bfloat16) == 4
    assert launch.pipeline_stages(4, torch.float32) == 2
    assert launch.pipeline_stages(3, torch.float32) == 2
    assert launch.dot_precision(torch.float32) == "ieee"
    assert launch.dot_precision(torch.float16) == "tf32"


def test_persistent_grid_is_capped_by_the_work():
    assert launch.persistent_grid(CPU, 2, 100) == (4,)
    assert launch.persistent_grid(CPU, 2, 3) == (3,)
    assert launch.persistent_grid(CPU, 2, 0) == (1,)


def test_routing_rows_per_program():
    """route_kernel: one row a program on the GPU (measured), a whole window in the interpreter
    (programs run one by one)."""
    assert launch.route_launch(256, GPU).route_rows == 1
    assert launch.route_launch(256, CPU).route_rows == 32


def test_override_is_scoped_and_restores_the_default():
    fast = RouteLaunch(route_rows=4)
    with launch.override(route=fast, moe_path="grouped"):
        assert launch.route_launch(256, GPU) == fast
        assert moe_path(1) == "grouped"
        assert launch.attention_launch(1) == FEW_SEQUENCES  # not overridden: the heuristic
    assert launch.route_launch(256, GPU) == RouteLaunch()
    assert moe_path(1) == "decode"


def test_override_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with launch.override(decode=DecodeConfig(down_splits=1)):
            raise RuntimeError
    assert launch.moe_launch(1, 8, 256, torch.float16, CPU).decode == DecodeConfig()


def test_overrides_nest_innermost_wins_outer_keys_stay():
    outer = AttentionLaunch(block_m=32)
    inner = AttentionLaunch(block_m=64)
    with launch.override(attention=outer, align=AlignLaunch(chunk=16)):
        with launch.override(attention=inner):
            assert launch.attention_launch(1) == inner
            assert launch.align_launch(4, 4).chunk == 16
        assert launch.attention_launch(1) == outer
    assert launch.attention_launch(1) == FEW_SEQUENCES
    assert launch.align_launch(4, 4) == AlignLaunch()


def test_override_is_thread_local():
    seen = []
    with launch.override(route=RouteLaunch(route_rows=2)):
        worker = threading.Thread(target=lambda: seen.append(launch.route_launch(256, GPU)))
        worker.start()
        worker.join()
    assert seen == [RouteLaunch()]


@pytest.mark.parametrize("kwargs, name", [
    (dict(route=DecodeConfig()), "route"),
    (dict(decode=RouteLaunch()), "decode"),
    (dict(grouped=DecodeConfig()), "grouped"),
    (dict(attention=(16, 128, 4, 3)), "attention"),
    (dict(prep=4), "prep"),
    (dict(align=True), "align"),
    (dict(moe_path=1), "moe_path"),
    (dict(pick=RouteLaunch()), "pick"),
])
def test_bad_override_types_name_the_argument(kwargs, name):
    with pytest.raises(TypeError, match=f"^{name} must be"):
        with launch.override(**kwargs):
            pass
    assert launch.route_launch(256, GPU) == RouteLaunch()


def test_bad_moe_path_is_a_value_error():
    with pytest.raises(ValueError, match="moe_path must be one of"):
        with launch.override(moe_path="fast"):
            pass


def test_policy_table_is_the_one_source_of_codes_and_names():
    assert POLICY_NAMES == ("token", "dmoe", "des_vote", "topk_cap", "capacity",
                            "expert_choice", "ec_coreset")
    assert POLICIES["dmoe"].code == policy_codes.DMOE.value
    assert POLICIES["des_vote"].code == policy_codes.DES_VOTE.value
    assert POLICIES["capacity"].code == policy_codes.CAPACITY.value
    assert POLICIES["token"].code == POLICIES["topk_cap"].code == policy_codes.TOKEN.value
    assert (POLICIES["expert_choice"].code == POLICIES["ec_coreset"].code
            == policy_codes.EXPERT_CHOICE.value)
    block = {name for name, kind in POLICIES.items() if kind.is_block}
    assert block == {"dmoe", "des_vote", "capacity", "expert_choice", "ec_coreset"}
    assert RoutingPolicy.dmoe().code == policy_codes.DMOE.value
    with pytest.raises(ValueError, match="policy kind must be one of"):
        RoutingPolicy("expert_chooses")


@pytest.mark.parametrize("build, field", [
    (lambda: launch.RouteLaunch(route_rows=0), "route_rows"),
    (lambda: launch.RouteLaunch(route_rows=3), "route_rows"),
    (lambda: launch.RouteLaunch(vote_rows=5), "vote_rows"),
    (lambda: launch.RouteLaunch(vote_cols=48), "vote_cols"),
    (lambda: launch.DecodeConfig(block_i=0), "block_i"),
    (lambda: launch.DecodeConfig(block_i=48), "block_i"),
    (lambda: launch.DecodeConfig(block_h=8), "DecodeConfig.block_h must be >= 16"),
    (lambda: launch.DecodeConfig(block_i=8), "DecodeConfig.block_i must be >= 16"),
    (lambda: launch.DecodeConfig(tail_cols=8), "DecodeConfig.tail_cols must be >= 16"),
    (lambda: launch.DecodeConfig(tail_cols=24), "tail_cols must be a power of two"),
    (lambda: launch.DecodeConfig(tail_k_tile=8), "DecodeConfig.tail_k_tile must be >= 16"),
    (lambda: launch.DecodeConfig(block_i=32, tail_cols=64),
     "DecodeConfig.tail_cols must be <= block_i \\(32\\), got 64"),
    (lambda: launch.DecodeConfig(down_splits=0), "down_splits"),
    (lambda: launch.GroupedConfig(block_m=8), "block_m"),
    (lambda: launch.AttentionLaunch(block_m=3), "block_m"),
    (lambda: launch.CombineLaunch(block_h=100), "block_h"),
    (lambda: launch.DecodeConfig(x_prepass="no"), "x_prepass must be a bool"),
    (lambda: launch.GroupedConfig(x_prepass=0), "x_prepass must be a bool"),
    (lambda: launch.GroupedConfig(block_i=True), "block_i must be an int"),
])
def test_a_launch_shape_the_kernels_cannot_take_is_named_when_built(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_forced_pdl_off_a_hopper_gpu_is_refused_and_bad_shapes_name_the_argument():
    with launch.override(pdl=True):
        with pytest.raises(ValueError, match=r"pdl=True\) needs a CUDA device"):
            launch.pdl(CPU)
    assert launch.pdl(CPU) == dict(PDL=False, launch_pdl=False)
    assert launch.attention_launch(0, 4096).key_splits == 1  # no sequence: nothing to split
    with pytest.raises(ValueError, match="batch must be >= 0"):
        launch.attention_launch(-1, 1024)
    with pytest.raises(ValueError, match="n_keys must be >= 0"):
        launch.attention_launch(1, -5)


def test_pick_launch_slices_follow_the_sm_count(monkeypatch):
    """About 8 programs per SM (132 on an H200): LLaDA2's 157184 logits (39 steps of 4096) in
    20 slices of 2 steps for one sequence's 32 rows, 3 for 16 sequences, 1 for 64; a vocabulary
    of one step never splits; off CUDA, 4 programs."""
    monkeypatch.setattr(launch, "sm_count", lambda device: 132)
    for rows, slices in ((32, 20), (512, 3), (2048, 1)):
        shapes = launch.pick_launch(rows, 157184, GPU)
        assert (shapes.block_v, shapes.slices) == (4096, slices), rows
        assert shapes.slice_v(157184) == 4096 * (2 if rows == 32 else 13 if rows == 512 else 39)
    assert launch.pick_launch(1, 3000, GPU).slices == 1
    assert launch.pick_launch(1, 157184, torch.device("cpu")).slices == 4


def test_bad_pick_launch_fields_are_named():
    for kwargs, field in ((dict(block_v=48), "block_v"), (dict(merge_rows=0), "merge_rows"),
                          (dict(slices=0), "slices"), (dict(merge_rows=3), "merge_rows"),
                          (dict(warps=64), "warps"), (dict(merge_warps=64), "merge_warps")):
        with pytest.raises(ValueError, match=f"PickLaunch.{field} must be"):
            launch.PickLaunch(**{"block_v": 64, "warps": 4, **kwargs})


def test_warps_past_a_cuda_program_are_named():
    """Every launch shape's warps fields: at most 32 (1024 threads), named when built."""
    with pytest.raises(ValueError, match=r"DecodeConfig.warps_down must be <= 32, got 64"):
        DecodeConfig(warps_down=64)
    with pytest.raises(ValueError, match=r"RouteLaunch.coreset_warps must be <= 32"):
        RouteLaunch(coreset_warps=64)
    assert DecodeConfig(warps_gate_up=32).warps_gate_up == 32
