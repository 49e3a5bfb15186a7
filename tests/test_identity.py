"""A cache's identity is content, not the spelling of a path (issue 12, items 5 and 11).

- The teacher: the same folder as a relative or absolute path, or copied elsewhere, is the same teacher; new weights
  saved into the same folder (same file names and sizes) are another. File hashes are cached outside the folder.
- Hub ids: the resolved commit hash, not the name or revision spelling.
- The input files: absolute URL + size, so a job resumed from another working directory resumes.
- Claims: a job that fails before planning claims nothing; a claim with no committed unit is taken over by the next
  job; jobs racing on one URI never mix fingerprints in one manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import stdlib_texts, tiny_job_config, write_text_corpus

from kdcache.capture.job import compute_fingerprint, run_cache_job
from kdcache.capture.plan import plan_units
from kdcache.cli import main
from kdcache.errors import CacheMismatchError
from kdcache.identity import (
    check_claim,
    claim_fingerprint,
    file_sha256,
    fingerprint_inputs,
    fingerprint_of,
    weights_fingerprint,
)
from kdcache.manifest import FINGERPRINT_KEY, commit_key, dumps
from kdcache.store import Store


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "hash-cache" / "file-hashes.json"
    monkeypatch.setenv("KDCACHE_HASH_CACHE", str(path))
    return path


def _rewrite_weights_in_place(folder: Path) -> None:
    """Save other weights into the same file: same name, same size (same shapes and dtype), other bytes."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    size = path.stat().st_size
    tensors = {name: t + 0.5 for name, t in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    assert path.stat().st_size == size


def test_weights_fingerprint_is_the_content_of_the_weights(tiny_teacher, tmp_path, hash_cache, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_teacher)
    original = weights_fingerprint(str(tiny_teacher), config)
    assert len(original) == 64

    # another spelling of the same folder, and a copy at another place: the same teacher
    monkeypatch.chdir(tiny_teacher.parent)
    assert weights_fingerprint(tiny_teacher.name, config) == original
    assert weights_fingerprint(f"./{tiny_teacher.name}/", config) == original
    copy = tmp_path / "elsewhere" / "teacher-copy"
    shutil.copytree(tiny_teacher, copy)
    assert weights_fingerprint(str(copy), config) == original

    # new weights saved in place (same names, same sizes): another teacher
    before = sorted(p.name for p in copy.iterdir())
    _rewrite_weights_in_place(copy)
    assert weights_fingerprint(str(copy), config) != original
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing written into the model folder
    assert hash_cache.is_file()  # the hashes live in the cache file instead
    entries = json.loads(hash_cache.read_text())
    assert str((copy / "model.safetensors").resolve()) in entries


def test_file_hashes_are_cached_by_path_size_and_times(tmp_path, monkeypatch):
    import hashlib

    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: calls.append(name) or real(f, name))
    first = file_sha256(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() and len(calls) == 1
    assert file_sha256(str(path)) == first and len(calls) == 1  # a cache hit: not read again
    st = path.stat()
    path.write_bytes(b"b" * 1000)  # same size; the old mtime put back, as cp -p / rsync -t would
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 2  # ctime changed


def test_a_corrupt_or_oversized_hash_cache_is_ignored(tmp_path, hash_cache):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x")
    hash_cache.parent.mkdir(parents=True)
    hash_cache.write_text("{not json")
    assert file_sha256(path) == __import__("hashlib").sha256(b"x").hexdigest()
    assert json.loads(hash_cache.read_text())  # rewritten whole


def test_hub_teacher_is_its_resolved_commit(tiny_job_cfg_factory):
    cfg = tiny_job_cfg_factory("teacher.model=org/model", "teacher.revision=main")
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert weights_fingerprint("org/model", SimpleNamespace(_commit_hash=commit)) == commit
    info = {"padded_vocab_size": 320, "weights_fingerprint": commit}
    tok = {"hash": "h", "vocab_size": 256}
    files = [("/data/a.jsonl", 10)]
    by_branch = fingerprint_inputs(cfg, info, tok, files)
    by_commit = fingerprint_inputs(
        tiny_job_cfg_factory("teacher.model=org/model", f"teacher.revision={commit}"), info, tok, files
    )
    assert fingerprint_of(by_branch) == fingerprint_of(by_commit)  # "main" and its commit: the same teacher
    assert "model" not in by_branch["teacher"] and "revision" not in by_branch["teacher"]
    unresolved = fingerprint_inputs(cfg, {**info, "weights_fingerprint": None}, tok, files)
    assert unresolved["teacher"]["model"] == "org/model" and unresolved["teacher"]["revision"] == "main"


@pytest.fixture
def tiny_job_cfg_factory(tiny_teacher, tmp_path):
    corpus = write_text_corpus(tmp_path / "data", [stdlib_texts(2, max_chars=300)])

    def make(*extra):
        return tiny_job_config(tiny_teacher, corpus, tmp_path / "out", *extra)

    return make


def test_fingerprint_and_units_ignore_how_paths_are_spelled(tiny_teacher, tmp_path, monkeypatch):
    corpus = write_text_corpus(tmp_path / "data", [stdlib_texts(3, max_chars=400), stdlib_texts(2, max_chars=200)])
    absolute = tiny_job_config(tiny_teacher, corpus, tmp_path / "out")
    inputs = compute_fingerprint(absolute)
    units = plan_units(absolute.data.source, "jsonl", unit_bytes=absolute.data.unit_bytes)

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # another working directory, relative paths, the tokenizer named
    teacher = os.path.relpath(tiny_teacher, tmp_path / "elsewhere")
    relative = tiny_job_config(
        Path(teacher),
        Path("../data"),
        "../out",
        f"data.tokenizer={teacher}/",
        "data.source=[../data/a.jsonl, ../data/b.jsonl]",
    )
    assert relative.data.source != absolute.data.source and relative.teacher.model != absolute.teacher.model
    assert compute_fingerprint(relative) == inputs
    assert [u.unit_id for u in plan_units(relative.data.source, "jsonl", unit_bytes=1500)] == [
        u.unit_id for u in units
    ]
    # ... but other files are other inputs
    (corpus / "b.jsonl").write_text((corpus / "b.jsonl").read_text() + '{"text": "more"}\n')
    changed = compute_fingerprint(relative)
    assert changed["data"]["bytes"] > inputs["data"]["bytes"] and changed["data"] != inputs["data"]


def test_a_job_that_fails_before_planning_claims_nothing(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = tiny_job_config(tiny_teacher, tmp_path / "nothing-here", out)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        run_cache_job(cfg)
    assert not (out / FINGERPRINT_KEY).exists()
    # the Parquet footer is read while planning: a bad one claims nothing either
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"not parquet")
    bad = tiny_job_config(tiny_teacher, tmp_path / "bad", out, "data.format=parquet", f"data.source={tmp_path}/bad")
    with pytest.raises(Exception, match="not a readable Parquet file"):
        run_cache_job(bad)
    assert not (out / FINGERPRINT_KEY).exists()


def test_a_claim_with_no_committed_unit_is_taken_over(tmp_path):
    store = Store(str(tmp_path / "c"))
    claim_fingerprint(store, "a" * 64, {"targets": {"k": 8}})
    claim_fingerprint(store, "b" * 64, {"targets": {"k": 4}})  # the first job committed nothing
    assert json.loads(store.read_bytes(FINGERPRINT_KEY))["fingerprint"] == "b" * 64
    with pytest.raises(CacheMismatchError, match="took over"):
        check_claim(store, "a" * 64)  # the first job, still running, finds out before writing index.json
    store.create_exclusive(commit_key("u1"), dumps({"unit_id": "u1", "fingerprint": "b" * 64}))
    with pytest.raises(CacheMismatchError, match=r"1 units committed.*targets\.k: cache has 4, this job has 2"):
        claim_fingerprint(store, "c" * 64, {"targets": {"k": 2}})
    claim_fingerprint(store, "b" * 64, {"targets": {"k": 4}})  # its own job resumes
    check_claim(store, "b" * 64)


def test_a_worker_never_adopts_another_fingerprints_commit(tiny_teacher, tmp_path):
    """Two jobs with different fingerprints on one URI: the second to commit a unit fails, naming the race."""
    from kdcache.capture.worker import UnitWorker, WorkerSettings

    corpus = write_text_corpus(tmp_path / "data", [stdlib_texts(1, max_chars=300)])
    cfg = tiny_job_config(tiny_teacher, corpus, tmp_path / "out")
    unit = plan_units(cfg.data.source, "jsonl", unit_bytes=cfg.data.unit_bytes)[0].to_dict()
    theirs = UnitWorker(WorkerSettings.from_config(cfg, "x" * 64), device="cpu")
    assert theirs.process(unit)["fingerprint"] == "x" * 64
    ours = UnitWorker(WorkerSettings.from_config(cfg, "y" * 64), device="cpu")
    with pytest.raises(CacheMismatchError, match="another fingerprint"):
        ours.process(unit)
    assert len(list((tmp_path / "out" / "shards").iterdir())) == 1  # the loser deleted its shard


def test_rerun_from_another_directory_resumes_and_new_weights_are_refused(
    ray_session, tiny_teacher, tmp_path, monkeypatch, capsys
):
    """The field trial: a crashed job resumed from another working directory (relative paths) computes only the
    missing units; a rerun after new weights were saved into the teacher's folder is refused, naming the weights."""
    teacher = tmp_path / "models" / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    corpus = write_text_corpus(tmp_path / "data", [stdlib_texts(4, max_chars=900)])
    out = tmp_path / "out"
    first = run_cache_job(tiny_job_config(teacher, corpus, out, "cluster.num_actors=1"))
    assert first["stats"]["num_units"] >= 2
    (out / "index.json").unlink()  # "crash": one unit's commit and the manifest are missing
    dropped = first["units"][-1]
    (out / "commits" / f"{dropped['unit_id']}.json").unlink()
    (out / dropped["path"]).unlink()

    monkeypatch.chdir(tmp_path / "models")
    resumed = run_cache_job(
        tiny_job_config(Path("teacher"), Path("../data"), "../out", "cluster.num_actors=1", "teacher.revision=main")
    )
    assert resumed["complete"] and resumed["fingerprint"] == first["fingerprint"]
    assert resumed["stats"]["last_run"]["units"] == 1  # nothing redone but the missing unit
    assert [u["unit_id"] for u in resumed["units"]] == [u["unit_id"] for u in first["units"]]

    (out / "index.json").unlink()
    _rewrite_weights_in_place(teacher)
    config = tmp_path / "job.yaml"
    config.write_text(
        f"teacher: {{model: {teacher}}}\ndata: {{source: '{corpus}/*.jsonl', max_length: 96, unit_bytes: 1500}}\n"
        f"targets: {{k: 8}}\noutput: {{uri: {out}}}\ncluster: {{num_actors: 1, batch_tokens: 512, progress: false}}\n"
    )
    assert main(["cache", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache: error:") and "teacher.weights_fingerprint" in err and "Traceback" not in err
    assert not (out / "index.json").exists()
