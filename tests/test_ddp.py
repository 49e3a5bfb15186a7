"""Real multi-process DDP on CPU (gloo): every sequence seen exactly once, equal steps per rank, and the train job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fake_cache import write_fake_cache

from kdcache.read.reader import open_cache

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
CASES = [  # (cache name, drop_last)
    ("uneven", False),  # 19 sequences, global batch 4: the last global batch is padded
    ("uneven", True),  # ... or dropped
    ("even", False),  # 16 sequences
]


def _rank_main(rank: int, caches: dict[str, str], out: str, init_file: str) -> None:
    from kdcache.read.dataset import KDCacheDataset

    # Built before the process group exists: the rank is resolved when iteration starts (and for the workers).
    early = KDCacheDataset(caches["uneven"], batch_size=2, seed=1)
    timeout = timedelta(seconds=60)  # a hang (unequal steps) fails instead of blocking the suite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timeout)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    results = {}
    for name, drop_last in CASES:
        ds = (
            early
            if (name, drop_last) == ("uneven", False)
            else KDCacheDataset(caches[name], batch_size=2, seed=1, drop_last=drop_last)
        )
        ids, steps = [], 0
        # fork: in a process started by mp.spawn the default would be spawn, re-importing torch per worker (slow)
        for batch in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"):
            x = batch["attention_mask"].float().sum(1, keepdim=True).expand(-1, 4)
            model(x).sum().backward()  # a gradient all-reduce per step: unequal step counts would hang here
            ids += [i for i in batch["seq_id"].tolist() if i >= 0]
            steps += 1
        results[f"{name}-{drop_last}"] = {"ids": ids, "steps": steps, "len": len(ds), "rank": ds.rank}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ddp")
    write_fake_cache(str(root / "uneven"), num_units=4, seqs_per_unit=[5, 4, 6, 4], k=4, vocab=32)
    write_fake_cache(str(root / "even"), num_units=4, seqs_per_unit=4, k=4, vocab=32)
    return {"uneven": str(root / "uneven"), "even": str(root / "even")}


def test_ddp_two_ranks_two_workers_exactly_once(caches, tmp_path):
    mp.spawn(_rank_main, args=(caches, str(tmp_path), str(tmp_path / "init")), nprocs=WORLD, join=True)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for name, drop_last in CASES:
        key = f"{name}-{drop_last}"
        runs = [r[key] for r in per_rank]
        assert [r["rank"] for r in runs] == list(range(WORLD))  # taken from torch.distributed
        everything = [int(s["seq_id"]) for s in open_cache(caches[name]).iter_sequences()]
        expected_steps = len(everything) // 4 if drop_last else -(-len(everything) // 4)
        assert {r["steps"] for r in runs} == {r["len"] for r in runs} == {expected_steps}
        seen = [i for r in runs for i in r["ids"]]
        assert len(seen) == len(set(seen))
        if drop_last:
            assert len(seen) == expected_steps * 4 and set(seen) <= set(everything)
        else:
            assert sorted(seen) == sorted(everything)


def test_train_student_job_with_torchrun(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig

    write_fake_cache(str(tmp_path / "cache"), num_units=3, seqs_per_unit=[5, 4, 6], k=8, vocab=64, max_len=16)
    LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ).to_json_file(str(tmp_path / "student.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "jobs" / "train_student.py"), "--cache", str(tmp_path / "cache")]
    cmd += ["--student", str(tmp_path / "student.json"), "--steps", "3", "--out", str(tmp_path / "run")]
    cmd += ["--num-workers", "1", "--alpha", "0.5", "--temperature", "2.0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["step"] for line in lines if "step" in line] == [1, 2, 3]
    assert math.isfinite(lines[-1]["final_loss"]) and lines[-1]["steps"] == 3
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    # 15 sequences, global batch 8: 2 batches per epoch, so step 3 consumed epoch 0 and batch 0 of epoch 1
    assert ckpt["step"] == 3 and (ckpt["dataset"]["epoch"], ckpt["dataset"]["global_batches_done"]) == (1, 1)
