"""Hugging Face `transformers.Trainer` on a kdcache: `KDTrainer` feeds `KDCacheDataset` batches and distils.

    ds = KDCacheDataset(uri, batch_size=8, student_vocab_size=model.config.vocab_size)
    trainer = KDTrainer(model=model, args=TrainingArguments("out", max_steps=1000), train_dataset=ds,
                        kd_alpha=0.9, kd_temperature=2.0)   # kd_kind: the estimator that fits the cache
    trainer.train()                                   # or trainer.train(resume_from_checkpoint="out/checkpoint-500")

- Batches come from a `KDDataLoader` (batch_size=None): the dataset already batches, shuffles and splits by rank
  (rank and world size from torch.distributed, which the Trainer initializes), so the loader is not passed through
  `accelerator.prepare`, which would split the batches again. The same holds for a KDCacheDataset given as
  `eval_dataset` (or a dict of them) or to `predict`: `evaluate()` reports the distillation loss on it.
- `per_device_train_batch_size` / `per_device_eval_batch_size` are ignored: the dataset's `batch_size` is the
  per-device batch.
- The loss is `kdcache.losses.distillation_loss` on the student's logits; `labels` are not passed to the model
  (they are already shifted: position t holds token t + 1).
- Each checkpoint folder gets `kdcache_dataset_state.json` (the dataset state after the last batch trained on, from
  the batch's `batch_index`); `train(resume_from_checkpoint=...)` loads it and turns off the Trainer's own
  batch skipping (`ignore_data_skip`), so the resume reads nothing it skips.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from kdcache.integrations import KDDataLoader, passthrough_collator
from kdcache.losses import distillation_loss
from kdcache.read.dataset import KDCacheDataset

__all__ = ["DATASET_STATE_FILE", "KDTrainer"]

DATASET_STATE_FILE = "kdcache_dataset_state.json"


class _SaveDatasetState(TrainerCallback):
    """Writes the dataset state into each checkpoint folder (main process only)."""

    def __init__(self, trainer: KDTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder) and self.trainer.kd_state is not None:
            with open(os.path.join(folder, DATASET_STATE_FILE), "w") as f:
                json.dump(self.trainer.kd_state, f, indent=1)


class KDTrainer(Trainer):
    """A Trainer whose `train_dataset` is a KDCacheDataset and whose loss is a distillation loss.

    Args:
        kd_kind: a key of `kdcache.losses.LOSSES` ("forward_kl", "sampled_kl", "reverse_kl", "jsd", ...); None
            (the default): the estimator that fits the cache (`kdcache.losses.default_kind`).
        kd_alpha: weight of the KD term; 1 - kd_alpha weighs the hard-label cross-entropy.
        kd_temperature: KD temperature (exact when cached; the KD term is scaled by T**2).
        *args, **kwargs: as for `transformers.Trainer` (`data_collator` defaults to a passthrough).
    """

    def __init__(
        self,
        *args: Any,
        kd_kind: str | None = None,
        kd_alpha: float = 1.0,
        kd_temperature: float = 1.0,
        **kwargs: Any,
    ):
        kwargs.setdefault("data_collator", passthrough_collator)
        super().__init__(*args, **kwargs)
        self.kd_kind, self.kd_alpha, self.kd_temperature = kd_kind, kd_alpha, kd_temperature
        self.kd_state: dict[str, Any] | None = None  # dataset state after the last batch trained on
        self.add_callback(_SaveDatasetState(self))

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if not isinstance(self.train_dataset, KDCacheDataset):
            return super().get_train_dataloader()
        return self._kd_loader(self.train_dataset)

    def get_eval_dataloader(self, eval_dataset: str | Any = None) -> torch.utils.data.DataLoader:
        """As `Trainer.get_eval_dataloader`; a KDCacheDataset's batches pass through as they are."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(eval_dataset, str) and isinstance(self.eval_dataset, dict):
            dataset = self.eval_dataset[eval_dataset]
        if not isinstance(dataset, KDCacheDataset):
            return super().get_eval_dataloader(eval_dataset)
        return self._kd_loader(dataset)

    def get_test_dataloader(self, test_dataset: Any) -> torch.utils.data.DataLoader:
        """As `Trainer.get_test_dataloader`; a KDCacheDataset's batches pass through as they are."""
        if not isinstance(test_dataset, KDCacheDataset):
            return super().get_test_dataloader(test_dataset)
        return self._kd_loader(test_dataset)

    def _kd_loader(self, dataset: KDCacheDataset) -> KDDataLoader:
        # the Trainer's own loader would batch the dataset's batches again (a list of dicts per step)
        return KDDataLoader(
            dataset,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
            collate_fn=self.data_collator,
        )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """Student forward on `input_ids`/`attention_mask`, then `distillation_loss` against the cached targets."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = distillation_loss(
            outputs.logits, inputs, kind=self.kd_kind, alpha=self.kd_alpha, temperature=self.kd_temperature
        )
        if model.training and isinstance(self.train_dataset, KDCacheDataset) and "batch_index" in inputs:
            self.kd_state = self.train_dataset.state_after(int(inputs["batch_index"]) + 1)
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """As `Trainer.train`; a checkpoint's dataset state is loaded into the KDCacheDataset first."""
        if isinstance(resume_from_checkpoint, str) and isinstance(self.train_dataset, KDCacheDataset):
            path = os.path.join(resume_from_checkpoint, DATASET_STATE_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    self.train_dataset.load_state_dict(json.load(f))
                self.args.ignore_data_skip = True  # the dataset resumes itself; skipping again would lose batches
        return super().train(resume_from_checkpoint, *args, **kwargs)
