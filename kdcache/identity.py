"""What a cache is: its fingerprint, how a job claims it, and which students may read it. Identity in one place.

A cache holds exactly one fingerprint: the sha256 of the canonical JSON of everything that determines its bytes
(`fingerprint_inputs`: teacher and weights, tokenizer content, targets, codec, windowing, data reading, shard
format; for conversations the chat template's content and which positions get targets; for generated caches every
generation setting, the engine and the ids that end a response). Identity is content,
never the spelling of a path: the teacher's weights by the sha256 of their bytes (`weights_fingerprint`; hashed once
per file version, the hashes kept in a small cache outside the model folder, `file_sha256`) or the resolved hub
commit, the tokenizer by its content hash, the input files by their absolute URLs and sizes (`files_identity`). The
driver claims the fingerprint once its plan is made, by creating `fingerprint.json` exclusively
(`claim_fingerprint`); a job with a different fingerprint is refused at the same URI, naming what differs, unless
the claim's job committed nothing (then the new job takes the URI over). Readers refuse a student whose vocabulary,
tokenizer or chat template does not match (`check_student`).

Pure functions and duck-typed objects: nothing here imports transformers, torch or Ray. The capture stage reads the
teacher's config and tokenizer (`kdcache.capture.teacher.read_model_info`, `load_tokenizer`) and passes what it
read in.

    inputs = fingerprint_inputs(cfg, model_info, tokenizer_fingerprint(tokenizer), files)
    fingerprint = fingerprint_of(inputs)
    claim_fingerprint(store, fingerprint, inputs)      # CacheMismatchError if the URI holds another cache
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcache.codec import CodecParams
from kdcache.config import CHAT_FORMATS, redact_secrets
from kdcache.errors import CacheMismatchError
from kdcache.manifest import COMMITS_DIR, FINGERPRINT_KEY, FORMAT_NAME, FORMAT_VERSION, INDEX_KEY, dumps

if TYPE_CHECKING:
    from kdcache.config import GenerateConfig, KDCacheConfig, TargetsConfig
    from kdcache.store import Store

__all__ = [
    "canonical_json",
    "check_claim",
    "chat_template_hash",
    "check_student",
    "claim_fingerprint",
    "describe_difference",
    "file_sha256",
    "files_identity",
    "fingerprint_inputs",
    "fingerprint_of",
    "generate_identity",
    "hash_cache_path",
    "read_claim",
    "targets_identity",
    "tokenizer_chat_template",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]

log = logging.getLogger("kdcache.identity")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# Files of a local teacher folder whose bytes are its identity: config, weights and custom code (trust_remote_code).
IDENTITY_SUFFIXES = (*WEIGHT_SUFFIXES, ".py")
HASH_CACHE_ENV = "KDCACHE_HASH_CACHE"  # the file-hash cache's path (default: $XDG_CACHE_HOME/kdcache/file-hashes.json)
HASH_CACHE_MAX_BYTES = 8 * 2**20  # a larger cache file is not read (it is rebuilt)
HASH_CACHE_MAX_ENTRIES = 2048  # newest entries kept
_HASH_CACHE_LOCK = threading.Lock()


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


def hash_cache_path() -> Path:
    """Where `file_sha256` keeps its hashes: $KDCACHE_HASH_CACHE, else $XDG_CACHE_HOME (~/.cache)/kdcache/."""
    if os.environ.get(HASH_CACHE_ENV):
        return Path(os.environ[HASH_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdcache" / "file-hashes.json"


def _file_signature(st: os.stat_result) -> list[int]:
    # ctime and inode too: a file rewritten in place with its old size and mtime (cp -p, rsync -t) still misses
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > HASH_CACHE_MAX_BYTES:
            return {}
        cache = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}  # missing, unreadable or torn: it is only a cache
    return cache if isinstance(cache, dict) else {}


def _write_hash_cache(path: Path, cache: dict[str, Any]) -> None:
    newest = sorted(cache.items(), key=lambda kv: -float(kv[1].get("used", 0)))[:HASH_CACHE_MAX_ENTRIES]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(newest), sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file; the last writer wins
    except OSError as exc:
        log.info("file-hash cache %s not written (%s); weights will be hashed again next time", path, exc)


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, remembered per (absolute path, size, mtime, ctime, inode) in `hash_cache_path`.

    The first call on a file version reads it whole (bench/identity.py measures the rate); later calls cost one
    `stat`. The cache lives outside the hashed folder: a teacher's folder is never written to.
    """
    path = Path(path).resolve()
    signature = _file_signature(path.stat())
    cache_file = hash_cache_path()
    cache = _read_hash_cache(cache_file)
    hit = cache.get(str(path))
    if isinstance(hit, dict) and hit.get("stat") == signature and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if _file_signature(path.stat()) == signature:  # not rewritten while we read it: safe to remember
        with _HASH_CACHE_LOCK:  # threads of this process (weights_fingerprint hashes files in parallel)
            cache = _read_hash_cache(cache_file)  # another process may have added entries meanwhile
            cache[str(path)] = {"stat": signature, "sha256": digest, "used": time.time()}
            _write_hash_cache(cache_file, cache)
    return digest


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
    """The teacher's identity by content: never by how its path is spelled.

    A local directory: sha256 over the sha256 of the bytes of `config.json` and of every top-level weight file and
    Python file (custom code), with their names (`file_sha256`, so each file version is read once). The same
    folder given as a relative or absolute path, or copied elsewhere, has the same fingerprint; new weights saved
    into it have another. A hub id: the resolved commit hash (``config._commit_hash``), None when unresolved.

    Args:
        name_or_path: the teacher's local directory or hub id.
        config: its loaded transformers config (read for ``_commit_hash`` when it came from the hub).
    """
    local = Path(name_or_path)
    if local.is_dir():
        files = [local / "config.json"]
        files += sorted(p for p in local.iterdir() if p.is_file() and p.name.endswith(IDENTITY_SUFFIXES))
        # one thread per file (hashlib releases the GIL): a sharded checkpoint hashes on several cores
        with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1, 8))) as pool:
            hashes = list(pool.map(file_sha256, files))
        digest = hashlib.sha256(b"kdcache-weights-v2\n")
        for path, file_hash in zip(files, hashes):
            digest.update(f"{path.name}\t{file_hash}\n".encode())
        return digest.hexdigest()
    return getattr(config, "_commit_hash", None)  # None: the hub commit could not be resolved


def files_identity(files: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """The input files' identity: their count, total size and the sha256 of the sorted (absolute URL, size) list.

    `kdcache.store.expand_urls` gives absolute URLs, so a relative and an absolute spelling of the same files (or a
    glob and a list naming them) are the same input. Content is not hashed (terabytes): a copy at another URL is
    another input, and an edit that keeps a file's size is not noticed (the cache stores the tokens it read).
    """
    listing = sorted([str(url), int(size)] for url, size in files)
    return {
        "files": len(listing),
        "bytes": sum(size for _, size in listing),
        "files_sha256": hashlib.sha256(canonical_json(listing).encode()).hexdigest(),
    }


def targets_identity(targets: TargetsConfig) -> dict[str, Any]:
    """What of the `targets` config section determines the cached bytes."""
    out: dict[str, Any] = {
        "mode": targets.mode,
        "k": targets.stored_k,
        "temperatures": targets.temperatures,
        "logprob_codec": targets.logprob_codec,
        "positions": targets.positions,  # all | assistant: which positions hold a target
        "cross_tokenizer": targets.cross_tokenizer,  # the shards hold the text behind every token
    }
    if targets.mode != "topk":
        out.update(samples=targets.samples, seed=targets.seed)
    return out


def generate_identity(generate: GenerateConfig, stop_token_ids: Sequence[int]) -> dict[str, Any]:
    """What of the `generate` section determines a generated cache's bytes: every setting (the batch size too: it
    changes the float rounding of batched forwards), the engine, and the ids that end a response (from the teacher's
    generation config and tokenizer)."""
    return {
        "engine": generate.engine,
        "n": generate.n,
        "max_new_tokens": generate.max_new_tokens,
        "temperature": generate.temperature,
        "top_p": generate.top_p,
        "top_k": generate.top_k,
        "stop": list(generate.stop),
        "seed": generate.seed,
        "batch_size": generate.batch_size,
        "engine_options": redact_secrets(dict(generate.engine_options)),
        "stop_token_ids": [int(i) for i in stop_token_ids],
    }


def fingerprint_inputs(
    cfg: KDCacheConfig,
    model_info: dict[str, Any],
    tokenizer_info: dict[str, Any],
    files: Sequence[tuple[str, int]],
    chat_template: str | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Everything that determines a job's cached bytes, by content: no path as the user spelled it.

    Args:
        cfg: the job configuration.
        model_info: `kdcache.capture.teacher.read_model_info` of the teacher (config only; its
            ``weights_fingerprint`` identifies the weights).
        tokenizer_info: `tokenizer_fingerprint` of the tokenizer the job uses.
        files: the input files as (absolute URL, size), `kdcache.store.expand_urls` of ``data.source``.
        chat_template: the text of the chat template records are rendered with (chat / prompt_completion: the
            ``data.chat_template`` override or the tokenizer's own); its sha256 is recorded.
        stop_token_ids: with a `generate` section, the ids that end a response
            (`kdcache.capture.generate.stop_token_ids`); recorded under ``generate`` with every generation setting.
    """
    t = cfg.teacher
    teacher = {"dtype": t.dtype, **model_info}
    if model_info.get("weights_fingerprint") is None:  # a hub id whose commit is unknown: its name is all there is
        teacher.update(model=t.model, revision=t.revision)
    data = {
        **files_identity(files),
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
    inputs = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher,
        "tokenizer": {key: value for key, value in tokenizer_info.items() if key != "name"},
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
    if cfg.generate is not None:  # absent otherwise: the fingerprints of other caches stay what they were
        inputs["generate"] = generate_identity(cfg.generate, stop_token_ids or [])
    return inputs


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


def read_claim(store: Store) -> dict[str, Any] | None:
    """The record in `fingerprint.json`, or None when there is none."""
    try:
        return json.loads(store.read_bytes(FINGERPRINT_KEY))
    except FileNotFoundError:
        return None


def claim_fingerprint(
    store: Store, fingerprint: str, inputs: dict[str, Any], names: dict[str, Any] | None = None
) -> None:
    """Create `fingerprint.json` exclusively, or check that the one there is ours.

    A claim whose job committed no unit (no `commits/` record, no `index.json`: it failed before any work was
    kept) locks nothing: a job with another fingerprint replaces it. Jobs racing for one URI stay safe: every
    commit record carries its job's fingerprint, a worker that finds another fingerprint's record for its unit
    fails the job (`CacheMismatchError`), and a driver writes `index.json` only from records of its own
    fingerprint while `fingerprint.json` still holds it (`check_claim`).

    Args:
        names: informational, not part of the identity: how the job named its teacher, revision and tokenizer.

    Raises:
        CacheMismatchError: the store already holds a cache with another fingerprint (the message names what
            differs).
    """
    record = {"format": FORMAT_NAME, "fingerprint": fingerprint, "fingerprint_inputs": inputs, "names": names or {}}
    if store.create_exclusive(FINGERPRINT_KEY, dumps(record)):
        return
    existing = read_claim(store) or {}
    if existing.get("fingerprint") == fingerprint:
        return
    diffs = describe_difference(existing.get("fingerprint_inputs", {}), inputs)
    committed = [n for n in store.list_names(COMMITS_DIR) if n.endswith(".json")]
    if not committed and not store.exists(INDEX_KEY):
        log.warning(
            "%s: taking over the claim of a job that committed nothing (fingerprint %s; differences: %s)",
            store.uri, str(existing.get("fingerprint", "?"))[:12], "; ".join(diffs[:6]) or "unknown",
        )  # fmt: skip
        store.write_bytes(FINGERPRINT_KEY, dumps(record))
        return
    raise CacheMismatchError(
        f"{store.uri} already holds a cache with a different fingerprint "
        f"({str(existing.get('fingerprint', '?'))[:12]} vs {fingerprint[:12]}, {len(committed)} units committed): "
        + "; ".join(diffs[:6])
        + ". Use a new output.uri (a cache is immutable)."
    )


def check_claim(store: Store, fingerprint: str) -> None:
    """Raise `CacheMismatchError` unless `fingerprint.json` still holds `fingerprint` (another job took it over)."""
    found = (read_claim(store) or {}).get("fingerprint")
    if found != fingerprint:
        raise CacheMismatchError(
            f"{store.uri}: another job (fingerprint {str(found)[:12]}) took over this output while this one "
            f"(fingerprint {fingerprint[:12]}) ran; run one job per output.uri"
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
