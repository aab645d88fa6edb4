"""The arithmetic task generator, its splits, the scorer and the character tokenizer."""
import pytest

from dmoe_triton import tasks


def test_same_seed_same_problems_other_seed_other_problems():
    a = tasks.sample_problems("test", 50, seed=3)
    assert a == tasks.sample_problems("test", 50, seed=3)
    assert a != tasks.sample_problems("test", 50, seed=4)
    assert len({p.prompt for p in a}) == 50


def test_splits_are_disjoint_and_owned_by_the_hash():
    drawn = {s: tasks.sample_problems(s, 300, seed=0) for s in tasks.SPLITS}
    prompts = {s: {p.prompt for p in ps} for s, ps in drawn.items()}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    for split, ps in drawn.items():
        assert all(tasks.split_of(p.prompt) == split for p in ps)


def test_every_task_appears_and_answers_are_right():
    problems = tasks.sample_problems("train", 400, seed=1)
    assert {p.task for p in problems} == set(tasks.TASKS)
    for p in problems:
        expression = p.prompt[:-1]  # drop the trailing '='
        assert int(tasks.final_answer(p.answer)) == eval(expression)  # noqa: S307 (our own text)
        assert len(p.prompt) + len(p.answer) + 1 <= tasks.MAX_SEQUENCE


def test_worked_steps_are_consistent():
    steps = [p for p in tasks.sample_problems("train", 200, seed=2, tasks=["steps"])]
    for p in steps:
        first, second = p.answer.split(";")
        assert eval(first.replace("=", "==")) and eval(second.replace("=", "=="))  # noqa: S307


def test_scorer_exact_match_on_the_final_answer():
    assert tasks.exact_match("521", "521")
    assert tasks.exact_match(" 521 ", "521")
    assert not tasks.exact_match("52", "521")
    assert not tasks.exact_match("5210", "521")
    assert tasks.exact_match("1+2=3;3*4=12", "1+2=3;3*4=12")
    assert tasks.exact_match("1+2=4;3*4=12", "1+2=3;3*4=12")  # the final answer decides
    assert not tasks.exact_match("1+2=3;3*4=13", "1+2=3;3*4=12")
    problems = tasks.sample_problems("test", 4, seed=0)
    answers = [p.answer for p in problems]
    assert tasks.accuracy(answers, problems) == 1.0
    assert tasks.accuracy(answers[:2] + ["x", "y"], problems) == 0.5
    with pytest.raises(ValueError, match="pair up"):
        tasks.accuracy(answers[:3], problems)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="split"):
        tasks.sample_problems("dev", 3, seed=0)
    with pytest.raises(ValueError, match="n must"):
        tasks.sample_problems("test", -1, seed=0)
    with pytest.raises(ValueError, match="tasks"):
        tasks.sample_problems("test", 1, seed=0, tasks=["div"])
    with pytest.raises(ValueError, match="alphabet"):
        tasks.encode("1+a=")


def test_tokenizer_round_trip_and_file_format(tmp_path):
    from tokenizers import Tokenizer

    path = tasks.save_tokenizer(str(tmp_path))
    tok = Tokenizer.from_file(path)
    vocab = tasks.token_ids()
    for p in tasks.sample_problems("validation", 20, seed=0):
        text = p.prompt + p.answer
        ids = tok.encode(text + tasks.EOS).ids
        assert ids == tasks.encode(text) + [vocab[tasks.EOS]]
        assert tok.decode(ids) == text
        assert tasks.decode(ids + [vocab[tasks.MASK]]) == text
    for s in tasks.SPECIALS:
        assert tok.token_to_id(s) == vocab[s]


def test_saved_tokenizer_is_the_shipped_models_byte_for_byte(tmp_path):
    """One tokenizer builder (tiny.build_tokenizer) serves the task: what it writes is exactly
    the tokenizer.json the shipped checkpoints carry."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "models" / "arith-dmoe" / "tokenizer.json"
    if not shipped.is_file():
        pytest.skip("models/arith-dmoe is not in the repository")
    path = tasks.save_tokenizer(str(tmp_path))
    assert Path(path).read_bytes() == shipped.read_bytes()


def test_routing_sizes_scale_from_256_experts():
    from dmoe_triton.defaults import scaled_guard, scaled_size

    assert [scaled_guard(e) for e in (256, 64, 16, 4)] == [16, 4, 1, 1]
    assert [scaled_guard(e, 12) for e in (256, 64, 16)] == [12, 3, 1]
    assert [scaled_size(e) for e in (256, 64, 16)] == [38, 10, 2]


def test_no_test_imports_a_bench_script():
    """Library code the tests need lives in the package; bench/ holds scripts only."""
    from pathlib import Path

    forbidden = ("sys.path." + "insert", "import " + "bench", "import " + "train_tiny")
    for path in Path(__file__).parent.glob("test_*.py"):
        text = path.read_text()
        assert not any(f in text for f in forbidden), path.name
