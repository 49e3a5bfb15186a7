"""`bench/capture.py --quick` runs end to end (a subprocess, as a user runs it) and reports sane numbers.

Run: ``python -m pytest tests/test_capture_bench.py -q``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text``, each as a list of {header: cell}."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            assert set("".join(block[1])) <= set("-:"), block[1]
            tables.append([dict(zip(block[0], row)) for row in block[2:]])
            block = []
    return tables


def test_quick_capture_bench_reports_sane_numbers(tmp_path: Path) -> None:
    out = tmp_path / "capture.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "capture.py"), "--quick", "--threads", "1", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    topk_table, capture_table = markdown_tables(done.stdout)
    assert [row["V"] for row in topk_table] == ["4,096"]
    assert float(topk_table[0]["before (s)"]) > 0 and float(topk_table[0]["after (s)"]) > 0
    paths = [row["path"] for row in capture_table]
    assert paths == ["bare forward", "Teacher.compute_targets", "UnitWorker.process"]

    capture = json.loads(out.read_text())["capture"]
    assert 0.0 < capture["ratio"] <= 1.5 and capture["process_encode_overlapped_s"] > 0.0
    assert 0.0 < capture["real_token_fraction"] <= 1.0
    assert capture["real_tokens"] <= capture["padded_tokens"]
    assert all(0.0 < r["real_token_fraction"] <= 1.0 for r in capture["real_token_fraction_by_unit_tokens"])
    timing = capture["process_timing_s"]
    assert set(timing) == {"read", "forward", "encode", "write", "total"}
    assert all(value >= 0.0 for value in timing.values()) and timing["total"] >= timing["forward"]
    assert f"throughput ratio = {capture['ratio']:.3f}" in done.stdout
