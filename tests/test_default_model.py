"""The default model: the shipped arithmetic checkpoint (models/arith-dmoe) when the repository
has it, else the tiny random one; and the shipped model really solves held-out problems."""
from pathlib import Path

import pytest
import torch

from dmoe_triton import RoutingPolicy, cli, tasks, tiny
from dmoe_triton import training as tt
from dmoe_triton.models import LLaDA2MoeModelLM
from dmoe_triton.patch import patch_model, set_policy

NOT_SHIPPED = ("models/arith-dmoe is not in the repository yet: train it on a GPU with "
               "`bash bench/train_and_eval.sh OUT` and unpack OUT/models.tar into models/")


@pytest.fixture
def micro_checkpoint(tmp_path):
    """An untrained micro arithmetic checkpoint, saved as train_tiny saves the real one (it
    declares the dMoE routing it was fine-tuned for)."""
    torch.manual_seed(0)
    path = tmp_path / "arith-dmoe"
    model = LLaDA2MoeModelLM(tt.model_config("micro"))
    model.config.core_threshold = 0.6
    tt.save_checkpoint(model, str(path))
    return path


def test_default_is_the_shipped_model_when_present(micro_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "SHIPPED_MODEL", str(micro_checkpoint))
    assert tiny.default_model_dir() == str(micro_checkpoint)
    assert tiny.is_arithmetic_model(str(micro_checkpoint))
    monkeypatch.setattr(tiny, "SHIPPED_MODEL", str(tmp_path / "absent"))
    monkeypatch.setattr(tiny, "tiny_model_dir", lambda: "random-model")
    assert tiny.default_model_dir() == "random-model"


def test_shipped_model_is_looked_up_beside_the_package():
    repo = Path(tiny.__file__).resolve().parents[1]
    assert Path(tiny.SHIPPED_MODEL) == repo / "models" / "arith-dmoe"


def test_cli_runs_the_arithmetic_default_on_its_example(micro_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(tiny, "SHIPPED_MODEL", str(micro_checkpoint))
    assert cli.main(["generate", "--no-compare", "--gen-length", "8"]) == 0
    out = capsys.readouterr().out
    assert "shipped arithmetic model" in out and "not random" in out
    assert "guard=1" in out  # 16 of 256 experts, scaled to the micro model's 16
    assert cli.main(["generate", "--prompt", "1 + 2="]) == 2  # a space is outside the alphabet
    assert "alphabet" in capsys.readouterr().err


@pytest.mark.skipif(tiny.shipped_model_dir() is None, reason=NOT_SHIPPED)
def test_shipped_model_solves_held_out_problems_with_token_and_dmoe_routing():
    model = LLaDA2MoeModelLM.from_pretrained(tiny.shipped_model_dir(), dtype=torch.float32).eval()
    problems = tasks.sample_problems("test", 8, seed=0)
    token, dmoe = RoutingPolicy.token(), tt.eval_policy(model.config, 0.6)
    patched = patch_model(model, token)
    unique = {}
    for policy in (token, dmoe):
        set_policy(patched, policy)
        answers, stats = tasks.solve(patched, problems, batch_size=8)
        right = [tasks.exact_match(a, p.answer) for a, p in zip(answers, problems)]
        # The model scores well above 90% (bench/results/fidelity.md): a miss or two at most.
        assert sum(right) >= 6, (policy, list(zip([p.prompt for p in problems], answers)))
        unique[policy.kind] = tasks.mean_unique_experts(stats)
    assert unique["dmoe"] < 0.5 * unique["token"]
