"""The driver's scheduling loop: run work units on a pool of actors, exactly once, through actor and node failures
and stragglers. `job.run_cache_job` calls it with teacher actors; `bench/driver.py` with fake ones.

    stats = schedule_units(units, TeacherActorFactory(settings, num_gpus=1, num_cpus=8), num_actors=64)
    stats.records      # one commit record per unit
    stats.last_run()   # what the manifest records as stats.last_run

Actors come from a factory (`start()` -> handle, `stop(handle)`); a handle's `ready.remote()` and
`process.remote(unit_dict)` return Ray object refs. Ray is imported when the loop starts (job.py starts Ray).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from kdcache.capture.plan import WorkUnit
from kdcache.errors import CacheMismatchError, ConfigError, JobFailed, SourceError

__all__ = ["ActorFactory", "RunStats", "actor_start_timeout", "schedule_units"]

log = logging.getLogger("kdcache.capture.job")


class ActorFactory(Protocol):
    """What the scheduling loop needs from its actors: `start()` returns a handle whose `ready.remote()` and
    `process.remote(unit_dict)` return Ray object refs; `stop(handle)` kills it. See `actors.TeacherActorFactory`."""

    def start(self) -> Any: ...

    def stop(self, handle: Any) -> None: ...


@dataclass
class RunStats:
    """What one run of the scheduling loop did; `last_run()` is what the manifest records as `stats.last_run`."""

    records: list[dict[str, Any]] = field(default_factory=list)  # one commit record per unit, in completion order
    failures: list[dict[str, Any]] = field(default_factory=list)  # {unit_id, kind, error, actor}
    retries: int = 0  # units put back in the queue after a failed attempt
    backups: int = 0  # backup copies started for stragglers
    steals: int = 0  # units queued behind another unit copied to an idle actor at the end of the queue
    backup_wins: int = 0  # units whose backup copy finished first
    duplicates: int = 0  # attempts that finished after their unit was done (their shard is deleted)
    actors_started: int = 0
    actors_lost: int = 0  # actors that died (process killed, node lost) and were replaced
    wall_time_s: float = 0.0
    actors: list[dict[str, Any]] = field(default_factory=list)  # per-actor throughput

    @property
    def tokens(self) -> int:
        return sum(r["num_tokens"] for r in self.records)

    def last_run(self, orphans_deleted: int = 0) -> dict[str, Any]:
        rates = sorted(a["tokens_per_s"] for a in self.actors if a["units"])
        padded = sum(r.get("padded_tokens", 0) for r in self.records)
        return {
            "units": len(self.records),
            "tokens": self.tokens,
            "wall_time_s": self.wall_time_s,
            "tokens_per_s": self.tokens / self.wall_time_s if self.records and self.wall_time_s > 0 else 0.0,
            "real_token_fraction": self.tokens / padded if padded else 0.0,
            "failures": self.failures[:MAX_RECORDED_FAILURES],
            "num_failures": len(self.failures),
            "retries": self.retries,
            "store_retries": sum(r.get("store_retries", 0) for r in self.records),
            "backups": self.backups,
            "steals": self.steals,
            "backup_wins": self.backup_wins,
            "duplicates": self.duplicates,
            "actors_started": self.actors_started,
            "actors_lost": self.actors_lost,
            "orphans_deleted": orphans_deleted,
            "actor_tokens_per_s": {"min": rates[0], "median": statistics.median(rates), "max": rates[-1]}
            if rates
            else {},
            "slowest_actors": sorted((a for a in self.actors if a["units"]), key=lambda a: a["tokens_per_s"])[:3],
        }


MAX_RECORDED_FAILURES = 100  # the manifest keeps the first ones; `num_failures` counts all
AUTO_BACKUP_FACTOR = 3.0  # automatic straggler threshold: this many times the median unit time ...
AUTO_BACKUP_MIN_S = 30.0  # ... and at least this many seconds
PER_ACTOR = 2  # units in flight per actor: one running, one queued so the actor never waits on the driver
STOP_TIMEOUT_S = 30.0  # how long the end of a run waits for killed actors' copies to be gone
KILL_GRACE_S = 1.0  # and then for their processes (and a write they had in flight) to end
# How long the job waits while no teacher actor is ready (placed on a node and its teacher loaded) before failing,
# when `cluster.actor_start_timeout_s` is null: an embedded local Ray never gets more resources than it started
# with, so only a teacher's first load (a download included) needs time; a cluster's autoscaler may take many
# minutes to add the nodes actors ask for.
ACTOR_START_TIMEOUT_EMBEDDED_S = 600.0
ACTOR_START_TIMEOUT_CLUSTER_S = 1800.0


def actor_start_timeout(configured: float | None, *, embedded: bool) -> float:
    """Seconds without a ready actor before the job fails: `cluster.actor_start_timeout_s`, or the default."""
    if configured is not None:
        return configured
    return ACTOR_START_TIMEOUT_EMBEDDED_S if embedded else ACTOR_START_TIMEOUT_CLUSTER_S


@dataclass(eq=False)
class _Actor:
    handle: Any
    ready: bool = False
    dead: bool = False
    since: float = 0.0  # when it was started (while starting) or when its head unit began running
    refs: deque = field(default_factory=deque)  # its in-flight process() refs in submission order; [0] is running
    info: dict[str, Any] = field(default_factory=dict)
    units: int = 0
    tokens: int = 0
    padded: int = 0
    busy_s: float = 0.0
    generated: int = 0  # tokens generated (a generated cache's responses)
    generate_s: float = 0.0  # seconds its engine spent generating them

    def summary(self) -> dict[str, Any]:
        out = {
            "pid": self.info.get("pid"),
            "node": str(self.info.get("node", ""))[:12],
            "units": self.units,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.busy_s if self.busy_s > 0 else 0.0,
            "real_token_fraction": self.tokens / self.padded if self.padded else 0.0,
        }
        if self.generated:
            rate = self.generated / self.generate_s if self.generate_s > 0 else 0.0
            out |= {"generated_tokens": self.generated, "generated_tokens_per_s": rate}
        return out


@dataclass(eq=False)
class _Attempt:
    unit: WorkUnit
    actor: _Actor
    backup: bool
    started: float | None  # when it began running (None while queued behind another unit on its actor)
    superseded: bool = False  # a copy went to an idle actor while this one waited in its actor's queue


class _Scheduler:
    """State of one scheduling run; `schedule_units` is its public face."""

    def __init__(
        self,
        units: list[WorkUnit],
        factory: ActorFactory,
        *,
        num_actors: int,
        max_retries: int,
        backup_after_s: float | None,
        bar: Any,
        tick_s: float,
        log_every_s: float,
        start_timeout_s: float | None = None,
    ):
        import ray
        from ray.exceptions import RayActorError, RayError, RayTaskError

        self.ray, self.RayActorError, self.RayTaskError, self.RayError = ray, RayActorError, RayTaskError, RayError
        self.factory, self.max_retries, self.backup_after_s = factory, max_retries, backup_after_s
        self.bar, self.tick_s, self.log_every_s = bar, tick_s, log_every_s
        self.total = len(units)
        self.pending: deque[WorkUnit] = deque(units)
        self.running: dict[Any, _Attempt] = {}  # process() ref -> attempt
        self.starting: dict[Any, _Actor] = {}  # ready() ref -> actor
        self.copies: dict[str, int] = {}  # unit id -> attempts in flight
        self.attempts: dict[str, int] = {}  # unit id -> failed attempts
        self.backed_up: set[str] = set()
        self.done: set[str] = set()
        self.durations: list[float] = []
        self.start_failures = 0  # actor starts that failed since an actor last became ready
        self.start_timeout_s = start_timeout_s  # None: wait for a ready actor forever
        self.unready_since: float | None = time.perf_counter()  # since when no actor has been ready (None: one is)
        self.stats = RunStats()
        self.t0 = time.perf_counter()
        self.last_log = self.t0
        self.all_actors: list[_Actor] = []  # every actor started, including replaced ones
        self.actors: list[_Actor] = [self._start() for _ in range(min(num_actors, len(units)))]

    # -- actors ---------------------------------------------------------------------------------------------------
    def _start(self) -> _Actor:
        actor = _Actor(self.factory.start(), since=time.perf_counter())
        self.starting[actor.handle.ready.remote()] = actor
        self.all_actors.append(actor)
        self.stats.actors_started += 1
        return actor

    def _replace(self, actor: _Actor, why: str) -> None:
        if actor.dead:
            return
        actor.dead = True
        self.stats.actors_lost += 1
        try:
            self.factory.stop(actor.handle)
        except Exception:  # already gone
            pass
        self.actors[self.actors.index(actor)] = self._start()
        node = str(actor.info.get("node", "?"))[:12]
        log.warning("actor pid %s on node %s lost (%s); starting a replacement", actor.info.get("pid"), node, why)

    def _on_ready(self, ref: Any, actor: _Actor) -> None:
        try:
            actor.info = self.ray.get(ref)
        except self.RayError as exc:
            self.start_failures += 1
            error = _error_text(exc)
            self.stats.failures.append({"unit_id": None, "kind": "actor_start", "error": error, "actor": None})
            if self.start_failures > max(3, self.max_retries) and not any(a.ready for a in self.actors):
                raise JobFailed(
                    f"teacher actors failed to start {self.start_failures} times; last error: {error}"
                ) from None
            actor.info = {"pid": None, "node": "?"}
            self._replace(actor, f"failed to start: {error[:200]}")
            return
        actor.ready, actor.since = True, time.perf_counter()
        self.start_failures = 0

    # -- units ----------------------------------------------------------------------------------------------------
    def _submit(self, unit: WorkUnit, actor: _Actor, *, backup: bool) -> None:
        ref = actor.handle.process.remote(unit.to_dict())
        now = time.perf_counter()
        if not actor.refs:
            actor.since = now
        self.running[ref] = _Attempt(unit, actor, backup, now if not actor.refs else None)
        actor.refs.append(ref)
        self.copies[unit.unit_id] = self.copies.get(unit.unit_id, 0) + 1

    def _threshold(self) -> float | None:
        """Seconds after which a running unit counts as a straggler (None: not known yet)."""
        if self.backup_after_s is not None:
            return self.backup_after_s
        if len(self.durations) < 3:
            return None
        return max(AUTO_BACKUP_FACTOR * statistics.median(self.durations[-1000:]), AUTO_BACKUP_MIN_S)

    def _overdue(self, actor: _Actor, now: float, threshold: float | None) -> bool:
        return threshold is not None and bool(actor.refs) and now - actor.since > threshold

    def _dispatch(self, now: float) -> None:
        """Every idle actor gets a unit first, then actors fill up to PER_ACTOR (so the tail starts balanced)."""
        threshold = self._threshold()
        for depth in range(1, PER_ACTOR + 1):
            for actor in self.actors:
                if not self.pending:
                    return
                if actor.ready and not actor.dead and len(actor.refs) < depth:
                    if not self._overdue(actor, now, threshold):  # nothing more behind a straggler
                        self._submit(self.pending.popleft(), actor, backup=False)

    def _fill_idle(self, now: float) -> None:
        """Queue empty: idle actors take a copy of units still queued behind another actor's unit (so the tail does
        not wait a unit's time for nothing), then backup copies of stragglers. The first copy to commit wins; the
        original is not cancelled (Ray may still run a cancelled actor task), its commit loses and its shard is
        deleted, or its actor is killed when the job ends."""
        idle = [a for a in self.actors if a.ready and not a.dead and not a.refs]
        if not idle:
            return
        queued = [
            attempt
            for attempt in self.running.values()
            if attempt.started is None and not attempt.superseded and self.copies[attempt.unit.unit_id] == 1
        ]
        for attempt, actor in zip(queued, idle):
            attempt.superseded = True
            self.stats.steals += 1
            self._submit(attempt.unit, actor, backup=False)
        idle = idle[len(queued) :]
        threshold = self._threshold()
        if not idle or threshold is None or math.isinf(threshold):
            return
        late = []
        for attempt in self.running.values():
            uid = attempt.unit.unit_id
            if uid in self.done or uid in self.backed_up or self.copies[uid] > 1 or attempt.actor.dead:
                continue
            if self._overdue(attempt.actor, now, threshold):  # running late, or queued behind a late unit
                late.append((attempt.started or attempt.actor.since, attempt))
        for (_, attempt), actor in zip(sorted(late, key=lambda x: x[0]), idle):
            uid = attempt.unit.unit_id
            log.warning(
                "unit %s is late (actor pid %s busy for %.0fs > %.0fs); starting a backup copy on actor pid %s",
                uid, attempt.actor.info.get("pid"), now - attempt.actor.since, threshold, actor.info.get("pid"),
            )  # fmt: skip
            self.backed_up.add(uid)
            self.stats.backups += 1
            self._submit(attempt.unit, actor, backup=True)

    def _on_result(self, ref: Any, attempt: _Attempt) -> None:
        actor, unit = attempt.actor, attempt.unit
        now = time.perf_counter()
        if actor.refs and actor.refs[0] == ref:
            actor.refs.popleft()
            actor.since = now  # the next queued unit starts running now
            if actor.refs:
                self.running[actor.refs[0]].started = now
        elif ref in actor.refs:
            actor.refs.remove(ref)
        self.copies[unit.unit_id] -= 1
        try:
            record = self.ray.get(ref)
        except self.RayActorError as exc:
            self._replace(actor, _error_text(exc)[:200])
            self._failed(attempt, "actor_died", exc)
            return
        except self.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, (SourceError, ConfigError, CacheMismatchError)):  # retrying cannot help
                raise JobFailed(f"unit {unit.unit_id} ({unit.url}): {cause}") from None
            self._failed(attempt, "task_error", exc)
            return
        except self.RayError as exc:  # object lost, cancelled, ...
            self._failed(attempt, "ray_error", exc)
            return
        if unit.unit_id in self.done:
            self.stats.duplicates += 1  # a late copy: the worker already deleted its shard
            return
        self.done.add(unit.unit_id)
        self.stats.records.append(record)
        self.stats.backup_wins += attempt.backup
        self.stats.duplicates += bool(record.get("duplicate"))
        if attempt.started is not None:
            self.durations.append(now - attempt.started)
        actor.units += 1
        actor.tokens += record["num_tokens"]
        actor.padded += record.get("padded_tokens", record["num_tokens"])
        actor.busy_s += record.get("actor_s") or (now - (attempt.started or now))
        actor.generated += record.get("generated_tokens", 0)
        actor.generate_s += (record.get("timing_s") or {}).get("generate", 0.0)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.stats.tokens / max(now - self.t0, 1e-9):,.0f} tok/s", refresh=False)
            self.bar.update(1)

    def _failed(self, attempt: _Attempt, kind: str, exc: BaseException) -> None:
        unit = attempt.unit
        error = _error_text(exc)
        actor = attempt.actor.info.get("pid")
        self.stats.failures.append({"unit_id": unit.unit_id, "kind": kind, "error": error[:500], "actor": actor})
        if unit.unit_id in self.done or self.copies[unit.unit_id] > 0:
            return  # another copy finished or is still running
        self.attempts[unit.unit_id] = self.attempts.get(unit.unit_id, 0) + 1
        log.warning(
            "unit %s failed (attempt %d, %s): %s", unit.unit_id, self.attempts[unit.unit_id], kind, error[:300]
        )
        if self.attempts[unit.unit_id] > self.max_retries:
            raise JobFailed(
                f"unit {unit.unit_id} ({unit.url} [{unit.start}:{unit.stop}]) failed {self.attempts[unit.unit_id]} "
                f"times; last error: {error}"
            )
        self.stats.retries += 1
        self.backed_up.discard(unit.unit_id)
        self.pending.appendleft(unit)

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> RunStats:
        ray = self.ray
        try:
            while len(self.done) < self.total:
                now = time.perf_counter()
                self._dispatch(now)
                if not self.pending:
                    self._fill_idle(now)
                refs = [*self.running, *self.starting]
                if not refs:
                    raise JobFailed(f"no actor and no work in flight with {self.total - len(self.done)} units left")
                ready, _ = ray.wait(refs, num_returns=1, timeout=self.tick_s)
                if ready and len(refs) > 1:  # collect everything else that is ready too, without waiting
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    if ref in self.starting:
                        self._on_ready(ref, self.starting.pop(ref))
                    else:
                        self._on_result(ref, self.running.pop(ref))
                self._check_something_can_run()
                if time.perf_counter() - self.last_log >= self.log_every_s:
                    self._log_progress()
        finally:
            self._stop_all()
        self.stats.wall_time_s = time.perf_counter() - self.t0
        self.stats.actors = [a.summary() for a in self.all_actors if a.units]
        self._log_progress(final=True)
        return self.stats

    def _check_something_can_run(self) -> None:
        """Fail once no actor has been ready for `start_timeout_s` (nothing can run: no node has the resources an
        actor asks for, the nodes are gone, or the teacher never finishes loading)."""
        now = time.perf_counter()
        if any(a.ready and not a.dead for a in self.actors):
            self.unready_since = None
            return
        if self.unready_since is None:
            self.unready_since = now
        waited = now - self.unready_since
        if self.start_timeout_s is None or waited <= self.start_timeout_s:
            return
        try:
            have = self.ray.cluster_resources()
            nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
            held = [f"{key} {value:g}" for key, value in sorted(have.items()) if key in ("CPU", "GPU")]
            cluster = f"the cluster has {nodes} live node(s)" + (f" with {', '.join(held)}" if held else "")
        except Exception as exc:  # the cluster itself may be what is broken
            cluster = f"the cluster does not answer ({type(exc).__name__})"
        raise JobFailed(
            f"no teacher actor was ready for {waited:.0f}s (cluster.actor_start_timeout_s = {self.start_timeout_s:g} "
            f"s): each asks for {getattr(self.factory, 'describe', lambda: '?')()}; {cluster}. Check the nodes "
            "(`ray status`), lower cluster.gpus_per_actor / cluster.cpus_per_actor, or raise "
            "cluster.actor_start_timeout_s if the teacher takes longer to load"
        )

    def _stop_all(self) -> None:
        """Kill every actor, then wait (bounded) until the copies still running are gone: a late copy of a done unit
        (a backup, a stolen unit's original) could otherwise write its shard after the caller's orphan cleanup
        listed the shards. A killed actor's refs resolve just before its process is gone, hence the grace."""
        for actor in self.actors:
            if not actor.dead:
                try:
                    self.factory.stop(actor.handle)
                except Exception:  # already gone
                    pass
        if self.running:
            late = list(self.running)
            self.ray.wait(late, num_returns=len(late), timeout=STOP_TIMEOUT_S)
            time.sleep(KILL_GRACE_S)

    def _log_progress(self, final: bool = False) -> None:
        now = time.perf_counter()
        self.last_log = now
        elapsed = now - self.t0
        done = len(self.done)
        eta = elapsed / done * (self.total - done) if done else float("nan")
        ready = sum(a.ready and not a.dead for a in self.actors)
        s = self.stats
        log.info(
            "%s%d/%d units, %.0f tok/s, ETA %.0fs; actors %d ready of %d; %d retries, %d backups, %d lost actors",
            "done: " if final else "", done, self.total, s.tokens / max(elapsed, 1e-9), eta, ready, len(self.actors),
            s.retries, s.backups, s.actors_lost,
        )  # fmt: skip
        if not ready and self.starting:
            oldest = min(a.since for a in self.starting.values())
            log.warning(
                "no teacher actor is ready after %.0fs (%s); the cluster may lack the resources an actor asks for "
                "(the job fails after cluster.actor_start_timeout_s = %s s)",
                now - oldest, getattr(self.factory, "describe", lambda: "?")(), self.start_timeout_s,
            )  # fmt: skip
        summaries = sorted((a.summary() for a in self.all_actors if a.units), key=lambda a: a["tokens_per_s"])
        if summaries:  # per-actor throughput: the spread, then the slowest (a sick GPU shows up here)
            rates = [a["tokens_per_s"] for a in summaries]
            log.info(
                "actor tok/s: min %.0f, median %.0f, max %.0f over %d actors; slowest:",
                rates[0], statistics.median(rates), rates[-1], len(rates),
            )  # fmt: skip
            for a in summaries[: 10 if final else 3]:
                log.info(
                    "  actor pid %s node %s: %d units, %.0f tok/s, real-token fraction %.3f",
                    a["pid"], a["node"], a["units"], a["tokens_per_s"], a["real_token_fraction"],
                )  # fmt: skip


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {exc}"


def schedule_units(
    units: list[WorkUnit],
    factory: ActorFactory,
    *,
    num_actors: int,
    max_retries: int = 3,
    backup_after_s: float | None = None,
    progress: bool = False,
    progress_total: int | None = None,
    progress_done: int = 0,
    tick_s: float = 1.0,
    log_every_s: float = 60.0,
    start_timeout_s: float | None = None,
) -> RunStats:
    """Run every unit once on a pool of `num_actors` actors from `factory`; returns the commit records and stats.

    The loop keeps two units in flight per actor and sends work to an actor only after its `ready()` answered (an
    actor that cannot be placed, e.g. after its node was lost, gets none). Faults:

    - a failed unit goes back to the front of the queue; after `max_retries` failed attempts the job fails with
      `JobFailed` naming the unit and the last error (bad input, `SourceError` / `ConfigError`, fails at once);
    - a dead actor (process killed, node lost) is replaced; its units go back to the queue;
    - the tail: once the queue is empty, an idle actor takes a copy of a unit still waiting behind another actor's
      unit, and a unit running longer than `backup_after_s` (None: 3x the median unit time, at least 30 s; inf:
      never) gets a backup copy on an idle actor. The first copy to commit wins; the other's commit fails and its
      worker deletes its shard (the worker's commit protocol). Late results are ignored; copies still running
      when the last unit is done die with their actors (their shards are the caller's orphans to delete);
    - nothing can run: once no actor has been ready for `start_timeout_s` seconds (None: never), `JobFailed` says
      what the actors ask for and what the cluster has.

    Requires `ray.init()` to have run. Cost per unit on the driver: one `process.remote`, one `ray.get` of a record
    of ~1 KB, and a share of a `ray.wait` over all refs in flight (see docs/SCALING.md).
    """
    bar = _progress(progress_total or len(units), progress_done, progress)
    try:
        scheduler = _Scheduler(
            units,
            factory,
            num_actors=num_actors,
            max_retries=max_retries,
            backup_after_s=backup_after_s,
            bar=bar,
            tick_s=tick_s,
            log_every_s=log_every_s,
            start_timeout_s=start_timeout_s,
        )
        return scheduler.run()
    finally:
        if bar is not None:
            bar.close()


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="unit", desc="kdcache", dynamic_ncols=True)
