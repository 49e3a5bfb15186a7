"""Fault tolerance of the driver with real teacher actors on a real local Ray: an actor SIGKILLed mid-unit, a writer
killed between its shard and its commit, a stalled actor (straggler), transient and persistent store errors, and a
lost node of a 2-node cluster. Every run must end with every sequence exactly once and the same targets as a clean
run. Faults are injected by the actors' test hook (`KDCACHE_TEST_FAULTS`, see kdcache/actors.py). When nothing can
run (actors ask for more than the cluster has; the embedded Ray's raylet is gone) the job fails after
`cluster.actor_start_timeout_s` with a message saying so, instead of waiting forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cluster_helpers import LocalRayCluster, assert_no_stray_shards, assert_same_sequences, read_back
from conftest import stdlib_texts, tiny_job_config, write_text_corpus

from kdcache.capture.actors import FAULTS_ENV
from kdcache.capture.job import run_cache_job
from kdcache.capture.plan import plan_units
from kdcache.capture.scheduler import (
    ACTOR_START_TIMEOUT_CLUSTER_S,
    ACTOR_START_TIMEOUT_EMBEDDED_S,
    actor_start_timeout,
    schedule_units,
)
from kdcache.errors import JobFailed, SourceError, StoreError
from kdcache.store import Store


@pytest.fixture(scope="module")
def fault_corpus(tmp_path_factory) -> Path:
    texts = stdlib_texts(12, max_chars=1000)
    return write_text_corpus(tmp_path_factory.mktemp("fault-corpus"), [texts[:6], texts[6:]])


def fault_config(teacher, corpus, out, *extra):
    return tiny_job_config(teacher, corpus, out, "cluster.max_retries=2", *extra)


@pytest.fixture(scope="module")
def clean(ray_session, tiny_teacher, fault_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "c"
    manifest = run_cache_job(fault_config(tiny_teacher, fault_corpus, out))
    assert manifest["stats"]["num_units"] >= 6 and manifest["stats"]["last_run"]["retries"] == 0
    return read_back(str(out))


def run_with_faults(cfg, faults: list[dict], tmp_path: Path) -> dict:
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(faults))
    return run_cache_job(cfg, actor_options={"runtime_env": {"env_vars": {FAULTS_ENV: str(path)}}})


@pytest.mark.slow
def test_killed_actor_and_killed_writer_are_rerun_on_new_actors(tiny_teacher, fault_corpus, clean, tmp_path):
    out = tmp_path / "c"
    faults = [{"unit_index": 1, "action": "kill"}, {"unit_index": 4, "action": "kill_before_commit"}]
    manifest = run_with_faults(fault_config(tiny_teacher, fault_corpus, out), faults, tmp_path)
    last = manifest["stats"]["last_run"]
    assert last["actors_lost"] == 2 and last["actors_started"] == 4
    assert last["retries"] >= 2 and {f["kind"] for f in last["failures"]} == {"actor_died"}
    assert last["orphans_deleted"] >= 1  # the killed writer's complete shard, never committed
    assert_same_sequences(read_back(str(out)), clean)
    assert_no_stray_shards(str(out), manifest)


@pytest.mark.slow
def test_straggler_gets_a_backup_copy_and_transient_store_errors_are_retried(
    tiny_teacher, fault_corpus, clean, tmp_path
):
    out = tmp_path / "c"
    cfg = fault_config(tiny_teacher, fault_corpus, out)
    cfg.cluster.backup_after_s = 1.0  # config key requested (cluster.backup_after_s); getattr reads it meanwhile
    faults = [
        {"unit_index": 0, "action": "stall", "seconds": 120},
        {"unit_index": 2, "action": "store_errors", "count": 3},
    ]
    t0 = time.perf_counter()
    manifest = run_with_faults(cfg, faults, tmp_path)
    assert time.perf_counter() - t0 < 90  # the job did not wait for the stalled actor
    last = manifest["stats"]["last_run"]
    assert last["backups"] >= 1 and last["backup_wins"] >= 1
    assert last["store_retries"] >= 3 and last["retries"] == 0 and last["num_failures"] == 0
    assert_same_sequences(read_back(str(out)), clean)
    assert_no_stray_shards(str(out), manifest)


@pytest.mark.slow
def test_persistent_store_errors_fail_the_job_naming_the_unit(tiny_teacher, fault_corpus, tmp_path):
    cfg = fault_config(tiny_teacher, fault_corpus, tmp_path / "c", "cluster.max_retries=1")
    unit = plan_units(cfg.data.source, "jsonl", unit_bytes=cfg.data.unit_bytes)[2]
    faults = [{"unit_index": 2, "action": "store_errors", "count": 10_000, "once": False}]
    with pytest.raises(JobFailed) as info:
        run_with_faults(cfg, faults, tmp_path)
    message = str(info.value)
    assert f"unit {unit.unit_id}" in message and "failed 2 times" in message
    assert "StoreError" in message and "failed after 5 attempts" in message and "/shards/" in message
    assert not (tmp_path / "c" / "index.json").exists()


# ---- the store alone: a filesystem that fails N times ---------------------------------------------------------------


class FlakyFS:
    """An fsspec filesystem whose first `failures` writes and reads raise a transient error."""

    def __init__(self, fs, failures: int):
        self.fs, self.failures, self.calls = fs, failures, 0

    def _maybe_fail(self):
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionResetError("connection reset by peer (injected)")

    def pipe_file(self, *args, **kwargs):
        self._maybe_fail()
        return self.fs.pipe_file(*args, **kwargs)

    def cat_file(self, *args, **kwargs):
        self._maybe_fail()
        return self.fs.cat_file(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_transient_store_errors_are_retried_with_backoff_then_fail_naming_the_key(tmp_path, monkeypatch):
    import kdcache.store as store_module

    sleeps: list[float] = []
    monkeypatch.setattr(store_module.time, "sleep", sleeps.append)
    store = Store(f"memory://flaky-{tmp_path.name}", retries=4, base_delay_s=0.2)
    store.fs = FlakyFS(store.fs, failures=3)
    store.write_bytes("shards/u-a.parquet", b"data")
    assert store.read_bytes("shards/u-a.parquet") == b"data"
    assert sleeps == [0.2, 0.4, 0.8] and store.retries_used == 3
    store.fs.failures = 100
    with pytest.raises(
        StoreError, match=r"write memory://flaky-.*/shards/u-b\.parquet: failed after 5 attempts.*reset"
    ):
        store.write_bytes("shards/u-b.parquet", b"data")
    assert sleeps[3:] == [0.2, 0.4, 0.8, 1.6]
    store.fs.failures = 0
    with pytest.raises(FileNotFoundError):  # not transient: no retry
        store.read_bytes("shards/missing")
    assert store.retries_used == 7


def test_a_retried_create_whose_first_try_landed_counts_as_created(tmp_path):
    """A lost response must not read as a lost race: the worker would delete the shard its own commit names."""
    store = Store(str(tmp_path))
    record = b'{"path": "shards/u-attempt1.parquet"}'
    assert store.create_exclusive("commits/u.json", record)
    assert store.create_exclusive("commits/u.json", record)  # the retry of the same request
    assert not store.create_exclusive("commits/u.json", b'{"path": "shards/u-attempt2.parquet"}')
    assert store.read_bytes("commits/u.json") == record


# ---- the scheduling loop with scripted fake actors (no teacher): errors that must fail the job at once ----------


class ScriptedFactory:
    """Fake actors whose process() raises what `script` says for a unit index, else returns a tiny record; each
    asks Ray for `num_cpus` CPUs."""

    def __init__(self, script: dict[int, str], num_cpus: float = 0):
        import ray

        @ray.remote(num_cpus=num_cpus)
        class Scripted:
            def ready(self):
                return {"pid": os.getpid(), "node": "fake"}

            def process(self, unit):
                action = script.get(unit["index"])
                if action == "store_error":
                    raise StoreError(f"write file:///x/shards/{unit['unit_id']}-a.parquet: failed after 5 attempts")
                if action == "source_error":
                    raise SourceError(f"{unit['url']} line 3: invalid JSON")
                return {"unit_id": unit["unit_id"], "num_tokens": 10, "padded_tokens": 12}

        self.actor_class = Scripted
        self.num_cpus = num_cpus

    def describe(self) -> str:
        return f"Scripted(num_cpus={self.num_cpus})"

    def start(self):
        return self.actor_class.remote()

    def stop(self, handle):
        import ray

        ray.kill(handle)


def test_loop_retries_a_failing_unit_then_fails_naming_it(ray_session, fault_corpus):
    units = plan_units(f"{fault_corpus}/*.jsonl", "jsonl", unit_bytes=1500)
    with pytest.raises(
        JobFailed, match=rf"unit {units[1].unit_id} \(.*a.jsonl \[\d+:\d+\]\) failed 3 times.*StoreError"
    ):
        schedule_units(units, ScriptedFactory({1: "store_error"}), num_actors=2, max_retries=2)
    with pytest.raises(JobFailed, match=rf"unit {units[2].unit_id} .*line 3: invalid JSON"):
        schedule_units(units, ScriptedFactory({2: "source_error"}), num_actors=2, max_retries=2)
    stats = schedule_units(units, ScriptedFactory({}), num_actors=3, max_retries=0)
    assert sorted(r["unit_id"] for r in stats.records) == sorted(u.unit_id for u in units)
    assert stats.last_run()["units"] == len(units) and stats.retries == 0


# ---- a lost node of a 2-node cluster (separate `ray start` processes; the driver is a subprocess) ---------------


@pytest.mark.slow
def test_lost_node_the_job_finishes_on_the_rest(tiny_teacher, fault_corpus, clean, tmp_path):
    faults = tmp_path / "faults.json"  # every unit takes >= 1 s, so the node dies with work in flight
    units = plan_units(f"{fault_corpus}/*.jsonl", "jsonl", unit_bytes=1500)
    faults.write_text(
        json.dumps([{"unit_index": u.index, "action": "stall", "seconds": 1, "once": False} for u in units])
    )
    out = tmp_path / "c"
    with LocalRayCluster(env={FAULTS_ENV: str(faults)}) as cluster:
        cluster.add_node(num_cpus=1)  # head and worker have 1 CPU each: one teacher actor per node
        raw = fault_config(tiny_teacher, fault_corpus, out, f"cluster.address={cluster.address}").to_dict()
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
        cmd = [sys.executable, "-m", "kdcache.cli", "-v", "cache", str(tmp_path / "job.yaml")]
        with open(tmp_path / "driver.log", "w") as log:
            driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cluster.client_env())
        try:
            deadline = time.monotonic() + 120  # kill the worker node while its actor is in the middle of a unit
            while not (list((out / "commits").glob("*.json")) and cluster.running_on(1, "TeacherActor.process")):
                assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()
                time.sleep(0.1)
            cluster.kill_node(1)
            rc = driver.wait(timeout=180)
        finally:
            if driver.poll() is None:
                driver.kill()
    log_text = (tmp_path / "driver.log").read_text()
    assert rc == 0, log_text[-5000:]
    manifest = json.loads((out / "index.json").read_text())
    last = manifest["stats"]["last_run"]
    assert last["actors_lost"] >= 1 and last["retries"] >= 1, last
    assert_same_sequences(read_back(str(out)), clean)


# ---- nothing can run: the job fails after cluster.actor_start_timeout_s instead of waiting forever -------------


def test_actors_no_node_can_place_fail_the_job_after_the_start_timeout(ray_session, fault_corpus):
    units = plan_units(f"{fault_corpus}/*.jsonl", "jsonl", unit_bytes=1500)
    t0 = time.perf_counter()
    with pytest.raises(
        JobFailed, match=r"no teacher actor was ready for \d+s \(cluster\.actor_start_timeout_s = 3 s\)"
    ) as info:
        schedule_units(units, ScriptedFactory({}, num_cpus=64), num_actors=2, start_timeout_s=3, tick_s=0.5)
    assert time.perf_counter() - t0 < 40  # 3 s, then the bounded stop of the actors
    assert "each asks for Scripted(num_cpus=64)" in str(info.value) and "CPU 2" in str(info.value)
    assert actor_start_timeout(None, embedded=True) == ACTOR_START_TIMEOUT_EMBEDDED_S < ACTOR_START_TIMEOUT_CLUSTER_S
    assert actor_start_timeout(None, embedded=False) == ACTOR_START_TIMEOUT_CLUSTER_S
    assert actor_start_timeout(42.0, embedded=True) == 42.0


@pytest.mark.slow
def test_embedded_ray_losing_its_raylet_fails_the_job_after_the_start_timeout(tiny_teacher, fault_corpus, tmp_path):
    """The field report: the only node's raylet gone mid-job; the driver logged "no teacher actor is ready" for as
    long as it was let. Now `kdcache cache` ends with one error line after cluster.actor_start_timeout_s."""
    import psutil

    units = plan_units(f"{fault_corpus}/*.jsonl", "jsonl", unit_bytes=1500)
    faults = tmp_path / "faults.json"  # every unit takes >= 1 s: the raylet dies with the job under way
    faults.write_text(
        json.dumps([{"unit_index": u.index, "action": "stall", "seconds": 1, "once": False} for u in units])
    )
    out = tmp_path / "c"
    # 30 s: long enough for the actor's first start on a busy 2-core machine, which the timeout also covers
    cfg = fault_config(tiny_teacher, fault_corpus, out, "cluster.num_actors=1", "cluster.actor_start_timeout_s=30")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "kdcache.cli", "cache", str(tmp_path / "job.yaml")]
    with open(tmp_path / "driver.log", "w") as log:  # its own session: the embedded Ray dies with it at the end
        driver = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, FAULTS_ENV: str(faults)},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not list((out / "commits").glob("*.json")):
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()
            time.sleep(0.2)
        (raylet,) = [p for p in psutil.Process(driver.pid).children(recursive=True) if p.name() == "raylet"]
        for proc in [raylet, *raylet.children(recursive=True)]:  # the node: its raylet and the workers it started
            proc.kill()
        killed = time.monotonic()
        rc = driver.wait(timeout=90)
    finally:
        try:  # the driver's session: it and what its embedded Ray left (a gcs_server without its raylet), only
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        driver.wait(timeout=30)
    log_text = (tmp_path / "driver.log").read_text()
    assert rc == 2, log_text[-3000:]
    assert "kdcache: error: no teacher actor was ready for" in log_text
    assert "(cluster.actor_start_timeout_s = 30 s)" in log_text and "Traceback" not in log_text
    assert time.monotonic() - killed < 30 + 45  # the timeout, then the bounded stop of the actors
    assert not (out / "index.json").exists()
