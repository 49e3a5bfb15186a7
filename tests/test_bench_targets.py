"""`bench/gradient_angle.py --quick` runs end to end (a subprocess, as a user runs it) and prints a sane table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def run_bench(*args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The first markdown table in ``text`` as a list of {header: cell}."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "").strip()) == set(), lines[1]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def angle(cell: str) -> float:
    return float(cell.split("±")[0])


@pytest.fixture(scope="module")
def gradient_table(tmp_path_factory) -> tuple[dict[str, dict[str, str]], dict]:
    out = tmp_path_factory.mktemp("bench") / "angles.json"
    stdout = run_bench(str(BENCH / "gradient_angle.py"), "--quick", "--json", str(out))
    rows = {row["estimator"]: row for row in markdown_rows(stdout)}
    return rows, json.loads(out.read_text())


def test_gradient_angle_table_is_complete_and_in_range(gradient_table):
    rows, raw = gradient_table
    assert len(rows) == len(raw["rows"]) == 11
    for name, row in rows.items():
        assert 0.0 <= angle(row["angle to full KD (°)"]) <= 180.0, name
        mean_cell = row["angle of mean over draws (°)"]
        assert mean_cell == "—" or 0.0 <= float(mean_cell) <= 180.0, name
        assert float(row["norm ratio"]) > 0.0
    for k in (8, 16, 64):  # top-k stores exactly k ids, and more ids cost more bytes
        assert float(rows[f"top-{k} + tail bucket"]["ids/token"]) == k
    assert float(rows["top-64 + tail bucket"]["shard B/token"]) > float(rows["top-8 + tail bucket"]["shard B/token"])
    assert 1.0 <= float(rows["sample N=50"]["ids/token"]) <= 50.0  # unique ids of 50 draws
    assert 8.0 < float(rows["hybrid head 8 + N=50"]["ids/token"]) <= 58.0


def test_unbiased_estimators_beat_renormalized_topk(gradient_table):
    rows, raw = gradient_table
    renorm8 = angle(rows["top-8 renormalized"]["angle to full KD (°)"])
    for name in ("sample N=50", "hybrid head 8 + N=50"):
        assert angle(rows[name]["angle to full KD (°)"]) < renorm8, name
    # the exact tail bucket is closer than dropping the tail, and more head ids get closer still
    assert angle(rows["top-8 + tail bucket"]["angle to full KD (°)"]) < renorm8
    tail_angles = {k: angle(rows[f"top-{k} + tail bucket"]["angle to full KD (°)"]) for k in (8, 64)}
    assert tail_angles[64] < tail_angles[8]
    # averaging independent draws removes noise, not bias: the mean gradient is closer than a single draw
    sample = next(r for r in raw["rows"] if r["estimator"] == "sample N=50")
    assert sample["draws"] == 3 and sample["angle_of_mean"] < sample["angle"]
