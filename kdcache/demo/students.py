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

Layout: `kdcache.demo.evaluation` builds students (`StudentSpec`, `build_student`) and measures them (`ValidationSet`,
`make_validation`, `evaluate` and the pure metrics); `kdcache.demo.training` holds the loss of a run (`make_loss`), the
batch stream (`cache_batches`) and the loop (`train_student`); this module trains and compares runs (`StudentRun`,
`train_runs`, `RunResult`, `format_results`, `plot_curves`) and the demo's students. Every name listed in `__all__`
stays importable from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcache.demo.evaluation import (
    ECE_BINS,
    StudentSpec,
    ValidationSet,
    build_student,
    make_chat_validation,
    make_validation,
    num_parameters,
    read_conversations,
    read_texts,
)
from kdcache.demo.training import TrainSettings, cache_batches, make_loss, train_student

__all__ = ["DEMO_STUDENTS", "RunResult", "StudentRun", "demo_students", "format_results", "plot_curves", "train_runs"]


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
    from kdcache.read.reader import CacheReader

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
        valid_dir: Held-out ``*.jsonl`` texts, or conversations (``messages``) for a cache of conversations (then
            the students are measured where the next token is an assistant's).
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

    from kdcache.read.reader import CacheReader

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
    chat = manifest["fingerprint_inputs"].get("data", {}).get("format") in ("chat", "prompt_completion")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if chat:
            valid = make_chat_validation(
                teacher, tokenizer, read_conversations(valid_dir), length=length, windows=valid_windows,
            )  # fmt: skip
        else:
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
