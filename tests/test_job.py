"""End to end on a real local Ray with 2 teacher actors: every planned sequence exactly once, targets equal the
teacher computed directly, a rerun does no work, a different fingerprint is refused."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import stdlib_texts, tiny_job_config, write_text_corpus

from kdcache.capture.job import run_cache_job
from kdcache.cli import main
from kdcache.codec import CodecParams, error_bound
from kdcache.errors import CacheMismatchError, ConfigError
from kdcache.read.reader import open_cache
from kdcache.tools.info import cache_summary


@pytest.fixture(scope="module")
def job_corpus(tmp_path_factory):
    texts = stdlib_texts(10, max_chars=1200)  # a blank and a one-word document in a.jsonl
    return write_text_corpus(tmp_path_factory.mktemp("corpus"), [[*texts[:5], "   ", "tiny"], texts[5:]])


def job_config(teacher, corpus, out, *extra):
    return tiny_job_config(teacher, corpus, out, "targets.temperatures=[1.0, 2.0]", *extra)


def expected_windows(teacher, corpus, max_length):
    """Independently tokenize and window the corpus: {seq_id: input_ids}."""
    from transformers import AutoTokenizer

    from kdcache.capture.sources import make_seq_id

    tok = AutoTokenizer.from_pretrained(teacher)
    out = {}
    for path in sorted(corpus.glob("*.jsonl")):
        offset = 0
        for line in path.read_bytes().splitlines(keepends=True):
            text = json.loads(line)["text"]
            if text.strip():
                ids = tok(text)["input_ids"] + [tok.eos_token_id]
                for w, start in enumerate(range(0, len(ids), max_length)):
                    window = ids[start : start + max_length]
                    if len(window) >= 2:
                        out[make_seq_id(str(path), f"b{offset}", w)] = window
            offset += len(line)
    return out


@pytest.fixture(scope="module")
def finished_cache(ray_session, tiny_teacher, job_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    cfg = job_config(tiny_teacher, job_corpus, out)
    manifest = run_cache_job(cfg)
    return cfg, manifest, out


def test_every_planned_sequence_exactly_once(finished_cache, tiny_teacher, job_corpus):
    cfg, manifest, out = finished_cache
    assert manifest["complete"] and manifest["stats"]["num_units"] > 2  # several units over 2 actors
    cache = open_cache(str(out))
    seqs = list(cache.iter_sequences())
    counts = Counter(int(s["seq_id"]) for s in seqs)
    assert max(counts.values()) == 1
    expected = expected_windows(tiny_teacher, job_corpus, cfg.data.max_length)
    assert set(counts) == set(expected)
    for s in seqs:
        assert s["input_ids"].tolist() == expected[int(s["seq_id"])]
    assert manifest["stats"]["num_sequences"] == len(seqs)
    assert manifest["stats"]["num_tokens"] == sum(len(v) for v in expected.values())
    assert manifest["stats"]["empty_documents"] == 1
    assert 0.5 < manifest["stats"]["real_token_fraction"] <= 1.0


def test_cached_targets_match_the_teacher_computed_directly(finished_cache, tiny_teacher):
    from transformers import AutoModelForCausalLM

    _, _, out = finished_cache
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    codec = CodecParams()
    cache = open_cache(str(out))
    for s in list(cache.iter_sequences())[:6]:
        with torch.no_grad():
            logits = model(torch.as_tensor(s["input_ids"], dtype=torch.long)[None]).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        top = torch.topk(logp, 8, dim=-1)
        ids_ref = np.sort(top.indices.numpy(), axis=1)
        np.testing.assert_array_equal(s["target_ids"], ids_ref)
        lp_ref = np.take_along_axis(logp.numpy(), s["target_ids"], axis=1)
        want = np.maximum(lp_ref, codec.logprob_min)
        assert (np.abs(s["target_logprobs"] - want) <= error_bound(want, codec) + 1e-4).all()
        tail_ref = np.log1p(-np.exp(lp_ref).sum(1))
        np.testing.assert_allclose(s["tail_logprob"], tail_ref, atol=1e-4, rtol=1e-3)  # float16 tails
        lz2 = torch.logsumexp(logits / 2.0, -1).numpy()
        np.testing.assert_allclose(s["log_normalizers"][:, 1], lz2, rtol=1e-5, atol=1e-4)
        ent = -(logp.exp() * logp).sum(-1).numpy()
        np.testing.assert_allclose(s["entropy"], ent, atol=1e-4, rtol=1e-3)  # float16


def test_rerun_does_no_work_and_other_fingerprint_is_refused(finished_cache, tiny_teacher, job_corpus, monkeypatch):
    cfg, manifest, out = finished_cache
    import kdcache.capture.job as job

    def boom(*a, **k):
        raise AssertionError("a rerun of a complete cache must not schedule any unit")

    monkeypatch.setattr(job, "_run_units", boom)
    assert run_cache_job(cfg) == manifest
    with pytest.raises(CacheMismatchError, match=r"targets\.k: cache has 8, this job has 4"):
        run_cache_job(job_config(tiny_teacher, job_corpus, out, "targets.k=4"))


def test_resume_after_partial_run_skips_committed_units(
    ray_session, tiny_teacher, job_corpus, tmp_path, finished_cache
):
    """Simulate a crash: keep some commit records and shards, drop index.json; the rerun computes only the rest."""
    import shutil

    _, manifest, out = finished_cache
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / "index.json").unlink()
    dropped = manifest["units"][1:]
    for unit in dropped:
        (partial / "commits" / f"{unit['unit_id']}.json").unlink()
        (partial / unit["path"]).unlink()
    assert cache_summary(str(partial))["complete"] is False
    resumed = run_cache_job(job_config(tiny_teacher, job_corpus, partial))
    assert resumed["stats"]["last_run"]["units"] == len(dropped)
    a = {int(s["seq_id"]): s for s in open_cache(str(out)).iter_sequences()}
    b = {int(s["seq_id"]): s for s in open_cache(str(partial)).iter_sequences()}
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key]["target_ids"], b[key]["target_ids"])
        np.testing.assert_array_equal(a[key]["target_logprobs"], b[key]["target_logprobs"])


def test_cache_is_plain_parquet_and_json(finished_cache):
    """pyarrow alone reads the shards; the manifest is JSON with relative paths; no pickle anywhere."""
    _, manifest, out = finished_cache
    index = json.loads((out / "index.json").read_text())
    total, schemas = 0, set()
    for unit in index["units"]:
        path = out / unit["path"]
        assert not unit["path"].startswith("/") and path.stat().st_size == unit["bytes"]
        table = pq.read_table(path)
        assert {"seq_id", "input_id", "target_gaps_p0_0", "target_codes_p0", "tail_logprob_0", "entropy"} <= set(
            table.column_names
        )
        assert unit["num_target_tokens"] == unit["num_tokens"]  # the worker stores a target at every position
        schemas.add(tuple(table.column_names))
        total += table.num_rows
        assert b"pickle" not in path.read_bytes()
    assert len(schemas) == 1  # gap planes follow the vocabulary: one schema for every shard
    assert total == manifest["stats"]["num_tokens"]


def test_info_cli_json(finished_cache, capsys):
    _, manifest, out = finished_cache
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("num_sequences", "num_tokens", "total_bytes", "k", "format", "complete", "fingerprint"):
        assert key in info
    assert info["k"] == 8 and info["complete"] is True and info["format"] == "parquet"
    assert info["num_tokens"] == manifest["stats"]["num_tokens"] == info["num_target_tokens"]
    assert info["target_token_fraction"] == 1.0
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bytes/token" in printed and "trained-token fraction 1.000" in printed


def test_k_larger_than_vocab_fails_before_any_work(tiny_teacher, job_corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"targets\.k"):
        run_cache_job(job_config(tiny_teacher, job_corpus, tmp_path / "x", "targets.k=100000"))
    assert not (tmp_path / "x").exists()


def test_telemetry_in_manifest_matches_the_cached_tokens(finished_cache):
    _, manifest, out = finished_cache
    seqs = list(open_cache(str(out)).iter_sequences())
    entropy = np.concatenate([s["entropy"] for s in seqs])
    mass = np.concatenate([1 - np.exp(s["tail_logprob"].astype(np.float64)) for s in seqs])
    tel = manifest["stats"]["telemetry"]
    assert tel["entropy"]["count"] == len(entropy)
    assert abs(tel["entropy"]["mean"] - entropy.mean()) < 1e-4
    assert abs(tel["captured_mass"]["mean"] - mass.mean()) < 1e-4
    assert all(u["timing_s"]["forward"] > 0 for u in manifest["units"] if u["num_tokens"])
    assert all("telemetry" not in u and isinstance(u["crc32"], int) for u in manifest["units"])
