"""Train a student LM on a kdcache with DDP under torchrun (gloo on CPU, nccl on GPU), checkpointing the data state.

    torchrun --nproc_per_node 2 jobs/train_student.py --cache /data/kd/llama-top64 --student path/to/config.json \
        --steps 1000 --batch-size 4 --out runs/s1 --save-every 200
    torchrun --nproc_per_node 2 jobs/train_student.py ... --resume runs/s1/checkpoint.pt     # continues exactly

`--student` is a model directory (weights loaded with from_pretrained), or a config (a directory with config.json
only, or the JSON file itself: a fresh student built from it, seeded by --seed). Rank 0 first prints what the cache
came from (`{"cache", "teacher", "license", "generated"}`: the teacher's license, and a cache of the teacher's own
responses' generation settings, docs/GENERATE.md), then one JSON line per step and a final line
`{"final_loss": ..., "steps": ...}`; the checkpoint (`<out>/checkpoint.pt`) holds the model, optimizer, step and
`KDCacheDataset.state_after(...)` of the last batch trained on.

On a cache of the teacher's own responses, `--alpha 0.5` mixes token-level KD (the soft targets) with sequence-level
KD (cross-entropy on the generated tokens: `distillation_loss` takes CE where the cache has targets); `--alpha 0` is
sequence-level KD alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from kdcache.losses import LOSSES, distillation_loss
from kdcache.read.dataset import KDCacheDataset

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="cache root URL (local path, s3://, gs://)")
    p.add_argument("--student", required=True, help="model directory, or a config.json / directory with only one")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in total (resumed runs included)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step per rank")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument(
        "--kind", default=None, choices=sorted(LOSSES), help="KD divergence (default: the estimator fitting the cache)"
    )
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the KD term (1 - alpha: hard-label CE)")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature (exact when cached)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most probable cached entries")
    p.add_argument("--seed", type=int, default=0, help="data order and fresh-student initialization")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--out", default=None, help="directory for checkpoint.pt (rank 0 writes)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", default=None, help="checkpoint.pt to continue from")
    return p.parse_args(argv)


def load_student(spec: str, seed: int) -> torch.nn.Module:
    """A causal LM from a model directory (with weights), or a fresh one from a config directory or JSON file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    if path.is_dir() and any((path / name).exists() for name in WEIGHT_FILES):
        return AutoModelForCausalLM.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def provenance(uri: str, manifest: dict) -> dict:
    """What the cache came from: its teacher, the teacher's license, and for a generated cache how it was generated."""
    recorded = manifest.get("provenance") or {}
    teacher = recorded.get("teacher") or {}
    generated = recorded.get("generation")
    keys = ("engine", "n", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "sequences", "generated_tokens")
    return {
        "cache": uri,
        "teacher": teacher.get("model") or (manifest.get("config") or {}).get("teacher", {}).get("model"),
        "license": teacher.get("license"),
        "generated": None if generated is None else {key: generated.get(key) for key in keys},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = load_student(args.student, args.seed).to(device)
    dataset = KDCacheDataset(  # rank and world size from the process group
        args.cache,
        batch_size=args.batch_size,
        seed=args.seed,
        top_k=args.top_k,
        student_vocab_size=model.config.vocab_size,
        compact_targets=cuda and args.top_k is None,  # on a GPU the losses decode the stored head there
    )
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    step, data_state = 0, None
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, data_state = ckpt["step"], ckpt["dataset"]
        dataset.load_state_dict(data_state)

    def save() -> None:
        if rank == 0 and args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            torch.save({**ckpt, "dataset": data_state}, Path(args.out) / "checkpoint.pt")

    if len(dataset) == 0:
        raise SystemExit(f"{args.cache}: the cache has no sequences to train on")
    if rank == 0:
        print(json.dumps(provenance(args.cache, dataset.manifest)), flush=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.num_workers)
    loss_value = math.nan
    while step < args.steps:
        dataset.set_epoch(dataset.epoch)  # keeps a loaded resume point of this epoch
        finished_epoch = True
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = distillation_loss(logits, batch, kind=args.kind, alpha=args.alpha, temperature=args.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            data_state = dataset.state_after(int(batch["batch_index"]) + 1)  # what this step consumed
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            loss_value = float(mean) / world
            if rank == 0:
                print(json.dumps({"step": step, "loss": loss_value, "epoch": dataset.epoch}), flush=True)
            if args.save_every and step % args.save_every == 0:
                save()
            if step >= args.steps:
                finished_epoch = False
                break
        if finished_epoch:
            dataset.set_epoch(dataset.epoch + 1)
    save()
    if rank == 0:
        print(json.dumps({"final_loss": loss_value, "steps": step}), flush=True)
    dist.destroy_process_group()
    return 0 if math.isfinite(loss_value) else 1


if __name__ == "__main__":
    sys.exit(main())
