"""The README's Python snippets run as written (on the shipped model, on the CPU here)."""
import os
import re
from pathlib import Path

import pytest

from dmoe_triton import tiny

ROOT = Path(__file__).resolve().parents[1]


def python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.skipif(tiny.shipped_model_dir() is None, reason="the shipped model is not here")
def test_readme_python_api_runs_as_written(monkeypatch, capsys):
    blocks = python_blocks()
    assert blocks, "the README has no python snippet"
    monkeypatch.chdir(ROOT)  # the snippet names the shipped model by its repository path
    for code in blocks:
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (our own README)
    printed = capsys.readouterr().out
    assert printed.strip(), "the snippet prints the answer"
    assert tuple(scope["y"].shape) == (32, 64) and scope["y"].isfinite().all()
    assert os.path.isdir(scope["path"])
