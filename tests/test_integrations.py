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
