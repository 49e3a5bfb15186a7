"""Students: build small Llama students, train them from a cache (or online from the teacher, or on hard labels),
and evaluate them against the true next token and against the teacher.

One piece of code serves `kdcache demo` and `bench/distill.py`:

    valid = make_validation(teacher, tokenizer, read_texts(assets.valid_dir), windows=16, length=256)
    runs = [StudentRun("tiny <- top-16 cache", TINY, "cache", cache_uri),
            StudentRun("tiny, hard labels", TINY, "hard", cache_uri)]       # same batches, same steps
    results = train_runs(runs, teacher=teacher, valid=valid, settings=TrainSettings(steps=150))
    print(format_results(results, valid))
    plot_curves(results, "curves.png", valid=valid)

Targets of a run (`StudentRun.targets`):

- ``"cache"``: the cache's soft targets with the loss its mode calls for (`forward_kl_tail` for ``topk``,
  `sampled_kl` for ``sample`` / ``hybrid``), mixed with hard-label CE when ``TrainSettings.alpha < 1``;
- ``"online"``: full knowledge distillation, the teacher run inside the loop, forward KL on its dense logits;
- ``"hard"``: cross-entropy against the next token, no teacher.

Every run reads its batches (``input_ids``, ``labels``, ``loss_mask``) from a cache with `KDCacheDataset` and the
same data seed, so runs that name caches of the same corpus and windowing see the same sequences in the same order,
whatever their targets. Evaluation (`evaluate`) runs on held-out windows: cross-entropy against the true next token,
KL(teacher || student) over the full vocabulary, and the expected calibration error of the top-1 prediction.

Math (`dense_forward_kl`, `kl_to_teacher`, `expected_calibration_error`) is pure functions on tensors; transformers
and matplotlib are imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdcache import losses

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = [
    "DEMO_STUDENTS",
    "ECE_BINS",
    "RunResult",
    "StudentRun",
    "StudentSpec",
    "TrainSettings",
    "ValidationSet",
    "build_student",
    "cache_batches",
    "demo_students",
    "dense_forward_kl",
    "evaluate",
    "expected_calibration_error",
    "format_results",
    "kl_to_teacher",
    "make_loss",
    "make_validation",
    "num_parameters",
    "plot_curves",
    "read_texts",
    "train_runs",
    "train_student",
]

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
TARGETS = ("cache", "online", "hard")


# --------------------------------------------------------------------------------------------------- students


@dataclass(frozen=True)
class StudentSpec:
    """Shape of a Llama student (the tokenizer and the output vocabulary are the teacher's).

    Attributes:
        name: Short label, e.g. ``"h64-L1"``.
        hidden_size: Model width.
        num_layers: Decoder layers.
        heads: Attention heads (``hidden_size`` must be a multiple).
    """

    name: str
    hidden_size: int
    num_layers: int
    heads: int


def build_student(spec: StudentSpec, *, vocab_size: int, tokenizer: Any = None, seed: int = 0) -> LlamaForCausalLM:
    """An untrained ``LlamaForCausalLM`` with ``vocab_size`` output columns (the teacher's padded vocabulary).

    Word embeddings are tied to the output head; the MLP is ``4 * hidden_size`` wide; the global torch RNG is left
    untouched.

    Args:
        spec: Width, depth and heads.
        vocab_size: Logit columns; at least the teacher's padded vocabulary (a cache refuses fewer).
        tokenizer: Supplies bos / eos / pad ids when given.
        seed: Seeds the weight initialisation.

    Returns:
        The model, float32, train mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.hidden_size % spec.heads:
        raise ValueError(
            f"student {spec.name}: hidden_size {spec.hidden_size} is not a multiple of heads {spec.heads}"
        )
    ids = {}
    if tokenizer is not None:
        ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=4 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------- metrics


def dense_forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(teacher || student) on dense logits, mean over the positions where ``mask`` is true.

    Args:
        student_logits: ``[B, T, V]`` float.
        teacher_logits: ``[B, T, V']`` float, ``V' <= V`` (student columns past ``V'`` get teacher probability 0).
        mask: ``[B, T]`` bool; None means every position.

    Returns:
        Scalar float32 tensor (0 when no position is selected), differentiable w.r.t. ``student_logits``.
    """
    vocab = teacher_logits.shape[-1]
    if student_logits.shape[-1] < vocab:
        raise ValueError(f"student vocab {student_logits.shape[-1]} < teacher vocab {vocab}")
    if mask is None:
        mask = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
    s = student_logits[mask].float()  # [N, V]
    log_p = torch.log_softmax(teacher_logits[mask].float(), -1)  # [N, V']
    log_q = torch.log_softmax(s, -1)[:, :vocab]
    per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    return per_row.sum() / max(int(mask.sum()), 1)


def kl_to_teacher(student_logits: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Per-position KL(teacher || student) over the full vocabulary.

    Args:
        student_logits: ``[..., V]`` float.
        teacher_logprobs: ``[..., V']`` float log-softmax of the teacher, ``V' <= V``.

    Returns:
        ``[...]`` float32, in nats.
    """
    vocab = teacher_logprobs.shape[-1]
    log_q = torch.log_softmax(student_logits.float(), -1)[..., :vocab]
    log_p = teacher_logprobs.float()
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def expected_calibration_error(confidence: Tensor, correct: Tensor, *, bins: int = ECE_BINS) -> float:
    """Expected calibration error of top-1 predictions with ``bins`` equal-width confidence bins.

    ``ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|`` with bin b = ``(b / bins, (b + 1) / bins]`` (a
    confidence of exactly 0 goes to the first bin), as in Guo et al. (2017).

    Args:
        confidence: ``[N]`` float in [0, 1], the probability of the predicted token.
        correct: ``[N]`` bool, whether the predicted token is the true one.
        bins: Number of bins.

    Returns:
        The ECE as a fraction in [0, 1] (0.0 for N = 0).
    """
    confidence = confidence.reshape(-1).double()
    correct = correct.reshape(-1).double()
    if confidence.numel() != correct.numel():
        raise ValueError(f"confidence has {confidence.numel()} entries, correct {correct.numel()}")
    n = confidence.numel()
    if n == 0:
        return 0.0
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return float((acc_sum - conf_sum).abs().sum() / n)  # sum_b n_b/N |acc_b - conf_b| = sum_b |acc_sum - conf_sum|/N


# --------------------------------------------------------------------------------------------------- validation


@dataclass
class ValidationSet:
    """Held-out windows and the teacher's distributions on them.

    Attributes:
        input_ids: ``[N, L]`` int64.
        labels: ``[N, L]`` int64, the true next token of every position.
        teacher_logprobs: ``[N, L, V]`` float32, the teacher's log-softmax at every position.
        teacher: The teacher's own metrics on these windows (``ce``, ``ece``, ``accuracy``, ``entropy``, ``params``;
            ``curve_ce`` on the curve windows only).
        curve_windows: Windows used for the intermediate points of training curves (the first ones); final
            metrics use all N.
    """

    input_ids: Tensor
    labels: Tensor
    teacher_logprobs: Tensor
    teacher: dict[str, float] = field(default_factory=dict)
    curve_windows: int | None = None

    @property
    def tokens(self) -> int:
        return int(self.labels.numel())


def read_texts(folder: str | Path) -> list[str]:
    """The ``text`` field of every record of the ``*.jsonl`` files in ``folder`` (sorted by file name)."""
    texts = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"])
    if not texts:
        raise ValueError(f"{folder}: no jsonl records with a 'text' field")
    return texts


def make_validation(
    teacher: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    windows: int,
    length: int,
    curve_windows: int | None = None,
    batch_windows: int = 8,
) -> ValidationSet:
    """Cut ``windows`` windows of ``length + 1`` tokens, spread evenly over the packed texts, and run the teacher.

    The texts are tokenized and packed as ``<bos> text <eos> <bos> ...``; window i's inputs are its first ``length``
    tokens and its labels the last ``length``.

    Args:
        teacher: A causal LM returning ``.logits`` ``[B, L, V]``.
        tokenizer: A transformers fast tokenizer (``backend_tokenizer``, ``bos_token_id``, ``eos_token_id``).
        texts: Held-out documents.
        windows: Number of windows N.
        length: Tokens per window L.
        curve_windows: Windows used for curve points (default: all).
        batch_windows: Windows per teacher forward.

    Returns:
        The set, with the teacher's own CE / ECE / accuracy / entropy.

    Raises:
        ValueError: Fewer than ``windows * (length + 1)`` tokens of text.
    """
    stream: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        stream += [tokenizer.bos_token_id, *enc.ids, tokenizer.eos_token_id]
    need = windows * (length + 1)
    if len(stream) < need:
        raise ValueError(f"validation text has {len(stream)} tokens, need {need}; use fewer windows or shorter ones")
    step = (len(stream) - (length + 1)) // max(windows - 1, 1)
    data = torch.tensor([stream[i * step : i * step + length + 1] for i in range(windows)], dtype=torch.long)
    input_ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    parts = []
    teacher.eval()
    with torch.no_grad():
        for lo in range(0, windows, batch_windows):
            logits = teacher(input_ids=input_ids[lo : lo + batch_windows]).logits.float()
            parts.append(torch.log_softmax(logits, -1))
    logprobs = torch.cat(parts)
    valid = ValidationSet(input_ids, labels, logprobs, curve_windows=curve_windows)
    confidence, predicted = logprobs.max(-1)
    token_ce = -logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [N, L]
    valid.teacher = {
        "ce": float(token_ce.mean()),
        "curve_ce": float(token_ce[:curve_windows].mean()),  # on the windows the curves are drawn on
        "kl": 0.0,
        "accuracy": float((predicted == labels).double().mean()),
        "ece": expected_calibration_error(confidence.exp(), predicted == labels),
        "entropy": float(-(logprobs.exp() * logprobs).sum(-1).mean()),
        "params": num_parameters(teacher),
    }
    return valid


def evaluate(
    model: torch.nn.Module, valid: ValidationSet, *, windows: int | None = None, batch_windows: int = 8
) -> dict[str, float]:
    """A student's metrics on the validation windows (the first ``windows`` of them; default all).

    Returns:
        ``ce`` (nats per token against the true next token), ``kl`` (mean KL(teacher || student), nats), ``ece``
        (top-1, `ECE_BINS` bins, a fraction), ``accuracy`` (top-1) and ``confidence`` (mean top-1 probability).
    """
    n = valid.input_ids.shape[0] if windows is None else min(windows, valid.input_ids.shape[0])
    was_training = model.training
    model.eval()
    ce, kl, confs, corrects = [], [], [], []
    with torch.no_grad():
        for lo in range(0, n, batch_windows):
            hi = min(lo + batch_windows, n)
            logits = model(input_ids=valid.input_ids[lo:hi]).logits.float()
            labels = valid.labels[lo:hi]
            log_q = torch.log_softmax(logits, -1)
            ce.append(-log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
            kl.append(kl_to_teacher(logits, valid.teacher_logprobs[lo:hi]))
            conf, predicted = log_q.max(-1)
            confs.append(conf.exp())
            corrects.append(predicted == labels)
    model.train(was_training)
    confidence, correct = torch.cat(confs).reshape(-1), torch.cat(corrects).reshape(-1)
    return {
        "ce": float(torch.cat(ce).double().mean()),
        "kl": float(torch.cat(kl).double().mean()),
        "ece": expected_calibration_error(confidence, correct),
        "accuracy": float(correct.double().mean()),
        "confidence": float(confidence.double().mean()),
    }


# --------------------------------------------------------------------------------------------------- training


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
        return lambda logits, batch: losses.cross_entropy(logits, batch["labels"])
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


def cache_batches(
    uri: str, *, batch_size: int, seed: int, student_vocab_size: int | None = None
) -> Iterator[dict[str, Any]]:
    """Endless batches of a cache: epoch 0, 1, ... of `KDCacheDataset` (full batches only), a pure function of seed."""
    from kdcache.dataset import KDCacheDataset

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


@dataclass
class RunResult:
    """What one trained student measured.

    Attributes:
        label: The run's label.
        run: The `StudentRun`.
        params: Student parameters.
        curve: ``[{"step", "ce", "kl", "ece", ...}]`` on the validation set's curve windows.
        final: Metrics after the last step on all validation windows (see `evaluate`).
        train_seconds: Wall time of the training steps (data, teacher forwards for online KD, optimizer), without
            the evaluations.
        eval_seconds: Wall time of the evaluations.
        losses: Training loss of every step.
        tokens: Target positions trained on.
    """

    label: str
    run: StudentRun
    params: int
    curve: list[dict[str, float]]
    final: dict[str, float]
    train_seconds: float
    eval_seconds: float
    losses: list[float]
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "student": self.run.spec.name,
            "targets": self.run.targets,
            "cache_uri": self.run.cache_uri,
            "mode": self.run.mode,
            "loss": self.run.loss,
            "seed": self.run.seed,
            "params": self.params,
            "final": self.final,
            "curve": self.curve,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "tokens": self.tokens,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
        }


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

    from kdcache.demo import _available_cpus, _ThreadChooser

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    chooser = _ThreadChooser(_available_cpus()) if settings.threads is None else None
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


# --------------------------------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class StudentRun:
    """One student to train in a comparison.

    Attributes:
        label: Row label, e.g. ``"h64-L1 <- top-8 cache"``.
        spec: The student's shape.
        targets: ``"cache"``, ``"online"`` or ``"hard"`` (see `make_loss`).
        cache_uri: The cache the batches come from (its soft targets are used only for ``"cache"``).
        seed: Seeds the student's initialisation (and, added to ``TrainSettings.data_seed``, the batch order).
        loss: A key of `kdcache.losses.LOSSES` for ``"cache"`` runs; None: the mode's default (see `make_loss`).
        mode: The cache's ``targets.mode`` (filled in by `train_runs` from the manifest).
    """

    label: str
    spec: StudentSpec
    targets: str
    cache_uri: str
    seed: int = 0
    loss: str | None = None
    mode: str | None = None


def train_runs(
    runs: Sequence[StudentRun],
    *,
    teacher: torch.nn.Module,
    valid: ValidationSet,
    settings: TrainSettings,
    tokenizer: Any = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Train and evaluate every run, one after the other, with the same settings.

    Args:
        runs: The students.
        teacher: For ``"online"`` runs (and the vocabulary size of the students: ``teacher.config.vocab_size``).
        valid: Validation windows (`make_validation`).
        settings: Shared training settings.
        tokenizer: Gives the students bos / eos / pad ids.
        progress: Show a tqdm bar per run.
        log: Called with one line per finished run.

    Returns:
        One `RunResult` per run, in order.
    """
    from kdcache.reader import CacheReader

    vocab = int(teacher.config.vocab_size)
    results = []
    for run in runs:
        manifest = CacheReader(run.cache_uri).manifest
        mode = manifest["fingerprint_inputs"]["targets"].get("mode", "topk")
        run = dataclasses.replace(run, mode=mode)
        model = build_student(run.spec, vocab_size=vocab, tokenizer=tokenizer, seed=1000 + run.seed)
        loss_fn = make_loss(run.targets, mode=mode, kind=run.loss, teacher=teacher, alpha=settings.alpha)
        batches = cache_batches(
            run.cache_uri, batch_size=settings.batch_size, seed=settings.data_seed + run.seed, student_vocab_size=vocab
        )
        curve, stats = train_student(model, batches, loss_fn, settings, valid=valid, progress=progress, desc=run.label)
        batches.close()
        result = RunResult(
            label=run.label,
            run=run,
            params=num_parameters(model),
            curve=curve,
            final=stats["final"],
            train_seconds=stats["train_seconds"],
            eval_seconds=stats["eval_seconds"],
            losses=stats["losses"],
            tokens=stats["tokens"],
        )
        results.append(result)
        if log is not None and result.final:
            log(
                f"{run.label}: valid CE {result.final['ce']:.3f}, KL {result.final['kl']:.3f}, "
                f"ECE {100 * result.final['ece']:.2f}%, {result.train_seconds:.1f} s"
            )
    return results


def format_results(
    results: Sequence[RunResult], valid: ValidationSet, *, cache_seconds: Mapping[str, float] | None = None
) -> str:
    """A markdown table of the final metrics, the teacher first as a reference.

    Args:
        results: Trained runs.
        valid: Supplies the teacher's own metrics.
        cache_seconds: Wall time of each cache's teacher pass by URI; adds the amortized time per student (the
            pass divided by the number of students trained from that cache).
    """
    users: dict[str, int] = {}
    for r in results:
        if r.run.targets == "cache":
            users[r.run.cache_uri] = users.get(r.run.cache_uri, 0) + 1
    t = valid.teacher
    lines = [
        "| student | params | targets | valid CE | KL(teacher‖student) | ECE (%) | top-1 acc | train s"
        + (" | + cache s (amortized) |" if cache_seconds else " |"),
        "|---|---:|---|---:|---:|---:|---:|---:" + ("|---:|" if cache_seconds else "|"),
        f"| teacher (reference) | {t['params']:,} | — | {t['ce']:.3f} | 0 | {100 * t['ece']:.2f} "
        f"| {t['accuracy']:.3f} | —" + (" | — |" if cache_seconds else " |"),
    ]
    for r in results:
        f = r.final
        row = (
            f"| {r.label} | {r.params:,} | {r.run.targets} | {f['ce']:.3f} | {f['kl']:.3f} | {100 * f['ece']:.2f} "
            f"| {f['accuracy']:.3f} | {r.train_seconds:.1f}"
        )
        if cache_seconds:
            if r.run.targets == "cache" and r.run.cache_uri in cache_seconds:
                share = cache_seconds[r.run.cache_uri] / users[r.run.cache_uri]
                row += f" | {r.train_seconds + share:.1f} |"
            else:
                row += f" | {r.train_seconds:.1f} |"
        else:
            row += " |"
        lines.append(row)
    return "\n".join(lines)


def plot_curves(
    results: Sequence[RunResult], path: str | Path, *, valid: ValidationSet | None = None, title: str = ""
) -> Path:
    """Write a PNG of the validation curves: CE against the true next token and KL to the teacher, by step.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_ce, ax_kl) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"cache": "-", "online": "--", "hard": ":"}
    for r in results:
        points = r.curve
        steps = [p["step"] for p in points]
        kw = {"linestyle": styles.get(r.run.targets, "-"), "marker": ".", "label": r.label}
        ax_ce.plot(steps, [p["ce"] for p in points], **kw)
        ax_kl.plot(steps, [p["kl"] for p in points], **kw)
    teacher_ce = valid.teacher.get("curve_ce", valid.teacher.get("ce")) if valid is not None else None
    if teacher_ce is not None:  # on the same windows as the curves
        ax_ce.axhline(teacher_ce, color="black", linewidth=0.8, label="teacher")
    ax_ce.set(xlabel="step", ylabel="validation CE vs next token (nats)", title="cross-entropy")
    ax_kl.set(xlabel="step", ylabel="KL(teacher ‖ student) (nats)", title="KL to the teacher")
    for ax, key in ((ax_ce, "ce"), (ax_kl, "kl")):
        ax.grid(alpha=0.3)
        # Zoom on the trained part: the untrained point (CE ~ log V) would flatten the differences that matter.
        values = [p[key] for r in results for p in r.curve if p["step"] > 0]
        if values:
            low, high = min(values), max(values)
            if key == "ce" and teacher_ce is not None:
                low = min(low, teacher_ce)
            pad = 0.05 * (high - low) + 1e-3
            ax.set_ylim(low - pad, high + pad)
    ax_ce.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------- the demo

DEMO_STUDENTS = (StudentSpec("h64-L1", 64, 1, 2), StudentSpec("h96-L2", 96, 2, 3))


def demo_students(
    teacher_dir: str | Path,
    valid_dir: str | Path,
    cache_uri: str,
    plot_path: str | Path,
    *,
    steps: int = 100,
    valid_windows: int = 16,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[RunResult]:
    """What `kdcache demo` does after caching: two students of different sizes trained from the cache and a
    hard-label baseline of the smaller size, on the same batches and steps; prints a table, writes a PNG of the curves.

    Args:
        teacher_dir: The teacher (model and tokenizer, ``save_pretrained`` layout).
        valid_dir: Held-out ``*.jsonl`` texts.
        cache_uri: The cache to train from (its ``max_length`` sets the validation window length).
        plot_path: Where the PNG goes.
        steps: Optimizer steps per student (8 sequences each).
        valid_windows: Held-out windows evaluated (for the curves too).
        progress: tqdm bars.
        log: Receives the output lines.

    Returns:
        The runs' results.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kdcache.reader import CacheReader

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
    try:
        teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    manifest = CacheReader(cache_uri).manifest
    length = int(manifest["fingerprint_inputs"]["windowing"]["max_length"])
    targets = manifest["fingerprint_inputs"]["targets"]
    what = f"top-{targets['k']}" if targets.get("mode", "topk") == "topk" else targets["mode"]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        valid = make_validation(
            teacher, tokenizer, read_texts(valid_dir), windows=valid_windows, length=length,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
    settings = TrainSettings(steps=steps, batch_size=8, eval_every=max(1, steps // 6))
    small, large = DEMO_STUDENTS
    runs = [
        StudentRun(f"{small.name} <- {what} cache", small, "cache", cache_uri),
        StudentRun(f"{large.name} <- {what} cache", large, "cache", cache_uri),
        StudentRun(f"{small.name} hard labels (no teacher)", small, "hard", cache_uri),
    ]
    log(
        f"[demo] training {len(runs)} tiny students for {steps} steps of {settings.batch_size} cached sequences each "
        "(a demo: seconds of CPU, not a real distillation run)"
    )
    results = train_runs(
        runs, teacher=teacher, valid=valid, settings=settings, tokenizer=tokenizer, progress=progress,
        log=lambda line: log(f"[demo]   {line}"),
    )  # fmt: skip
    log(f"[demo] students on {valid.tokens:,} held-out tokens (valid split; ECE: top-1, {ECE_BINS} bins):")
    log(format_results(results, valid))
    title = f"kdcache demo: students trained {steps} steps from the {what} cache vs hard labels (demo teacher)"
    path = plot_curves(results, plot_path, valid=valid, title=title)
    log(f"[demo] validation curves: {path}")
    return results
