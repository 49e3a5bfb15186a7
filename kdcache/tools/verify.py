"""Check a cache against its manifest: `kdcache verify URI [--deep]`.

    report = verify_cache("s3://bucket/kd/llama-top64", deep=True)
    print(report.format()); sys.exit(0 if report.ok else 1)

Fast mode (default) reads no data pages, so it stays cheap on an object store with terabytes of shards. Per unit:
the shard exists with exactly the byte size the manifest records; its self-description opens (Parquet footer and
the small seq_id column; Zarr zip directory and zarr.json entries, with every chunk present) and agrees with the
manifest (k, codec, unit id, every declared column / array with the type the format specifies); its token,
sequence and target-position counts equal the manifest's. It finds missing and truncated
shards, and damage to footers and metadata, but not a flipped byte inside compressed data: that takes --deep.

Deep mode (`deep=True`) reads every shard whole: sha256 against the commit record, a full decode, and the
invariants of the data: ids strictly ascending per token and inside [0, padded vocab), log-probs <= 0, head mass
plus tail mass = 1 (within the codec's quantization), tails <= 0, entropies >= 0, finite normalizers, sample counts
per token summing to the number of draws (or 0), sampled ids disjoint from the head, and every seq_id exactly once
in the whole cache; in a cache with `targets.cross_tokenizer`, the text behind the tokens decodes and covers every
token once. Only the declared columns / arrays are decompressed, each bounded by the counts the manifest
declares (what readers do), so a decompression bomb is reported, not expanded. Positions without a target are
skipped by the invariants. The manifest's statistics are checked against the sum of its units in both modes.

Each problem names the unit and its shard; the CLI exits 1 when there is any.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.codec import CodecParams, error_bound
from kdcache.errors import KdcacheError
from kdcache.formats import get_format
from kdcache.formats.base import ShardCounts
from kdcache.manifest import INDEX_KEY, read_manifest
from kdcache.store import Store

__all__ = ["Problem", "VerifyReport", "check_shard_data", "verify_cache"]

TAIL_TOLERANCE = 1e-5  # nats: float32 logsumexp rounding can put an exact tail a hair above 0


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cache: the unit (or "manifest") and shard it concerns, and what is wrong."""

    unit_id: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.unit_id} {self.path}: {self.message}"


@dataclass
class VerifyReport:
    """What `verify_cache` checked and found."""

    uri: str
    deep: bool
    units: int = 0
    bytes: int = 0
    tokens: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """Human-readable lines: one per problem, then a verdict."""
        mode = "deep: sha256 + full decode + invariants" if self.deep else "fast: sizes + metadata + counts"
        lines = [f"kdcache verify {self.uri} ({mode})"]
        lines += [f"  FAIL {p}" for p in self.problems]
        verdict = "OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)"
        lines.append(f"  {self.units} units, {self.tokens:,} tokens, {self.bytes:,} bytes checked: {verdict}")
        return "\n".join(lines)


def check_shard_data(
    data: Any, *, k: int, padded_vocab: int | None, num_samples: int, codec: CodecParams
) -> list[str]:
    """Invariants of one decoded shard (`ShardData`) at its positions with targets; returns what is violated (empty
    when all hold)."""
    found: list[str] = []
    mask = data.target_mask
    every = bool(mask.all())
    ids, lps = (
        (data.target_ids, data.target_logprobs) if every else (data.target_ids[mask], data.target_logprobs[mask])
    )
    if ids.shape[1] != k:
        found.append(f"holds {ids.shape[1]} head entries per token, the manifest says k={k}")
        return found
    if k > 1 and not bool((np.diff(ids, axis=1) > 0).all()):
        found.append("head ids are not strictly ascending within a token")
    if ids.size and (ids.min() < 0 or (padded_vocab is not None and ids.max() >= padded_vocab)):
        found.append(f"head ids outside [0, {padded_vocab})")
    if lps.size and not bool((lps <= 0).all()):
        found.append("head log-probs above 0")
    tails = data.tail_logprobs if every else data.tail_logprobs[mask]
    norms = data.log_normalizers if every else data.log_normalizers[mask]
    entropy = data.entropy if every else data.entropy[mask]
    if tails.size and not bool((np.nan_to_num(tails, nan=1.0) <= TAIL_TOLERANCE).all()):
        found.append("tail log-masses above 0 (or NaN)")
    if norms.size and not bool(np.isfinite(norms).all()):
        found.append("log-normalizers not finite")
    if entropy.size and not bool((np.isfinite(entropy) & (entropy >= 0)).all()):
        found.append("entropies negative or not finite")
    if k > 0 and len(ids):
        # the head and the tail partition the distribution: their masses add up to 1 (up to quantization)
        head = np.logaddexp.reduce(lps.astype(np.float64), axis=1)
        total = np.logaddexp(head, tails[:, 0].astype(np.float64))
        # each head log-prob is off by at most its level's bound, so their logsumexp is too; plus the entries clipped
        # at logprob_min, the float16 tail (relative 2**-11) and float32 rounding
        clipped = k * np.exp(codec.logprob_min) if codec.logprobs != "f32" else 0.0
        tolerance = error_bound(lps, codec).max(axis=1) + clipped + 1e-3
        excess = np.abs(total) - tolerance
        if not bool((excess <= 0).all()):
            row = int(np.argmax(excess))
            found.append(
                f"head + tail mass differs from 1 by {abs(total[row]):.3g} nats at token {row} "
                f"(tolerance {tolerance[row]:.3g})"
            )
    if num_samples > 0:
        if data.sample_counts is None:
            return [*found, "sample columns missing from a sampled cache"]
        counts = data.sample_counts if every else data.sample_counts[mask]
        sums = counts.sum(axis=1)
        if not bool(np.isin(sums, (0, num_samples)).all()):
            found.append(f"sample counts per token do not sum to {num_samples}")
        if not every and bool((data.sample_counts[~mask] > 0).any()):
            found.append("samples at positions without a target")
        valid = counts > 0
        sids = data.sample_ids if every else data.sample_ids[mask]
        if sids.size and (
            sids[valid].min(initial=0) < 0 or (padded_vocab is not None and sids[valid].max(initial=0) >= padded_vocab)
        ):
            found.append(f"sampled ids outside [0, {padded_vocab})")
        if sids.shape[1] > 1:
            both = valid[:, 1:] & valid[:, :-1]
            if not bool((np.diff(sids, axis=1)[both] > 0).all()):
                found.append("sampled ids are not strictly ascending within a token")
        if k > 0 and sids.size:
            drawn = np.where(valid, sids, -1)
            if bool((drawn[:, :, None] == ids[:, None, :]).any()):
                found.append("sampled ids overlap the head ids")
    return found


def _runs(seq_ids: np.ndarray) -> np.ndarray:
    """The seq_id of each run of equal values (one per sequence)."""
    if len(seq_ids) == 0:
        return seq_ids
    return seq_ids[np.concatenate([[0], np.flatnonzero(np.diff(seq_ids)) + 1])]


class _Checker:
    def __init__(self, store: Store, manifest: dict[str, Any], deep: bool):
        inputs = manifest["fingerprint_inputs"]
        self.store, self.deep = store, deep
        self.fmt = get_format(manifest["shard_format"])
        self.codec = CodecParams.from_dict(inputs["codec"])
        self.k = int(inputs["targets"]["k"])
        self.temperatures = len(inputs["targets"]["temperatures"])
        self.num_samples = int(inputs["targets"].get("samples", 0)) if inputs["targets"]["mode"] != "topk" else 0
        self.padded_vocab = inputs.get("teacher", {}).get("padded_vocab_size")
        self.token_text = bool(inputs["targets"].get("cross_tokenizer"))  # shards hold the text behind the tokens

    def layout(self, unit: dict[str, Any]) -> dict[str, Any]:
        """What the format readers check a shard against: the cache's layout and the unit's declared counts."""
        return {
            "k": self.k,
            "num_temperatures": self.temperatures,
            "codec": self.codec,
            "num_samples": self.num_samples,
            "counts": ShardCounts(unit["num_tokens"], unit["num_sequences"], unit["num_target_tokens"]),
        }

    def check(self, unit: dict[str, Any]) -> tuple[list[str], np.ndarray | None]:
        """Problems of one unit (messages), and its sequence ids (deep mode)."""
        path = unit["path"]
        try:
            size = self.store.size(path)
        except FileNotFoundError:
            return ["shard is missing"], None
        if size != unit["bytes"]:
            what = "truncated" if size < unit["bytes"] else "longer than recorded"
            return [f"shard has {size} bytes, the manifest records {unit['bytes']} ({what})"], None
        if self.deep:
            return self._deep(unit)
        try:
            with self.store.open(path, "rb") as f:
                info = self.fmt.read_shard_info(f, **self.layout(unit))
        except Exception as exc:  # any failure to read the footer/metadata is the finding
            return [f"cannot read the shard's metadata: {type(exc).__name__}: {exc}"], None
        return self._info_problems(unit, info), None

    def _info_problems(self, unit: dict[str, Any], info: dict[str, Any]) -> list[str]:
        found = []
        for key in ("num_tokens", "num_sequences", "num_target_tokens"):
            if info.get(key) is not None and info[key] != unit[key]:
                found.append(f"holds {info[key]} {key[4:].replace('_', ' ')}, the manifest records {unit[key]}")
        meta = info["metadata"]
        if meta.get("k", self.k) != self.k:
            found.append(f"was written with k={meta['k']}, the manifest says {self.k}")
        try:
            codec = CodecParams.from_dict(meta["codec"]) if isinstance(meta.get("codec"), dict) else self.codec
        except (ValueError, TypeError, KeyError):
            codec = None
        if codec != self.codec:
            found.append(
                f"was written with codec {str(meta.get('codec'))[:200]}, the manifest says {self.codec.to_dict()}"
            )
        if meta.get("unit_id", unit["unit_id"]) != unit["unit_id"]:
            found.append(f"belongs to unit {meta['unit_id']}")
        return found

    def _deep(self, unit: dict[str, Any]) -> tuple[list[str], np.ndarray | None]:
        raw = self.store.read_bytes(unit["path"])
        if hashlib.sha256(raw).hexdigest() != unit["sha256"]:
            return ["shard fails its sha256 checksum (corrupted)"], None
        try:
            data = self.fmt.read_shard(raw, **self.layout(unit))
            info = self.fmt.read_shard_info(raw, **self.layout(unit))
        except Exception as exc:
            return [f"cannot decode the shard: {type(exc).__name__}: {exc}"], None
        seq_ids = _runs(data.seq_ids)
        found = self._info_problems(unit, info)
        if len(seq_ids) != unit["num_sequences"] or data.num_tokens != unit["num_tokens"]:
            found.append(
                f"decodes to {len(seq_ids)} sequences / {data.num_tokens} tokens, the manifest records "
                f"{unit['num_sequences']} / {unit['num_tokens']}"
            )
        if len(np.unique(seq_ids)) != len(seq_ids):
            found.append("a sequence's rows are not contiguous, or a seq_id repeats")
        found += check_shard_data(
            data, k=self.k, padded_vocab=self.padded_vocab, num_samples=self.num_samples, codec=self.codec
        )
        if self.token_text:  # what a student with another tokenizer reads: decodes, and covers every token once
            try:
                self.fmt.read_token_text(raw, **self.layout(unit))
            except Exception as exc:
                found.append(f"cannot decode the text behind its tokens: {type(exc).__name__}: {exc}")
        return found, seq_ids


def verify_cache(
    uri: str, *, deep: bool = False, storage_options: dict[str, Any] | None = None, workers: int = 8
) -> VerifyReport:
    """Check every unit of a cache's manifest (see the module docstring); never raises for a damaged shard.

    Raises:
        KdcacheError: there is no readable manifest at `uri`.
    """
    store = Store(uri, storage_options)
    manifest = read_manifest(store)
    if manifest is None:
        raise KdcacheError(f"{store.url(INDEX_KEY)}: no manifest; nothing to verify (is the job finished?)")
    report = VerifyReport(uri=uri, deep=deep)
    units = manifest["units"]
    stats = manifest["stats"]
    for key, total in (
        ("num_units", len(units)),
        ("num_sequences", sum(u["num_sequences"] for u in units)),
        ("num_tokens", sum(u["num_tokens"] for u in units)),
        ("num_target_tokens", sum(u["num_target_tokens"] for u in units)),
        ("total_bytes", sum(u["bytes"] for u in units)),
    ):
        if stats.get(key) != total:
            report.problems.append(
                Problem("manifest", INDEX_KEY, f"stats.{key} is {stats.get(key)}, its units add up to {total}")
            )
    try:
        checker = _Checker(store, manifest, deep)
    except (KeyError, ValueError) as exc:
        report.problems.append(Problem("manifest", INDEX_KEY, f"cannot be used: {exc}"))
        return report
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(checker.check, units))
    seen: dict[int, str] = {}
    for unit, (messages, seq_ids) in zip(units, results):
        report.units += 1
        report.bytes += unit["bytes"]
        report.tokens += unit["num_tokens"]
        report.problems += [Problem(unit["unit_id"], store.url(unit["path"]), m) for m in messages]
        for seq_id in [] if seq_ids is None else seq_ids.tolist():
            if seq_id in seen:
                message = f"seq_id {seq_id} is also in unit {seen[seq_id]}"
                report.problems.append(Problem(unit["unit_id"], store.url(unit["path"]), message))
            seen.setdefault(seq_id, unit["unit_id"])
    return report
