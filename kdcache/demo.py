"""Demo assets built offline: a tiny but really trained teacher and a corpus, from the Python standard library.

`make run` (``kdcache demo``) needs a teacher and a corpus without downloading anything. This module makes both from
the standard library's own ``.py`` sources, which every Python install has:

* a corpus of jsonl shards, one record ``{"text": ..., "name": ...}`` per source file, split into train / valid by
  a hash of the file name;
* a byte-level BPE tokenizer (``tokenizers``) wrapped as a ``transformers`` fast tokenizer;
* a 2-layer ``LlamaForCausalLM`` whose vocabulary is padded up to a multiple of 64 (like real checkpoints: the
  logits have more rows than the tokenizer has tokens), trained for a fixed number of AdamW steps so its next-token
  distributions are far from uniform. **A demo, not a real model.**

Everything is deterministic given the seed (the step count is fixed, not time-bounded) and takes ~25 s on 2 idle CPU
cores (training drops to one thread, ~2x slower, while other processes compete for the cores). ``prepare_demo`` is
idempotent: a marker ``demo.json``, written last, records the settings and training stats; a second call with the
same settings returns at once, different settings rebuild. ``kdcache demo`` calls it; alone::

    python -m kdcache.demo .kdcache/demo/assets
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay inside the functions that use them
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "DEFAULT_TRAIN_STEPS",
    "DemoAssets",
    "build_teacher",
    "prepare_demo",
    "split_train_valid",
    "stdlib_documents",
    "train_teacher",
    "train_tokenizer",
    "write_corpus",
]

logger = logging.getLogger(__name__)

MARKER_NAME = "demo.json"  # written last: its presence (with matching settings) means the assets are complete
FORMAT_VERSION = 1  # bump when the layout or the recipe changes, so old assets are rebuilt
DEFAULT_TRAIN_STEPS = 400  # AdamW steps of 8 x 128 tokens: ~20 s on 2 idle CPU cores; loss 7.7 -> 4.2 nats
MAX_FILE_BYTES = 100_000  # stdlib files larger than this are skipped (a handful of generated/huge modules)
VOCAB_PAD_MULTIPLE = 64  # the model's vocabulary (logit rows) is padded up to a multiple of this
SPECIAL_TOKENS = {"unk_token": "<|unk|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclass(frozen=True)
class DemoAssets:
    """Where a prepared demo lives.

    Attributes:
        teacher_dir: ``save_pretrained`` model and tokenizer; loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
        train_dir: ``*.jsonl`` shards, one record ``{"text": ..., "name": ...}`` per stdlib source file.
        valid_dir: Same format, held-out files (split by file name, deterministic).
        info: Contents of the marker ``demo.json``: ``settings``, ``stats`` (training), ``tokenizer_vocab_size``,
            ``model_vocab_size`` (padded), file counts.
    """

    teacher_dir: Path
    train_dir: Path
    valid_dir: Path
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


# --------------------------------------------------------------------------------------------------- corpus


def stdlib_documents(max_files: int | None = None, *, max_file_bytes: int = MAX_FILE_BYTES) -> list[tuple[str, str]]:
    """Read the Python standard library's own ``.py`` sources.

    Skips ``site-packages``, test directories, files over ``max_file_bytes``, blank files and files that are not
    valid UTF-8. With ``max_files`` set, keeps that many files spread evenly over the sorted list (so a small
    corpus still covers many packages rather than only ``_*.py`` modules).

    Args:
        max_files: Keep at most this many files; ``None`` keeps all (~700 files, ~9 MB).
        max_file_bytes: Skip files larger than this many bytes.

    Returns:
        ``(relative_name, text)`` pairs sorted by name; names use ``/`` separators, e.g. ``"json/decoder.py"``.
    """
    root = Path(os.path.dirname(os.__file__))
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in filenames:
            path = Path(dirpath) / filename
            if filename.endswith(".py") and path.is_file() and path.stat().st_size <= max_file_bytes:
                names.append(path.relative_to(root).as_posix())
    names.sort()
    docs: list[tuple[str, str]] = []
    for name in names:
        try:
            text = (root / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((name, text))
    if max_files is not None and len(docs) > max_files:
        if max_files <= 0:
            return []
        step = len(docs) / max_files  # evenly spaced picks; indices strictly increase, so output stays sorted
        docs = [docs[int(i * step)] for i in range(max_files)]
    return docs


def _name_fraction(name: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from a name (sha256; unlike ``hash`` it is not salted)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_train_valid(
    docs: Sequence[tuple[str, str]], valid_fraction: float = 0.1
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split documents into train / valid by a hash of their name, deterministically and disjointly.

    A document goes to valid when its name hashes below ``valid_fraction``, so its side never depends on which other
    files are present. With ``valid_fraction > 0`` and at least 2 documents, both sides are kept non-empty (the
    lowest- or highest-hashing name moves over).

    Args:
        docs: ``(name, text)`` pairs; names must be unique.
        valid_fraction: Expected share of documents held out, in ``[0, 1)``.

    Returns:
        ``(train, valid)``, each in the input order.

    Raises:
        ValueError: ``valid_fraction`` outside ``[0, 1)`` or duplicate names.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    names = [name for name, _ in docs]
    if len(set(names)) != len(names):
        raise ValueError("split_train_valid: document names must be unique (they decide the split)")
    keys = {name: _name_fraction(name) for name in names}
    valid_names = {name for name in names if keys[name] < valid_fraction}
    if valid_fraction > 0 and len(names) >= 2:
        if not valid_names:
            valid_names = {min(names, key=keys.__getitem__)}
        elif len(valid_names) == len(names):
            valid_names.discard(max(names, key=keys.__getitem__))
    train = [doc for doc in docs if doc[0] not in valid_names]
    valid = [doc for doc in docs if doc[0] in valid_names]
    return train, valid


def write_corpus(docs: Sequence[tuple[str, str]], out_dir: Path, *, files: int) -> list[Path]:
    """Write documents as jsonl shards ``part-00000.jsonl`` ..., one record ``{"text", "name"}`` per document.

    Documents are cut into ``min(files, len(docs))`` contiguous, near-equal runs, keeping their order.

    Args:
        docs: ``(name, text)`` pairs.
        out_dir: Created if missing.
        files: Number of shards wanted (fewer when there are fewer documents).

    Returns:
        The shard paths, in order.

    Raises:
        ValueError: ``files < 1`` or no documents.
    """
    if files < 1:
        raise ValueError(f"write_corpus: files must be >= 1, got {files}")
    if not docs:
        raise ValueError(f"write_corpus: no documents to write to {out_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_files = min(files, len(docs))
    paths = []
    for i in range(n_files):
        lo, hi = i * len(docs) // n_files, (i + 1) * len(docs) // n_files
        path = out_dir / f"part-{i:05d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for name, text in docs[lo:hi]:
                f.write(json.dumps({"text": text, "name": name}, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------- teacher


def train_tokenizer(
    texts: Iterable[str], out_dir: Path, *, vocab_size: int = 2048, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and save it with ``save_pretrained(out_dir)``.

    The tokenizer has ``vocab_size`` learned tokens (256 bytes + merges; fewer if the text is too small) plus 4
    special tokens ``<|unk|> <|bos|> <|eos|> <|pad|>`` at ids 0-3. Like Llama's it prepends ``<|bos|>`` when
    ``add_special_tokens=True``. Decoding with ``skip_special_tokens=True`` returns the text exactly.

    Args:
        texts: Training text.
        out_dir: Where ``tokenizer.json`` / ``tokenizer_config.json`` go (created if missing).
        vocab_size: Learned tokens, not counting the special tokens.
        model_max_length: Recorded in the tokenizer config (tokens).

    Returns:
        The ``transformers`` fast tokenizer; ``len(tokenizer)`` counts the special tokens too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials),  # the trainer counts special tokens inside vocab_size
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def padded_vocab_size(tokenizer_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Round a tokenizer's size up to a multiple of ``multiple`` (the model's logit rows)."""
    return -(-tokenizer_size // multiple) * multiple


def build_teacher(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    heads: int = 4,
    max_position: int = 512,
    seed: int = 0,
    intermediate_size: int | None = None,
) -> LlamaForCausalLM:
    """Build an untrained ``LlamaForCausalLM`` sized for ``tokenizer``, vocabulary padded to a multiple of 64.

    ``config.vocab_size`` is the padded size (the logits' last dimension); ``config.tokenizer_vocab_size`` records
    ``len(tokenizer)``. Rows past the tokenizer are never targets, so training drives their probability toward 0,
    as in real padded checkpoints. Word embeddings are tied to the output head. The global torch RNG is untouched.

    Args:
        tokenizer: Supplies the vocabulary size and the bos / eos / pad ids.
        hidden_size: Model width.
        num_layers: Decoder layers.
        heads: Attention heads (no grouped-query attention).
        max_position: ``max_position_embeddings`` (tokens).
        seed: Seeds the weight initialisation.
        intermediate_size: MLP width; default ``4 * hidden_size``.

    Returns:
        The model in float32, train mode.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        tokenizer_vocab_size=len(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _available_cpus() -> int:
    """CPUs this process may use: the affinity mask, further limited by a cgroup v2 CPU quota if one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


class _ThreadChooser:
    """Picks torch's intra-op thread count step by step: all CPUs while they are free, 1 while others compete.

    With several threads every op ends at a barrier; when another process holds one of the cores, each barrier waits
    for a time slice and a step gets ~10x slower (measured: 0.1 s -> 1.1 s on 2 shared cores), while one thread only
    slows in proportion. So time a few one-thread steps as a reference, then run on all CPUs, and fall back to one
    thread for ``backoff_steps`` after two steps in a row slower than the reference. Thread counts change float
    rounding only, never which batches are drawn.
    """

    def __init__(self, cpus: int, *, probe_steps: int = 4, backoff_steps: int = 50) -> None:
        self.cpus = cpus
        self.backoff_steps = backoff_steps
        self.single_left = probe_steps  # steps still to run on one thread (the first also warms up: not timed)
        self.single_best = math.inf  # fastest one-thread step seen (s)
        self.slow_in_a_row = 0
        self.steps_by_threads: dict[str, int] = {}

    def threads(self) -> int:
        return 1 if self.cpus == 1 or self.single_left > 0 else self.cpus

    def record(self, threads: int, seconds: float, *, timed: bool = True) -> None:
        self.steps_by_threads[str(threads)] = self.steps_by_threads.get(str(threads), 0) + 1
        if threads == 1:
            self.single_left = max(0, self.single_left - 1)
            if timed:
                self.single_best = min(self.single_best, seconds)
            return
        self.slow_in_a_row = self.slow_in_a_row + 1 if seconds > 1.25 * self.single_best else 0
        if self.slow_in_a_row >= 2:
            self.single_left, self.slow_in_a_row = self.backoff_steps, 0


def _token_stream(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> list[int]:
    """Concatenate ``<|bos|> text <|eos|>`` for every text, as token ids."""
    texts = list(texts)
    # The backend tokenizer skips transformers' per-call overhead and its "sequence longer than max" warning.
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream: list[int] = []
    for enc in encodings:
        stream.append(tokenizer.bos_token_id)
        stream.extend(enc.ids)
        stream.append(tokenizer.eos_token_id)
    return stream


def train_teacher(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: Iterable[str],
    *,
    steps: int | None = None,
    seconds: float | None = 30.0,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place with AdamW on next-token prediction over random windows of the packed texts.

    Runs ``steps`` steps, or until ``seconds`` have passed, whichever comes first (give ``seconds=None`` for a
    deterministic run). Learning rate: linear warmup, then cosine decay to 10% over the run's progress. Uses as many
    torch threads as this process has CPUs, or 1 while other processes compete for them (see ``_ThreadChooser``),
    then restores the previous setting.

    Args:
        model: A causal LM (e.g. from `build_teacher`); left in eval mode.
        tokenizer: Tokenizes ``texts``; each text becomes ``<|bos|> ... <|eos|>``, all packed into one stream.
        texts: Training documents.
        steps: Optimizer steps; ``None`` means bounded by ``seconds`` only.
        seconds: Wall-clock budget (s); ``None`` means bounded by ``steps`` only.
        seq_len: Tokens per window.
        batch_size: Windows per step.
        lr: Peak learning rate.
        seed: Seeds the window sampling.
        progress: Show a tqdm bar.

    Returns:
        ``{"steps", "first_loss", "last_loss", "seconds", "tokens_per_step", "steps_by_threads"}``; losses in nats
        per token, ``first_loss`` of the first batch (before any update), ``last_loss`` the mean over the last 10%
        of steps (at least 1, at most 20) to smooth batch-to-batch noise.

    Raises:
        ValueError: Neither ``steps`` nor ``seconds`` given, or texts shorter than one window.
    """
    import torch
    from tqdm.auto import tqdm

    if steps is None and seconds is None:
        raise ValueError("train_teacher: give steps, seconds or both")
    stream = torch.tensor(_token_stream(tokenizer, texts), dtype=torch.long)
    if len(stream) <= seq_len:
        raise ValueError(f"train_teacher: {len(stream)} tokens of text, need more than seq_len={seq_len}")
    warmup_steps = max(1, min(20, steps // 10)) if steps else 10
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    previous_threads = torch.get_num_threads()
    chooser = _ThreadChooser(_available_cpus())
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="training demo teacher", unit="step", disable=not progress, leave=False)
    model.train()
    try:
        step = 0
        while True:
            elapsed = time.perf_counter() - start
            done = max(step / steps if steps else 0.0, elapsed / seconds if seconds else 0.0)
            if done >= 1.0:
                break
            if step < warmup_steps:
                scale = (step + 1) / warmup_steps
            else:
                scale = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * done))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
            input_ids = stream[starts[:, None] + offsets]  # [batch_size, seq_len] int64
            threads = chooser.threads()
            torch.set_num_threads(threads)
            step_start = time.perf_counter()
            loss = model(input_ids=input_ids, labels=input_ids).loss  # HF shifts labels by one inside
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            chooser.record(threads, time.perf_counter() - step_start, timed=step > 0)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
        model.eval()
    if not losses:
        raise ValueError("train_teacher: no step ran (seconds too small?)")
    tail = losses[-max(1, min(20, len(losses) // 10)) :]
    return {
        "steps": len(losses),
        "first_loss": losses[0],
        "last_loss": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - start, 3),
        "tokens_per_step": batch_size * seq_len,
        "steps_by_threads": chooser.steps_by_threads,
    }


# --------------------------------------------------------------------------------------------------- assets


def _save_quietly(model: LlamaForCausalLM, out_dir: Path) -> None:
    """``save_pretrained`` without transformers' one-shard "Writing model shards" progress bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out_dir))
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _read_marker(workdir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((workdir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _assets(workdir: Path, info: dict[str, Any]) -> DemoAssets:
    return DemoAssets(
        teacher_dir=workdir / "teacher", train_dir=workdir / "train", valid_dir=workdir / "valid", info=info
    )


def _complete(assets: DemoAssets) -> bool:
    """The files a consumer needs are all there (guards against a marker left beside deleted folders)."""
    return (
        (assets.teacher_dir / "config.json").is_file()
        and (assets.teacher_dir / "tokenizer.json").is_file()
        and any(assets.teacher_dir.glob("*.safetensors"))
        and any(assets.train_dir.glob("*.jsonl"))
        and any(assets.valid_dir.glob("*.jsonl"))
    )


def prepare_demo(
    workdir: Path,
    *,
    train_steps: int | None = DEFAULT_TRAIN_STEPS,
    train_seconds: float | None = None,
    max_files: int | None = 400,
    corpus_files: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> DemoAssets:
    """Build (or reuse) the demo teacher and corpus under ``workdir``.

    Layout: ``workdir/teacher`` (model + tokenizer), ``workdir/train/*.jsonl``, ``workdir/valid/*.jsonl`` and the
    marker ``workdir/demo.json``. If the marker exists with the same settings and the folders are complete, returns
    at once without training. Otherwise removes the marker first, builds everything in a temporary folder inside
    ``workdir``, moves the folders into place and writes the marker last, so an interrupted build never looks
    complete.

    Args:
        workdir: Created if missing.
        train_steps: Optimizer steps (deterministic); ``None`` to bound training by ``train_seconds`` only.
        train_seconds: Optional wall-clock cap on training (s); makes the step count timing-dependent.
        max_files: Stdlib files used (see `stdlib_documents`); ``None`` for all.
        corpus_files: jsonl shards written for the train split (the valid split gets at most 2).
        seed: Seeds the model init and the training batches.
        progress: Show a tqdm bar while training.

    Returns:
        The assets, with ``info`` holding the marker's contents.
    """
    workdir = Path(workdir)
    settings = json.loads(
        json.dumps(
            {
                "format": FORMAT_VERSION,
                "python": f"{sys.version_info.major}.{sys.version_info.minor}",  # the stdlib sources differ by version
                "train_steps": train_steps,
                "train_seconds": train_seconds,
                "max_files": max_files,
                "corpus_files": corpus_files,
                "seed": seed,
            }
        )
    )
    marker = _read_marker(workdir)
    if marker is not None and marker.get("settings") == settings:
        assets = _assets(workdir, marker)
        if _complete(assets):
            logger.info("demo assets in %s are up to date", workdir)
            return assets

    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER_NAME).unlink(missing_ok=True)  # first: from here on the folders may be half-replaced
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=workdir))
    try:
        docs = stdlib_documents(max_files)
        train_docs, valid_docs = split_train_valid(docs)
        if not train_docs or not valid_docs:
            raise ValueError(f"prepare_demo: max_files={max_files} gives too few stdlib files for a train/valid split")
        write_corpus(train_docs, tmp / "train", files=corpus_files)
        write_corpus(valid_docs, tmp / "valid", files=min(2, corpus_files))
        train_texts = [text for _, text in train_docs]
        logger.info("demo: %d train / %d valid stdlib files; training the tokenizer", len(train_docs), len(valid_docs))
        tokenizer = train_tokenizer(train_texts, tmp / "teacher")
        model = build_teacher(tokenizer, seed=seed)
        logger.info("demo: training a %d-parameter teacher", sum(p.numel() for p in model.parameters()))
        stats = train_teacher(
            model, tokenizer, train_texts, steps=train_steps, seconds=train_seconds, seed=seed, progress=progress
        )
        _save_quietly(model, tmp / "teacher")
        for name in ("teacher", "train", "valid"):
            target = workdir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    info = {
        "settings": settings,
        "stats": stats,
        "tokenizer_vocab_size": len(tokenizer),
        "model_vocab_size": int(model.config.vocab_size),
        "train_files": len(train_docs),
        "valid_files": len(valid_docs),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    marker_tmp = workdir / f".{MARKER_NAME}.tmp"
    marker_tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(marker_tmp, workdir / MARKER_NAME)
    logger.info(
        "demo: teacher loss %.2f -> %.2f nats in %d steps; built in %.1f s",
        stats["first_loss"],
        stats["last_loss"],
        stats["steps"],
        info["build_seconds"],
    )
    return _assets(workdir, info)


if __name__ == "__main__":  # python -m kdcache.demo [WORKDIR]: build (or reuse) the assets, print the marker
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(prepare_demo(Path(sys.argv[1] if len(sys.argv) > 1 else ".kdcache/demo/assets")).info, indent=1))
