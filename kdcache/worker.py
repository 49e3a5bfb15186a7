"""Process one work unit end to end, without Ray: read -> tokenize -> window -> teacher -> encode -> write -> commit.

`UnitWorker` holds a loaded teacher and tokenizer; `process(unit)` writes the unit's shard straight to the store and
returns only its small commit record. Ray actors (`actors.py`) wrap it; tests and debugging use it directly.

Pipelining: the teacher runs batch after batch on the calling thread while one encoder thread, fed through a queue
of at most `ENCODE_QUEUE_BATCHES` batches, encodes each finished batch's sequences (id sort, gap coding, log-prob
quantization, telemetry). After the last forward only the in-order assembly, the format's `finish` (Arrow/Zarr and
zstd) and the store write remain. On CPU this gains little: encoding and `finish` (~2 us per token at k = 64) are
~0.3% of the forward of even a small teacher (bench/capture.py). On a GPU the forward per token is one to two
orders of magnitude faster while encoding is not, so unpipelined it would add roughly a few percent (8B teacher)
to tens of percent (1B) to every unit (estimates; bench/gpu_check.sh measures it). The device-to-host copy of each
batch's targets stays on the teacher's thread. An error on either thread stops the unit and is raised there.

Commit protocol (exactly once): the shard goes to a key unique to this attempt; then the commit record is created
exclusively. If another attempt committed first, this attempt deletes its own shard and returns the winner's record.
Nothing is written before every batch is computed and encoded, so a crash at any point leaves no commit record.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.codec import CodecParams
from kdcache.errors import ConfigError
from kdcache.formats import get_format
from kdcache.manifest import FINGERPRINT_KEY, commit_key, dumps, shard_key
from kdcache.sources import cut_windows, iter_documents, make_seq_id, tokenize_documents
from kdcache.store import Store
from kdcache.telemetry import captured_mass, summarize_tokens

__all__ = ["ENCODE_QUEUE_BATCHES", "BatchEncoder", "UnitWorker", "WorkerSettings", "make_batches", "pad_batch"]

ENCODE_QUEUE_BATCHES = 2  # computed batches waiting for the encoder at most (bounds the host memory they hold)


def make_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices into batches of at most `batch_tokens` padded tokens, longest first.

    Sorting by length keeps similar lengths together so padding stays small (length bucketing).
    Returns lists of indices into `lengths`.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class WorkerSettings:
    """Plain settings a worker needs (taken from the job config by the driver)."""

    teacher: dict[str, Any]  # TeacherConfig as a dict
    data: dict[str, Any]  # DataConfig as a dict
    k: int
    temperatures: list[float]
    output_uri: str
    storage_options: dict[str, Any]
    compression_level: int
    batch_tokens: int
    shard_metadata: dict[str, Any]  # fingerprint etc., stored in each file's key-value metadata
    num_samples: int = 0  # draws per position (sample/hybrid modes); 0 = topk
    seed: int = 0  # seed of the draws, combined with the unit id and batch index
    shard_format: str | None = None  # parquet | zarr; None: as the cache's fingerprint.json records (else parquet)
    codec: dict[str, Any] | None = None  # CodecParams.to_dict(); None: as fingerprint.json records (else u8)
    row_group_tokens: int = 65536  # tokens per Parquet row group / Zarr chunk (whole sequences per row group)
    store_retries: int = 4  # retries of a storage operation after a transient error (output.store_retries)
    store_backoff_s: float = 0.2  # seconds before the first of them, doubling (output.store_backoff_s)


class UnitWorker:
    """Loads the teacher once, then processes units.

    Args:
        settings: what to compute and where to write.
        device: torch device string; None picks CUDA when available.
    """

    def __init__(self, settings: WorkerSettings, device: str | None = None):
        from kdcache.teacher import Teacher, load_tokenizer

        self.settings = settings
        t = settings.teacher
        self.teacher = Teacher(
            t["model"],
            revision=t["revision"],
            dtype=t["dtype"],
            device=device,
            trust_remote_code=t["trust_remote_code"],
            chunk_bytes=t["chunk_bytes"],
            device_map=t.get("device_map"),
        )
        self.tokenizer = load_tokenizer(
            settings.data["tokenizer"] or t["model"],
            revision=None if settings.data["tokenizer"] else t["revision"],
            trust_remote_code=t["trust_remote_code"],
        )
        self.store = Store(
            settings.output_uri,
            settings.storage_options,
            retries=settings.store_retries,
            base_delay_s=settings.store_backoff_s,
        )
        self._shard_format: tuple[Any, CodecParams] | None = None

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: whole documents exceed model_max_length by design (they are cut into windows next)
        return self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]

    def read_windows(self, unit: dict[str, Any]) -> tuple[list[tuple[int, np.ndarray]], dict[str, int]]:
        """The unit's windows as (seq_id, input_ids [T] int32), plus counts of skipped input."""
        data = self.settings.data
        counts = {"documents": 0, "empty_documents": 0, "short_windows_dropped": 0}
        docs = iter_documents(unit, fmt=data["format"], text_field=data["text_field"], ids_field=data["ids_field"])
        eos = self.tokenizer.eos_token_id
        windows: list[tuple[int, np.ndarray]] = []
        non_empty = (d for d in docs if not _is_empty(d, counts))
        for doc, ids in tokenize_documents(non_empty, self._encode):
            counts["documents"] += 1
            if data["add_eos"] and eos is not None and doc.ids is None:
                ids = [*ids, eos]
            cut = cut_windows(ids, data["max_length"], data["min_length"])
            counts["short_windows_dropped"] += -(-len(ids) // data["max_length"]) - len(cut)
            windows += [(make_seq_id(unit["url"], doc.locator, w), arr) for w, arr in enumerate(cut)]
        return windows, counts

    def _compute(self, ids, mask, unit_id: str, batch_index: int) -> list[np.ndarray]:
        """Targets of one padded batch as numpy arrays, in ShardWriter.add's argument order."""
        import torch

        s = self.settings
        if s.num_samples == 0:
            t = self.teacher.compute_targets(ids, mask, k=s.k, temperatures=s.temperatures)
            samples = []
        else:
            # Seeded per (seed, unit, batch): a rerun or a retry on another actor draws the same ids.
            generator = torch.Generator(device=self.teacher.device)
            generator.manual_seed(_draw_seed(s.seed, unit_id, batch_index))
            t, st = self.teacher.compute_sampled_targets(
                ids, mask, num_samples=s.num_samples, head=s.k, temperatures=s.temperatures, generator=generator
            )
            samples = [st.ids.cpu().numpy(), st.counts.cpu().numpy(), st.logprobs.cpu().numpy()]
        head = [t.ids, t.logprobs, t.log_normalizers, t.tail_logprobs, t.entropy]
        return [a.cpu().numpy() for a in head] + samples

    def shard_format(self) -> tuple[Any, CodecParams]:
        """(format module, CodecParams) of the shards this worker writes.

        The settings decide when they name them; otherwise the cache's own identity does: the driver creates
        fingerprint.json before any unit runs, and its `shard_format` and `codec` are what the manifest will
        record, so shards and manifest cannot disagree. Without a fingerprint.json (a bare worker): parquet, u8.
        """
        if self._shard_format is None:
            s = self.settings
            inputs: dict[str, Any] = {}
            if s.shard_format is None or s.codec is None:
                try:
                    inputs = json.loads(self.store.read_bytes(FINGERPRINT_KEY)).get("fingerprint_inputs", {})
                except FileNotFoundError:
                    inputs = {}
            codec = CodecParams.from_dict(s.codec or inputs.get("codec") or CodecParams().to_dict())
            wanted = inputs.get("targets", {}).get("logprob_codec", codec.logprobs)
            if s.codec is None and wanted != codec.logprobs:
                raise ConfigError(
                    f"targets.logprob_codec: the job asks for {wanted!r} but the cache's fingerprint records codec "
                    f"{codec.logprobs!r}; the driver must record CodecParams.for_logprobs({wanted!r}).to_dict()"
                )
            self._shard_format = (get_format(s.shard_format or inputs.get("shard_format") or "parquet"), codec)
        return self._shard_format

    def shard_writer(self, unit: dict[str, Any]) -> Any:
        """An empty shard writer of this cache's format and codec for `unit` (its id goes into the file metadata)."""
        s = self.settings
        fmt, codec = self.shard_format()
        return fmt.ShardWriter(
            k=s.k,
            num_temperatures=len(s.temperatures),
            num_samples=s.num_samples,
            compression_level=s.compression_level,
            codec=codec,
            metadata={**s.shard_metadata, "unit_id": unit["unit_id"]},
            row_group_tokens=s.row_group_tokens,
        )

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        """Compute, write and commit one unit; return its commit record (small JSON-able dict).

        The record's ``timing_s``: ``read`` (read and tokenize), ``forward`` (teacher compute, summed over batches),
        ``encode`` (what encoding costs after the last forward: waiting for the encoder, in-order assembly and the
        format's ``finish``), ``encode_overlapped`` (the encoder thread's busy time, hidden behind the forwards),
        ``write`` (shard and commit record), ``total``.
        """

        s = self.settings
        t0 = time.perf_counter()
        windows, counts = self.read_windows(unit)
        t_read = time.perf_counter()
        fmt, _ = self.shard_format()
        writer = self.shard_writer(unit)
        lengths = [len(w) for _, w in windows]
        encoded: list[Any] = [None] * len(windows)  # EncodedSequence per window, in read order
        entropies: list[Any] = [None] * len(windows)
        masses: list[Any] = [None] * len(windows)

        def encode_batch(batch: list[int], arrays: list[np.ndarray]) -> None:
            offset = 0
            for i in batch:  # valid positions come row by row, in batch order
                n = lengths[i]
                part = [a[offset : offset + n] for a in arrays]
                offset += n
                encoded[i] = writer.encode_sequence(windows[i][0], windows[i][1], *part)
                entropies[i] = part[4]
                masses[i] = captured_mass(part[1], part[7] if len(part) > 5 else None)

        padded = 0
        forward_s = 0.0
        encoder = BatchEncoder(encode_batch)
        try:
            for batch_index, batch in enumerate(make_batches(lengths, s.batch_tokens)):
                ids, mask = pad_batch([windows[i][1] for i in batch])
                padded += ids.numel()
                f0 = time.perf_counter()
                arrays = self._compute(ids, mask, unit["unit_id"], batch_index)
                forward_s += time.perf_counter() - f0
                encoder.submit(batch, arrays)  # raises at once if the encoder failed
        except BaseException:
            encoder.abort()
            raise
        e0 = time.perf_counter()
        encoder.finish()  # raises the encoder's error, if any
        for part in encoded:  # file order = read order, not batch order
            writer.add_encoded(part)
        data = writer.finish()
        record = {
            "unit_id": unit["unit_id"],
            "index": unit["index"],
            "path": shard_key(unit["unit_id"], uuid.uuid4().hex[:12], fmt.SUFFIX),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "crc32": zlib.crc32(data),
            "num_sequences": writer.num_sequences,
            "num_tokens": writer.num_tokens,
            "padded_tokens": padded,
            **counts,
            "telemetry": summarize_tokens(
                np.concatenate(entropies) if entropies else np.zeros(0),
                np.concatenate(masses) if masses else np.zeros(0),
            ),
            "timing_s": {
                "read": t_read - t0,
                "forward": forward_s,
                "encode": time.perf_counter() - e0,
                "encode_overlapped": encoder.busy_s,
            },
        }
        w0 = time.perf_counter()
        self.store.write_bytes(record["path"], data)
        if not self.store.create_exclusive(commit_key(unit["unit_id"]), dumps(record)):
            self.store.delete(record["path"])  # another attempt won; ours is a duplicate
            return {**json.loads(self.store.read_bytes(commit_key(unit["unit_id"]))), "duplicate": True}
        record["timing_s"] |= {"write": time.perf_counter() - w0, "total": time.perf_counter() - t0}
        record["finished_at"] = time.time()
        return record


class BatchEncoder:
    """Runs ``encode(*item)`` for submitted items on one background thread, in submission order.

    ``submit`` blocks while ``max_queued`` items wait (so at most that many computed batches are held in memory).
    The first exception raised by ``encode`` is kept; later items are dropped, the next ``submit`` and ``finish``
    raise it. Lifecycle: ``submit`` ... then exactly one of ``finish`` (wait for everything, raise the encoder's
    error) or ``abort`` (the caller failed: stop, drop what is queued, raise nothing).

    Args:
        encode: called on the encoder thread with each submitted item's arguments.
        max_queued: items waiting at most; one more may be in ``encode`` at the same time.

    Attributes:
        busy_s: seconds the encoder thread spent in ``encode``.
    """

    _STOP = object()

    def __init__(self, encode: Callable[..., None], max_queued: int = ENCODE_QUEUE_BATCHES) -> None:
        self._encode = encode
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._error: BaseException | None = None
        self._cancelled = False
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name="kdcache-encoder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._STOP:
            if self._error is not None or self._cancelled:
                continue  # keep draining so that a blocked submit() returns
            start = time.perf_counter()
            try:
                self._encode(*item)
            except BaseException as exc:  # raised on the caller's thread by submit() / finish()
                self._error = exc
            self.busy_s += time.perf_counter() - start

    def submit(self, *args: Any) -> None:
        """Queue one item for ``encode(*args)``; raises the encoder's error if an earlier item failed."""
        self._raise_error()
        self._queue.put(args)

    def finish(self) -> None:
        """Wait until every submitted item is encoded; raise the first error ``encode`` raised."""
        self._queue.put(self._STOP)
        self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Stop after the item being encoded, dropping the queued ones; never raises (the caller's error wins)."""
        self._cancelled = True
        self._queue.put(self._STOP)
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def pad_batch(token_windows: list[np.ndarray]) -> tuple[Any, Any]:
    """Right-padded ``(input_ids, attention_mask)`` int64 tensors ``[len(token_windows), longest]`` of a batch."""
    import torch

    longest = max((len(w) for w in token_windows), default=0)
    ids = torch.zeros((len(token_windows), longest), dtype=torch.long)
    mask = torch.zeros((len(token_windows), longest), dtype=torch.long)
    for row, window in enumerate(token_windows):
        ids[row, : len(window)] = torch.from_numpy(np.asarray(window, dtype=np.int64))
        mask[row, : len(window)] = 1
    return ids, mask


def _draw_seed(seed: int, unit_id: str, batch_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{unit_id}\0{batch_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _is_empty(doc, counts: dict[str, int]) -> bool:
    empty = (
        (doc.text is None and doc.ids is None)
        or (doc.text is not None and not doc.text.strip())
        or (doc.ids is not None and len(doc.ids) == 0)
    )
    if empty:
        counts["empty_documents"] += 1
    return empty
