"""What a cache is: its fingerprint, how a job claims it, and which students may read it. Identity in one place.

A cache holds exactly one fingerprint: the sha256 of the canonical JSON of everything that determines its bytes
(`fingerprint_inputs`: teacher and weights, tokenizer content, targets, codec, windowing, data reading, shard
format; for conversations the chat template's content and which positions get targets). The driver claims it before
any work by creating `fingerprint.json` exclusively (`claim_fingerprint`); a job with a different fingerprint is
refused at the same URI, naming what differs. Readers refuse a student whose vocabulary, tokenizer or chat template
does not match (`check_student`).

Pure functions and duck-typed objects: nothing here imports transformers, torch or Ray. The capture stage reads the
teacher's config and tokenizer (`kdcache.capture.teacher.read_model_info`, `load_tokenizer`) and passes what it
read in.

    inputs = fingerprint_inputs(cfg, model_info, tokenizer_identity(tokenizer, name))
    fingerprint = fingerprint_of(inputs)
    claim_fingerprint(store, fingerprint, inputs)      # CacheMismatchError if the URI holds another cache
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcache.codec import CodecParams
from kdcache.config import CHAT_FORMATS
from kdcache.errors import CacheMismatchError
from kdcache.manifest import FINGERPRINT_KEY, FORMAT_NAME, FORMAT_VERSION, dumps

if TYPE_CHECKING:
    from kdcache.config import KDCacheConfig, TargetsConfig
    from kdcache.store import Store

__all__ = [
    "canonical_json",
    "chat_template_hash",
    "check_student",
    "claim_fingerprint",
    "describe_difference",
    "fingerprint_inputs",
    "fingerprint_of",
    "targets_identity",
    "tokenizer_chat_template",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def canonical_json(value: Any) -> str:
    """Stable JSON text: sorted keys, no whitespace; the input of every hash kdcache computes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint_of(inputs: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of the fingerprint inputs."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Identify a tokenizer by content, so a cache can refuse a student whose tokenizer differs.

    Args:
        tokenizer: A transformers tokenizer. A fast one is hashed by its ``tokenizer.json`` content (minus the
            truncation/padding state, which transformers changes on each call), a slow one by its sorted vocab.

    Returns:
        ``{"hash": sha256 hex, "vocab_size": len(tokenizer), "eos_token_id": int | None, "bos_token_id": ...}``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        content = json.loads(backend.to_str())
        content.pop("truncation", None)
        content.pop("padding", None)
    else:
        content = tokenizer.get_vocab()
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return {
        "hash": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def tokenizer_chat_template(tokenizer: Any) -> str | None:
    """A tokenizer's own chat template text: ``chat_template`` (its "default" entry when it holds named templates, as
    transformers picks without tools), or None."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    return own if isinstance(own, str) and own else None


def chat_template_hash(template: str | None) -> str | None:
    """sha256 hex of a chat template's text (None for None): what the fingerprint and the student check compare."""
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()


def weights_fingerprint(name_or_path: str, config: Any) -> str | None:
    """sha256 of config.json plus sorted (weight file, size) for a local directory; else the resolved hub commit.

    Args:
        name_or_path: the teacher's local directory or hub id.
        config: its loaded transformers config (read for ``_commit_hash`` when it came from the hub).
    """
    local = Path(name_or_path)
    if local.is_dir():
        digest = hashlib.sha256((local / "config.json").read_bytes())
        for path in sorted(p for p in local.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
            digest.update(f"\n{path.name}\t{path.stat().st_size}".encode())
        return digest.hexdigest()
    return getattr(config, "_commit_hash", None)  # None: the hub commit could not be resolved


def targets_identity(targets: TargetsConfig) -> dict[str, Any]:
    """What of the `targets` config section determines the cached bytes."""
    out: dict[str, Any] = {
        "mode": targets.mode,
        "k": targets.stored_k,
        "temperatures": targets.temperatures,
        "logprob_codec": targets.logprob_codec,
        "positions": targets.positions,  # all | assistant: which positions hold a target
    }
    if targets.mode != "topk":
        out.update(samples=targets.samples, seed=targets.seed)
    return out


def fingerprint_inputs(
    cfg: KDCacheConfig, model_info: dict[str, Any], tokenizer_info: dict[str, Any], chat_template: str | None = None
) -> dict[str, Any]:
    """Everything that determines a job's cached bytes.

    Args:
        cfg: the job configuration.
        model_info: `kdcache.capture.teacher.read_model_info` of the teacher (config only, no weights).
        tokenizer_info: `tokenizer_fingerprint` of the tokenizer the job uses, plus its ``name``.
        chat_template: the text of the chat template records are rendered with (chat / prompt_completion: the
            ``data.chat_template`` override or the tokenizer's own); its sha256 is recorded.
    """
    t = cfg.teacher
    data = {
        "source": cfg.data.source,
        "format": cfg.data.format,
        "text_field": cfg.data.text_field,
        "ids_field": cfg.data.ids_field,
        "unit_bytes": cfg.data.unit_bytes,
    }
    if cfg.data.format in CHAT_FORMATS:
        data |= {
            "messages_field": cfg.data.messages_field,
            "prompt_field": cfg.data.prompt_field,
            "completion_field": cfg.data.completion_field,
            "chat_template_sha256": chat_template_hash(chat_template),
        }
    return {
        "format_version": FORMAT_VERSION,
        "teacher": {"model": t.model, "revision": t.revision, "dtype": t.dtype, **model_info},
        "tokenizer": tokenizer_info,
        "targets": targets_identity(cfg.targets),
        "codec": CodecParams.for_logprobs(cfg.targets.logprob_codec).to_dict(),
        "windowing": {
            "max_length": cfg.data.max_length,
            "min_length": cfg.data.min_length,
            "add_eos": cfg.data.add_eos,
            "add_special_tokens": True,
        },
        "data": data,
        "shard_format": cfg.output.format,
    }


def describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """One line per leaf that differs between two fingerprint inputs: ``"key.path: cache has A, this job has B"``."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: cache has {a!r}, this job has {b!r}")
    return diffs


def claim_fingerprint(store: Store, fingerprint: str, inputs: dict[str, Any]) -> None:
    """Create `fingerprint.json` exclusively, or check that the one there is ours.

    Raises:
        CacheMismatchError: the store already holds a cache with another fingerprint (the message names what
            differs).
    """
    record = {"format": FORMAT_NAME, "fingerprint": fingerprint, "fingerprint_inputs": inputs}
    if store.create_exclusive(FINGERPRINT_KEY, dumps(record)):
        return
    existing = json.loads(store.read_bytes(FINGERPRINT_KEY))
    if existing.get("fingerprint") != fingerprint:
        diffs = describe_difference(existing.get("fingerprint_inputs", {}), inputs)
        raise CacheMismatchError(
            f"{store.uri} already holds a cache with a different fingerprint "
            f"({existing.get('fingerprint', '?')[:12]} vs {fingerprint[:12]}): "
            + "; ".join(diffs[:6])
            + ". Use a new output.uri (a cache is immutable)."
        )


def check_student(manifest: dict[str, Any], *, student_vocab_size: int | None = None, tokenizer: Any = None) -> None:
    """Raise `CacheMismatchError` when a student cannot be trained on this cache's targets.

    A student output layer with at least the teacher's padded vocabulary is fine (extra columns get teacher
    probability 0); fewer columns, a tokenizer of another size, or a tokenizer with another content hash are not.
    For a cache of conversations, a student tokenizer that has a chat template must have the one the conversations
    were rendered with: the student would otherwise learn one format and be prompted in another.

    Args:
        manifest: the cache's manifest. student_vocab_size: the student's output columns (`config.vocab_size`).
        tokenizer: the student's tokenizer: a transformers tokenizer (size, content hash and chat template checked)
            or anything with `__len__` (size checked).
    """
    inputs = manifest["fingerprint_inputs"]
    teacher_padded = inputs["teacher"]["padded_vocab_size"]
    cached_tok = inputs["tokenizer"]
    if student_vocab_size is not None and int(student_vocab_size) < teacher_padded:
        raise CacheMismatchError(
            f"student vocab {int(student_vocab_size)} < teacher padded vocab {teacher_padded}: the student's output "
            f"layer must cover every cached id; pad it (e.g. resize_token_embeddings({teacher_padded}))"
        )
    if tokenizer is None:
        return
    size = len(tokenizer)
    if size != cached_tok["vocab_size"]:
        raise CacheMismatchError(
            f"student tokenizer vocab {size} != teacher tokenizer vocab {cached_tok['vocab_size']} "
            f"(cache tokenizer {cached_tok.get('name')!r}): the student must use the teacher's tokenizer"
        )
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        digest = tokenizer_fingerprint(tokenizer)["hash"]
        if digest != cached_tok["hash"]:
            raise CacheMismatchError(
                f"student tokenizer hash {digest[:16]} != teacher tokenizer hash {str(cached_tok['hash'])[:16]} "
                f"(both vocab {size}): same size, different tokens; use the teacher's tokenizer"
            )
    if size > teacher_padded:
        raise CacheMismatchError(f"student tokenizer vocab {size} > teacher padded vocab {teacher_padded}")
    cached_template = inputs.get("data", {}).get("chat_template_sha256")
    student_template = chat_template_hash(tokenizer_chat_template(tokenizer))
    if cached_template is not None and student_template is not None and student_template != cached_template:
        raise CacheMismatchError(
            f"student chat template sha256 {student_template[:16]} != {cached_template[:16]}, the template the "
            f"cache's conversations were rendered with (teacher tokenizer {cached_tok.get('name')!r}, or the job's "
            "data.chat_template): the student would learn one chat format and be prompted in another; give the "
            "student tokenizer the cache's template (tokenizer.chat_template = ...)"
        )
