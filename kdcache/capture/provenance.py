"""What a cache came from, for people: the teacher's license and, for a generated cache, how it was generated.

Provenance is recorded in the manifest (``provenance``) and shown by `kdcache info`, never part of the identity: a
license tells the user what they may do with the cache (some licenses forbid training models that compete with the
teacher on its outputs), it does not change a byte.

The license is ``teacher.license`` when set, else the one the model card declares (the ``license`` key of the YAML
front matter of the checkpoint's README.md, with ``license_name`` / ``license_link`` for "other"), else a
``license`` key of its config.json; a hub checkpoint's card is read from the local Hugging Face cache or fetched once
(a failure leaves it unknown, never fails the job).

    teacher_license("meta-llama/Llama-3.1-8B-Instruct")   # {"license": "llama3.1", "source": "model card", ...}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_CARD_BYTES", "card_license", "teacher_license"]

log = logging.getLogger("kdcache.capture.provenance")
MAX_CARD_BYTES = 1 << 20  # a model card (or config) larger than this is not read for its license


def card_license(text: str) -> dict[str, Any] | None:
    """The license a model card's YAML front matter declares: ``{"license": ..., "license_name": ...,
    "license_link": ...}`` (the keys present), or None."""
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return None
    if not isinstance(meta, dict) or meta.get("license") in (None, "", []):
        return None
    out = {key: meta[key] for key in ("license", "license_name", "license_link") if meta.get(key) is not None}
    return {key: value if isinstance(value, (str, list)) else str(value) for key, value in out.items()}


def _read_small(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_CARD_BYTES:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _hub_file(repo: str, filename: str, revision: str | None) -> Path | None:
    """A file of a hub repository: from the local Hugging Face cache, else downloaded; None when unavailable."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as exc:  # offline, gated, no such file: the license stays unknown
        log.info("%s: %s not available (%s); its license is unknown", repo, filename, type(exc).__name__)
        return None


def teacher_license(name_or_path: str, *, revision: str | None = None, override: str | None = None) -> dict[str, Any]:
    """The teacher's license for the manifest: ``{"license": str | list | None, "source": str}``.

    Args:
        name_or_path: the teacher's local directory or hub id.
        revision: its hub revision.
        override: ``teacher.license`` (wins when set; source "teacher.license").
    """
    if override is not None:
        return {"license": override, "source": "teacher.license"}
    local = Path(name_or_path)
    card = local / "README.md" if local.is_dir() else _hub_file(name_or_path, "README.md", revision)
    text = _read_small(card) if card is not None else None
    found = card_license(text) if text else None
    if found:
        return {**found, "source": "model card"}
    config = local / "config.json" if local.is_dir() else None
    raw = _read_small(config) if config is not None else None
    if raw:
        try:
            value = json.loads(raw).get("license")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, str) and value:
            return {"license": value, "source": "config.json"}
    return {"license": None, "source": "not declared"}
