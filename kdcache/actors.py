"""The Ray actor that runs a teacher replica (one of the two modules that import Ray; the other is job.py).

Each `TeacherActor` loads the teacher once, then processes whole work units on request, writing shards straight to
the store; only the small commit record travels back to the driver.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from kdcache.worker import UnitWorker, WorkerSettings

__all__ = ["TeacherActor", "start_actor"]

log = logging.getLogger("kdcache.actor")


@ray.remote
class TeacherActor:
    """A teacher replica. Args: settings as a `WorkerSettings` dict; cpu_threads: torch threads on CPU."""

    def __init__(self, settings: dict[str, Any], cpu_threads: int):
        import torch

        if cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        self.worker = UnitWorker(WorkerSettings(**settings))
        self.units_done = 0

    def ready(self) -> dict[str, Any]:
        """Who and where this actor is (called once to surface load errors early)."""
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": str(self.worker.teacher.device)}

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        record = self.worker.process(unit)
        self.units_done += 1
        timing = record.get("timing_s", {})
        if timing:
            log.info(
                "unit %s: %d tokens in %.2fs (%.0f tok/s), real-token fraction %.3f",
                unit["unit_id"],
                record["num_tokens"],
                timing["total"],
                record["num_tokens"] / max(timing["total"], 1e-9),
                record["num_tokens"] / max(record["padded_tokens"], 1),
            )
        return {**record, "pid": os.getpid()}


def start_actor(settings: dict[str, Any], *, num_gpus: float, num_cpus: float) -> Any:
    """Create one teacher actor with its resource request."""
    threads = max(1, int(num_cpus)) if num_gpus == 0 else 0
    return TeacherActor.options(num_gpus=num_gpus, num_cpus=num_cpus).remote(settings, threads)
