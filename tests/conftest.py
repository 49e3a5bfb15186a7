"""Shared fixtures: a session-wide local Ray, tiny real teachers saved with save_pretrained, small corpora."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from tiny_models import build_tiny_model, build_tiny_tokenizer  # noqa: E402


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


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Two jsonl files with documents of varied length, including an empty one."""
    texts = stdlib_texts(12, max_chars=1500)
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"text": t} for t in texts[:6]] + [{"text": ""}])
    write_jsonl(tmp_path / "data" / "b.jsonl", [{"text": t[:200]} for t in texts[6:]])
    return tmp_path / "data"
