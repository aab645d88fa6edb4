"""`dmoe generate` on broken or unusual checkpoints (issue 11): one line `dmoe: error: ...` naming
the file, field or argument, exit code 2, never a traceback; honest tokens/s; and a patched
model that saves the published tensor names."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dmoe_triton import RoutingPolicy, cli
from dmoe_triton import training as tt
from dmoe_triton.models import LLaDA2MoeModelLM
from dmoe_triton.patch import patch_model
from dmoe_triton.testing import small_model

FAST = ["--no-compare", "--gen-length", "8", "--block-length", "8", "--steps", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained micro arithmetic checkpoint (config.json, model.safetensors, tokenizer)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "arith"
    tt.save_checkpoint(LLaDA2MoeModelLM(tt.model_config("micro")), str(path))
    return path


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    """A fresh copy to break."""
    path = tmp_path / "model"
    shutil.copytree(checkpoint, path)
    return path


def fails(capsys, argv, *needles):
    """main(argv) exits 2 with one line `dmoe: error: ...` holding every needle."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmoe: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def test_checkpoint_runs(ckpt, capsys):
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST]) == 0
    assert "answer:" in capsys.readouterr().out


def test_missing_model_directory_is_named(capsys, tmp_path):
    fails(capsys, ["generate", "--model", str(tmp_path / "nonexistent")],
          "--model", "nonexistent", "no such directory")


def test_invalid_config_json(ckpt, capsys):
    (ckpt / "config.json").write_text("{\"num_experts\": 16,,}")
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1+2="],
          str(ckpt / "config.json"), "invalid JSON")


@pytest.mark.parametrize("value, needle", [(-4, "num_experts must be >= 2"),
                                           ("sixty-four", "num_experts must be an int")])
def test_bad_num_experts(ckpt, capsys, value, needle):
    edit_config(ckpt, num_experts=value)
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST],
          "config.json", needle)


@pytest.mark.parametrize("damage", ["empty", "truncated", "header"])
def test_broken_safetensors(ckpt, capsys, damage):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:8] + b"#" * 16 + data[24:])
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST],
          str(path), "expected a safetensors file")


def test_missing_shard(tmp_path, capsys, checkpoint):
    path = tmp_path / "sharded"
    shutil.copytree(checkpoint, path)
    model = LLaDA2MoeModelLM.from_pretrained(checkpoint)
    os.remove(path / "model.safetensors")
    model.save_pretrained(path, max_shard_size="20KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert cli.main(["generate", "--model", str(path), "--prompt", "1+2=", *FAST]) == 0
    capsys.readouterr()
    os.remove(path / shards[-1])
    fails(capsys, ["generate", "--model", str(path), "--prompt", "1+2=", *FAST],
          shards[-1], "missing shard", "model.safetensors.index.json")


def test_non_finite_weights_are_one_line(ckpt, capsys):
    model = LLaDA2MoeModelLM.from_pretrained(ckpt)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    model.save_pretrained(ckpt)
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST],
          "model.norm.weight", "non-finite")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(ckpt, capsys):
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1+2=", "--device", "cuda"],
          "--device cuda", "CUDA is not available")


def test_unknown_device(ckpt, capsys):
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1+2=", "--device", "tpu"],
          "--device tpu", "expected")


def test_prompt_past_max_position_embeddings(ckpt, capsys):
    limit = json.loads((ckpt / "config.json").read_text())["max_position_embeddings"]
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1+2=" * limit, *FAST],
          "max_position_embeddings", str(limit), "--gen-length 8")


def test_eos_token_id_list_in_config(ckpt, capsys):
    config = json.loads((ckpt / "config.json").read_text())
    edit_config(ckpt, eos_token_id=[config["eos_token_id"], 3])
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST]) == 0
    assert "answer:" in capsys.readouterr().out


def test_errors_come_without_traceback_from_the_command(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"")
    run = subprocess.run([sys.executable, "-m", "dmoe_triton", "generate", "--model", str(ckpt),
                          "--prompt", "1+2="], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("dmoe: error: ")
    assert "Traceback" not in run.stderr


def test_tokens_counted_to_eos_and_warm_up_outside_timing(ckpt, capsys, monkeypatch):
    from dmoe_triton import decoding

    calls = []
    real = decoding.generate

    def spy(*args, **kwargs):
        try:
            result = real(*args, **kwargs)
        except decoding._WarmedUp:  # the warm-up: the same layout, stopped after one block
            calls.append(("warm-up", kwargs["gen_length"], None))
            raise
        calls.append(("timed", kwargs["gen_length"], result))
        return result

    monkeypatch.setattr(decoding, "generate", spy)
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "1+2=", "--gen-length", "16",
                     "--block-length", "8", "--steps", "4", "--policy", "dmoe"]) == 0
    out = capsys.readouterr().out
    # Each policy (dmoe, then token for the comparison line) gets an untimed warm-up of the
    # same layout first (so the timed call finds its graphs kept: issue 18).
    assert [(kind, n) for kind, n, _ in calls] == [("warm-up", 16), ("timed", 16)] * 2
    result = calls[1][2]
    shown = int(out.split("tokens/s: ")[1].split("(")[1].split(" tokens")[0])
    assert shown == len(result.tokens[0]) == result.stats.generated_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_model_saves_the_published_names(tmp_path, dtype):
    original = small_model(seed=1).to(dtype)
    want = {k: v.clone() for k, v in original.state_dict().items()}
    patched = patch_model(small_model(seed=1).to(dtype), RoutingPolicy.dmoe(0.6, 2),
                          backend="reference")
    assert set(patched.state_dict()) == set(want)
    patched.save_pretrained(tmp_path)
    got = LLaDA2MoeModelLM.from_pretrained(tmp_path, dtype=dtype).state_dict()
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    # and a patched model loads that state dict back
    other = patch_model(small_model(seed=5).to(dtype), RoutingPolicy.token(), backend="reference")
    other.load_state_dict(patched.state_dict())
    for name, value in other.state_dict().items():
        assert torch.equal(value, want[name]), name


def test_import_dmoe_triton_registers_the_auto_classes():
    code = ("import dmoe_triton\n"
            "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
            "from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,\n"
            "    MODEL_MAPPING)\n"
            "c = AutoConfig.for_model('llada2_moe')\n"
            "print(type(c).__name__, MODEL_MAPPING[type(c)].__name__,\n"
            "      MODEL_FOR_CAUSAL_LM_MAPPING[type(c)].__name__)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["LLaDA2MoeConfig", "LLaDA2MoeModel", "LLaDA2MoeModelLM"]


def test_default_gen_length_fits_the_position_limit(ckpt, capsys):
    limit = json.loads((ckpt / "config.json").read_text())["max_position_embeddings"]
    prompt = "1+2=" * ((limit - 8) // 4)  # limit - 8 tokens: the default takes the 8 left
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", prompt, "--no-compare",
                     "--block-length", "8", "--steps", "2"]) == 0
    capsys.readouterr()
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1" * limit, "--no-compare"],
          f"the prompt is {limit} tokens", f"max_position_embeddings {limit}")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_broken_tokenizer_files(ckpt, capsys, name):
    (ckpt / name).write_text("{not json")
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST], str(ckpt / name))


# ---------------------------------------------------------------------------------------------
# LLaDA2.2 / 2.1 checkpoints (issue 12 items 4 and 7)


@pytest.fixture(scope="module")
def llada22(tmp_path_factory):
    """A small LLaDA2.2-style checkpoint: expert_capacity and block_size in config.json (its
    own block routing), RoPE as rope_parameters, and a generation_config.json carrying
    LLaDA2.1's editing knobs."""
    config = tt.model_config("micro")
    config.expert_capacity, config.block_size = config.num_experts // 2, 8
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "llada22"
    tt.save_checkpoint(LLaDA2MoeModelLM(config), str(path))
    raw = json.loads((path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.pop("rope_theta"),
                              "partial_rotary_factor": raw.pop("partial_rotary_factor")}
    (path / "config.json").write_text(json.dumps(raw))
    (path / "generation_config.json").write_text(json.dumps(
        {"editing_threshold": 0.0, "max_post_steps": 2, "threshold": 0.9}))
    return path


def test_a_llada22_checkpoint_runs_its_own_routing_and_editing(llada22, capsys):
    assert cli.main(["generate", "--model", str(llada22), *FAST]) == 0
    out = capsys.readouterr().out
    assert "policy: capacity(expert_capacity=" in out and "block_size=8)" in out, out
    assert "auto: config.json expert_capacity=" in out, out
    assert "LLaDA2.1 token editing, editing_threshold=0.0 (generation_config.json), " \
           "max_post_steps=2" in out, out
    assert " edits)" in out, out


def test_generation_config_defaults_and_what_wins(llada22, tmp_path):
    assert cli.generation_defaults(str(llada22)) == {
        "editing_threshold": 0.0, "max_post_steps": 2, "threshold": 0.9}
    assert cli.generation_defaults(str(tmp_path)) == {}
    args = cli.build_parser().parse_args(["generate", "--editing-threshold", "0.5"])
    cli._decoding_args(args, str(llada22))  # an explicit value wins; the rest from the file
    assert (args.editing_threshold, args.max_post_steps, args.threshold) == (0.5, 2, 0.9)


def test_bad_editing_knobs_are_named(llada22, tmp_path, capsys):
    fails(capsys, ["generate", "--model", str(llada22), "--editing-threshold", "1.5", *FAST],
          "editing_threshold", "[0, 1]")
    bad = tmp_path / "bad"
    shutil.copytree(llada22, bad)
    (bad / "generation_config.json").write_text(json.dumps({"editing_threshold": -1}))
    fails(capsys, ["generate", "--model", str(bad), *FAST], "generation_config.json",
          "editing_threshold")


def test_a_capacity_policy_needs_a_capacity(ckpt, capsys):
    fails(capsys, ["generate", "--model", str(ckpt), "--prompt", "1+2=", "--policy", "capacity",
                   *FAST], "expert_capacity", "--capacity")


def test_quantize_fp8_and_an_fp8_checkpoint_run(ckpt, tmp_path, capsys):
    """--quantize fp8 quantizes the experts at load; a saved FP8 checkpoint (quantization_config
    in config.json, weight_scale_inv beside each expert weight) loads and runs as it is."""
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "1+2=", "--quantize", "fp8",
                     *FAST]) == 0
    assert "FP8 experts" in capsys.readouterr().out
    model = patch_model(LLaDA2MoeModelLM.from_pretrained(str(ckpt)), expert_dtype="fp8")
    path = tmp_path / "fp8"
    tt.save_checkpoint(model, str(path))
    assert "quantization_config" in json.loads((path / "config.json").read_text())
    assert cli.main(["generate", "--model", str(path), "--prompt", "1+2=", *FAST]) == 0
    assert "FP8 experts" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--top-p", "0.3"], r"--top-p sets a routing parameter, but --policy auto runs the "
                         r"checkpoint's own routing with its own parameters \(auto: config.json"
                         r".*pass --policy \(one of dmoe, ec_coreset\) to set --top-p"),
    (["--block-size", "0"], "--block-size sets a routing parameter, but --policy auto"),
    (["--policy", "token", "--k", "3"], r"--k is an option of topk_cap, expert_choice, "
                                        r"ec_coreset, but the routing that runs is token "
                                        r"\(--policy\)"),
    (["--policy", "dmoe", "--capacity", "4"], "--capacity is an option of capacity"),
    (["--policy", "expert_choice", "--top-p", "0.5"], "--top-p is an option of dmoe"),
    # a break test found --k-min 0 --k-max 99 ignored under the fixed schedule (exit 0)
    (["--policy", "expert_choice", "--k-min", "0", "--k-max", "99"],
     r"--k-min / --k-max are the linear schedules' ends; --schedule fixed"),
    (["--policy", "ec_coreset", "--schedule", "linear", "--k", "4"],
     r"--k is the fixed schedule's capacity factor; --schedule linear takes --k-min"),
])
def test_an_option_the_routing_would_ignore_is_an_error(ckpt, capsys, argv, needle):
    """Options of other policies were dropped without a word (a break test found --top-p nan
    and --capacity 4 accepted with exit 0)."""
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST, *argv]) == 2
    assert re.search(needle, capsys.readouterr().err)


def test_the_options_of_the_policy_that_runs_are_taken(ckpt, capsys):
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST,
                     "--policy", "dmoe", "--top-p", "0.3", "--guard", "2",
                     "--block-size", "8"]) == 0
    assert "top_p=0.3" in capsys.readouterr().out
    # expert choice's fixed k (it had no flag: --k was topk_cap's alone)
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST,
                     "--policy", "expert_choice", "--k", "1"]) == 0
    assert "k_min=1, k_max=1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--editing-threshold", "1.5"], "editing_threshold"),
    (["--threshold", "1.5"], r"--threshold must be in \[0, 1\]"),
])
def test_bad_decoding_options_are_named_before_the_run_starts(ckpt, capsys, argv, needle):
    """A break test found --editing-threshold 1.5 printed as the run's decoding (the model
    loaded) before the error."""
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "1+2=", *FAST, *argv]) == 2
    out = capsys.readouterr()
    assert re.search(needle, out.err)
    assert "decoding:" not in out.out and "model:" not in out.out
