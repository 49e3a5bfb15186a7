"""The caching job's driver: fingerprint, plan, schedule units on a pool of teacher actors, write the manifest.

    manifest = run_cache_job(load_config("configs/quickstart.yaml"))

Steps: (1) read the teacher's config and tokenizer (no weights) and compute the cache fingerprint; refuse a cache
made with a different one; (2) plan work units; skip those already committed (a rerun of a complete cache does no
work and starts no Ray); (3) run `cluster.num_actors` actors that pull units, write shards and return commit
records; a failed unit is retried on a fresh actor up to `cluster.max_retries` times; (4) write `index.json` last.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Any

from kdcache.codec import CodecParams
from kdcache.config import KDCacheConfig
from kdcache.errors import CacheMismatchError, ConfigError, KdcacheError
from kdcache.formats.parquet import SHARD_SUFFIX
from kdcache.manifest import (
    COMMITS_DIR,
    FINGERPRINT_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_KEY,
    build_manifest,
    commit_key,
    dumps,
    read_manifest,
)
from kdcache.plan import WorkUnit, fingerprint_of, plan_units
from kdcache.store import Store

__all__ = ["JobFailed", "compute_fingerprint", "run_cache_job"]

log = logging.getLogger("kdcache.job")


class JobFailed(KdcacheError):
    """A unit failed more than `cluster.max_retries` times, or failed on bad input."""


def compute_fingerprint(cfg: KDCacheConfig) -> dict[str, Any]:
    """Everything that determines the cached bytes, read from the teacher's config and tokenizer (no weights)."""
    from kdcache.teacher import load_tokenizer, read_model_info, tokenizer_fingerprint

    t = cfg.teacher
    info = read_model_info(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
    tok = load_tokenizer(
        cfg.data.tokenizer or t.model,
        revision=None if cfg.data.tokenizer else t.revision,
        trust_remote_code=t.trust_remote_code,
    )
    cfg.validate_against_vocab(info["padded_vocab_size"])
    return {
        "format_version": FORMAT_VERSION,
        "teacher": {"model": t.model, "revision": t.revision, "dtype": t.dtype, **info},
        "tokenizer": {"name": cfg.data.tokenizer or t.model, **tokenizer_fingerprint(tok)},
        "targets": cfg.targets.fingerprint(),
        "codec": CodecParams().to_dict(),
        "windowing": {
            "max_length": cfg.data.max_length,
            "min_length": cfg.data.min_length,
            "add_eos": cfg.data.add_eos,
            "add_special_tokens": True,
        },
        "data": {
            "source": cfg.data.source,
            "format": cfg.data.format,
            "text_field": cfg.data.text_field,
            "ids_field": cfg.data.ids_field,
            "unit_bytes": cfg.data.unit_bytes,
        },
        "shard_format": cfg.output.format,
    }


def _describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: cache has {a!r}, this job has {b!r}")
    return diffs


def _claim_fingerprint(store: Store, fingerprint: str, inputs: dict[str, Any]) -> None:
    record = {"format": FORMAT_NAME, "fingerprint": fingerprint, "fingerprint_inputs": inputs}
    if store.create_exclusive(FINGERPRINT_KEY, dumps(record)):
        return
    existing = json.loads(store.read_bytes(FINGERPRINT_KEY))
    if existing.get("fingerprint") != fingerprint:
        diffs = _describe_difference(existing.get("fingerprint_inputs", {}), inputs)
        raise CacheMismatchError(
            f"{store.uri} already holds a cache with a different fingerprint "
            f"({existing.get('fingerprint', '?')[:12]} vs {fingerprint[:12]}): "
            + "; ".join(diffs[:6])
            + ". Use a new output.uri (a cache is immutable)."
        )


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
            num_cpus=max(int(needed + 0.999), os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=cfg.cluster.address, logging_level=logging.WARNING)
    return ray


def _run_units(cfg: KDCacheConfig, settings: dict[str, Any], units: list[WorkUnit], progress_total: int, done: int):
    """Schedule units on the actor pool; returns (commit records, failures)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from kdcache.actors import start_actor
    from kdcache.errors import SourceError

    c = cfg.cluster

    def new_actor():
        return start_actor(settings, num_gpus=c.gpus_per_actor, num_cpus=c.cpus_per_actor)

    actors = [new_actor() for _ in range(min(c.num_actors, len(units)))]
    queue: deque[WorkUnit] = deque(units)
    inflight: dict[Any, tuple[int, WorkUnit]] = {}
    attempts: dict[str, int] = {}
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    busy = [0] * len(actors)
    per_actor = 2  # one running, one queued so the actor never waits on the driver
    bar = _progress(progress_total, done, c.progress)
    tokens = 0
    t0 = time.perf_counter()
    try:
        while queue or inflight:
            for a in range(len(actors)):
                while queue and busy[a] < per_actor:
                    unit = queue.popleft()
                    inflight[actors[a].process.remote(unit.to_dict())] = (a, unit)
                    busy[a] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                a, unit = inflight.pop(ref)
                busy[a] -= 1
                try:
                    record = ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    cause = exc.cause if isinstance(exc, RayTaskError) else None
                    if isinstance(cause, (SourceError, ConfigError)):
                        raise JobFailed(f"unit {unit.unit_id} ({unit.url}): {cause}") from None
                    attempts[unit.unit_id] = attempts.get(unit.unit_id, 0) + 1
                    failures.append({"unit_id": unit.unit_id, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
                    log.warning("unit %s failed (attempt %d): %s", unit.unit_id, attempts[unit.unit_id], exc)
                    if attempts[unit.unit_id] > c.max_retries:
                        raise JobFailed(
                            f"unit {unit.unit_id} ({unit.url} [{unit.start}:{unit.stop}]) failed "
                            f"{attempts[unit.unit_id]} times; last error: {exc}"
                        ) from None
                    if isinstance(exc, RayActorError):  # the actor is gone: replace it, requeue its work
                        actors[a] = new_actor()
                    queue.appendleft(unit)
                    continue
                records.append(record)
                tokens += record["num_tokens"]
                if bar is not None:
                    rate = tokens / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for actor in actors:
            ray.kill(actor)
    return records, failures


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="unit", desc="kdcache", dynamic_ncols=True)


def run_cache_job(cfg: KDCacheConfig) -> dict[str, Any]:
    """Run (or resume, or skip) a caching job; return the manifest written to `index.json`."""
    store = Store(cfg.output.uri, cfg.output.storage_options)
    if store.protocol == "memory":
        raise ConfigError("output.uri: memory:// is private to one process; Ray actors cannot write to it")
    if not store.exclusive_create_is_atomic:
        log.warning("%s: exclusive create is not atomic on %s; run one job per cache", store.uri, store.protocol)
    started = time.time()
    inputs = compute_fingerprint(cfg)
    fingerprint = fingerprint_of(inputs)
    _claim_fingerprint(store, fingerprint, inputs)
    existing = read_manifest(store)
    if existing is not None and existing["complete"] and existing["fingerprint"] == fingerprint:
        log.info("%s: cache is complete; nothing to do", store.uri)
        return existing
    units = plan_units(cfg.data.source, cfg.data.format, unit_bytes=cfg.data.unit_bytes)
    committed = {name[: -len(".json")] for name in store.list_names(COMMITS_DIR) if name.endswith(".json")}
    pending = [u for u in units if u.unit_id not in committed]
    log.info("%s: %d units planned, %d already committed, %d to run", store.uri, len(units), len(units) - len(pending), len(pending))
    run_records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if pending:
        _init_ray(cfg)
        settings = {
            "teacher": cfg.to_dict()["teacher"],
            "data": cfg.to_dict()["data"],
            "k": cfg.targets.stored_k,
            "num_samples": cfg.targets.num_samples,
            "seed": cfg.targets.seed,
            "temperatures": cfg.targets.temperatures,
            "output_uri": cfg.output.uri,
            "storage_options": cfg.output.storage_options,
            "compression_level": cfg.output.compression_level,
            "batch_tokens": cfg.cluster.batch_tokens,
            "shard_metadata": {"fingerprint": fingerprint, "format_version": FORMAT_VERSION},
        }
        run_records, failures = _run_units(cfg, settings, pending, len(units), len(units) - len(pending))
    run_wall_s = time.perf_counter() - t0
    by_id = {r["unit_id"]: r for r in run_records}
    manifest_units = []
    for unit in units:
        record = by_id.get(unit.unit_id) or json.loads(store.read_bytes(commit_key(unit.unit_id)))
        manifest_units.append(
            {key: record[key] for key in ("unit_id", "path", "bytes", "sha256", "num_sequences", "num_tokens")}
            | {"source": unit.url, "range": [unit.start, unit.stop], "padded_tokens": record.get("padded_tokens", 0)}
            | {k: record.get(k, 0) for k in ("documents", "empty_documents", "short_windows_dropped")}
            | {k: record[k] for k in ("telemetry", "timing_s", "finished_at") if k in record}
        )
    manifest = _build_manifest(cfg, fingerprint, inputs, manifest_units, run_records, failures, run_wall_s, started)
    store.write_bytes(INDEX_KEY, dumps(manifest))
    return manifest


def _build_manifest(cfg, fingerprint, inputs, units, run_records, failures, run_wall_s, started) -> dict[str, Any]:
    run_tokens = sum(r["num_tokens"] for r in run_records)
    last_run = {
        "units": len(run_records),
        "tokens": run_tokens,
        "wall_time_s": run_wall_s,
        "tokens_per_s": run_tokens / run_wall_s if run_records and run_wall_s > 0 else 0.0,
        "failures": failures,
    }
    return build_manifest(
        fingerprint=fingerprint,
        fingerprint_inputs=inputs,
        units=units,
        shard_format=cfg.output.format,
        shard_suffix=SHARD_SUFFIX,
        config=_sanitized_config(cfg),
        last_run=last_run,
        created_at=started,
    )
