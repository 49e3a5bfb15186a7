"""Lightning: `KDCacheDataModule` serves a KDCacheDataset; `KDLightningModule` distils a student on its batches.

    dm = KDCacheDataModule(uri, batch_size=8, num_workers=1, temperature=2.0)
    module = KDLightningModule(student, kd_alpha=0.9, kd_temperature=1.0, lr=1e-4)
    lightning.Trainer(max_steps=1000, strategy="ddp").fit(module, datamodule=dm)

- The data module builds the dataset in `setup()` with the trainer's global rank and world size, and sets its epoch
  to `trainer.current_epoch` at each epoch (Lightning does not call `set_epoch` on iterable datasets).
- Checkpoints hold the data module's `state_dict()`: the dataset state after the last batch the trainer consumed
  (recorded from `batch_index` in `on_before_batch_transfer`, i.e. at the consumer, not where workers prefetch).
  Restoring a checkpoint resumes mid-epoch without reading skipped data, also from `trainer.save_checkpoint()`
  after `fit` stopped at `max_steps`: Lightning counts that epoch as finished (`current_epoch` + 1), the dataset
  does not, so the module maps Lightning's epochs onto the dataset's from then on (the rest of the interrupted
  epoch first, then the next ones in order).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from kdcache.integrations import KDDataLoader
from kdcache.losses import distillation_loss
from kdcache.read.dataset import KDCacheDataset

__all__ = ["KDCacheDataModule", "KDLightningModule"]


class KDCacheDataModule(L.LightningDataModule):
    """Training batches from a cache.

    Args:
        uri: cache root URL; batch_size: sequences per batch per device; num_workers: DataLoader workers.
        **dataset_kwargs: other KDCacheDataset arguments (seed, top_k, temperature, student_vocab_size, ...).
    """

    def __init__(self, uri: str, *, batch_size: int, num_workers: int = 0, **dataset_kwargs: Any):
        super().__init__()
        self.uri, self.batch_size, self.num_workers, self.dataset_kwargs = uri, batch_size, num_workers, dataset_kwargs
        self.dataset: KDCacheDataset | None = None
        self._pending: dict[str, Any] | None = None
        self._consumed: tuple[int, int] | None = None  # (epoch, global batches done) at the consumer
        self._restored_epoch: int | None = None  # the dataset epoch of a loaded state, until its first iteration
        self._epoch_offset = 0  # dataset epoch = trainer.current_epoch + this

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            self.dataset = KDCacheDataset(
                self.uri, batch_size=self.batch_size, rank=rank, world_size=world, **self.dataset_kwargs
            )
        if self._pending is not None:
            self.dataset.load_state_dict(self._pending)
            self._pending = None

    def train_dataloader(self) -> KDDataLoader:
        epoch_fn = self._dataset_epoch if self.trainer is not None else None
        return KDDataLoader(self.dataset, num_workers=self.num_workers, epoch_fn=epoch_fn)

    def _dataset_epoch(self) -> int:
        """The dataset epoch of the trainer's current epoch. After a restore the first iteration continues the
        restored epoch, whatever Lightning calls it (its loops are restored after the data module's state)."""
        current = self.trainer.current_epoch
        if self._restored_epoch is not None:
            self._epoch_offset = self._restored_epoch - current
            self._restored_epoch = None
        return current + self._epoch_offset

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and "batch_index" in batch:
            self._consumed = (self.dataset.epoch, int(batch["batch_index"]) + 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self.dataset is None or self._consumed is None:
            return {}
        epoch, done = self._consumed
        return self.dataset.state_after(done, epoch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.dataset is None:
            self._pending = state_dict
        else:
            self.dataset.load_state_dict(state_dict)
        self._consumed = (state_dict["epoch"], state_dict["global_batches_done"])
        self._restored_epoch = int(state_dict["epoch"])


class KDLightningModule(L.LightningModule):
    """Distils `student` (a Hugging Face causal LM or any module returning `.logits` [B, L, V]) on cache batches.

    Args:
        kd_kind, kd_alpha, kd_temperature: as `kdcache.losses.distillation_loss` (kind, alpha, temperature); kind
            None (the default) is the estimator that fits the cache.
        lr: AdamW learning rate.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        *,
        kd_kind: str | None = None,
        kd_alpha: float = 1.0,
        kd_temperature: float = 1.0,
        lr: float = 1e-4,
    ):
        super().__init__()
        self.student = student
        self.kd_kind, self.kd_alpha, self.kd_temperature, self.lr = kd_kind, kd_alpha, kd_temperature, lr

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = distillation_loss(
            logits, batch, kind=self.kd_kind, alpha=self.kd_alpha, temperature=self.kd_temperature
        )
        self.log("train_loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
