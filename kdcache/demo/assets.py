"""Demo assets built offline: a tiny but really trained teacher and a corpus, from the Python standard library.

`make run` (``kdcache demo``) needs a teacher and a corpus without downloading anything. This module makes both from
the standard library's own ``.py`` sources, which every Python install has:

* a corpus of jsonl shards, one record ``{"text": ..., "name": ...}`` per source file, split into train / valid by
  a hash of the file name;
* a chat set (`kdcache.demo.chat`): questions about standard-library functions answered with their docstrings, one
  record ``{"name": ..., "messages": [...]}`` per function, for `configs/chat-quickstart.yaml`;
* a byte-level BPE tokenizer (``tokenizers``) wrapped as a ``transformers`` fast tokenizer, with a chat template;
* a 2-layer ``LlamaForCausalLM`` whose vocabulary is padded up to a multiple of 64 (like real checkpoints: the
  logits have more rows than the tokenizer has tokens), trained for a fixed number of AdamW steps so its next-token
  distributions are far from uniform. **A demo, not a real model.**

Everything is deterministic given the seed (the step count is fixed, not time-bounded) and takes ~25 s on 2 idle CPU
cores (training drops to one thread, ~2x slower, while other processes compete for the cores). ``prepare_demo`` is
idempotent: a marker ``demo.json``, written last, records the settings and training stats; a second call with the
same settings returns at once, different settings rebuild. ``kdcache demo`` calls it; alone::

    python -m kdcache.demo.assets .kdcache/demo/assets

The corpus helpers are in `kdcache.demo.corpus`, the tokenizer and teacher in `kdcache.demo.teacher`; this module
assembles them into the assets folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcache.demo import chat, corpus, teacher

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = ["DEFAULT_TRAIN_STEPS", "DemoAssets", "prepare_demo"]

logger = logging.getLogger(__name__)

MARKER_NAME = "demo.json"  # written last: its presence (with matching settings) means the assets are complete
FORMAT_VERSION = 2  # bump when the layout or the recipe changes, so old assets are rebuilt (2: the chat set)
DEFAULT_TRAIN_STEPS = 400  # AdamW steps of 8 x 128 tokens: ~20 s on 2 idle CPU cores; loss 7.7 -> 4.2 nats


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

    @property
    def chat_train_dir(self) -> Path:
        """The chat set's training conversations (``part-00000.jsonl``, records ``{"name", "messages"}``)."""
        return self.train_dir.parent / "chat" / "train"

    @property
    def chat_valid_dir(self) -> Path:
        """The chat set's held-out conversations (split by function name)."""
        return self.train_dir.parent / "chat" / "valid"


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
        and any(assets.chat_train_dir.glob("*.jsonl"))
        and any(assets.chat_valid_dir.glob("*.jsonl"))
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

    Layout: ``workdir/teacher`` (model + tokenizer), ``workdir/train/*.jsonl``, ``workdir/valid/*.jsonl``,
    ``workdir/chat/{train,valid}/part-00000.jsonl`` and the marker ``workdir/demo.json``. If the marker exists with
    the same settings and the folders are complete, returns at once without training. Otherwise removes the marker
    first, builds everything in a temporary folder inside ``workdir``, moves the folders into place and writes the
    marker last, so an interrupted build never looks complete.

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
        docs = corpus.stdlib_documents(max_files)
        train_docs, valid_docs = corpus.split_train_valid(docs)
        if not train_docs or not valid_docs:
            raise ValueError(f"prepare_demo: max_files={max_files} gives too few stdlib files for a train/valid split")
        corpus.write_corpus(train_docs, tmp / "train", files=corpus_files)
        corpus.write_corpus(valid_docs, tmp / "valid", files=min(2, corpus_files))
        chat_counts = chat.write_chat(tmp / "chat")
        train_texts = [text for _, text in train_docs]
        logger.info("demo: %d train / %d valid stdlib files; training the tokenizer", len(train_docs), len(valid_docs))
        tokenizer = teacher.train_tokenizer(train_texts, tmp / "teacher", chat_template=chat.DEMO_CHAT_TEMPLATE)
        model = teacher.build_teacher(tokenizer, seed=seed)
        logger.info("demo: training a %d-parameter teacher", sum(p.numel() for p in model.parameters()))
        stats = teacher.train_teacher(
            model, tokenizer, train_texts, steps=train_steps, seconds=train_seconds, seed=seed, progress=progress
        )
        _save_quietly(model, tmp / "teacher")
        for name in ("teacher", "train", "valid", "chat"):
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
        "chat_conversations": chat_counts,
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


if __name__ == "__main__":  # python -m kdcache.demo.assets [WORKDIR]: build (or reuse) the assets, print the marker
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(prepare_demo(Path(sys.argv[1] if len(sys.argv) > 1 else ".kdcache/demo/assets")).info, indent=1))
