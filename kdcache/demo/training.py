"""Training a student: the loss of a run, an endless stream of cached batches, and the AdamW training loop.

    loss_fn = make_loss("cache", mode="topk")          # or "online" (needs the teacher) / "hard"
    batches = cache_batches(cache_uri, batch_size=8, seed=0)
    curve, stats = train_student(model, batches, loss_fn, TrainSettings(steps=150), valid=valid)

Targets of a run (`make_loss`):

- ``"cache"``: the cache's soft targets with the loss its mode calls for (`forward_kl_tail` for ``topk``,
  `sampled_kl` for ``sample`` / ``hybrid``), mixed with hard-label CE when ``TrainSettings.alpha < 1``;
- ``"online"``: full knowledge distillation, the teacher run inside the loop, forward KL on its dense logits;
- ``"hard"``: cross-entropy against the next token, no teacher (only where ``loss_mask`` is set: on a chat cache,
  the assistants' tokens).

Students are built and evaluated by `kdcache.demo.evaluation`; runs are compared by `kdcache.demo.students`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdcache import losses
from kdcache.demo.evaluation import ValidationSet, dense_forward_kl, evaluate
from kdcache.demo.threads import ThreadChooser, available_cpus

__all__ = ["LossFn", "TrainSettings", "cache_batches", "make_loss", "train_student"]

TARGETS = ("cache", "online", "hard")  # what a run trains on (see make_loss)
LossFn = Callable[[Tensor, Mapping[str, Any]], Tensor]  # (student logits [B, L, V], batch) -> scalar


def make_loss(
    targets: str,
    *,
    mode: str = "topk",
    kind: str | None = None,
    teacher: torch.nn.Module | None = None,
    alpha: float = 1.0,
) -> LossFn:
    """The training loss of a run.

    Args:
        targets: ``"cache"`` (the batch's cached soft targets), ``"online"`` (the teacher's dense logits, computed
            here on the batch's ``input_ids``) or ``"hard"`` (cross-entropy against ``labels``).
        mode: The cache's ``targets.mode`` (``"cache"`` only): ``topk`` trains with `forward_kl_tail`, ``sample`` and
            ``hybrid`` with `sampled_kl`.
        kind: A key of `kdcache.losses.LOSSES` instead of the mode's default (``"cache"`` only), e.g.
            ``"renormalized_topk_kl"``.
        teacher: Required for ``"online"``.
        alpha: Weight of the KD term; ``1 - alpha`` goes to hard-label CE (ignored for ``"hard"``).

    Returns:
        ``loss(student_logits, batch) -> scalar``.
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if targets == "hard":
        return lambda logits, batch: losses.cross_entropy(logits, _masked_labels(batch))
    if targets == "online":
        if teacher is None:
            raise ValueError("online KD needs the teacher")

        def online(logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            kd = dense_forward_kl(logits, teacher_logits, batch["loss_mask"].bool())
            return kd if alpha == 1.0 else alpha * kd + (1 - alpha) * losses.cross_entropy(logits, batch["labels"])

        return online
    kind = kind or ("forward_kl" if mode == "topk" else "sampled_kl")
    return lambda logits, batch: losses.distillation_loss(logits, batch, kind=kind, alpha=alpha)


def _masked_labels(batch: Mapping[str, Any]) -> Tensor:
    """The batch's labels, ignored (-100) where ``loss_mask`` is off: hard labels train on the same positions as the
    cache's targets (a chat cache's assistant tokens; unchanged for a text cache, whose mask covers every label)."""
    labels = batch["labels"]
    if "loss_mask" not in batch:
        return labels
    return labels.masked_fill(~batch["loss_mask"].bool(), losses.IGNORE_INDEX)


def cache_batches(
    uri: str, *, batch_size: int, seed: int, student_vocab_size: int | None = None
) -> Iterator[dict[str, Any]]:
    """Endless batches of a cache: epoch 0, 1, ... of `KDCacheDataset` (full batches only), a pure function of seed."""
    from kdcache.read.dataset import KDCacheDataset

    ds = KDCacheDataset(uri, batch_size=batch_size, seed=seed, drop_last=True, student_vocab_size=student_vocab_size)
    if len(ds) == 0:
        raise ValueError(f"{uri}: {ds.num_sequences} sequences, fewer than one batch of {batch_size}")
    epoch = 0
    while True:
        ds.set_epoch(epoch)
        yield from ds
        epoch += 1


@dataclass(frozen=True)
class TrainSettings:
    """How every student of a comparison is trained (the same for all of them).

    Attributes:
        steps: Optimizer steps.
        batch_size: Sequences per step.
        lr: Peak AdamW learning rate (linear warmup over ``warmup`` of the steps, cosine decay to 10%).
        warmup: Fraction of the steps spent warming up.
        alpha: KD weight of the distillation runs (1.0: pure KD; the rest is hard-label CE).
        eval_every: Steps between curve points (0: none but the last; the last step is always one).
        data_seed: Seed of the batch order (the same for every run).
        threads: Torch threads of the training step. 1 (default) leaves the other cores to the dataset's background
            decoding and keeps timings comparable on a shared machine (two threads on two busy cores measured 8x
            slower); None chooses per step (all CPUs while they are free, 1 under contention).
    """

    steps: int = 150
    batch_size: int = 8
    lr: float = 3e-3
    warmup: float = 0.1
    alpha: float = 1.0
    eval_every: int = 25
    data_seed: int = 0
    threads: int | None = 1


def _learning_rate(step: int, settings: TrainSettings) -> float:
    warmup = max(1, round(settings.warmup * settings.steps))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_student(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    loss_fn: LossFn,
    settings: TrainSettings,
    *,
    valid: ValidationSet | None = None,
    progress: bool = False,
    desc: str = "student",
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Train ``model`` in place with AdamW for ``settings.steps`` steps; evaluate along the way.

    Args:
        model: A causal LM taking ``input_ids`` / ``attention_mask`` and returning ``.logits`` ``[B, L, V]``.
        batches: Yields batches with ``input_ids``, ``attention_mask`` ``[B, L]`` and whatever ``loss_fn`` reads;
            at least ``settings.steps`` of them.
        loss_fn: ``loss(logits, batch) -> scalar``.
        settings: Steps, learning rate, evaluation interval, threads.
        valid: Evaluated at step 0, every ``eval_every`` steps and after the last step; None skips evaluation.
        progress: Show a tqdm bar.
        desc: The bar's label.

    Returns:
        ``(curve, stats)``: the curve points (`evaluate` metrics on ``valid.curve_windows`` plus ``step``) and
        ``{"train_seconds", "eval_seconds", "losses", "tokens", "final"}``, ``final`` the metrics after the last step
        on every validation window (empty without ``valid``).
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    chooser = ThreadChooser(available_cpus()) if settings.threads is None else None
    previous_threads = torch.get_num_threads()
    curve: list[dict[str, float]] = []
    step_losses: list[float] = []
    train_seconds = eval_seconds = 0.0
    tokens = 0
    final: dict[str, float] = {}

    def run_eval(step: int, last: bool) -> None:
        nonlocal eval_seconds
        if valid is None:
            return
        started = time.perf_counter()
        point = evaluate(model, valid, windows=valid.curve_windows)
        curve.append({"step": step, **point})
        if last:
            n = valid.input_ids.shape[0]
            final.update(point if valid.curve_windows is None or valid.curve_windows >= n else evaluate(model, valid))
        eval_seconds += time.perf_counter() - started

    bar = tqdm(total=settings.steps, desc=desc, unit="step", disable=not progress, leave=False)
    model.train()
    iterator = iter(batches)
    try:
        torch.set_num_threads(settings.threads or chooser.threads())
        run_eval(0, False)
        for step in range(settings.steps):
            started = time.perf_counter()
            batch = next(iterator)
            threads = settings.threads or chooser.threads()
            torch.set_num_threads(threads)
            step_started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, settings)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = loss_fn(logits, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append(float(loss.detach()))
            tokens += int(batch["loss_mask"].sum()) if "loss_mask" in batch else int(batch["input_ids"].numel())
            now = time.perf_counter()
            if chooser is not None:
                chooser.record(threads, now - step_started, timed=step > 0)
            train_seconds += now - started
            bar.update(1)
            bar.set_postfix(loss=f"{step_losses[-1]:.3f}")
            last = step + 1 == settings.steps
            if last or (settings.eval_every and (step + 1) % settings.eval_every == 0):
                run_eval(step + 1, last)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
        model.eval()
    stats = {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "losses": step_losses, "tokens": tokens}
    return curve, stats | {"final": final}
