"""Torch intra-op thread counts for training loops on a shared CPU machine.

`available_cpus` says how many CPUs this process may use (affinity mask and cgroup quota); `ThreadChooser` picks the
thread count step by step. Used by the demo teacher's training (`kdcache.demo.teacher.train_teacher`) and by the
students' (`kdcache.demo.training.train_student`). Standard library only: the caller sets ``torch.set_num_threads``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["ThreadChooser", "available_cpus"]


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, further limited by a cgroup v2 CPU quota if one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


class ThreadChooser:
    """Picks torch's intra-op thread count step by step: all CPUs while they are free, 1 while others compete.

    With several threads every op ends at a barrier; when another process holds one of the cores, each barrier waits
    for a time slice and a step gets ~10x slower (measured: 0.1 s -> 1.1 s on 2 shared cores), while one thread only
    slows in proportion. So time a few one-thread steps as a reference, then run on all CPUs, and fall back to one
    thread for ``backoff_steps`` after two steps in a row slower than the reference. Thread counts change float
    rounding only, never which batches are drawn.
    """

    def __init__(self, cpus: int, *, probe_steps: int = 4, backoff_steps: int = 50) -> None:
        self.cpus = cpus
        self.backoff_steps = backoff_steps
        self.single_left = probe_steps  # steps still to run on one thread (the first also warms up: not timed)
        self.single_best = math.inf  # fastest one-thread step seen (s)
        self.slow_in_a_row = 0
        self.steps_by_threads: dict[str, int] = {}

    def threads(self) -> int:
        """The thread count for the next step."""
        return 1 if self.cpus == 1 or self.single_left > 0 else self.cpus

    def record(self, threads: int, seconds: float, *, timed: bool = True) -> None:
        """Note a step's thread count and duration (s); ``timed=False`` counts it without timing it (warm-up)."""
        self.steps_by_threads[str(threads)] = self.steps_by_threads.get(str(threads), 0) + 1
        if threads == 1:
            self.single_left = max(0, self.single_left - 1)
            if timed:
                self.single_best = min(self.single_best, seconds)
            return
        self.slow_in_a_row = self.slow_in_a_row + 1 if seconds > 1.25 * self.single_best else 0
        if self.slow_in_a_row >= 2:
            self.single_left, self.slow_in_a_row = self.backoff_steps, 0
