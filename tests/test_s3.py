"""Exactly-once commits on an object store: a local moto S3 server (a real HTTP server on loopback, not the mock
decorators), s3fs, a real local Ray. Exclusive create honours If-None-Match (and a server that ignores it is
detected); a full job writes to s3:// with its storage options passed to the actors and no credential in any
object; a duplicate commit loses and deletes its shard; a writer killed between shard and commit leaves nothing a
reader sees; a driver SIGKILLed mid-job, rerun, gives the same bytes as a clean run. Students read an s3:// cache
through DataLoader workers started by fork and by spawn. Errors: wrong credentials and a missing bucket fail naming
the URI and bucket; a persistent outage fails a write after `output.store_retries` + 1 HTTP attempts in all (the
client library's own retries are off), within seconds."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from cluster_helpers import assert_no_stray_shards, assert_same_sequences, kill_driver_after_commits, read_back
from conftest import stdlib_texts, tiny_job_config, write_jsonl
from fake_cache import write_fake_cache
from torch.utils.data import DataLoader

from kdcache.capture.job import run_cache_job
from kdcache.capture.plan import plan_units
from kdcache.cli import main
from kdcache.errors import KdcacheError, StoreError
from kdcache.read.dataset import KDCacheDataset
from kdcache.read.reader import open_cache
from kdcache.store import Store

KEY_ID = "AKIAKDCACHETEST00001"
SECRET = "kdcache-test-secret-do-not-leak-0123456789"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket `kdcache`; yields the storage options that reach it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="dummy", AWS_SECRET_ACCESS_KEY="dummy", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": KEY_ID,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    Store("s3://kdcache", options).fs.call_s3("create_bucket", Bucket="kdcache")
    yield options
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def s3_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s3-corpus")
    texts = stdlib_texts(10, max_chars=1000)
    write_jsonl(root / "a.jsonl", [{"text": t} for t in texts[:5]])
    write_jsonl(root / "b.jsonl", [{"text": t} for t in texts[5:]])
    return root


def s3_config(teacher, corpus, uri, options, *extra):
    cfg = tiny_job_config(teacher, corpus, uri, *extra)
    cfg.output.storage_options = options
    return cfg


@pytest.fixture(scope="module")
def s3_clean(ray_session, s3, tiny_teacher, s3_corpus):
    uri = "s3://kdcache/clean"
    manifest = run_cache_job(s3_config(tiny_teacher, s3_corpus, uri, s3))
    return manifest, read_back(uri, s3)


def racer_believes_it_won_after_losing(store, key: str) -> bool:
    """A create onto an existing key must report a loss (sequential: no race, deterministic even on moto)."""
    return Store(store.uri, store.storage_options).create_exclusive(key, b"a late writer")


def test_conditional_put_is_honoured_one_writer_wins_a_race(s3):
    store = Store("s3://kdcache/race", s3)
    assert store.conditional_put_works() and store.exclusive_create_is_atomic
    for trial in range(5):
        results: list[tuple[bool, int]] = []
        barrier = threading.Barrier(8)

        def attempt(i, trial=trial, barrier=barrier, results=results):
            racer = Store("s3://kdcache/race", s3)
            barrier.wait()
            results.append((racer.create_exclusive(f"commits/u{trial}.json", f"writer {i}".encode()), i))

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for won, i in results if won]
        # moto checks If-None-Match and stores the object without a lock, so under heavy load two racing PUTs can
        # both pass (seen once in CI on 2 busy cores); real S3 makes the check atomic. What must hold everywhere:
        # at least one winner, the stored record is a winner's, and a loser never believes it won.
        assert winners
        stored = store.read_bytes(f"commits/u{trial}.json")
        assert stored in {f"writer {i}".encode() for i in winners}
        assert not racer_believes_it_won_after_losing(store, f"commits/u{trial}.json")
    assert store.list_names("commits") == [f"u{t}.json" for t in range(5)]
    assert store.list_names("_kdcache_probe") == []  # the capability probe cleans up after itself


class IgnoresIfNoneMatch:
    """An S3-compatible server that ignores If-None-Match: every PUT overwrites (older MinIO, some gateways)."""

    def __init__(self, fs):
        self.fs = fs

    def pipe_file(self, path, data, mode="overwrite", **kwargs):
        return self.fs.pipe_file(path, data, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_a_server_ignoring_if_none_match_is_detected_and_falls_back(s3, caplog):
    s3fs_client = Store("s3://kdcache", s3).fs
    s3fs_client.call_s3("create_bucket", Bucket="lax-kdcache")
    store = Store("s3://lax-kdcache/cache", s3)
    store.fs = IgnoresIfNoneMatch(store.fs)
    with caplog.at_level(logging.WARNING, logger="kdcache.store"):
        assert not store.exclusive_create_is_atomic
    assert "ignores If-None-Match" in caplog.text
    assert store.create_exclusive("commits/u.json", b"first")
    assert not store.create_exclusive("commits/u.json", b"second")  # check-write-read-back still sees the first
    assert store.create_exclusive("commits/u.json", b"first")  # a retry of the winner's own request
    assert store.read_bytes("commits/u.json") == b"first"


@pytest.mark.slow
def test_job_on_s3_every_sequence_once_and_no_credentials_anywhere(s3_clean, s3, tiny_teacher, s3_corpus):
    manifest, seqs = s3_clean
    assert manifest["complete"] and manifest["stats"]["num_sequences"] == len(seqs) > 10
    last = manifest["stats"]["last_run"]
    assert last["units"] == manifest["stats"]["num_units"] and last["tokens_per_s"] > 0 and last["num_failures"] == 0
    assert manifest["config"]["output"]["storage_options"] == ["client_kwargs", "key", "secret"]  # names only
    fs = Store("s3://kdcache", s3).fs
    objects = fs.find("kdcache/clean")
    assert any(o.endswith("index.json") for o in objects) and any("/shards/" in o for o in objects)
    for path in objects:  # manifest, fingerprint, commit records, shards (their key-value metadata too)
        data = fs.cat_file(path)
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, path
        assert s3["client_kwargs"]["endpoint_url"].encode() not in data, path


@pytest.fixture(scope="module")
def worker(s3, tiny_teacher, s3_corpus):
    """A UnitWorker (no Ray) writing to s3://kdcache/worker: the commit protocol in isolation."""
    from kdcache.capture.worker import UnitWorker, WorkerSettings

    cfg = s3_config(tiny_teacher, s3_corpus, "s3://kdcache/worker", s3)
    units = plan_units(cfg.data.source, "jsonl", unit_bytes=cfg.data.unit_bytes)
    return UnitWorker(WorkerSettings.from_config(cfg, "0" * 64), device="cpu"), units


def test_a_duplicate_commit_loses_cleanly_and_deletes_its_shard(worker, s3):
    w, units = worker
    first = w.process(units[0].to_dict())
    second = w.process(units[0].to_dict())  # a backup copy or a retry of a unit that did commit
    assert second["duplicate"] is True
    assert (second["path"], second["sha256"]) == (first["path"], first["sha256"])
    names = w.store.list_names("shards")
    assert names == [first["path"].split("/", 1)[1]]  # the loser's object is gone, the winner's intact
    assert json.loads(w.store.read_bytes(f"commits/{units[0].unit_id}.json"))["path"] == first["path"]


class Killed(BaseException):
    """Stands in for SIGKILL between the shard write and the commit."""


def test_a_killed_writer_leaves_nothing_visible_and_a_rerun_completes(worker, s3, s3_clean, tiny_teacher, s3_corpus):
    w, units = worker
    uri = "s3://kdcache/killed-writer"
    w.store = Store(uri, s3)

    def killed(relpath, data):
        raise Killed

    w.store.create_exclusive = killed
    with pytest.raises(Killed):
        w.process(units[1].to_dict())
    assert len(w.store.list_names("shards")) == 1 and w.store.list_names("commits") == []
    with pytest.raises(KdcacheError, match="no manifest"):  # readers see no cache, not a partial one
        open_cache(uri, s3)
    manifest = run_cache_job(s3_config(tiny_teacher, s3_corpus, uri, s3))
    last = manifest["stats"]["last_run"]
    assert last["units"] == manifest["stats"]["num_units"]
    assert last["orphans_deleted"] >= 1  # the killed writer's shard (and any late copy killed at the end)
    assert_no_stray_shards(uri, manifest, s3)
    assert_same_sequences(read_back(uri, s3), s3_clean[1])


@pytest.mark.slow
def test_driver_killed_mid_job_then_rerun_gives_the_clean_run(s3, s3_clean, tiny_teacher, s3_corpus, tmp_path):
    """The driver and its embedded Ray are SIGKILLed with units committed, one stalled and others in flight."""
    uri = "s3://kdcache/killed-driver"
    store = Store(uri, s3)
    cfg = s3_config(tiny_teacher, s3_corpus, uri, s3, "cluster.num_actors=1")
    # unit 3 stalls, so the job is certainly unfinished when we kill it
    committed = kill_driver_after_commits(
        cfg, tmp_path, store, faults=[{"unit_index": 3, "action": "stall", "seconds": 300}], timeout_s=120
    )
    assert not store.exists("index.json") and 2 <= committed < s3_clean[0]["stats"]["num_units"]
    manifest = run_cache_job(s3_config(tiny_teacher, s3_corpus, uri, s3))
    assert manifest["stats"]["last_run"]["units"] == manifest["stats"]["num_units"] - committed
    assert_same_sequences(read_back(uri, s3), s3_clean[1])
    assert [(u["unit_id"], u["sha256"]) for u in manifest["units"]] == [
        (u["unit_id"], u["sha256"]) for u in s3_clean[0]["units"]
    ]  # same config and inputs: the same bytes
    assert_no_stray_shards(uri, manifest, s3)


# ---- students reading an s3:// cache through DataLoader workers (the README's pattern) ----------------------------


@pytest.fixture(scope="module")
def s3_fake_cache(s3, tmp_path_factory) -> str:
    """A small complete cache (fake teacher) copied to s3://kdcache/students."""
    local = tmp_path_factory.mktemp("fake") / "cache"
    write_fake_cache(str(local), num_units=3, seqs_per_unit=[4, 3, 5], k=8, vocab=64)
    remote = Store("s3://kdcache/students", s3)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        remote.write_bytes(path.relative_to(local).as_posix(), path.read_bytes())
    return "s3://kdcache/students"


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers_read_an_s3_cache(s3, s3_fake_cache, start_method):
    """The dataset opens the cache (and its S3 client) in the parent; each worker must open its own."""
    ds = KDCacheDataset(s3_fake_cache, batch_size=2, seed=0, storage_options=s3)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=start_method)
    seen = [i for batch in loader for i in batch["seq_id"].tolist() if i >= 0]
    assert sorted(seen) == sorted({int(s["seq_id"]) for s in open_cache(s3_fake_cache, s3).iter_sequences()})
    assert len(seen) == 12


# ---- errors that retrying cannot fix, and the retry budget of a persistent outage ------------------------------


def test_wrong_credentials_name_the_uri(s3, tmp_path, monkeypatch, capsys):
    from moto.core.authorization import enable_iam_authentication

    wrong = {**s3, "key": "AKIAWRONGWRONGWRONG0", "secret": "wrong"}
    with enable_iam_authentication():  # moto checks signatures against its IAM users from here on
        with pytest.raises(StoreError, match=r"write s3://kdcache/creds/x: access denied .*check the credentials"):
            Store("s3://kdcache/creds", wrong).write_bytes("x", b"1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", wrong["key"])  # `kdcache info` takes credentials from the environment
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong["secret"])
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3["client_kwargs"]["endpoint_url"])
        assert main(["info", "s3://kdcache/students"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache: error: read s3://kdcache/students/index.json: access denied")
    assert "Traceback" not in err


def test_a_missing_bucket_is_named(s3):
    store = Store("s3://no-such-kdcache-bucket/cache", s3)
    with pytest.raises(StoreError, match=r"the bucket 'no-such-kdcache-bucket' does not exist.*create it"):
        assert store.exclusive_create_is_atomic  # a job's first request: the conditional-PUT probe
    with pytest.raises(StoreError, match=r"write s3://no-such-kdcache-bucket/cache/x: the bucket"):
        store.write_bytes("x", b"1")
    with pytest.raises(FileNotFoundError):  # a missing key in an existing bucket stays a missing key
        Store("s3://kdcache/nothing-here", s3).read_bytes("index.json")


class SlowDownServer:
    """An S3 endpoint in a persistent outage: every request gets 503 SlowDown (which botocore and s3fs both
    retry by themselves); counts the requests."""

    def __init__(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers `Expect: 100-continue` (botocore's PUTs wait for it)

            def _refuse(self):
                owner.requests += 1
                owner.methods.append(self.command)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _refuse

            def log_message(self, *args):
                pass

        self.requests = 0
        self.methods: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def options(self) -> dict:
        endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        client = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        return {"key": KEY_ID, "secret": SECRET, "client_kwargs": client}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def outage():
    server = SlowDownServer()
    yield server
    server.close()


def test_a_persistent_outage_fails_a_write_after_the_documented_attempts(outage):
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match=r"write s3://kdcache/down/shards/u\.parquet: failed after 5 attempts"):
        Store("s3://kdcache/down", outage.options()).write_bytes("shards/u.parquet", b"x" * 1000)
    elapsed = time.perf_counter() - t0
    assert outage.requests == 5  # 1 + 4 retries (docs/SCALING.md), not 5 x s3fs's 5 x botocore's 5
    assert 0.2 + 0.4 + 0.8 + 1.6 <= elapsed < 15
    outage.requests = 0
    with pytest.raises(StoreError, match="failed after 2 attempts"):
        Store("s3://kdcache/down", outage.options(), retries=1, base_delay_s=0.01).write_bytes("x", b"1")
    assert outage.requests == 2
    outage.requests = 0  # storage options that ask for botocore's retries get them
    asked = {**outage.options(), "config_kwargs": {"retries": {"total_max_attempts": 2}}}
    with pytest.raises(StoreError, match="failed after 1 attempts"):
        Store("s3://kdcache/down", asked, retries=0).write_bytes("x", b"1")
    assert outage.requests >= 2


def test_cache_command_on_an_outage_stops_after_output_store_retries(
    outage, tiny_teacher, s3_corpus, tmp_path, capsys
):  # noqa: E501
    """The driver's first write (the conditional-PUT probe) meets the outage: `output.store_retries` bounds it."""
    cfg = s3_config(tiny_teacher, s3_corpus, "s3://kdcache/down", outage.options(), "output.store_retries=1")
    cfg.output.store_backoff_s = 0.05
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["cache", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache: error: probe conditional PUT at s3://kdcache/down: failed after 2 attempts")
    assert "Traceback" not in err
    assert outage.methods[-4:] == ["PUT", "DELETE"] * 2  # the probe twice, each with its cleanup ...
    assert len(outage.methods) <= 6  # ... after one look for a complete cache (rerun message), not retried


def test_workers_take_the_store_retry_budget_from_the_config(worker, s3, tiny_teacher, s3_corpus):
    from kdcache.capture.worker import UnitWorker, WorkerSettings

    cfg = s3_config(tiny_teacher, s3_corpus, "s3://kdcache/worker", s3, "output.store_retries=2")
    cfg.output.store_backoff_s = 0.5
    w = UnitWorker(WorkerSettings.from_config(cfg, "0" * 64), device="cpu")
    assert (w.store.retries, w.store.base_delay_s) == (2, 0.5)
