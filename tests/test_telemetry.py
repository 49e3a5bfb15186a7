"""Telemetry summaries merge exactly and describe the right quantities."""

from __future__ import annotations

import numpy as np

from kdcache.telemetry import captured_mass, describe, merge_summaries, summarize_tokens


def test_merged_summary_equals_summary_of_all_tokens():
    rng = np.random.default_rng(0)
    ent = rng.gamma(2.0, 1.0, size=1000)
    mass = rng.uniform(0, 1, size=1000)
    whole = summarize_tokens(ent, mass)
    parts = merge_summaries([summarize_tokens(ent[:300], mass[:300]), None, summarize_tokens(ent[300:], mass[300:])])
    assert parts["entropy"]["counts"] == whole["entropy"]["counts"]
    d = describe(parts)
    assert abs(d["entropy"]["mean"] - ent.mean()) < 1e-9
    assert abs(d["entropy"]["std"] - ent.std()) < 1e-6
    assert abs(d["entropy"]["p50"] - np.median(ent)) < 0.3  # within a bin
    assert abs(d["captured_mass"]["p90"] - np.quantile(mass, 0.9)) < 0.03
    assert sum(d["captured_mass"]["counts"]) == 1000


def test_captured_mass_sums_head_and_samples():
    head = np.log(np.array([[0.5, 0.25]]))
    samples = np.log(np.array([[0.125, 0.0]]))
    assert np.allclose(captured_mass(head, samples), [0.875])
    assert np.allclose(captured_mass(np.zeros((1, 0)), samples), [0.125])
    assert describe(None) is None and merge_summaries([None]) is None


def test_manifest_merges_unit_telemetry_and_leaves_it_in_the_commit_records():
    from kdcache.manifest import build_manifest

    rng = np.random.default_rng(1)
    units = []
    for u in range(3):
        ent, mass = rng.gamma(2.0, 1.0, size=100), rng.uniform(0, 1, size=100)
        units.append(
            {"unit_id": f"u{u}", "path": f"shards/u{u}-a.parquet", "bytes": 10, "sha256": "0" * 64}
            | {"num_sequences": 1, "num_tokens": 100, "telemetry": summarize_tokens(ent, mass)}
        )
    manifest = build_manifest(
        fingerprint="f", fingerprint_inputs={}, units=units, shard_format="parquet", shard_suffix=".parquet"
    )
    assert manifest["stats"]["telemetry"]["entropy"]["count"] == 300
    assert all("telemetry" not in u for u in manifest["units"])
    assert all("telemetry" in u for u in units)  # the caller's entries (the commit records' copies) are untouched
