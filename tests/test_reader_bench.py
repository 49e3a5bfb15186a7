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


def test_tiny_cluster_bench():
    """--cluster over the counting HTTP server: partitioned ranks fetch the cache about once, ranks that all read
    every window fetch it about W times, and the shuffle spreads a unit's neighbours further with partitions."""
    args = ["--tokens", "32768", "--units", "32", "--seq-len", "64", "-k", "8", "--cluster", "--json"]
    args += ["--world-sizes", "1,4", "--baseline-ranks", "2", "--batch-size", "4"]
    proc = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout)["cluster"]
    assert set(runs) == {"W=1 partitioned", "W=4 partitioned", "W=4 one_partition"}
    assert runs["W=1 partitioned"]["fetched_over_cache"] == 1.0
    assert 1.0 <= runs["W=4 partitioned"]["fetched_over_cache"] <= 1.15
    assert runs["W=4 one_partition"]["fetched_over_cache"] >= 3.0
    spread, window = runs["W=4 partitioned"], runs["W=4 one_partition"]
    assert spread["neighbour_distance"] > window["neighbour_distance"]
    assert spread["units_per_global_batch"] > window["units_per_global_batch"]
    assert all(r["rank_tokens_per_s_median"] > 0 for r in runs.values())
