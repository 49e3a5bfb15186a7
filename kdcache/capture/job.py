"""The caching job's driver: fingerprint, plan, schedule units on a pool of teacher actors, write the manifest.

    manifest = run_cache_job(load_config("configs/quickstart.yaml"))

Steps: (1) read the teacher's config and tokenizer (no weights) and compute the cache fingerprint; refuse a cache
made with a different one; (2) plan work units; skip those already committed (a rerun of a complete cache does no
work and starts no Ray); (3) `schedule_units` runs `cluster.num_actors` actors that pull units, write shards and
return commit records (see its docstring for retries, lost actors and nodes, and backup copies of stragglers);
(4) delete shards no commit names (attempts that lost or died) and write `index.json` last, with the run's
statistics in `stats.last_run`.

The scheduling loop takes its actors from a factory (`start()` / `stop(handle)`), so `bench/driver.py` measures the
real loop with fake actors that compute nothing.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from typing import Any

from kdcache.capture.plan import WorkUnit, plan_units
from kdcache.capture.scheduler import ActorFactory, RunStats, schedule_units
from kdcache.config import KDCacheConfig
from kdcache.errors import ConfigError
from kdcache.identity import claim_fingerprint, fingerprint_inputs, fingerprint_of, tokenizer_fingerprint
from kdcache.manifest import (
    COMMITS_DIR,
    INDEX_KEY,
    SHARDS_DIR,
    build_manifest,
    commit_key,
    dumps,
    read_manifest,
)
from kdcache.store import Store

__all__ = ["compute_fingerprint", "run_cache_job", "shutdown_ray"]

log = logging.getLogger("kdcache.capture.job")


def compute_fingerprint(cfg: KDCacheConfig) -> dict[str, Any]:
    """The job's fingerprint inputs (`kdcache.identity.fingerprint_inputs`), from the teacher's config and tokenizer
    (no weights are loaded); checks the targets against the vocabulary first."""
    from kdcache.capture.teacher import load_tokenizer, read_model_info

    t = cfg.teacher
    info = read_model_info(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
    tok = load_tokenizer(
        cfg.data.tokenizer or t.model,
        revision=None if cfg.data.tokenizer else t.revision,
        trust_remote_code=t.trust_remote_code,
    )
    cfg.validate_against_vocab(info["padded_vocab_size"])
    return fingerprint_inputs(cfg, info, {"name": cfg.data.tokenizer or t.model, **tokenizer_fingerprint(tok)})


def _sanitized_config(cfg: KDCacheConfig) -> dict[str, Any]:
    """The config as recorded in the manifest: storage options (credentials) are never written."""
    raw = cfg.to_dict()
    raw["output"]["storage_options"] = sorted(raw["output"]["storage_options"])  # keys only
    return raw


def _init_ray(cfg: KDCacheConfig):
    import ray

    if ray.is_initialized():
        return ray
    if cfg.cluster.address is None:
        needed = cfg.cluster.num_actors * cfg.cluster.cpus_per_actor
        ray.init(
            address="local",  # a new embedded Ray, never whatever cluster `ray start` last left on this machine
            num_cpus=max(int(needed + 0.999), os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=cfg.cluster.address, logging_level=logging.WARNING)
    return ray


def shutdown_ray() -> None:
    """Leave the Ray this process started or joined (frees an embedded Ray's cores once the job is done)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _delete_orphan_shards(store: Store, units: list[dict[str, Any]]) -> int:
    """Delete shards that no manifest entry names: attempts that lost a commit race or died before committing.

    Safe once every unit has a commit record: any attempt still running anywhere can only lose its commit (and
    would delete its own shard anyway).
    """
    keep = {posixpath.basename(u["path"]) for u in units}
    orphans = [name for name in store.list_names(SHARDS_DIR) if name not in keep]
    for name in orphans:
        store.delete(f"{SHARDS_DIR}/{name}")
    if orphans:
        log.info("%s: deleted %d orphaned shard(s) of attempts that lost or died", store.uri, len(orphans))
    return len(orphans)


def run_cache_job(
    cfg: KDCacheConfig, *, factory: ActorFactory | None = None, actor_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run (or resume, or skip) a caching job; return the manifest written to `index.json`.

    Args:
        cfg: the job configuration.
        factory: actors to run the units on (default: teacher actors as `cfg.cluster` asks for; benchmarks pass
            fakes).
        actor_options: more Ray options for the teacher actors, e.g. {"runtime_env": {"env_vars": {...}}} or a
            scheduling_strategy.
    """
    store = Store(cfg.output.uri, cfg.output.storage_options)
    if store.protocol == "memory":
        raise ConfigError("output.uri: memory:// is private to one process; Ray actors cannot write to it")
    atomic = store.exclusive_create_is_atomic
    if not atomic:
        log.warning("%s: exclusive create is not atomic on %s; run one job per cache", store.uri, store.protocol)
    started = time.time()
    inputs = compute_fingerprint(cfg)
    fingerprint = fingerprint_of(inputs)
    claim_fingerprint(store, fingerprint, inputs)
    existing = read_manifest(store)
    if existing is not None and existing["complete"] and existing["fingerprint"] == fingerprint:
        log.info("%s: cache is complete; nothing to do", store.uri)
        return existing
    units = plan_units(cfg.data.source, cfg.data.format, unit_bytes=cfg.data.unit_bytes)
    committed = {name[: -len(".json")] for name in store.list_names(COMMITS_DIR) if name.endswith(".json")}
    pending = [u for u in units if u.unit_id not in committed]
    log.info(
        "%s: %d units planned, %d already committed, %d to run",
        store.uri, len(units), len(units) - len(pending), len(pending),
    )  # fmt: skip
    stats = RunStats()
    if pending:
        stats = _run_units(cfg, fingerprint, pending, len(units), factory, actor_options)
    by_id = {r["unit_id"]: r for r in stats.records}
    if not atomic:  # two attempts may both have "won": the commit records on the store are the truth
        by_id = {}
    missing = [commit_key(u.unit_id) for u in units if u.unit_id not in by_id]
    for data in store.read_many(missing).values():
        record = json.loads(data)
        by_id[record["unit_id"]] = record
    manifest_units = []
    for unit in units:
        record = by_id[unit.unit_id]
        manifest_units.append(
            {key: record[key] for key in ("unit_id", "path", "bytes", "sha256", "num_sequences", "num_tokens")}
            | {"num_target_tokens": record.get("num_target_tokens", record["num_tokens"])}
            | {"source": unit.url, "range": [unit.start, unit.stop], "padded_tokens": record.get("padded_tokens", 0)}
            | {k: record.get(k, 0) for k in ("documents", "empty_documents", "short_windows_dropped")}
            | {k: record[k] for k in ("crc32", "telemetry", "timing_s", "finished_at") if k in record}
        )
    orphans = _delete_orphan_shards(store, manifest_units)
    manifest = _build_manifest(cfg, fingerprint, inputs, manifest_units, stats.last_run(orphans), started)
    store.write_bytes(INDEX_KEY, dumps(manifest))
    return manifest


def _run_units(
    cfg: KDCacheConfig,
    fingerprint: str,
    pending: list[WorkUnit],
    total: int,
    factory: ActorFactory | None,
    actor_options: dict[str, Any] | None,
) -> RunStats:
    """Start Ray and schedule the pending units on teacher actors (or on `factory`'s actors)."""
    _init_ray(cfg)
    c = cfg.cluster
    if factory is None:
        from kdcache.capture.actors import TeacherActorFactory
        from kdcache.capture.worker import WorkerSettings

        settings = WorkerSettings.from_config(cfg, fingerprint)
        factory = TeacherActorFactory(
            settings, num_gpus=c.gpus_per_actor, num_cpus=c.cpus_per_actor, options=actor_options
        )
    return schedule_units(
        pending,
        factory,
        num_actors=c.num_actors,
        max_retries=c.max_retries,
        backup_after_s=c.backup_after_s,
        progress=c.progress,
        progress_total=total,
        progress_done=total - len(pending),
    )


def _build_manifest(cfg, fingerprint, inputs, units, last_run, started) -> dict[str, Any]:
    from kdcache.formats import get_format

    return build_manifest(
        fingerprint=fingerprint,
        fingerprint_inputs=inputs,
        units=units,
        shard_format=cfg.output.format,
        shard_suffix=get_format(cfg.output.format).SUFFIX,
        config=_sanitized_config(cfg),
        last_run=last_run,
        created_at=started,
    )
