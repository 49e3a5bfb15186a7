"""Ray Train: the KDCacheDataset of one Ray Train worker, with rank and world size from the train context.

    def train_loop(config):
        ds = shard_for_ray_train(config["cache"], batch_size=8, seed=0)
        for batch in torch.utils.data.DataLoader(ds, batch_size=None):
            ...
            ray.train.report(metrics, checkpoint=...)   # store ds.state_after(int(batch["batch_index"]) + 1) in it

    TorchTrainer(train_loop, train_loop_config={"cache": uri}, scaling_config=ScalingConfig(num_workers=4)).fit()

Each worker reads the cache directly (no Ray Data, no object store): the manifest, then the shards its rows fall in.
"""

from __future__ import annotations

from typing import Any

from kdcache.read.dataset import KDCacheDataset

__all__ = ["shard_for_ray_train"]


def shard_for_ray_train(uri: str, *, batch_size: int, context: Any = None, **kwargs: Any) -> KDCacheDataset:
    """This worker's KDCacheDataset: rank = `get_world_rank()`, world size = `get_world_size()` of the context.

    Args:
        uri: cache root URL; batch_size: sequences per batch on this worker.
        context: a Ray Train context (default: `ray.train.get_context()`, only valid inside a training function).
        **kwargs: other KDCacheDataset arguments (seed, epoch, top_k, temperature, storage_options, ...).
    """
    if context is None:
        import ray.train

        context = ray.train.get_context()
    return KDCacheDataset(
        uri, batch_size=batch_size, rank=context.get_world_rank(), world_size=context.get_world_size(), **kwargs
    )
