"""The caching job's driver: fingerprint, plan, schedule units on a pool of teacher actors, write the manifest.

    manifest = run_cache_job(load_config("configs/quickstart.yaml"))

Steps: (1) list the input files, read the teacher's config and tokenizer (no weights; the weight files are hashed,
once per file version) and check the job against them; compute the cache fingerprint; (2) plan work units, then
claim the output (refused when it holds a cache with a different fingerprint, unless that job committed nothing);
skip the units already committed (a rerun of a complete cache does no work and starts no Ray); (3)
`schedule_units` runs `cluster.num_actors` actors that pull units, write shards and return commit records (see its
docstring for retries, lost actors and nodes, and backup copies of stragglers); (4) check that every record and the
claim are still this job's, delete shards no commit names (attempts that lost or died) and write `index.json` last,
with the run's statistics in `stats.last_run` and the cache's provenance (the teacher's license, how a generated
cache was generated) in `provenance`.

The scheduling loop takes its actors from a factory (`start()` / `stop(handle)`), so `bench/driver.py` measures the
real loop with fake actors that compute nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import posixpath
import time
from typing import Any

from kdcache.capture.plan import WorkUnit, plan_units
from kdcache.capture.scheduler import ActorFactory, RunStats, actor_start_timeout, schedule_units
from kdcache.config import CHAT_FORMATS, KDCacheConfig, redact_urls
from kdcache.errors import CacheMismatchError, ConfigError, KdcacheError
from kdcache.identity import (
    check_claim,
    claim_fingerprint,
    fingerprint_inputs,
    fingerprint_of,
    tokenizer_fingerprint,
)
from kdcache.manifest import (
    COMMITS_DIR,
    INDEX_KEY,
    SHARDS_DIR,
    build_manifest,
    commit_key,
    dumps,
    read_manifest,
)
from kdcache.pieces import PIECES_KEY, pieces_to_json, token_pieces
from kdcache.store import Store, expand_urls

__all__ = ["compute_fingerprint", "run_cache_job", "shutdown_ray"]

log = logging.getLogger("kdcache.capture.job")

# counts a commit record of a cache of conversations carries: records and windows without a target, skipped
CHAT_COUNTS = ("no_assistant_tokens", "windows_without_targets")
# counts a commit record of a generated cache carries: prompts answered, responses and their tokens
GENERATE_COUNTS = ("prompts", "generated_sequences", "generated_tokens")
GENERATE_UNIT_BYTES_WARN = 1 << 20  # bytes of prompts per unit above which a generating job warns


def compute_fingerprint(cfg: KDCacheConfig, files: list[tuple[str, int]] | None = None) -> dict[str, Any]:
    """The job's fingerprint inputs (`kdcache.identity.fingerprint_inputs`), from the teacher's config and tokenizer
    (no weights are loaded; the weight files are hashed) and the input files (`files`, default
    `expand_urls(data.source)`); checks the job against the teacher first (`check_against_teacher`), and that
    conversations have a chat template."""
    from kdcache.capture.chat import effective_chat_template, read_chat_template
    from kdcache.capture.teacher import load_tokenizer, read_model_info

    files = expand_urls(cfg.data.source) if files is None else files
    t = cfg.teacher
    info = read_model_info(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
    tok = load_tokenizer(
        cfg.data.tokenizer or t.model,
        revision=None if cfg.data.tokenizer else t.revision,
        trust_remote_code=t.trust_remote_code,
    )
    cfg.validate_against_vocab(info["padded_vocab_size"])
    check_against_teacher(cfg, info, len(tok))
    template = None
    if cfg.data.format in CHAT_FORMATS:
        template = effective_chat_template(tok, read_chat_template(cfg.data.chat_template))
        if template is None and cfg.data.format == "chat":
            name = cfg.data.tokenizer or t.model
            raise ConfigError(f"data.format=chat: tokenizer {name} has no chat template; set data.chat_template")
    stop_ids = None
    if cfg.generate is not None:  # what ends a response is part of what the cache holds
        from kdcache.capture.generate import read_generation_eos, stop_token_ids

        eos = read_generation_eos(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
        stop_ids = stop_token_ids(eos, tok)
    return fingerprint_inputs(cfg, info, tokenizer_fingerprint(tok), files, template, stop_ids)


def write_teacher_pieces(cfg: KDCacheConfig, store: Store, tokenizer_hash: str) -> None:
    """Store the teacher tokenizer's piece table (`kdcache.pieces.PIECES_KEY`: the bytes of every id) beside the
    manifest, for students with another tokenizer (`targets.cross_tokenizer`); written once per cache."""
    from kdcache.capture.teacher import load_tokenizer

    if store.exists(PIECES_KEY):
        return
    t = cfg.teacher
    tok = load_tokenizer(
        cfg.data.tokenizer or t.model,
        revision=None if cfg.data.tokenizer else t.revision,
        trust_remote_code=t.trust_remote_code,
    )
    try:
        pieces = token_pieces(tok)
    except KdcacheError as exc:  # the cache is still a cache; only students with another tokenizer cannot use it
        log.warning("%s: no piece table for students with another tokenizer: %s", store.uri, exc)
        return
    if pieces.fingerprint != tokenizer_hash:
        raise CacheMismatchError(f"{cfg.data.tokenizer or t.model}: the tokenizer changed while the job started")
    store.write_bytes(PIECES_KEY, dumps(pieces_to_json(pieces)))


def check_against_teacher(cfg: KDCacheConfig, model_info: dict[str, Any], tokenizer_size: int) -> None:
    """Refuse, before any work, what the teacher cannot run: windows longer than its positions, a tokenizer with
    ids past its vocabulary. (Pre-tokenized ids are checked per record by the workers, naming the file and line.)"""
    positions = model_info.get("max_position_embeddings")
    if positions is not None and cfg.data.max_length > int(positions):
        raise ConfigError(
            f"data.max_length: {cfg.data.max_length} tokens is more than the teacher's max_position_embeddings "
            f"({positions}); set data.max_length <= {positions}"
        )
    vocab = int(model_info["padded_vocab_size"])
    if tokenizer_size > vocab:
        key = "data.tokenizer" if cfg.data.tokenizer else "teacher.model"
        raise ConfigError(
            f"{key}: the tokenizer has {tokenizer_size} tokens, more than the teacher's vocabulary ({vocab} logits); "
            "its ids past the vocabulary would index no embedding. Use the teacher's own tokenizer"
        )


def _check_generation(cfg: KDCacheConfig) -> None:
    """Before any work: a vLLM engine on an embedded Ray (actors in this Python environment) needs vLLM here; a large
    unit of prompts is a long unit to retry (warned)."""
    if cfg.generate is None:
        return
    if cfg.generate.engine == "vllm" and cfg.cluster.address is None and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "generate.engine: vllm is not installed in this environment, where the actors of an embedded Ray run; "
            "pip install 'kdcache[vllm]' (GPU machines), or use generate.engine: hf"
        )
    if cfg.data.unit_bytes > GENERATE_UNIT_BYTES_WARN:
        log.warning(
            "data.unit_bytes=%d: a unit of that many bytes of prompts takes long to generate (and to redo after a "
            "failure); units of ~%d KiB are a few minutes of generation on a GPU",
            cfg.data.unit_bytes, GENERATE_UNIT_BYTES_WARN // 1024,
        )  # fmt: skip


def _sanitized_config(cfg: KDCacheConfig) -> dict[str, Any]:
    """The config as recorded in the manifest: no storage option, env var value or URL password (`to_record`)."""
    return cfg.to_record()


def _in_ray_job() -> bool:
    """Whether this process is a Ray job's entrypoint (`ray job submit`, `kdcache submit`): Ray's job supervisor
    hands the job's runtime_env to it in this variable."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _init_ray(cfg: KDCacheConfig) -> bool:
    """Start or join Ray as `cluster.address` says; returns whether this is an embedded local Ray.

    `cluster.address: null` inside a Ray job joins the job's cluster: a nested local Ray there could not set up the
    job's runtime_env (working_dir) for its actors (`RuntimeEnvSetupError`)."""
    import ray

    embedded = cfg.cluster.address is None and not _in_ray_job()
    if ray.is_initialized():
        return embedded
    if embedded:
        needed = cfg.cluster.num_actors * cfg.cluster.cpus_per_actor
        ray.init(
            address="local",  # a new embedded Ray, never whatever cluster `ray start` last left on this machine
            num_cpus=max(int(needed + 0.999), os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            logging_level=logging.WARNING,
        )
    elif cfg.cluster.address is None:
        log.info("cluster.address is null inside a Ray job: joining the job's cluster")
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", logging_level=logging.WARNING)
    else:
        ray.init(address=cfg.cluster.address, logging_level=logging.WARNING)
    return embedded


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
    o = cfg.output
    store = Store(o.uri, o.storage_options, retries=o.store_retries, base_delay_s=o.store_backoff_s)
    if store.protocol == "memory":
        raise ConfigError("output.uri: memory:// is private to one process; Ray actors cannot write to it")
    atomic = store.exclusive_create_is_atomic
    if not atomic:
        log.warning("%s: exclusive create is not atomic on %s; run one job per cache", store.uri, store.protocol)
    started = time.time()
    _check_generation(cfg)
    files = expand_urls(cfg.data.source)
    inputs = compute_fingerprint(cfg, files)
    fingerprint = fingerprint_of(inputs)
    # Claim only once the plan stands: a job that fails before (no input file, a bad Parquet footer) claims nothing.
    units = plan_units(cfg.data.source, cfg.data.format, unit_bytes=cfg.data.unit_bytes, files=files)
    t = cfg.teacher
    names = {"teacher": t.model, "revision": t.revision, "tokenizer": cfg.data.tokenizer or t.model}
    claim_fingerprint(store, fingerprint, inputs, names)
    if cfg.targets.cross_tokenizer:
        write_teacher_pieces(cfg, store, inputs["tokenizer"]["hash"])
    existing = read_manifest(store)
    if existing is not None and existing["complete"] and existing["fingerprint"] == fingerprint:
        log.info("%s: cache is complete; nothing to do", store.uri)
        return existing
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
    foreign = [r["unit_id"] for r in by_id.values() if r.get("fingerprint", fingerprint) != fingerprint]
    if foreign:
        raise CacheMismatchError(
            f"{store.uri}: {len(foreign)} unit(s) (e.g. {foreign[0]}) were committed by a job with another "
            "fingerprint that ran at the same time; run one job per output.uri"
        )
    manifest_units = []
    for unit in units:
        record = by_id[unit.unit_id]
        manifest_units.append(
            {key: record[key] for key in ("unit_id", "path", "bytes", "sha256", "num_sequences", "num_tokens")}
            | {"num_target_tokens": record.get("num_target_tokens", record["num_tokens"])}
            | {"source": unit.url, "range": [unit.start, unit.stop], "padded_tokens": record.get("padded_tokens", 0)}
            | {k: record.get(k, 0) for k in ("documents", "empty_documents", "short_windows_dropped")}
            | {k: record[k] for k in CHAT_COUNTS if k in record}
            | {k: record[k] for k in GENERATE_COUNTS if k in record}
            | {k: record[k] for k in ("crc32", "telemetry", "timing_s", "finished_at") if k in record}
        )
    check_claim(store, fingerprint)  # still ours: no other job took the output over while this one ran
    orphans = _delete_orphan_shards(store, manifest_units)
    provenance = build_provenance(cfg, inputs, manifest_units, stats)
    manifest = _build_manifest(cfg, fingerprint, inputs, manifest_units, stats.last_run(orphans), started, provenance)
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
    embedded = _init_ray(cfg)
    c = cfg.cluster
    if factory is None:
        from kdcache.capture.actors import TeacherActorFactory
        from kdcache.capture.worker import WorkerSettings

        settings = WorkerSettings.from_config(_absolute_local_paths(cfg), fingerprint)
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
        start_timeout_s=actor_start_timeout(c.actor_start_timeout_s, embedded=embedded),
    )


def _absolute_local_paths(cfg: KDCacheConfig) -> KDCacheConfig:
    """The config the actors get: they run in another working directory (Ray's), so a relative local teacher,
    tokenizer or output path becomes absolute here; hub ids and URLs stay as they are."""

    def absolute(path: str | None, must_exist: bool) -> str | None:
        if path is None or "://" in path or (must_exist and not os.path.exists(path)):
            return path  # a hub id (no such local path) or a URL
        return os.path.abspath(path)

    t, d, o = cfg.teacher, cfg.data, cfg.output
    return dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(t, model=absolute(t.model, True)),
        data=dataclasses.replace(d, tokenizer=absolute(d.tokenizer, True)),
        output=dataclasses.replace(o, uri=absolute(o.uri, False)),
    )


def build_provenance(
    cfg: KDCacheConfig, inputs: dict[str, Any], units: list[dict[str, Any]], stats: RunStats
) -> dict[str, Any]:
    """What the cache came from, for the manifest's ``provenance`` (`kdcache.capture.provenance`): the teacher (as the
    job named it) and its license; for a generated cache the generation settings, what was generated, and the
    generation throughput of this run's actors (tokens per second of generation time, per actor)."""
    from kdcache.capture.provenance import teacher_license

    t = cfg.teacher
    out: dict[str, Any] = {
        "teacher": {"model": t.model, "revision": t.revision}
        | teacher_license(t.model, revision=t.revision, override=t.license)
    }
    if cfg.generate is not None:
        generated = sum(u.get("generated_tokens", 0) for u in units)
        seconds = sum((u.get("timing_s") or {}).get("generate", 0.0) for u in units)
        rates = [a["generated_tokens_per_s"] for a in stats.actors if a.get("generated_tokens")]
        out["generation"] = {
            **inputs["generate"],
            "prompts": sum(u.get("prompts", 0) for u in units),
            "sequences": sum(u.get("generated_sequences", 0) for u in units),
            "generated_tokens": generated,
            "generate_s": seconds,  # summed over units (the engines' time)
            "generated_tokens_per_s": generated / seconds if seconds > 0 else 0.0,  # per actor, over every unit
            "actor_generated_tokens_per_s": rates,  # this run's actors
        }
    return redact_urls(out)


def _build_manifest(cfg, fingerprint, inputs, units, last_run, started, provenance=None) -> dict[str, Any]:
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
        provenance=provenance,
    )
