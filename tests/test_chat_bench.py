"""`bench/chat.py --quick` runs end to end (a subprocess, as a user runs it): the assistant-only cache stores fewer
targets and fewer bytes than the every-position cache of the same conversations, and every student row is reported
(the bytes per stored target are compared like with like in `test_chat_capture.py`). Needs format v3's storage of
positions without targets (~40 s on idle cores).

Run: ``python -m pytest tests/test_chat_bench.py -q``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_chat_bench_reports_smaller_assistant_cache(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "chat.py"), "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    every, assistant = report["caches"]["all"], report["caches"]["assistant"]
    assert every["stored_positions"] == every["tokens"]
    assert 0 < assistant["stored_positions"] < 0.8 * assistant["tokens"]
    assert assistant["bytes"] < every["bytes"]
    rows = [r["row"] for r in report["rows"]]
    assert rows == [
        "KD, assistant-only cache",
        "hard labels on the same responses (CE)",
        "KD, every-position cache",
    ]
    assert all(r["ce"][0] > 0 and r["kl"][0] >= 0 for r in report["rows"])
    assert "| positions: assistant |" in done.stdout
