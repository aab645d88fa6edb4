"""bench/bench_e2e.py --serving (issue 14) on the CPU: its --smoke run (tiny config, 16 and 64
sequences), run as the script it is (bench/ holds scripts, not library code)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["calibrated at 1 seq", "calibrated at 16 seqs", "calibrated at 64 seqs"]


def find(rows, routing, policy, batch, prefix):
    hits = [r for r in rows if (r["routing"], r["policy"], r["batch"], r["prefix"])
            == (routing, policy, batch, prefix)]
    assert len(hits) == 1, (routing, policy, batch, prefix)
    return hits[0]


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """One smoke run with --llada22 (capacity routing beside dMoE, the _llada22 files). Target
    15.8 of the tiny model's 16 experts: its one-sequence step touches 14.0 unrouted, so that
    calibration raises diversity, i.e. changes the gate weights (the full model's case: 53 < 70)
    and a later calibration that did not start from the restored plain router would show it."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("serving")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_e2e.py"), "--smoke",
                          "--serving", "--llada22", "--target-unique", "15.8", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "e2e_serving_llada22.png").is_file()
    return (json.loads((out / "e2e_serving_llada22.json").read_text()),
            (out / "e2e_serving_llada22.md").read_text())


def test_serving_rows_per_calibration(serving):
    data, _ = serving
    rows, shapes = data["rows"], {(16, 32), (64, 32), (16, 64)}
    assert list(data["calibrations"]) == LABELS
    assert not [n for n in data["notes"] if "skipped" in n]  # well within its time budget
    policies = ("token", "dmoe p=0.6", "capacity 8")  # the smoke's capacity: 48 of 256 scaled
    want = {LABELS[0]: shapes, LABELS[1]: {(16, 32), (16, 64)}, LABELS[2]: {(64, 32)}}
    for label, mine in want.items():
        got = {(r["batch"], r["prefix"], r["policy"]) for r in rows if r["routing"] == label}
        assert got == {(b, p, name) for b, p in mine for name in policies}, label
    for r in rows:
        assert r["tok_s"] == pytest.approx(r["batch"] * 2.55 / r["ms"] * 1e3)
        assert r["unique"] > 0 and r["union"] >= r["unique"] and r["floor_ms"] > 0


def test_each_batch_is_calibrated_on_its_own_step_from_the_plain_router(serving):
    data, _ = serving
    rows, calibs = data["rows"], data["calibrations"]
    assert calibs[LABELS[0]]["diversity"] > 0  # the gate weights changed
    for label, batch in zip(LABELS, (1, 16, 64)):
        assert calibs[label]["batch"] == batch and calibs[label]["prefix"] == 32
    for label, batch in zip(LABELS[1:], (16, 64)):
        # the same seeded step as the calibration's: the token row shows what it measured
        token = find(rows, label, "token", batch, 32)
        assert token["unique"] == pytest.approx(calibs[label]["unique"])
    # The 16-sequence search's first forward (knob 0) ran the plain router: not the
    # one-sequence calibration's gate weights, whose token routing the first rows show.
    first = calibs[LABELS[1]]["history"][0]
    assert first[0] == 0
    assert first[1] != pytest.approx(find(rows, LABELS[0], "token", 16, 32)["unique"])


def test_serving_report_names_calibrations_and_targets(serving):
    _, text = serving
    assert text.startswith("# Serving shapes (issue 14)")
    for label in LABELS:
        assert f"| {label} | token" in text  # the routing column
        assert f"- **{label}** (rows: " in text and f"Rows {label}:" in text
    assert "restored before it" in text
    assert "issue 14: 16 seq, dMoE p=0.6 at most 1.7x its byte floor (prefix 32)" in text
    assert "issue 14: new row 64 seq, prefix 32, token:" in text
    assert "issue 14: new row 16 seq, prefix 64, dmoe p=0.6:" in text
    assert "issue 14 sets no target at this shape" in text
