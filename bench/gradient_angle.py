"""How close each cached-target estimator's gradient is to full-vocabulary KD, and what it costs to store.

On the demo's small trained teacher (``kdcache.demo.assets.prepare_demo``: a 2-layer Llama trained on the Python
standard library) and a smaller student Llama (built from a config, briefly trained on hard labels), over one batch of
held-out text:

1. the full-KD gradient: forward KL(p_teacher || q_student) with the teacher's full float32 distribution, mean over
   positions, differentiated w.r.t. every student parameter;
2. for each estimator, targets are drawn from the same teacher logits, written as a real shard with
   ``kdcache.formats.parquet.ShardWriter`` and read back (so the loss sees the stored, quantized values and the shard
   gives bytes per token), then the estimator's loss from ``kdcache.losses`` is differentiated the same way;
3. the angle between the two parameter gradients and their norm ratio. Sampled modes are drawn ``--draws`` times
   with independent seeds: the table gives the mean +- std of the single-draw angle and the angle of the gradient
   averaged over the draws (the noise part shrinks like 1/sqrt(draws); the bias does not).

Estimators: top-k (k = 8/16/64) with ``forward_kl_tail`` (head + exact tail bucket) and with
``renormalized_topk_kl``; sample (N draws from p, weights count / N) and hybrid (exact top-h head + N draws from the
renormalized tail, weights tail_mass * count / N) with ``sampled_kl``; hard-label cross-entropy as a reference.

Run::

    python bench/gradient_angle.py            # demo teacher (~20 s to build once), 16 x 128 tokens, 10 draws
    python bench/gradient_angle.py --quick    # smaller teacher trained in memory, 256 tokens, 3 draws: seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache import losses
from kdcache.capture.targets import sample_targets, select_topk
from kdcache.formats.parquet import ShardWriter, column_bytes, read_shard

REPO = Path(__file__).resolve().parent.parent
FULL = {"batch": 16, "length": 128, "draws": 10, "student_steps": 150}
# --quick trains its own smaller teacher in memory (512-token vocab, 40 steps) instead of the demo's.
QUICK = {"batch": 4, "length": 64, "draws": 3, "student_steps": 0, "teacher_steps": 40}
TARGET_COLUMNS = ("target_gaps", "target_codes", "tail_logprob_0", "sample_gaps", "sample_counts", "sample_codes")


@dataclass(frozen=True)
class Estimator:
    """One way of caching targets and the loss that reads them."""

    name: str
    mode: str  # "topk" | "sample" | "hybrid" | "ce" (hard labels, nothing cached)
    loss: str  # key of kdcache.losses.LOSSES, or "cross_entropy"
    k: int = 0  # head entries stored (topk: k, hybrid: head)
    samples: int = 0  # draws per position (sample, hybrid)

    @property
    def sampled(self) -> bool:
        return self.samples > 0


ESTIMATORS = [
    *(Estimator(f"top-{k} + tail bucket", "topk", "forward_kl_tail", k=k) for k in (8, 16, 64)),
    *(Estimator(f"top-{k} renormalized", "topk", "renormalized_topk_kl", k=k) for k in (8, 16, 64)),
    Estimator("sample N=50", "sample", "sampled_kl", samples=50),
    Estimator("sample N=20", "sample", "sampled_kl", samples=20),
    Estimator("hybrid head 8 + N=50", "hybrid", "sampled_kl", k=8, samples=50),
    Estimator("hybrid head 4 + N=12", "hybrid", "sampled_kl", k=4, samples=12),
    Estimator("hard-label CE (no teacher)", "ce", "cross_entropy"),
]


# ------------------------------------------------------------------------------------------------ models and data


def _read_texts(folder: Path) -> list[str]:
    lines = [line for path in sorted(folder.glob("*.jsonl")) for line in path.read_text("utf-8").splitlines()]
    return [json.loads(line)["text"] for line in lines]


def load_models(workdir: Path | None, settings: dict[str, Any], seed: int) -> tuple[Any, Any, list[str], list[str]]:
    """The teacher (eval mode), its tokenizer, and the train / valid texts.

    Full run: the demo's assets (``prepare_demo(workdir)``, built once, then reused). Quick run (``teacher_steps`` in
    ``settings``): a 64-wide Llama with a 512-token BPE vocabulary trained briefly in memory on 16 stdlib files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.demo import corpus
    from kdcache.demo import teacher as demo_teacher
    from kdcache.demo.assets import prepare_demo

    if "teacher_steps" in settings:
        train, valid = corpus.split_train_valid(corpus.stdlib_documents(16), valid_fraction=0.25)
        train_texts, valid_texts = [t for _, t in train], [t for _, t in valid]
        with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
            tokenizer = demo_teacher.train_tokenizer(train_texts, Path(tmp), vocab_size=508)
        teacher = demo_teacher.build_teacher(tokenizer, hidden_size=64, num_layers=2, heads=4, seed=seed)
        demo_teacher.train_teacher(
            teacher,
            tokenizer,
            train_texts,
            steps=settings["teacher_steps"],
            seconds=None,
            seq_len=64,
            lr=1e-2,
            seed=seed,
            progress=False,
        )
        return teacher.eval(), tokenizer, train_texts, valid_texts
    assets = prepare_demo(workdir, progress=False, seed=seed)
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    return teacher, tokenizer, _read_texts(assets.train_dir), _read_texts(assets.valid_dir)


def build_student(tokenizer: Any, train_texts: list[str], steps: int, seed: int) -> torch.nn.Module:
    """A 1-layer, 64-wide Llama over the teacher's padded vocabulary, trained ``steps`` AdamW steps on hard labels."""
    from kdcache.demo.teacher import build_teacher, train_teacher

    student = build_teacher(tokenizer, hidden_size=64, num_layers=1, heads=2, seed=seed + 1)
    if steps > 0:
        train_teacher(
            student, tokenizer, train_texts, steps=steps, seconds=None, seq_len=64, seed=seed, progress=False
        )
    return student.eval()


def validation_windows(tokenizer: Any, texts: list[str], batch: int, length: int) -> torch.Tensor:
    """``[batch, length + 1]`` int64 token windows from the held-out texts (inputs are [:, :-1], labels [:, 1:])."""
    stream: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += [tokenizer.bos_token_id, *enc.ids, tokenizer.eos_token_id]
    need = batch * (length + 1)
    if len(stream) < need:
        raise ValueError(f"validation text has {len(stream)} tokens, need {need}; use a smaller --batch/--length")
    step = (len(stream) - (length + 1)) // max(batch - 1, 1)  # spread the windows over the whole valid split
    return torch.tensor([stream[i * step : i * step + length + 1] for i in range(batch)], dtype=torch.long)


# ------------------------------------------------------------------------------------------------ cached targets


def cache_round_trip(
    est: Estimator, logits: torch.Tensor, input_ids: torch.Tensor, generator: torch.Generator | None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Compute the estimator's targets from teacher logits ``[B, L, V]``, store them as a shard and read them back.

    Returns:
        The loss batch (``[1, B * L, ...]`` tensors, every position unmasked) and storage numbers:
        ``ids_per_token`` (distinct ids stored), ``bytes_per_token`` (whole file), ``target_bytes_per_token``
        (compressed target/sample/tail column chunks only).
    """

    b, length, vocab = logits.shape
    flat = logits.reshape(b * length, vocab)
    if est.sampled:
        head, drawn = sample_targets(
            flat, num_samples=est.samples, head=est.k, temperatures=[1.0], generator=generator
        )
    else:
        head, drawn = select_topk(flat, est.k, [1.0]), None
    writer = ShardWriter(k=est.k, num_temperatures=1, num_samples=est.samples)
    for row in range(b):
        rows = (row * length, (row + 1) * length)
        writer.add(row, input_ids[row].numpy(), head.rows(*rows), None if drawn is None else drawn.rows(*rows))
    shard = writer.finish()
    data = read_shard(shard, k=est.k, num_temperatures=1)
    sizes = column_bytes(shard)
    n = b * length

    def t(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(0)

    batch = {"target_ids": t(data.target_ids), "target_logprobs": t(data.target_logprobs)}
    batch["tail_logprob"] = t(data.tail_logprobs[:, 0])
    ids_per_token = float(est.k)
    if est.sampled:
        counts = data.sample_counts.astype(np.float64)
        scale = np.exp(data.tail_logprobs[:, :1].astype(np.float64)) if est.k else 1.0  # hybrid: the tail mass
        batch |= {
            "sample_ids": t(data.sample_ids),
            "sample_weights": t((scale * counts / est.samples).astype(np.float32)),
            "sample_logprobs": t(data.sample_logprobs),
        }
        ids_per_token += float((data.sample_counts > 0).sum(axis=1).mean())
        if est.k == 0:  # sample mode: no head, so sampled_kl must not take the hybrid path
            for key in ("target_ids", "target_logprobs", "tail_logprob"):
                batch.pop(key)
    stats = {
        "ids_per_token": ids_per_token,
        "bytes_per_token": len(shard) / n,
        "target_bytes_per_token": sum(sizes.get(c, 0) for c in TARGET_COLUMNS) / n,
    }
    return batch, stats


# ------------------------------------------------------------------------------------------------ gradients


def logit_gradient(loss_fn: Callable[[torch.Tensor], torch.Tensor], student_logits: torch.Tensor) -> torch.Tensor:
    """d loss / d student logits, ``[B, T, V]`` float32."""
    leaf = student_logits.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(leaf), leaf)
    return grad


def param_gradient(logits: torch.Tensor, params: list[torch.nn.Parameter], grad_logits: torch.Tensor) -> torch.Tensor:
    """Chain a logit gradient through the student's graph: the flat parameter gradient, float64."""
    grads = torch.autograd.grad(logits, params, grad_outputs=grad_logits, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    ).double()


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def run(settings: dict[str, Any], workdir: Path, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every estimator; returns table rows and a description of the setup."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    teacher, tokenizer, train_texts, valid_texts = load_models(workdir, settings, seed)
    student = build_student(tokenizer, train_texts, settings["student_steps"], seed)
    windows = validation_windows(tokenizer, valid_texts, settings["batch"], settings["length"])
    input_ids, labels = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids).logits.float()  # [B, L, V]
    vocab = teacher_logits.shape[-1]
    params = [p for p in student.parameters() if p.requires_grad]
    student_logits = student(input_ids=input_ids).logits  # [B, L, V], graph kept for the per-estimator backward
    flat_logits = student_logits.reshape(1, -1, vocab)
    log_p = torch.log_softmax(teacher_logits, -1).reshape(1, -1, vocab)

    def full_kd(s: torch.Tensor) -> torch.Tensor:
        return (log_p.exp() * (log_p - torch.log_softmax(s, -1))).sum(-1).mean()

    g_full = param_gradient(flat_logits, params, logit_gradient(full_kd, flat_logits))
    entropy = float(-(log_p.exp() * log_p).sum(-1).mean())
    rows = []
    for est in ESTIMATORS:
        if est.mode == "ce":
            flat_labels = labels.reshape(1, -1)
            g = logit_gradient(lambda s, y=flat_labels: losses.cross_entropy(s, y), flat_logits)
            stats = {"ids_per_token": 1.0, "bytes_per_token": 0.0, "target_bytes_per_token": 0.0}
            draws = [(param_gradient(flat_logits, params, g), stats)]
        else:
            draws = []
            for draw in range(settings["draws"] if est.sampled else 1):
                generator = torch.Generator().manual_seed(seed * 1000 + draw) if est.sampled else None
                batch, stats = cache_round_trip(est, teacher_logits, input_ids, generator)
                loss_fn = losses.LOSSES[est.loss]
                g = logit_gradient(lambda s, fn=loss_fn, batch=batch: fn(s, batch), flat_logits)
                draws.append((param_gradient(flat_logits, params, g), stats))
        angles = [angle_degrees(g, g_full) for g, _ in draws]
        mean_grad = torch.stack([g for g, _ in draws]).mean(0)
        rows.append(
            {
                "estimator": est.name,
                "loss": est.loss,
                "ids_per_token": float(np.mean([s["ids_per_token"] for _, s in draws])),
                "bytes_per_token": float(np.mean([s["bytes_per_token"] for _, s in draws])),
                "target_bytes_per_token": float(np.mean([s["target_bytes_per_token"] for _, s in draws])),
                "angle": float(np.mean(angles)),
                "angle_std": float(np.std(angles)) if len(angles) > 1 else None,
                "angle_of_mean": angle_degrees(mean_grad, g_full) if len(draws) > 1 else None,
                "norm_ratio": float(np.mean([float(g.norm() / g_full.norm()) for g, _ in draws])),
                "draws": len(draws),
            }
        )
    setup = {
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in params),
        "vocab": vocab,
        "tokens": int(input_ids.numel()),
        "batch": list(input_ids.shape),
        "teacher_entropy": entropy,
        "seconds": time.perf_counter() - started,
    }
    return rows, setup


def format_table(rows: list[dict[str, Any]], setup: dict[str, Any], draws: int) -> str:
    """The markdown table printed by the benchmark."""
    lines = [
        f"Teacher: trained Llama, {setup['teacher_params']:,} params, V={setup['vocab']:,}, mean entropy "
        f"{setup['teacher_entropy']:.2f} nats on the batch. Student: {setup['student_params']:,} params. "
        f"Batch {setup['batch'][0]} x {setup['batch'][1]} = {setup['tokens']:,} held-out tokens. "
        f"Sampled modes: {draws} independent draws.",
        "",
        "| estimator | loss | ids/token | shard B/token | target cols B/token | angle to full KD (°) "
        "| angle of mean over draws (°) | norm ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        angle = f"{r['angle']:.1f}" + (f" ± {r['angle_std']:.1f}" if r["angle_std"] is not None else "")
        mean = "—" if r["angle_of_mean"] is None else f"{r['angle_of_mean']:.1f}"
        lines.append(
            f"| {r['estimator']} | {r['loss']} | {r['ids_per_token']:.1f} | {r['bytes_per_token']:.1f} "
            f"| {r['target_bytes_per_token']:.1f} | {angle} | {mean} | {r['norm_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Gradient angle of cached-target estimators to full KD.")
    parser.add_argument("--quick", action="store_true", help="tiny teacher, batch and draw count (a few seconds)")
    parser.add_argument("--workdir", type=Path, help="demo assets folder (default .kdcache/demo/assets)")
    parser.add_argument("--draws", type=int, help="independent draws per sampled estimator")
    parser.add_argument("--batch", type=int, help="held-out windows in the batch (16; quick: 4)")
    parser.add_argument("--length", type=int, help="tokens per window (128; quick: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows and setup as JSON here")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("draws", "batch", "length"):
        if getattr(args, key):
            settings[key] = getattr(args, key)
    workdir = args.workdir or REPO / ".kdcache" / "demo" / "assets"  # shared with `kdcache demo` (same settings)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    rows, setup = run(settings, workdir, args.seed)
    print(format_table(rows, setup, settings["draws"]))
    print(f"\n({setup['seconds']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "setup": setup}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
