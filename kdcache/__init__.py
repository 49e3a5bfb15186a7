"""kdcache: run a teacher language model once, cache its soft targets, and serve them to many students.

Public API (stable), loaded lazily so that `import kdcache` stays cheap (Ray, torch and transformers load only when
used):
    open_cache(uri)         -> CacheReader with `.manifest` and `.iter_sequences()`       (kdcache.read.reader)
    KDCacheDataset(uri, batch_size=...) -> a torch IterableDataset of collated batches    (kdcache.read.dataset)
    KDCacheConfig           -> the job configuration (YAML sections teacher/data/targets/output/cluster)
    run_cache_job(config)   -> run a caching job (embedded Ray when cluster.address is None)  (kdcache.capture.job)
    KdcacheError            -> the base of every error kdcache raises on purpose
    kdcache.losses          -> the distillation losses (torch only)
    kdcache.integrations    -> adapters for the Hugging Face Trainer, Lightning and Ray Train

The package's folders are the stages of the data flow: capture/ (sources -> teacher -> targets -> shards, on Ray),
formats/ (the shard files), read/ (manifest -> batches), losses/, integrations/, tools/ (info, verify, report) and
demo/ (the offline demo's assets and students); docs/ARCHITECTURE.md describes them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["KDCacheConfig", "KDCacheDataset", "KdcacheError", "__version__", "open_cache", "run_cache_job"]

# name -> the module that defines it (each name has this one address)
_LAZY = {
    "KDCacheConfig": "kdcache.config",
    "KdcacheError": "kdcache.errors",
    "KDCacheDataset": "kdcache.read.dataset",
    "open_cache": "kdcache.read.reader",
    "run_cache_job": "kdcache.capture.job",
}
_SUBPACKAGES = ("losses", "integrations")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"kdcache.{name}")
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
