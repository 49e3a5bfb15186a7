"""bench/storage.py --quick runs in seconds and its numbers are sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "storage.py"


def test_quick_storage_bench(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| source | k | B/token |" in proc.stdout and "Id codings alone" in proc.stdout
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert rows and {r["format"] for r in rows} == {"parquet", "zarr"}
    assert {r["logprobs"] for r in rows} == {"u8", "u16", "f32"}
    for r in rows:
        for key in ("bytes_per_token", "bytes_per_entry", "encode_tok_s", "decode_tok_s", "floor_bytes_per_entry"):
            assert r[key] > 0, (key, r)
        assert r["raw_int64_f32"] == 12.0  # int64 + float32 per entry, uncompressed
        assert r["bytes_per_entry"] < r["raw_int64_f32"] and r["u32_f16_zstd"] < r["raw_int64_f32"]
        assert 0 <= r["kl_head"] < (2e-4 if r["logprobs"] == "u8" else 1e-7)
        if r["format"] == "parquet":
            assert r["codes_bytes_per_entry"] > 0 and r["side_bytes_per_token"] > 0
            assert r["ids_bytes_per_entry"] < r["bytes_per_entry"]
            if r["logprobs"] == "u8":  # ids + codes against the baseline's ids + float16 log-probs
                assert r["ids_bytes_per_entry"] + r["codes_bytes_per_entry"] < r["u32_f16_zstd"]
            if r["source"].startswith("uniform"):  # uniform k-subsets: no coder beats log2 C(V, k)
                assert r["floor_bytes_per_entry"] < r["ids_bytes_per_entry"] < 1.3 * r["floor_bytes_per_entry"]
    for coding in results["ids"]:
        if coding["source"].startswith("uniform"):
            measured = [v for key, v in coding.items() if key not in ("source", "k", "floor")]
            assert min(measured) > coding["floor"]
