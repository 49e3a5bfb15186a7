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
