"""bench/reader.py on a tiny cache runs in seconds, every measurement counts the same tokens, and the baseline is a
real scan of the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "reader.py"


def test_tiny_reader_bench():
    args = ["--tokens", "4096", "--units", "2", "--seq-len", "64", "-k", "16", "--repeats", "1", "--json"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--breakdown"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["cache"]["tokens"] == 4096 and out["cache"]["units"] == 2
    results = out["results"]
    assert {"raw_read_table", "dataset", "dataset_no_prefetch", "dataset_memory_local_cache"} <= set(results)
    for name, r in results.items():
        assert r["tokens"] == 4096, name  # every reader sees every token once (the raw scan counts rows)
        assert r["best_s"] > 0 and r["best_s"] <= r["median_s"] and r["tokens_per_s_best"] > 0
    assert results["raw_read_table"]["vs_raw_best"] == 1.0
    parts = out["breakdown_ns_per_token"]
    assert all(v > 0 for v in parts.values()) and "crc32 (every read)" in parts and "sha256 (verify --deep)" in parts
