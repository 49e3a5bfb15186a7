"""Thin adapters from `KDCacheDataset` to trainers. Each submodule imports its trainer lazily-by-module:

- `kdcache.integrations.hf_trainer`: `KDTrainer`, a `transformers.Trainer` whose loss is a distillation loss.
- `kdcache.integrations.lightning`: `KDCacheDataModule` and `KDLightningModule` (needs `pip install lightning`).
- `kdcache.integrations.ray_train`: `shard_for_ray_train()`, the dataset of one Ray Train worker.

This package itself only holds what they share: a DataLoader that passes the dataset's batches through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from kdcache.read.dataset import KDCacheDataset

__all__ = ["KDDataLoader", "passthrough_collator"]


def passthrough_collator(batch: dict[str, Any]) -> dict[str, Any]:
    """The data collator for KDCacheDataset: its items are already collated batches."""
    return batch


class KDDataLoader(DataLoader):
    """`DataLoader(dataset, batch_size=None)` for a KDCacheDataset, with the epoch kept in step with the trainer.

    Args:
        dataset: the KDCacheDataset (it batches, shuffles and shards itself: no sampler, no batch size here).
        num_workers: DataLoader worker processes (each reads every unit of its rank unless the dataset has
            batch_phases divisible by it; 0 is usually enough: the dataset loads and collates in threads).
        epoch_fn: called at each `iter()`; its value is passed to `dataset.set_epoch` (for trainers that do not
            call `set_epoch` on the loader, e.g. Lightning: `lambda: trainer.current_epoch`).
        **kwargs: other DataLoader arguments (pin_memory, prefetch_factor, ...).
    """

    def __init__(
        self,
        dataset: KDCacheDataset,
        *,
        num_workers: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        **kwargs: Any,
    ):
        self._epoch_fn = epoch_fn
        kwargs.setdefault("collate_fn", passthrough_collator)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the dataset (the Hugging Face Trainer calls this on its train dataloader each epoch)."""
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        if self._epoch_fn is not None:
            self.dataset.set_epoch(int(self._epoch_fn()))
        return super().__iter__()
