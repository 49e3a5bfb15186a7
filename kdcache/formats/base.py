"""What every shard format shares: the decoded `ShardData`, and `TokenBuffer`, which encodes a unit's sequences
into flat arrays (sorted gap-coded ids, log-prob codes, ragged samples) that a format then lays out on disk.

Positions without a target (a chat's prompt, say): `target_mask` [T] bool names the positions that carry teacher
targets; the head and sample rows cover those positions only, in position order, so a prompt position costs no
encoding and no target bytes. A sequence given without a mask has a target at every position.

The text behind every token (`token_text`, for students with another tokenizer: docs/TARGETS.md) is optional per
shard: a writer made with `token_text=True` stores, per token, the bytes from its start to the next token's start
(empty for a token without text, unknown for a sequence given without text).

Encoding a sequence (`encode_sequence`, pure numpy) and appending it (`add_encoded`, list appends) are separate
steps, so a worker can encode on a background thread while its teacher computes the next batch, then append the
encoded sequences in file order.

No file format is known here: parquet.py and zarr.py turn `TokenBuffer.arrays()` into bytes and back.

Per-sequence fields (`SEQUENCE_FIELDS`): a sequence may carry a few integers about itself (a generated response's
``prompt_id`` and ``sample_index``), given as ``sequence_fields={...}``; every sequence of a shard carries the same
ones, or none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kdcache.codec import CodecParams, encode_ids, quantize_logprobs, sort_targets

__all__ = [
    "SEQUENCE_FIELDS",
    "BufferedShardWriter",
    "EncodedSequence",
    "HeadRows",
    "SampleRows",
    "MAX_TEXT_BYTES_PER_TOKEN",
    "ShardCounts",
    "ShardData",
    "TokenBuffer",
    "TokenText",
    "check_sequence_fields",
    "expand_rows",
    "ragged_to_padded",
    "ragged_ids",
    "split_sequences",
]


MAX_TEXT_BYTES_PER_TOKEN = 1024  # bytes of token text per token, averaged over a sequence (readers bound by it)
TokenText = tuple[bytes, np.ndarray]  # (a sequence's text bytes, [T] each token's byte end in them)
# Per-sequence integer fields a shard may store (name -> dtype): a generated response's source record (a stable 63-bit
# id of its file and position) and which of the prompt's responses it is (0 .. generate.n - 1).
SEQUENCE_FIELDS: dict[str, np.dtype] = {"prompt_id": np.dtype(np.int64), "sample_index": np.dtype(np.int32)}


def check_sequence_fields(seq_id: int, fields: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """``{name: [1] array}`` of a sequence's fields, checked: known names, integers that fit their dtype.

    Raises:
        ValueError: an unknown name or a value that is not an integer in range.
    """
    out = {}
    for name, value in (fields or {}).items():
        dtype = SEQUENCE_FIELDS.get(name)
        if dtype is None:
            known = ", ".join(SEQUENCE_FIELDS)
            raise ValueError(f"sequence {seq_id}: unknown sequence field {name!r} (known: {known})")
        info = np.iinfo(dtype)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"sequence {seq_id}: field {name!r} must be an integer, got {type(value).__name__}")
        if not info.min <= int(value) <= info.max:
            raise ValueError(f"sequence {seq_id}: field {name!r} = {int(value)} does not fit {dtype}")
        out[name] = np.array([int(value)], dtype=dtype)
    return out


class HeadRows(Protocol):
    """The head targets of T consecutive positions, as a shard writer takes them (numpy arrays or CPU tensors).

    `kdcache.capture.targets.TokenTargets` is one; any object with these attributes will do.
    """

    ids: Any  # [T, k] token ids (any order: writers sort them)
    logprobs: Any  # [T, k] log-probs at T = 1, aligned with ids
    log_normalizers: Any  # [T, nT] logsumexp(z / T_j) over the vocabulary
    tail_logprobs: Any  # [T, nT] log mass outside the ids at T_j
    entropy: Any  # [T] entropy at T = 1, nats


class SampleRows(Protocol):
    """Sampled targets of T consecutive positions (`kdcache.capture.targets.SampledTargets` is one)."""

    ids: Any  # [T, m] unique sampled ids, padding id 0
    counts: Any  # [T, m] draws of each id, 0 = padding
    logprobs: Any  # [T, m] teacher log-probs at T = 1, -inf = padding


@dataclass(frozen=True)
class ShardCounts:
    """What a shard must hold, as its manifest entry declares it: readers check a shard's own counts against these
    before decompressing anything, and bound every decompressed size by them."""

    num_tokens: int
    num_sequences: int
    num_target_tokens: int


@dataclass
class ShardData:
    """Decoded token rows of one shard (N tokens).

    Positions without a target (`target_mask` False) hold id -1, log-prob -inf, tail -inf (no mass), normalizer 0
    and entropy 0 in the target arrays, and no samples.
    """

    seq_ids: np.ndarray  # [N] int64
    input_ids: np.ndarray  # [N] int32
    target_ids: np.ndarray  # [N, k] int64, ascending per row
    target_logprobs: np.ndarray  # [N, k] float32
    log_normalizers: np.ndarray  # [N, nT] float32
    tail_logprobs: np.ndarray  # [N, nT] float32
    entropy: np.ndarray  # [N] float32
    sample_ids: np.ndarray | None = None  # [N, m] int64, padding id 0 (sampled caches)
    sample_counts: np.ndarray | None = None  # [N, m] int32, 0 = padding
    sample_logprobs: np.ndarray | None = None  # [N, m] float32, -inf = padding
    target_mask: np.ndarray | None = None  # [N] bool: the position carries targets (None: every position does)
    sequence_fields: dict[str, np.ndarray] | None = None  # {name: [N]} per token (its sequence's value), if stored

    def __post_init__(self) -> None:
        if self.target_mask is None:
            self.target_mask = np.ones(len(self.seq_ids), dtype=bool)

    @property
    def num_tokens(self) -> int:
        return len(self.seq_ids)

    @property
    def num_target_tokens(self) -> int:
        return int(np.count_nonzero(self.target_mask))


def split_sequences(data: ShardData) -> list[tuple[int, slice]]:
    """(seq_id, row slice) of each sequence, in file order (a sequence is a run of equal seq_id)."""
    if len(data.seq_ids) == 0:
        return []
    starts = np.flatnonzero(np.diff(data.seq_ids) != 0) + 1
    bounds = [0, *starts.tolist(), len(data.seq_ids)]
    return [(int(data.seq_ids[a]), slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def ragged_to_padded(lengths: np.ndarray, values: np.ndarray, fill: Any) -> np.ndarray:
    """Flat values of rows with `lengths` -> [N, max(lengths)] padded with `fill`."""
    n, width = len(lengths), int(np.max(lengths, initial=0))
    out = np.full((n, width), fill, dtype=values.dtype)
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    out[mask] = values
    return out


def ragged_ids(lengths: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Flat gap-coded ids of ragged rows -> flat int64 ids (the gap sum restarts at every row)."""
    steps = np.asarray(gaps, dtype=np.int64) + 1
    csum = np.cumsum(steps)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    starts = np.repeat(np.concatenate([[0], csum])[offsets[:-1]], lengths)
    return csum - starts - 1


def expand_rows(mask: np.ndarray, values: np.ndarray, fill: Any) -> np.ndarray:
    """Rows of the True positions of `mask` [N] -> [N, ...] with `fill` at the False ones (`values` itself when every
    position is True)."""
    if len(values) == len(mask):
        return values
    out = np.full((len(mask), *values.shape[1:]), fill, dtype=values.dtype)
    out[mask] = values
    return out


@dataclass(frozen=True)
class EncodedSequence:
    """One sequence encoded for a shard (see `TokenBuffer.encode_sequence`); `add_encoded` only appends it.

    Attributes:
        num_tokens: T, the sequence's length.
        parts: the sequence's rows of every flat array of `TokenBuffer.arrays` (same keys and dtypes).
        num_target_tokens: positions with a target (T without a mask).
    """

    num_tokens: int
    parts: dict[str, np.ndarray]
    num_target_tokens: int = -1

    def __post_init__(self) -> None:
        if self.num_target_tokens < 0:
            object.__setattr__(self, "num_target_tokens", self.num_tokens)


@dataclass
class TokenBuffer:
    """Collects a unit's sequences, encoded, as flat arrays (see `arrays`); shared by every shard writer.

    Args:
        k: head entries per token; num_temperatures: stored temperatures (index 0 is T = 1);
        num_samples: draws per token (0: no sample columns); codec: the log-prob coding;
        token_text: keep the text behind every token (`encode_sequence`'s `token_text`).
    """

    k: int
    num_temperatures: int
    num_samples: int = 0
    codec: CodecParams = field(default_factory=CodecParams)
    token_text: bool = False
    num_sequences: int = 0
    num_tokens: int = 0
    num_target_tokens: int = 0
    _parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def encode_sequence(
        self,
        seq_id: int,
        input_ids: np.ndarray,
        head: HeadRows,
        samples: SampleRows | None = None,
        *,
        target_mask: np.ndarray | None = None,
        token_text: TokenText | None = None,
        sequence_fields: dict[str, int] | None = None,
    ) -> EncodedSequence:
        """Check and encode one sequence (id sort, gap coding, log-prob quantization) without adding it.

        Args:
            seq_id: the sequence's id. input_ids: ``[T]`` its tokens.
            head: the head targets of its R target positions (``ids``, ``logprobs`` ``[R, k]``;
                ``log_normalizers``, ``tail_logprobs`` ``[R, nT]``; ``entropy`` ``[R]``), in position order; ids
                need not be sorted (they are sorted here).
            samples: sampled caches only: ``ids``, ``counts``, ``logprobs`` ``[R, m]``, padded with count 0.
            target_mask: ``[T]`` bool, True at the R positions that carry targets; None: every position (R = T).
            token_text: buffers with `token_text` only: ``(text, ends)``, the sequence's text bytes and each
                token's byte end in them (``[T]``, non-decreasing, the last is ``len(text)``); None: unknown (stored
                as null, as is a text of more than `MAX_TEXT_BYTES_PER_TOKEN` bytes per token on average).
            sequence_fields: ``{name: int}`` of `SEQUENCE_FIELDS` stored with the sequence (e.g. ``prompt_id``).

        Reads only the buffer's settings, never its contents, so it may run on another thread while this buffer is
        being added to; `add_encoded` appends the result.

        Raises:
            ValueError: a shape does not match the settings, or sampled ids/counts cannot be stored.
        """
        n = len(input_ids)
        fields = check_sequence_fields(seq_id, sequence_fields)
        if target_mask is None:
            mask = np.ones(n, dtype=bool)
        else:
            mask = np.asarray(target_mask)
            if mask.shape != (n,) or mask.dtype != np.bool_:
                raise ValueError(
                    f"sequence {seq_id}: target_mask must be a [{n}] bool array, got {mask.dtype} {mask.shape}"
                )
        t = n if target_mask is None else int(np.count_nonzero(mask))
        target_ids, target_logprobs = np.asarray(head.ids), np.asarray(head.logprobs)
        if target_ids.shape != (t, self.k) or target_logprobs.shape != (t, self.k):
            raise ValueError(f"sequence {seq_id}: targets must be [{t}, {self.k}], got {target_ids.shape}")
        log_normalizers, tail_logprobs = np.asarray(head.log_normalizers), np.asarray(head.tail_logprobs)
        entropy = np.asarray(head.entropy)
        if log_normalizers.shape != (t, self.num_temperatures) or tail_logprobs.shape != (t, self.num_temperatures):
            raise ValueError(f"sequence {seq_id}: normalizers/tails must be [{t}, {self.num_temperatures}]")
        if np.shape(entropy) != (t,):
            raise ValueError(f"sequence {seq_id}: entropy must be [{t}], got {np.shape(entropy)}")
        ids, lps = sort_targets(target_ids, target_logprobs)
        part = {
            "seq_ids": np.array([seq_id], dtype=np.int64),
            "seq_lengths": np.array([n], dtype=np.int64),
            "input_ids": np.asarray(input_ids, dtype=np.int32),
            "target_mask": mask,
            "gaps": encode_ids(ids) if self.k else np.zeros((t, 0), np.uint32),
            "codes": quantize_logprobs(lps, self.codec),
            "log_normalizers": log_normalizers.astype(np.float32),
            "tail_logprobs": tail_logprobs.astype(np.float32),
            "entropy": np.asarray(entropy, dtype=np.float32),
        }
        if self.num_samples > 0:
            if samples is None:
                raise ValueError(f"sequence {seq_id}: a sampled shard needs the sequence's sampled targets")
            part.update(_encode_samples(seq_id, t, samples.ids, samples.counts, samples.logprobs, self.codec))
        if self.token_text:
            part.update(_encode_text(seq_id, n, token_text))
        elif token_text is not None:
            raise ValueError(f"sequence {seq_id}: token_text given to a buffer made without token_text=True")
        part.update({f"field_{name}": value for name, value in fields.items()})
        return EncodedSequence(num_tokens=n, parts=part, num_target_tokens=t)

    def add_encoded(self, encoded: EncodedSequence) -> None:
        """Append a sequence from `encode_sequence` of a buffer with the same settings (sequences stay in add order).

        Raises:
            ValueError: ``encoded`` was made for other settings (k, number of temperatures, sampled or not).
        """
        parts = encoded.parts
        made_for = (parts["gaps"].shape[1], parts["log_normalizers"].shape[1], "sample_lengths" in parts)
        made_for += ("text_lengths" in parts,)
        if made_for != (self.k, self.num_temperatures, self.num_samples > 0, self.token_text):
            raise ValueError(
                f"add_encoded: a sequence encoded for (k, temperatures, sampled, text) = {made_for} does not fit a "
                f"buffer with k={self.k}, {self.num_temperatures} temperatures, num_samples={self.num_samples}, "
                f"token_text={self.token_text}"
            )
        fields = sorted(name for name in parts if name.startswith("field_"))
        if self.num_sequences and fields != self.field_names():
            raise ValueError(
                f"add_encoded: every sequence of a shard carries the same sequence fields; this one has "
                f"{[f.removeprefix('field_') for f in fields]}, the others {self.sequence_field_names()}"
            )
        for name, value in encoded.parts.items():
            self._parts.setdefault(name, []).append(value)
        self.num_sequences += 1
        self.num_tokens += encoded.num_tokens
        self.num_target_tokens += encoded.num_target_tokens

    def field_names(self) -> list[str]:
        """The ``field_<name>`` keys of the sequence fields added so far (sorted)."""
        return sorted(name for name in self._parts if name.startswith("field_"))

    def sequence_field_names(self) -> list[str]:
        """Names of the sequence fields the buffer's sequences carry, in `SEQUENCE_FIELDS` order."""
        held = set(self.field_names())
        return [name for name in SEQUENCE_FIELDS if f"field_{name}" in held]

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything added so far, concatenated in add order.

        Keys: seq_ids [S] int64, seq_lengths [S] int64, input_ids [N] int32, target_mask [N] bool; over the R
        target positions: gaps [R, k] uint32, codes [R, k] (codec dtype), log_normalizers / tail_logprobs [R, nT]
        float32, entropy [R] float32, for sampled buffers sample_lengths [R] uint8, sample_gaps [M] uint32,
        sample_counts [M] uint8, sample_codes [M]; with token_text text_lengths [N] int32 (each token's text bytes,
        -1 where unknown) and text_bytes [B] uint8; ``field_<name>`` [S] (`SEQUENCE_FIELDS` dtype) for each sequence
        field the sequences carry.
        """
        empty = {
            "seq_ids": np.zeros(0, np.int64),
            "seq_lengths": np.zeros(0, np.int64),
            "input_ids": np.zeros(0, np.int32),
            "target_mask": np.zeros(0, bool),
            "gaps": np.zeros((0, self.k), np.uint32),
            "codes": np.zeros((0, self.k), self.codec.code_dtype),
            "log_normalizers": np.zeros((0, self.num_temperatures), np.float32),
            "tail_logprobs": np.zeros((0, self.num_temperatures), np.float32),
            "entropy": np.zeros(0, np.float32),
        }
        if self.num_samples > 0:
            empty.update(
                sample_lengths=np.zeros(0, np.uint8),
                sample_gaps=np.zeros(0, np.uint32),
                sample_counts=np.zeros(0, np.uint8),
                sample_codes=np.zeros(0, self.codec.code_dtype),
            )
        if self.token_text:
            empty.update(text_lengths=np.zeros(0, np.int32), text_bytes=np.zeros(0, np.uint8))
        empty.update({f"field_{name}": np.zeros(0, SEQUENCE_FIELDS[name]) for name in self.sequence_field_names()})
        return {
            name: np.concatenate(self._parts[name]) if self._parts.get(name) else value
            for name, value in empty.items()
        }


def _encode_text(seq_id: int, n: int, token_text: TokenText | None) -> dict[str, np.ndarray]:
    """Per-token text lengths [T] int32 and the text bytes of one sequence (-1 lengths: unknown text)."""
    unknown = {"text_lengths": np.full(n, -1, np.int32), "text_bytes": np.zeros(0, np.uint8)}
    if token_text is None:
        return unknown
    text, ends = token_text
    ends = np.asarray(ends, dtype=np.int64)
    if ends.shape != (n,) or (n and (ends[0] < 0 or (np.diff(ends) < 0).any() or ends[-1] != len(text))):
        raise ValueError(
            f"sequence {seq_id}: token text ends must be [{n}] non-decreasing byte offsets ending at the text's "
            f"{len(text)} bytes"
        )
    if len(text) > MAX_TEXT_BYTES_PER_TOKEN * max(n, 1):
        return unknown  # readers bound the text by this; such a window (a pathological tokenization) has none
    lengths = np.diff(np.concatenate([[0], ends])).astype(np.int32)
    return {"text_lengths": lengths, "text_bytes": np.frombuffer(bytes(text), dtype=np.uint8)}


def _encode_samples(
    seq_id: int, t: int, ids: np.ndarray, counts: np.ndarray, logprobs: np.ndarray, codec: CodecParams
) -> dict[str, np.ndarray]:
    """Flat per-entry sample arrays from padded [T, m] arrays (entries with count 0 are padding)."""
    ids, counts, logprobs = np.asarray(ids), np.asarray(counts), np.asarray(logprobs)
    if ids.shape[0] != t or ids.shape != counts.shape or ids.shape != logprobs.shape:
        raise ValueError(f"sequence {seq_id}: sample_ids/counts/logprobs must all be [{t}, m]")
    valid = counts > 0
    lengths = valid.sum(axis=1)
    order = np.argsort(np.where(valid, ids, np.iinfo(np.int64).max), axis=1, kind="stable")  # valid ids ascending
    ids_s = np.take_along_axis(ids.astype(np.int64), order, axis=1)
    counts_s = np.take_along_axis(counts, order, axis=1)
    lps_s = np.take_along_axis(logprobs.astype(np.float32), order, axis=1)
    keep = np.arange(ids_s.shape[1])[None, :] < lengths[:, None]
    gaps = np.concatenate([ids_s[:, :1], np.diff(ids_s, axis=1) - 1], axis=1)[keep]
    if gaps.size and (gaps.min() < 0 or ids_s[keep].max() >= 2**32):
        raise ValueError(f"sequence {seq_id}: sampled ids must be distinct within a token and in [0, 2**32)")
    if counts_s[keep].max(initial=0) > 255 or lengths.max(initial=0) > 255:
        raise ValueError("sample counts above 255 cannot be stored; use targets.samples <= 255")
    return {
        "sample_lengths": lengths.astype(np.uint8),
        "sample_gaps": gaps.astype(np.uint32),
        "sample_counts": counts_s[keep].astype(np.uint8),
        "sample_codes": quantize_logprobs(lps_s[keep], codec),
    }


@dataclass
class BufferedShardWriter:
    """What every format's writer shares: its settings, a `TokenBuffer`, counts, and `add`; a format's subclass
    only implements `finish() -> bytes` from `self._buffer.arrays()`.

    Args:
        k: top-k entries per token; num_temperatures: number of stored temperatures (index 0 is T = 1);
        num_samples: draws per token (0: no sample columns); compression_level: zstd level;
        codec: log-prob coding; metadata: JSON-able dict stored in the file under "kdcache";
        row_group_tokens: tokens per Parquet row group / Zarr chunk (whole sequences per row group);
        vocab_size: the teacher's padded vocabulary (every id is below it): Parquet stores the byte planes this
            needs, so every shard of a cache has the same columns (None: the planes of the shard's largest gap).
        token_text: store the text behind every token (`targets.cross_tokenizer`).
    """

    k: int
    num_temperatures: int
    num_samples: int = 0
    compression_level: int = 3
    codec: CodecParams = field(default_factory=CodecParams)
    metadata: dict[str, Any] = field(default_factory=dict)
    row_group_tokens: int = 65536
    vocab_size: int | None = None
    token_text: bool = False
    _buffer: TokenBuffer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._buffer = TokenBuffer(self.k, self.num_temperatures, self.num_samples, self.codec, self.token_text)

    @property
    def num_sequences(self) -> int:
        return self._buffer.num_sequences

    @property
    def num_tokens(self) -> int:
        return self._buffer.num_tokens

    @property
    def num_target_tokens(self) -> int:
        """Positions with targets so far (`num_tokens` unless sequences were added with a `target_mask`)."""
        return self._buffer.num_target_tokens

    def add(self, *args: Any, **kwargs: Any) -> None:
        """Encode and append one sequence (the arguments of `TokenBuffer.encode_sequence`, the one place they are
        written out)."""
        self._buffer.add_encoded(self._buffer.encode_sequence(*args, **kwargs))

    def encode_sequence(self, *args: Any, **kwargs: Any) -> EncodedSequence:
        """`TokenBuffer.encode_sequence` (same arguments): encode one sequence without adding it; thread-safe."""
        return self._buffer.encode_sequence(*args, **kwargs)

    def add_encoded(self, encoded: EncodedSequence) -> None:
        """Append a sequence from `encode_sequence` (of a writer with the same settings), in file order."""
        self._buffer.add_encoded(encoded)

    def finish(self) -> bytes:
        raise NotImplementedError
