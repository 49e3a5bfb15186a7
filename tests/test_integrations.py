"""Trainer adapters on a fake cache with a tiny student (HF Trainer, Lightning, Ray Train); plain-Parquet interop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fake_cache import write_fake_cache

from kdcache.integrations.ray_train import shard_for_ray_train
from kdcache.read.dataset import KDCacheDataset
from kdcache.read.reader import open_cache

UNIT_SEQS = [5, 4, 6, 4]  # 19 sequences
VOCAB = 64


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("kd") / "cache")
    write_fake_cache(uri, num_units=len(UNIT_SEQS), seqs_per_unit=UNIT_SEQS, k=8, vocab=VOCAB, max_len=16)
    return uri


def tiny_student(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------------------------------
# Hugging Face Trainer


def test_hf_kd_trainer_trains_saves_and_resumes(cache, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from kdcache.integrations.hf_trainer import DATASET_STATE_FILE, KDTrainer

    def args(max_steps: int) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=max_steps,
            learning_rate=1e-2,
            logging_steps=1,
            save_steps=3,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )

    model = tiny_student()
    before = [p.detach().clone() for p in model.parameters()]
    ds = KDCacheDataset(cache, batch_size=2, seed=1, student_vocab_size=VOCAB)
    trainer = KDTrainer(model=model, args=args(6), train_dataset=ds, kd_alpha=0.8, kd_temperature=2.0)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert min(losses[-2:]) < losses[0]  # learning from the cached teacher
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # every parameter got gradients
    state = json.loads((tmp_path / "out" / "checkpoint-3" / DATASET_STATE_FILE).read_text())
    assert state["global_batches_done"] == 3 and state["epoch"] == 0

    ds2 = KDCacheDataset(cache, batch_size=2, seed=1)
    resumed = KDTrainer(model=tiny_student(), args=args(6), train_dataset=ds2, kd_alpha=0.8, kd_temperature=2.0)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert resumed.kd_state["global_batches_done"] == 6  # batches 3, 4, 5: nothing skipped twice, nothing repeated


# ------------------------------------------------------------------------------------------------------------------
# Lightning


def test_lightning_module_and_datamodule(cache):
    L = pytest.importorskip("lightning")
    from kdcache.integrations.lightning import KDCacheDataModule, KDLightningModule

    dm = KDCacheDataModule(cache, batch_size=2, num_workers=0, seed=2, student_vocab_size=VOCAB)
    module = KDLightningModule(tiny_student(), kd_alpha=0.5, lr=1e-2)
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
    state = dm.state_dict()
    assert state["global_batches_done"] == 4 and state["epoch"] == 0
    fresh = KDCacheDataModule(cache, batch_size=2, seed=2)
    fresh.load_state_dict(state)
    fresh.setup("fit")
    rest = [b["batch_index"].item() for b in fresh.train_dataloader()]
    assert rest == list(range(4, len(fresh.dataset)))


# ------------------------------------------------------------------------------------------------------------------
# Ray Train


def test_shard_for_ray_train_with_a_context(cache):
    seen = []
    for rank in range(2):
        context = SimpleNamespace(get_world_rank=lambda r=rank: r, get_world_size=lambda: 2)
        ds = shard_for_ray_train(cache, batch_size=3, context=context, seed=4)
        assert (ds.rank, ds.world_size) == (rank, 2)
        seen += [i for b in ds for i in b["seq_id"].tolist() if i >= 0]
    assert sorted(seen) == sorted(int(s["seq_id"]) for s in open_cache(cache).iter_sequences())


def test_ray_train_torch_trainer(cache, tmp_path, ray_session):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config: dict) -> None:  # nested, so Ray pickles it by value (tests/ is not importable there)
        import ray.train

        from kdcache.integrations.ray_train import shard_for_ray_train

        ds = shard_for_ray_train(config["cache"], batch_size=2, seed=3)
        ids, steps = [], 0
        for batch in torch.utils.data.DataLoader(ds, batch_size=None):
            ids += [i for i in batch["seq_id"].tolist() if i >= 0]
            steps += 1
            torch.distributed.all_reduce(torch.ones(1))  # a collective per step, as DDP: unequal steps would hang
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"ids": ids, "steps": steps}))

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cache": cache, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="kd"),
    )
    trainer.fit()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["steps"] == results[1]["steps"] == 5  # ceil(19 / 4)
    ids = results[0]["ids"] + results[1]["ids"]
    assert sorted(ids) == sorted(int(s["seq_id"]) for s in open_cache(cache).iter_sequences())


# ------------------------------------------------------------------------------------------------------------------
# Interop: the shards are plain Parquet


def shard_paths(cache: str) -> list[str]:
    return [str(Path(cache) / u["path"]) for u in open_cache(cache).units]


def test_pyarrow_dataset_reads_the_shards(cache):
    import pyarrow.dataset as pads

    manifest = open_cache(cache).manifest
    table = pads.dataset(shard_paths(cache), format="parquet").to_table()
    assert table.num_rows == manifest["stats"]["num_tokens"]
    assert len(set(table.column("seq_id").to_pylist())) == manifest["stats"]["num_sequences"]
    assert {"input_id", "target_gaps_p0_0", "target_codes_p0", "tail_logprob_0", "entropy"} <= set(table.column_names)


def test_ray_data_reads_the_shards(cache, ray_session):
    import ray.data

    manifest = open_cache(cache).manifest
    ds = ray.data.read_parquet(shard_paths(cache))
    assert ds.count() == manifest["stats"]["num_tokens"]
    assert "target_gaps_p0_0" in ds.schema().names
    rows = ds.select_columns(["seq_id"]).take_all()
    assert len({r["seq_id"] for r in rows}) == manifest["stats"]["num_sequences"]


# ------------------------------------------------------------------------------------------------------------------
# Evaluation and resume after max_steps (issue 12, item 4)


def _mean_batch_loss(model: torch.nn.Module, ds: KDCacheDataset, **loss_kwargs) -> float:
    from kdcache.losses import distillation_loss

    model.eval()
    with torch.no_grad():
        losses = [
            float(distillation_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b,
                                    **loss_kwargs))
            for b in ds
        ]  # fmt: skip
    return sum(losses) / len(losses)


def test_hf_kd_trainer_evaluates_on_a_cache_while_training_and_after_resume(cache, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from kdcache.integrations.hf_trainer import KDTrainer

    def trainer(model, max_steps: int) -> KDTrainer:
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=max_steps,
            learning_rate=1e-2,
            eval_strategy="steps",
            eval_steps=2,
            save_steps=2,
            per_device_eval_batch_size=3,  # ignored: the eval dataset batches itself
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        return KDTrainer(
            model=model,
            args=args,
            train_dataset=KDCacheDataset(cache, batch_size=2, seed=1),
            eval_dataset={"held": KDCacheDataset(cache, batch_size=4, shuffle=False)},
            kd_alpha=0.8,
        )

    first = trainer(tiny_student(), 4)
    first.train()
    evals = [row for row in first.state.log_history if "eval_held_loss" in row]
    assert [row["step"] for row in evals] == [2, 4] and all(math.isfinite(r["eval_held_loss"]) for r in evals)
    expected = _mean_batch_loss(first.model, KDCacheDataset(cache, batch_size=4, shuffle=False), alpha=0.8)
    assert evals[-1]["eval_held_loss"] == pytest.approx(expected, rel=1e-5)

    resumed = trainer(tiny_student(seed=5), 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.kd_state["global_batches_done"] == 4
    metrics = resumed.evaluate()
    assert metrics["eval_held_loss"] == pytest.approx(evals[-1]["eval_held_loss"], rel=1e-4)  # same weights again
    single = resumed.evaluate(KDCacheDataset(cache, batch_size=4, shuffle=False))  # a dataset passed directly
    assert single["eval_loss"] == pytest.approx(metrics["eval_held_loss"], rel=1e-6)
    predictions = resumed.predict(KDCacheDataset(cache, batch_size=4, shuffle=False))
    assert predictions.metrics["test_loss"] == pytest.approx(metrics["eval_held_loss"], rel=1e-6)


def test_lightning_resumes_from_a_checkpoint_saved_after_max_steps(cache, tmp_path):
    L = pytest.importorskip("lightning")
    from kdcache.integrations.lightning import KDCacheDataModule, KDLightningModule

    seen: list[tuple[int, int, int]] = []  # (lightning epoch, dataset epoch, batch_index)

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            dataset = trainer.datamodule.dataset
            seen.append((trainer.current_epoch, dataset.epoch, int(batch["batch_index"])))

    def fit(max_steps: int, ckpt_path: str | None = None) -> L.Trainer:
        trainer = L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Record()],
        )
        dm = KDCacheDataModule(cache, batch_size=2, seed=2, student_vocab_size=VOCAB)
        trainer.fit(KDLightningModule(tiny_student(), lr=1e-2), datamodule=dm, ckpt_path=ckpt_path)
        return trainer

    first = fit(4)
    assert seen == [(0, 0, b) for b in range(4)]
    first.save_checkpoint(str(tmp_path / "stopped.ckpt"))  # Lightning now counts epoch 0 as done
    assert first.current_epoch == 1
    seen.clear()
    batches = 10  # ceil(19 / 2)
    second = fit(4 + 6 + 3, ckpt_path=str(tmp_path / "stopped.ckpt"))
    # the rest of dataset epoch 0 (batches 4-9), then dataset epoch 1 from its start
    assert [(d, b) for _, d, b in seen] == [(0, b) for b in range(4, batches)] + [(1, b) for b in range(3)]
    assert [e for e, _, _ in seen] == [1] * 6 + [2] * 3

    second.save_checkpoint(str(tmp_path / "again.ckpt"))  # and once more, from a mapped epoch
    seen.clear()
    fit(13 + 2, ckpt_path=str(tmp_path / "again.ckpt"))
    assert [(d, b) for _, d, b in seen] == [(1, 3), (1, 4)]
