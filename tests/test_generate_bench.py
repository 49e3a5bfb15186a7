"""`bench/generate.py --quick` runs end to end (a subprocess, as a user runs it): the teacher answers the train and
held-out prompts through the caching job, every student row is trained and measured on the held-out generations, and
the HF engine's throughput is reported per batch size next to the `model.generate` baseline (~40 s on idle cores).

Run: ``python -m pytest tests/test_generate_bench.py -q``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_generate_bench_reports_every_row(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "generate.py"), "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    train = report["caches"]["train"]["provenance"]["generation"]
    assert train["prompts"] == report["train"]["prompts"] == 40 and train["sequences"] == 80
    assert train["generated_tokens"] > 80 and train["generated_tokens_per_s"] > 0
    assert report["caches"]["valid"]["provenance"]["generation"]["sequences"] == report["valid_generations"] == 8
    assert {r["row"] for r in report["results"]} == {
        "(a) generated responses, CE only",
        "(b) generated responses, soft targets",
        "(b') generated responses, soft targets + CE (alpha 0.5)",
        "(c) reference answers, hard labels",
    }
    assert all(r["final"]["ce"] > 0 and r["final"]["kl"] >= 0 for r in report["results"])
    engines = [(r["engine"], r["batch_size"]) for r in report["throughput"]]
    assert engines == [("model.generate (baseline)", 1), ("kdcache HFEngine", 1), ("kdcache HFEngine", 8)]
    assert all(r["tokens_per_s"] > 0 for r in report["throughput"])
    assert "| (c) reference answers, hard labels |" in done.stdout
