"""kdcache: run a teacher language model once, cache its soft targets, and serve them to many students.

Public API (stable):
    open_cache(uri)         -> CacheReader with `.manifest` and `.iter_sequences()`
    KDCacheDataset(uri, batch_size=...) -> a torch IterableDataset of collated batches for student training
    KDCacheConfig           -> the job configuration (YAML sections teacher/data/targets/output/cluster)
    run_cache_job(config)   -> run a caching job (embedded Ray when cluster.address is None)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["KDCacheConfig", "KDCacheDataset", "KdcacheError", "__version__", "open_cache", "run_cache_job"]


def __getattr__(name: str):
    # Lazy imports keep `import kdcache` cheap: Ray, torch and transformers load only when used.
    if name == "KDCacheConfig":
        from kdcache.config import KDCacheConfig

        return KDCacheConfig
    if name == "KdcacheError":
        from kdcache.errors import KdcacheError

        return KdcacheError
    if name == "KDCacheDataset":
        from kdcache.dataset import KDCacheDataset

        return KDCacheDataset
    if name == "open_cache":
        from kdcache.reader import open_cache

        return open_cache
    if name == "run_cache_job":
        from kdcache.job import run_cache_job

        return run_cache_job
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
