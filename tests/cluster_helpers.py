"""Helpers of the cluster-grade tests (test_faults, test_s3, test_submit): reading a cache back and comparing it with
a clean run, and a real multi-node Ray cluster on this machine made of `ray start --block` processes, one per node.

    assert_same_sequences(read_back(uri), clean)       # every sequence exactly once, same targets
    assert_no_stray_shards(uri, manifest)              # only the shards the manifest names remain
    kill_driver_after_commits(cfg, tmp_path, store, faults=[...], commits=2)   # a `kdcache cache` driver SIGKILLed

    with LocalRayCluster(env={...}) as cluster:       # head node, 1 CPU, no dashboard
        cluster.add_node(num_cpus=1)                   # a second "machine"
        subprocess.run([... driver ...], env=cluster.client_env())   # drivers connect to cluster.address
        cluster.running_on(1, "TeacherActor.process")  # is that node's actor busy with a unit?
        cluster.kill_node(1)                           # SIGKILL that node's raylet and everything it started

Each node runs in its own process group with a private temp dir (so `ray.init()` elsewhere never finds it) and
its own ports (a default port held by another Ray on the machine would leave the job agent dead), and
teardown kills exactly those groups, never other Ray processes on the machine (no `ray stop`). Token auth is set
explicitly (a fresh token per cluster) so clients do not depend on ~/.ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kdcache.read.reader import open_cache
from kdcache.store import Store

__all__ = ["LocalRayCluster", "assert_no_stray_shards", "assert_same_sequences", "free_port", "read_back"]

RAY = str(Path(sys.executable).parent / "ray")


def read_back(uri: str, storage_options: dict | None = None) -> dict[int, dict]:
    """Every sequence of a cache by seq_id (through `open_cache(uri).iter_sequences()`); fails on a duplicate."""
    out: dict[int, dict] = {}
    for seq in open_cache(uri, storage_options).iter_sequences():
        key = int(seq["seq_id"])
        assert key not in out, f"sequence {key} appears twice"
        out[key] = seq
    return out


def assert_same_sequences(got: dict[int, dict], want: dict[int, dict]) -> None:
    """The same sequences with the same inputs and targets as a clean run."""
    assert got.keys() == want.keys()
    for key, seq in want.items():
        for field in ("input_ids", "target_ids", "target_logprobs", "tail_logprob", "log_normalizers"):
            np.testing.assert_array_equal(got[key][field], seq[field], err_msg=f"{field} of sequence {key}")


def assert_no_stray_shards(uri: str, manifest: dict, storage_options: dict | None = None) -> None:
    """Only the shards the manifest names remain: losers' and dead writers' objects are gone."""
    names = Store(uri, storage_options).list_names("shards")
    assert sorted(names) == sorted(u["path"].split("/", 1)[1] for u in manifest["units"])


def kill_driver_after_commits(
    config: Any,
    workdir: Path,
    store: Store,
    *,
    faults: list[dict],
    commits: int = 2,
    env: dict[str, str] | None = None,
    timeout_s: float = 180,
) -> int:
    """Run `kdcache -v cache` on `config` (a KDCacheConfig) in a process of its own session, with `faults` injected
    (make one unit stall, so the job is certainly unfinished), and SIGKILL the whole session (the driver, its
    embedded Ray's GCS and raylet; the workers follow) once `store` holds `commits` commit records. Returns the
    commit records left."""
    from kdcache.capture.actors import FAULTS_ENV

    (workdir / "job.yaml").write_text(yaml.safe_dump(config.to_dict()))
    (workdir / "faults.json").write_text(json.dumps(faults))
    cmd = [sys.executable, "-m", "kdcache.cli", "-v", "cache", str(workdir / "job.yaml")]
    env = {**os.environ, **(env or {}), FAULTS_ENV: str(workdir / "faults.json")}
    with open(workdir / "driver.log", "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while len(store.list_names("commits")) < commits:
            assert driver.poll() is None and time.monotonic() < deadline, (workdir / "driver.log").read_text()
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    return len(store.list_names("commits"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """Args: env: extra environment of every node (their actors inherit it); dashboard: start the job server."""

    def __init__(self, *, env: dict[str, str] | None = None, num_cpus: int = 1, dashboard: bool = False):
        self.tmp = tempfile.mkdtemp(prefix="kdc-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        self.token = secrets.token_hex(16)
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "RAY_AUTH_TOKEN_PATH"
        }
        self.env |= {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_health_check_period_ms": "1000",  # notice a lost node in seconds, not the default ~30 s
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_timeout_ms": "1000",
            **(env or {}),
        }
        self.nodes: list[subprocess.Popen] = []
        self.port = free_port()
        self.dashboard_port = free_port() if dashboard else None
        args = [f"--port={self.port}", f"--temp-dir={self.tmp}", "--head", f"--ray-client-server-port={free_port()}"]
        if dashboard:
            args += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ]
        else:
            args += ["--include-dashboard=false"]
        self._start_node(args, num_cpus)

    @property
    def address(self) -> str:
        """The GCS address drivers pass to `ray.init(address=...)`."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver or client process of this cluster."""
        return {**self.env, **extra}

    def add_node(self, num_cpus: int = 1) -> int:
        """Start another node; returns its index (the head is 0)."""
        self._start_node([f"--address={self.address}"], num_cpus)
        return len(self.nodes) - 1

    def running_on(self, index: int, task: str) -> bool:
        """Whether a worker process of node `index` is executing `task` (Ray titles it ``ray::Class.method``)."""
        import psutil

        try:
            procs = psutil.Process(self.nodes[index].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        for proc in procs:
            try:
                if task in " ".join(proc.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    def kill_node(self, index: int) -> None:
        """SIGKILL a node's process group (its raylet, agents; its workers exit when the raylet dies)."""
        proc = self.nodes[index]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def shutdown(self) -> None:
        for index in reversed(range(len(self.nodes))):
            try:
                self.kill_node(index)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _start_node(self, args: list[str], num_cpus: int, timeout_s: float = 90.0) -> None:
        log_path = Path(self.tmp) / f"node{len(self.nodes)}.log"
        cmd = [RAY, "start", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0", "--node-ip-address=127.0.0.1"]
        cmd += ["--object-store-memory=100000000", "--disable-usage-stats", *args]
        cmd += [f"--dashboard-agent-listen-port={free_port()}"]  # the default (52365) may be taken by another Ray
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.nodes.append(proc)
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                output = log_path.read_text()[-3000:]
                self.shutdown()
                raise RuntimeError(f"ray start failed: {' '.join(cmd)}\n{output}")
            time.sleep(0.2)
