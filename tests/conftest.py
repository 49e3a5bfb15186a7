"""Shared fixtures: a session-wide local Ray, tiny real teachers saved with save_pretrained, small corpora, and the
config of a tiny cache job (`tiny_job_config`) that the job, fault and report tests run."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from tiny_models import build_tiny_model, build_tiny_tokenizer  # noqa: E402

if TYPE_CHECKING:
    from kdcache.config import KDCacheConfig

# A job small enough for 2 CPUs that still has several units over 2 actors: top-8 targets, 96-token windows,
# ~1500-byte units, 512-token teacher batches.
TINY_JOB_SETTINGS = (
    "targets.k=8",
    "data.max_length=96",
    "data.unit_bytes=1500",
    "cluster.num_actors=2",
    "cluster.batch_tokens=512",
    "cluster.progress=false",
)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny Llama teacher with a trained BPE tokenizer, vocab padded above the tokenizer's size."""
    out = tmp_path_factory.mktemp("teacher") / "llama"
    build_tiny_model("llama", out, vocab_size=320)
    build_tiny_tokenizer(out, vocab_size=256)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def stdlib_texts(n: int, max_chars: int = 3000) -> list[str]:
    """Deterministic text every Python install has: the first n stdlib modules' sources (truncated)."""
    import os as _os

    root = Path(_os.__file__).parent
    files = sorted(p for p in root.glob("*.py"))[:n]
    return [p.read_text(encoding="utf-8", errors="replace")[:max_chars] for p in files]


def write_text_corpus(root: Path, files: Sequence[Sequence[str]]) -> Path:
    """Write ``files[0]``, ``files[1]``, ... as ``root/a.jsonl``, ``root/b.jsonl``, ..., one ``{"text"}`` record per
    text in order; returns ``root``."""
    for index, texts in enumerate(files):
        write_jsonl(root / f"{chr(ord('a') + index)}.jsonl", [{"text": t} for t in texts])
    return root


def tiny_job_config(teacher: Path, corpus: Path, out: Path | str, *extra: str) -> KDCacheConfig:
    """The config of a tiny cache job: ``teacher``, every ``*.jsonl`` of ``corpus``, output at ``out``, with
    `TINY_JOB_SETTINGS`; ``extra`` ``key=value`` overrides come last (so they win)."""
    from kdcache.config import load_config

    base = [f"teacher.model={teacher}", f"data.source={corpus}/*.jsonl", f"output.uri={out}"]
    return load_config(None, [*base, *TINY_JOB_SETTINGS, *extra])


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Two jsonl files with documents of varied length, including an empty one."""
    texts = stdlib_texts(12, max_chars=1500)
    return write_text_corpus(tmp_path / "data", [[*texts[:6], ""], [t[:200] for t in texts[6:]]])


def record_writes(worker, monkeypatch) -> list[dict]:
    """Spy on what a UnitWorker hands its shard writer: per sequence its ids, head and sampled targets, target mask
    and sequence fields (`encode_sequence`'s arguments, every keyword passed on unchanged)."""
    import numpy as np

    calls: list[dict] = []
    make_writer = worker.shard_writer

    def spying(unit):
        writer = make_writer(unit)
        encode = writer.encode_sequence

        def encode_sequence(seq_id, input_ids, head, samples=None, **keywords):
            calls.append(
                {
                    "seq_id": seq_id,
                    "input_ids": np.array(input_ids),
                    "head": head,
                    "samples": samples,
                    "mask": keywords.get("target_mask"),
                    "fields": keywords.get("sequence_fields"),
                }
            )
            return encode(seq_id, input_ids, head, samples, **keywords)

        writer.encode_sequence = encode_sequence
        return writer

    monkeypatch.setattr(worker, "shard_writer", spying)
    return calls
