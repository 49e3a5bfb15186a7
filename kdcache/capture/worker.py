"""Process one work unit end to end, without Ray: read -> tokenize -> window -> teacher -> encode -> write -> commit.
With a `generate` section the teacher first answers the unit's prompts (`kdcache.capture.generate`): read -> render
prompts -> generate -> teacher -> encode -> write -> commit.

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

import dataclasses
import hashlib
import json
import queue
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kdcache.capture.chat import ChatRenderer, effective_chat_template, read_chat_template, target_mask
from kdcache.capture.sources import Window, cut_windows, iter_documents, make_seq_id, tokenize_documents
from kdcache.capture.tokentext import document_token_ends, window_text
from kdcache.codec import CodecParams
from kdcache.config import (
    CHAT_FORMATS,
    DataConfig,
    GenerateConfig,
    KDCacheConfig,
    OutputConfig,
    TargetsConfig,
    TeacherConfig,
)
from kdcache.errors import CacheMismatchError, ConfigError, KdcacheError, SourceError
from kdcache.formats import get_format
from kdcache.formats.base import BufferedShardWriter
from kdcache.manifest import FORMAT_VERSION, commit_key, dumps, shard_key
from kdcache.pieces import TokenPieces, spelled_text, token_pieces
from kdcache.store import Store
from kdcache.telemetry import captured_mass, summarize_tokens

if TYPE_CHECKING:
    from kdcache.capture.generate import Prompt
    from kdcache.capture.targets import SampledTargets, TokenTargets

__all__ = [
    "ENCODE_QUEUE_BATCHES",
    "BatchEncoder",
    "UnitWorker",
    "WorkerSettings",
    "make_batches",
    "pad_batch",
    "pad_target_masks",
]

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
    """What a teacher actor needs, typed: the job's config sections, the teacher batch size and the fingerprint.

    Dataclasses pickle, so these cross the Ray boundary as they are. Storage options travel to the actors this way
    and are never written to a file.
    """

    teacher: TeacherConfig
    data: DataConfig
    targets: TargetsConfig
    output: OutputConfig
    batch_tokens: int  # padded tokens per teacher batch
    fingerprint: str  # the cache's fingerprint, stored in each shard's metadata
    chat_template: str | None = None  # data.chat_template's text, read on the driver (actors may not see its file)
    generate: GenerateConfig | None = None  # the teacher answers the prompts first (None: no generation)

    @classmethod
    def from_config(cls, cfg: KDCacheConfig, fingerprint: str) -> WorkerSettings:
        """The settings of a job's actors. A teacher over several GPUs per actor gets accelerate's device map."""
        teacher = cfg.teacher
        if teacher.device_map is None and cfg.cluster.gpus_per_actor > 1:
            teacher = dataclasses.replace(teacher, device_map="auto")  # one replica spread over its actor's GPUs
        template = read_chat_template(cfg.data.chat_template)
        return cls(
            teacher, cfg.data, cfg.targets, cfg.output, cfg.cluster.batch_tokens, fingerprint, template, cfg.generate
        )

    @property
    def codec(self) -> CodecParams:
        """How the shards code log-probs (`targets.logprob_codec`)."""
        return CodecParams.for_logprobs(self.targets.logprob_codec)


class UnitWorker:
    """Loads the teacher once, then processes units.

    Args:
        settings: what to compute and where to write.
        device: torch device string; None picks CUDA when available.
    """

    def __init__(self, settings: WorkerSettings, device: str | None = None):
        from kdcache.capture.teacher import Teacher, load_tokenizer

        self.settings = settings
        t, data = settings.teacher, settings.data
        self.teacher = Teacher(
            t.model,
            revision=t.revision,
            dtype=t.dtype,
            device=device,
            trust_remote_code=t.trust_remote_code,
            chunk_bytes=t.chunk_bytes,
            device_map=t.device_map,
        )
        self.tokenizer = load_tokenizer(
            data.tokenizer or t.model,
            revision=None if data.tokenizer else t.revision,
            trust_remote_code=t.trust_remote_code,
        )
        self.store = Store(
            settings.output.uri,
            settings.output.storage_options,
            retries=settings.output.store_retries,
            base_delay_s=settings.output.store_backoff_s,
        )
        self.format = get_format(settings.output.format)
        # Every input id must index the teacher's embedding: checked per document, before the int32 windows (an
        # id >= 2**32 would wrap) and before the forward (where it would be an IndexError, retried as if transient).
        self.vocab_limit = int(self.teacher.model.get_input_embeddings().weight.shape[0])
        self.renderer: ChatRenderer | None = None  # chat / prompt_completion records
        if data.format in CHAT_FORMATS:
            template = effective_chat_template(self.tokenizer, settings.chat_template)
            if template is None and data.format == "chat":
                raise ConfigError(
                    f"data.format=chat: tokenizer {data.tokenizer or t.model} has no chat template; set "
                    "data.chat_template"
                )
            self.renderer = ChatRenderer(self.tokenizer, template, add_eos=data.add_eos)
        # targets.cross_tokenizer: the text behind every token (kdcache.capture.tokentext): cut from a plain-text
        # document, spelled by the pieces for windows without one (pre-tokenized ids, chat, generated responses)
        self.pieces: TokenPieces | None = None
        if settings.targets.cross_tokenizer:
            try:
                self.pieces = token_pieces(self.tokenizer)
            except KdcacheError:  # the job warned once already (kdcache.capture.job.write_teacher_pieces)
                self.pieces = None
        self.engine = None  # generation: `kdcache.capture.generate` engine (settings.generate)
        if settings.generate is not None:
            from kdcache.capture.generate import make_engine, read_generation_eos, stop_token_ids

            eos = read_generation_eos(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
            self.stop_ids = stop_token_ids(eos, self.tokenizer)
            self.engine = make_engine(
                settings.generate,
                teacher=self.teacher,
                tokenizer=self.tokenizer,
                stop_ids=self.stop_ids,
                teacher_config=t,
                tokenizer_name=data.tokenizer,
                max_model_len=data.max_length,
            )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: whole documents exceed model_max_length by design (they are cut into windows next)
        return self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]

    def _offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """A document's ids and character offsets (asked only when the tokenizer's pieces do not spell it)."""
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _tokenized(self, docs: Any) -> Any:
        """(document, ids, assistant mask [T] bool or None) per document: chat records rendered with the template,
        text tokenized in batches (with EOS appended when data.add_eos)."""
        if self.renderer is not None:
            for doc in docs:
                ids, assistant = self.renderer.render(doc.chat)
                yield doc, ids, assistant
            return
        eos, add_eos = self.tokenizer.eos_token_id, self.settings.data.add_eos
        for doc, ids in tokenize_documents(docs, self._encode):
            if add_eos and eos is not None and doc.ids is None:
                ids = [*ids, eos]
            yield doc, ids, None

    def read_windows(self, unit: dict[str, Any]) -> tuple[list[Window], dict[str, int]]:
        """The unit's windows (seq_id, input_ids [T] int32, target_mask [T] bool or None), plus counts of skipped
        input.

        With ``targets.positions: assistant`` a window's target mask is True where the next token is an assistant
        token (computed over the whole record, so a window's last position sees the next window's first token); a
        record without one (``no_assistant_tokens``) and a window without one (``windows_without_targets``) are
        skipped and counted.
        """
        data = self.settings.data
        counts = {"documents": 0, "empty_documents": 0, "short_windows_dropped": 0}
        masked = self.renderer is not None and self.settings.targets.positions == "assistant"
        if masked:
            counts |= {"no_assistant_tokens": 0, "windows_without_targets": 0}
        docs = iter_documents(
            unit,
            fmt=data.format,
            text_field=data.text_field,
            ids_field=data.ids_field,
            messages_field=data.messages_field,
            prompt_field=data.prompt_field,
            completion_field=data.completion_field,
        )
        windows: list[Window] = []
        non_empty = (d for d in docs if not _is_empty(d, counts))
        for doc, ids, assistant in self._tokenized(non_empty):
            counts["documents"] += 1
            if len(ids) and max(ids) >= self.vocab_limit:
                raise SourceError(_id_error(doc, max(ids), self.vocab_limit, data))
            targets = None
            if masked:
                targets = target_mask(assistant)
                if not targets.any():
                    counts["no_assistant_tokens"] += 1
                    continue
            doc_ends = doc_bytes = None
            if self.pieces is not None and doc.text is not None and doc.ids is None:
                doc_ends = document_token_ends(self.pieces, ids, doc.text, self._offsets)
                doc_bytes = doc.text.encode("utf-8")
            cut = cut_windows(ids, data.max_length, data.min_length)
            counts["short_windows_dropped"] += -(-len(ids) // data.max_length) - len(cut)
            for w, arr in enumerate(cut):
                start = w * data.max_length  # cut_windows drops only a short last window
                window_mask = None if targets is None else targets[start : start + len(arr)]
                if window_mask is not None and not window_mask.any():
                    counts["windows_without_targets"] += 1
                    continue
                text, ends = (
                    (None, None) if doc_ends is None else window_text(doc_bytes, doc_ends, start, start + len(arr))
                )
                seq_id = make_seq_id(unit["url"], doc.locator, w)
                windows.append(Window(seq_id, arr, window_mask, token_text=text, token_text_ends=ends))
        return windows, counts

    def read_prompts(self, unit: dict[str, Any]) -> tuple[list[Prompt], dict[str, int]]:
        """The unit's prompts to answer (generation), rendered: a chat record's conversation with the template's
        generation prompt, a prompt_completion record's prompt. Plus counts.

        Raises:
            SourceError: a malformed record or empty prompt, a conversation that does not end with a user (or tool)
                message, an id past the teacher's vocabulary, or a prompt of ``data.max_length`` tokens or more (no
                room for a response); each names the file and line or row.
        """
        from kdcache.capture.generate import Prompt

        data = self.settings.data
        docs = iter_documents(
            unit,
            fmt=data.format,
            text_field=data.text_field,
            ids_field=None,
            messages_field=data.messages_field,
            prompt_field=data.prompt_field,
            completion_field=data.completion_field,
            prompts_only=True,
        )
        prompts = []
        for doc in docs:
            ids = self.renderer.render_prompt(doc.chat)
            if not ids:
                raise SourceError(f"{doc.where}: the prompt renders to no token; generation needs a prompt to answer")
            if max(ids) >= self.vocab_limit:
                raise SourceError(_id_error(doc, max(ids), self.vocab_limit, data))
            if len(ids) >= data.max_length:
                raise SourceError(
                    f"{doc.where}: the prompt has {len(ids)} tokens, data.max_length is {data.max_length}: no room "
                    "for a response (raise data.max_length, or shorten or drop this prompt)"
                )
            prompts.append(Prompt(unit["url"], doc.locator, doc.where, ids))
        counts = {"documents": len(prompts), "empty_documents": 0, "short_windows_dropped": 0, "prompts": len(prompts)}
        return prompts, counts

    def generate_windows(self, unit: dict[str, Any]) -> tuple[list[Window], dict[str, Any], float]:
        """The unit's prompts answered `generate.n` times each, as windows (`generate.generate_windows`); counts with
        ``generated_sequences`` and ``generated_tokens``; seconds spent generating."""
        from kdcache.capture.generate import generate_windows

        prompts, counts = self.read_prompts(unit)
        windows, stats = generate_windows(
            prompts,
            self.engine,
            self.settings.generate,
            max_length=self.settings.data.max_length,
            positions=self.settings.targets.positions,
            stop_ids=self.stop_ids,
            decode=self._decode,
        )
        counts |= {"generated_sequences": stats["generated_sequences"], "generated_tokens": stats["generated_tokens"]}
        return windows, counts, stats["generate_s"]

    def compute(
        self, ids: Any, mask: Any, unit_id: str, batch_index: int, target_mask: Any = None
    ) -> tuple[TokenTargets, SampledTargets | None]:
        """Targets of one right-padded batch's valid positions (or of ``target_mask``'s, ``[B, L]`` bool), row-major,
        as numpy arrays on the host."""
        import torch

        targets = self.settings.targets
        if targets.num_samples == 0:
            head = self.teacher.compute_targets(
                ids, mask, k=targets.stored_k, temperatures=targets.temperatures, target_mask=target_mask
            )
            return head.numpy(), None
        # Seeded per (seed, unit, batch): a rerun or a retry on another actor draws the same ids.
        generator = torch.Generator(device=self.teacher.device)
        generator.manual_seed(_draw_seed(targets.seed, unit_id, batch_index))
        head, samples = self.teacher.compute_sampled_targets(
            ids,
            mask,
            num_samples=targets.num_samples,
            head=targets.stored_k,
            temperatures=targets.temperatures,
            generator=generator,
            target_mask=target_mask,
        )
        return head.numpy(), samples.numpy()

    def shard_writer(self, unit: dict[str, Any]) -> BufferedShardWriter:
        """An empty shard writer of this cache's format and codec for `unit` (its id goes into the file metadata)."""
        s = self.settings
        return self.format.ShardWriter(
            k=s.targets.stored_k,
            num_temperatures=len(s.targets.temperatures),
            num_samples=s.targets.num_samples,
            compression_level=s.output.compression_level,
            codec=s.codec,
            metadata={"fingerprint": s.fingerprint, "format_version": FORMAT_VERSION, "unit_id": unit["unit_id"]},
            row_group_tokens=s.output.row_group_tokens,
            vocab_size=self.teacher.padded_vocab_size,  # the same Parquet columns in every shard of the cache
            token_text=s.targets.cross_tokenizer,  # the text behind every token (null where unknown)
        )

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        """Compute, write and commit one unit; return its commit record (small JSON-able dict).

        The record's ``timing_s``: ``read`` (read and tokenize), ``forward`` (teacher compute, summed over batches),
        ``encode`` (what encoding costs after the last forward: waiting for the encoder, in-order assembly and the
        format's ``finish``), ``encode_overlapped`` (the encoder thread's busy time, hidden behind the forwards),
        ``write`` (shard and commit record), ``total``; with generation also ``generate`` (the engine's time, not
        in ``read``).
        """

        t0 = time.perf_counter()
        generate_s = None
        if self.engine is not None:
            windows, counts, generate_s = self.generate_windows(unit)
        else:
            windows, counts = self.read_windows(unit)
        t_read = time.perf_counter() - (generate_s or 0.0)
        writer = self.shard_writer(unit)
        lengths = [len(w.input_ids) for w in windows]
        # target rows per window: every position, or the True positions of its target mask
        num_rows = [n if w.target_mask is None else int(w.target_mask.sum()) for n, w in zip(lengths, windows)]
        masked = any(w.target_mask is not None for w in windows)
        encoded: list[Any] = [None] * len(windows)  # EncodedSequence per window, in read order
        entropies: list[Any] = [None] * len(windows)
        masses: list[Any] = [None] * len(windows)

        def encode_batch(batch: list[int], head: TokenTargets, samples: SampledTargets | None) -> None:
            offset = 0
            for i in batch:  # target positions come row by row, in batch order
                rows = (offset, offset + num_rows[i])
                offset += num_rows[i]
                seq_head, seq_samples = head.rows(*rows), None if samples is None else samples.rows(*rows)
                w = windows[i]
                fields = {"sequence_fields": w.fields} if w.fields else {}  # generated responses' prompt_id, ...
                if w.token_text is not None:  # targets.cross_tokenizer: the document's text, cut at the tokens
                    fields["token_text"] = (w.token_text, w.token_text_ends)
                elif self.pieces is not None:  # no document text (ids, chat, a response): what the tokens spell
                    fields["token_text"] = spelled_text(self.pieces, w.input_ids)
                encoded[i] = writer.encode_sequence(
                    w.seq_id, w.input_ids, seq_head, seq_samples, target_mask=w.target_mask, **fields
                )
                entropies[i] = seq_head.entropy
                masses[i] = captured_mass(seq_head.logprobs, None if seq_samples is None else seq_samples.logprobs)

        padded = 0
        forward_s = 0.0
        encoder = BatchEncoder(encode_batch)
        try:
            for batch_index, batch in enumerate(make_batches(lengths, self.settings.batch_tokens)):
                ids, mask = pad_batch([windows[i].input_ids for i in batch])
                selected = pad_target_masks([windows[i].target_mask for i in batch], ids.shape) if masked else None
                padded += ids.numel()
                f0 = time.perf_counter()
                head, samples = self.compute(ids, mask, unit["unit_id"], batch_index, selected)
                forward_s += time.perf_counter() - f0
                encoder.submit(batch, head, samples)  # raises at once if the encoder failed
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
            "fingerprint": self.settings.fingerprint,  # a driver keeps only records of its own fingerprint
            "index": unit["index"],
            "path": shard_key(unit["unit_id"], uuid.uuid4().hex[:12], self.format.SUFFIX),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "crc32": zlib.crc32(data),
            "num_sequences": writer.num_sequences,
            "num_tokens": writer.num_tokens,
            "num_target_tokens": writer.num_target_tokens,
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
                **({"generate": generate_s} if generate_s is not None else {}),
            },
        }
        w0 = time.perf_counter()
        self.store.write_bytes(record["path"], data)
        if not self.store.create_exclusive(commit_key(unit["unit_id"]), dumps(record)):
            self.store.delete(record["path"])  # another attempt won; ours is a duplicate
            winner = json.loads(self.store.read_bytes(commit_key(unit["unit_id"])))
            if winner.get("fingerprint", self.settings.fingerprint) != self.settings.fingerprint:
                raise CacheMismatchError(
                    f"{self.store.uri}: unit {unit['unit_id']} was committed by a job with another fingerprint "
                    f"({str(winner['fingerprint'])[:12]}) running on this output; run one job per output.uri"
                )
            return {**winner, "duplicate": True}
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


def pad_target_masks(masks: list[np.ndarray | None], shape: tuple[int, int]) -> Any:
    """``[B, L]`` bool tensor of a batch's target masks (each ``[T_i]`` bool), right-padded with False."""
    import torch

    out = torch.zeros(shape, dtype=torch.bool)
    for row, m in enumerate(masks):
        if m is None:
            raise ValueError("pad_target_masks: every window of a masked batch needs its target mask")
        out[row, : len(m)] = torch.from_numpy(np.asarray(m, dtype=bool))
    return out


def _draw_seed(seed: int, unit_id: str, batch_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{unit_id}\0{batch_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _id_error(doc: Any, largest: int, limit: int, data: DataConfig) -> str:
    """What to say about an input id the teacher has no embedding for."""
    if doc.ids is not None:
        return (
            f"{doc.where}: token id {largest} in field {data.ids_field!r} (data.ids_field) is >= the teacher's "
            f"vocabulary ({limit} embedding rows); were these ids made with another tokenizer?"
        )
    tokenizer = data.tokenizer or "the teacher's"
    return (
        f"{doc.where}: the tokenizer ({tokenizer}) produced id {largest}, >= the "
        f"teacher's vocabulary ({limit} embedding rows); set data.tokenizer to one that fits the teacher"
    )


def _is_empty(doc, counts: dict[str, int]) -> bool:
    empty = (
        (doc.text is None and doc.ids is None and doc.chat is None)
        or (doc.text is not None and not doc.text.strip())
        or (doc.ids is not None and len(doc.ids) == 0)
    )
    if empty:
        counts["empty_documents"] += 1
    return empty
