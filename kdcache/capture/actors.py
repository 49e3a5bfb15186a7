"""The Ray actor that runs a teacher replica, and the factory the driver starts it with. Ray lives in capture/ (here,
the scheduler, the job and the submission) and in the Ray Train adapter only (tests/test_layout.py checks).

Each `TeacherActor` loads the teacher once, then processes whole work units on request, writing shards straight to
the store; only the small commit record (plus who ran it and how fast) travels back to the driver. The actor logs
one line per unit with its throughput and real-token fraction; Ray forwards it to the driver's log.

Test hooks: when the environment variable `KDCACHE_TEST_FAULTS` names a JSON file, the actor injects the faults it
lists (a stalled unit, a SIGKILL mid-unit or between the shard write and the commit, transient store errors), so
fault tests run the real driver against real actors. Unset, nothing here costs anything.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

import ray

from kdcache.capture.worker import UnitWorker, WorkerSettings

__all__ = ["FAULTS_ENV", "TeacherActor", "TeacherActorFactory", "start_actor"]

log = logging.getLogger("kdcache.actor")
FAULTS_ENV = "KDCACHE_TEST_FAULTS"


@ray.remote
class TeacherActor:
    """A teacher replica.

    Args:
        settings: what it computes and writes. cpu_threads: torch threads on CPU (0: torch's default).
    """

    def __init__(self, settings: WorkerSettings, cpu_threads: int):
        import torch

        _log_to_stderr()
        if cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        self.worker = UnitWorker(settings)
        self.node = ray.get_runtime_context().get_node_id()
        self.units_done = 0
        self.tokens = 0
        self.busy_s = 0.0
        self.generated = 0  # tokens generated (a generated cache) and the seconds that took
        self.generate_s = 0.0

    def ready(self) -> dict[str, Any]:
        """Who and where this actor is (the driver sends work only after this answered: surfaces load errors)."""
        return {"pid": os.getpid(), "node": self.node, "device": str(self.worker.teacher.device)}

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        """Compute, write and commit one unit; the commit record plus pid, node, seconds spent and store retries."""
        t0 = time.perf_counter()
        retries_before = self.worker.store.retries_used
        with _injected_faults(unit, self.worker):
            record = self.worker.process(unit)
        elapsed = time.perf_counter() - t0
        self.units_done += 1
        self.busy_s += elapsed
        self.tokens += record["num_tokens"]
        if not record.get("duplicate"):
            log.info(
                "unit %s: %d tokens in %.2fs (%.0f tok/s), real-token fraction %.3f; actor: %d units, %.0f tok/s",
                unit["unit_id"],
                record["num_tokens"],
                elapsed,
                record["num_tokens"] / max(elapsed, 1e-9),
                record["num_tokens"] / max(record.get("padded_tokens", 0), 1),
                self.units_done,
                self.tokens / max(self.busy_s, 1e-9),
            )
            if "generated_tokens" in record:
                self.generated += record["generated_tokens"]
                self.generate_s += record["timing_s"].get("generate", 0.0)
                log.info(
                    "unit %s: generated %d tokens in %d responses in %.2fs (%.0f tok/s); actor: %.0f generated tok/s",
                    unit["unit_id"],
                    record["generated_tokens"],
                    record["generated_sequences"],
                    record["timing_s"].get("generate", 0.0),
                    record["generated_tokens"] / max(record["timing_s"].get("generate", 0.0), 1e-9),
                    self.generated / max(self.generate_s, 1e-9),
                )
        return {
            **record,
            "pid": os.getpid(),
            "node": self.node,
            "actor_s": elapsed,
            "store_retries": self.worker.store.retries_used - retries_before,
        }


class TeacherActorFactory:
    """Starts and stops teacher actors for the driver's scheduling loop (`kdcache.capture.scheduler.schedule_units`).

    Args:
        settings: what every actor computes and writes; num_gpus / num_cpus: each actor's resource request.
        options: more Ray actor options (runtime_env, scheduling_strategy, accelerator_type, ...).
    """

    def __init__(
        self, settings: WorkerSettings, *, num_gpus: float, num_cpus: float, options: dict[str, Any] | None = None
    ):
        self.settings = settings
        self.num_gpus = num_gpus
        self.num_cpus = num_cpus
        self.options = dict(options or {})

    def describe(self) -> str:
        return f"TeacherActor(num_gpus={self.num_gpus}, num_cpus={self.num_cpus})"

    def start(self) -> Any:
        return start_actor(self.settings, num_gpus=self.num_gpus, num_cpus=self.num_cpus, **self.options)

    def stop(self, handle: Any) -> None:
        ray.kill(handle, no_restart=True)


def start_actor(settings: WorkerSettings, *, num_gpus: float, num_cpus: float, **options: Any) -> Any:
    """Create one teacher actor with its resource request (and any other Ray actor `options`)."""
    threads = max(1, int(num_cpus)) if num_gpus == 0 else 0
    return TeacherActor.options(num_gpus=num_gpus, num_cpus=num_cpus, **options).remote(settings, threads)


def _log_to_stderr() -> None:
    """Ray workers do not configure logging; send kdcache's INFO lines to stderr, which Ray forwards to the driver."""
    logger = logging.getLogger("kdcache")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


# ---- test hooks: fault injection (active only when KDCACHE_TEST_FAULTS names a JSON file) -------------------------


class _injected_faults:
    """Context manager around one unit: applies the faults listed for this unit's plan index.

    The file holds a list of {"unit_index": int, "action": str, "seconds": float, "count": int, "once": bool}:
    stall (sleep `seconds` before the unit), kill (SIGKILL this actor before the unit), kill_before_commit (SIGKILL
    after the shard is written, before its commit record), store_errors (the store's first `count` writes raise a
    transient OSError). A fault with once=true (the default) fires on one attempt only, claimed cluster-wide by an
    exclusively created marker file next to the fault file (tests run all nodes on one machine).
    """

    def __init__(self, unit: dict[str, Any], worker: UnitWorker):
        self.worker = worker
        self.saved: dict[str, Any] = {}
        path = os.environ.get(FAULTS_ENV)
        self.faults = [f for f in _read_faults(path) if f["unit_index"] == unit["index"]] if path else []
        self.faults = [f for f in self.faults if not f.get("once", True) or _claim(path, f)]

    def __enter__(self) -> None:
        store = self.worker.store
        for fault in self.faults:
            action = fault["action"]
            log.warning("test fault: %s on unit index %d (pid %d)", action, fault["unit_index"], os.getpid())
            if action == "stall":
                time.sleep(float(fault["seconds"]))
            elif action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "kill_before_commit":
                self.saved["create_exclusive"] = store.create_exclusive
                store.create_exclusive = _kill_instead  # type: ignore[method-assign]
            elif action == "store_errors":  # object stores write through fs.pipe_file, local disk through a helper
                import kdcache.store as store_module

                flaky = _Flaky(int(fault["count"]))
                self.saved["fs"], self.saved["local_write"] = store.fs, store_module._local_atomic_write
                store.fs = _FlakyFilesystem(store.fs, flaky)
                store_module._local_atomic_write = flaky.wrap(store_module._local_atomic_write)
            else:
                raise ValueError(f"{FAULTS_ENV}: unknown fault action {action!r}")

    def __exit__(self, *exc: Any) -> None:
        store = self.worker.store
        if "create_exclusive" in self.saved:
            del store.create_exclusive
        if "fs" in self.saved:
            import kdcache.store as store_module

            store.fs = self.saved["fs"]
            store_module._local_atomic_write = self.saved["local_write"]


def _read_faults(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return []


def _claim(path: str, fault: dict[str, Any]) -> bool:
    marker = f"{path}.fired-{fault['unit_index']}-{fault['action']}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _kill_instead(relpath: str, data: bytes) -> bool:
    os.kill(os.getpid(), signal.SIGKILL)
    return False  # never reached


class _Flaky:
    """Counts down injected failures: the first `count` calls through `wrap` raise a transient OSError."""

    def __init__(self, count: int):
        self.left = count

    def wrap(self, fn: Any) -> Any:
        def flaky(*args: Any, **kwargs: Any) -> Any:
            if self.left > 0:
                self.left -= 1
                raise OSError("injected transient store error (test fault)")
            return fn(*args, **kwargs)

        return flaky


class _FlakyFilesystem:
    """Wraps an fsspec filesystem so that its writes (pipe_file) fail while `flaky` has failures left."""

    def __init__(self, fs: Any, flaky: _Flaky):
        self._fs = fs
        self.pipe_file = flaky.wrap(fs.pipe_file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)
