"""`KDCacheDataset`: stream a cache into any PyTorch trainer as collated batches, exactly once per epoch, resumable.

    ds = KDCacheDataset("s3://bucket/kd/llama-top64", batch_size=8, seed=0)        # rank/world from torch.distributed
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)     # the dataset batches itself
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            loss = distillation_loss(student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
            ...
            state = ds.state_after(int(batch["batch_index"]) + 1)  # save it; later ds.load_state_dict(state)
    mixed = KDCacheDataset([("s3://kd/web", 0.7), ("s3://kd/code", 0.3)], batch_size=8)   # kdcache.read.mixture

Contract:
- **Order**: a pure function of (seed, epoch, `num_partitions` P, `batch_phases` C, global batch size) (see
  `kdcache.read.order` and `kdcache.read.partition`): units permuted, cut into C * P partitions of equal sequence
  counts, sequences shuffled inside windows of `shuffle_window_units` units of a partition; global batch b draws evenly
  from the P partitions of phase b mod C. Not a function of the number of ranks or workers. P defaults to the world
  size when an epoch starts; a state saved mid-epoch carries its P, so a resumed epoch keeps it on any world size.
- **Partitioned reading**: rank r takes the rows of every global batch that fall in its partitions: with a world
  size W that divides P, ranks read disjoint units (P / W partitions each); when P divides W, the W / P consecutive
  ranks of a partition share it (one fetch per node with a shared `local_cache_dir`). Other W are correct but
  fetch more (`kdcache.read.partition`). All ranks together fetch at most about 1 + (C * P - 1) / U times the cache per
  epoch (U units of similar size: a unit straddling two partitions is fetched by both; with U < C * P a unit spans
  several partitions and each of their ranks fetches it whole). Few units and many partitions cost fetches, never
  balance: partitions always hold equal sequence counts. DataLoader worker w of n takes the rank's batches w,
  w + n, ...: when n divides `batch_phases`, the workers read disjoint units too; otherwise each worker reads every
  unit of its rank.
- **Exactly once, equal steps**: the order is cut into global batches of `batch_size * world_size`; every rank yields
  `batch_size` rows of each, so every rank yields the same number of batches; partitions are exactly balanced
  (sizes differ by at most one sequence), so nothing is padded but the incomplete last global batch, which is
  dropped (`drop_last=True`) or padded with rows whose `attention_mask`/`loss_mask` are all 0 and `seq_id` -1
  (`drop_last=False`, the default: no sequence is lost; a loss over zero positions is 0 with zero gradient).
- **Mixtures**: several caches with weights, `repeat` or `choose` counts per epoch (`kdcache.read.mixture`); the
batch's
  `source` [B] says which cache each row came from. The epoch's units of all caches are ordered as one cache's.
- **Workers**: `num_workers=n` yields the same batches in the same order as `num_workers=0`.
- **Resume**: `state_dict()`/`load_state_dict()`; the batch carries `batch_index`, the global batch index in the
  epoch, so the consumer knows what it consumed while workers prefetch: save `state_after(batch_index + 1)`.
  Under torchdata's `StatefulDataLoader` the per-worker `state_dict()` is exact too. Resuming skips by index
  arithmetic (nothing skipped is read) and works with another world size or worker count as long as the global
  batch size is unchanged. States of the order before partitioned reading (version 1) are refused.
- **Throughput and memory** (one process, several cores): units are fetched, checksummed, decompressed and decoded
  compactly (`kdcache.formats.rows`) `prefetch_units` ahead, in first-use order, by a pool of one thread per core; one
  background thread collates the next batches, off the training thread, also with num_workers=0 (which is why 0
  is the default to prefer). Memory per rank: about (C * P / W) * shuffle_window_units + prefetch_units compact
  units (one window at W >= P and C = 1), ~(3 * k + 24) bytes per token with the u8 codec and a vocabulary of at most
  65,536; bounded by the window, not the cache. Remote caches can keep fetched shards on local disk
  (`local_cache_dir`, `local_cache_bytes`; `kdcache.read.localcache`): ranks of a node share them, and a rank resumed
  on the same node at the same world size reads the same partitions, so the windows open when it stopped are there.
- **Epochs with workers**: call `set_epoch` before each epoch and do not use `persistent_workers=True` (persistent
  workers keep their copy of the dataset, so they would not see the new epoch).
- **Modes**: topk, sample and hybrid caches. Sampled caches add `sample_ids`, `sample_weights` (count / N, times the
  tail mass in hybrid mode) and `sample_logprobs` [B, L, m] for `kdcache.losses.sampled_kl`; top_k and a read-time
  temperature are refused for them (give the temperature to the loss instead).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdcache.errors import CacheMismatchError
from kdcache.formats.rows import UnitRows, logprob_table
from kdcache.identity import check_student
from kdcache.read.collate import (
    apply_temperature,
    collate_sequences,
    keep_top_k,
    sample_weights,
    stored_temperature_index,
)
from kdcache.read.mixture import (
    EpochUnits,
    Mixture,
    Source,
    as_mixture,
    check_compatible,
    epoch_units,
    sequences_per_epoch,
)
from kdcache.read.order import EpochOrder, batch_rows, num_global_batches
from kdcache.read.prefetch import UnitPrefetcher, in_background
from kdcache.read.reader import CacheReader
from kdcache.read.xbatch import CrossTokenizer, load_teacher_pieces

__all__ = ["STATE_VERSION", "KDCacheDataset"]

STATE_VERSION = 2  # 2: partitioned order (kdcache.read.partition); states of version 1 describe another order
_PLAN_BATCHES = 64  # batches whose rows are looked up at once
_MAX_PLANNED_BATCHES = 4096  # bound on batches planned ahead while looking for the next units to prefetch
_QUEUE_BATCHES = 2  # collated batches the background thread keeps ready


def _load_threads() -> int:
    """Threads loading units: one per core this process may use (the loads are CPU-bound once fetched)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class _Plan:
    """What one iterator (one rank, one worker) yields: global batches first, first + stride, ... < num_batches."""

    epoch: int
    rank: int
    world_size: int
    first: int
    stride: int
    num_batches: int
    worker_id: int
    num_workers: int
    num_partitions: int


class KDCacheDataset(IterableDataset):
    """Collated batches of cached teacher targets for one rank (see the module docstring for the contract).

    Args:
        uri: cache root URL, or a `kdcache.read.mixture.Mixture` (or a list of (uri, weight) pairs or `Source`s) of
        caches
            that share the tokenizer; storage_options: fsspec options. Only `index.json` and the shards it names
            are read.
        batch_size: sequences per batch on each rank; seed, epoch, shuffle: the order (a function of seed and epoch;
            shuffle=False keeps the units in manifest order, which is the epoch's order with one partition).
        rank, world_size: default to torch.distributed's when initialized (at construction or iteration), else 0/1.
        drop_last: drop the incomplete last global batch instead of padding it with masked rows.
        shuffle_window_units: units of a partition whose sequences are shuffled together (memory: about this many
            units per partition a rank reads).
        num_partitions: partitions of the order (like MosaicML streaming's canonical nodes): world sizes that divide
            it or that it divides read each unit about once. None: the world size when an epoch starts (a resumed
            epoch keeps the value its state carries). Give it explicitly to keep the order of every epoch the same
            across world sizes (e.g. 64 for runs on 1 to 64 ranks; memory grows with num_partitions / world_size).
        batch_phases: consecutive global batches cycle through this many disjoint parts of the cache, so that
            DataLoader workers whose count divides it read disjoint units (memory: this many windows per partition
            in one process). 1 (default): each worker reads every unit of its rank; prefer num_workers=0.
        top_k: keep the k' most probable cached entries per position, dropped mass folded into the tail.
        temperature: express targets at T (exact if cached, else renormalized top-k with a warning); see
            `kdcache.read.collate.apply_temperature` for how `temperatures` is re-based.
        student_vocab_size, tokenizer: checked against the cache (`check_student`).
        cross_tokenizer: `tokenizer` is a student's with another vocabulary: each sequence's text (stored with
            `targets.cross_tokenizer`) is tokenized by it and the targets mapped onto its positions and ids
            (`kdcache.read.xbatch`; docs/TARGETS.md "Students with another tokenizer"); cross_mapping: "exact" |
            "first", how a teacher token chooses its student token. The batch is in the student's ids, at one
            temperature (`temperature`, a stored one, or 1), with `unmapped_logprobs` and `xtok_kind`.
        prefetch_units: units fetched and decompressed ahead in background threads; 0 reads synchronously.
        local_cache_dir, local_cache_bytes: keep the shards of a remote cache in this local directory, at most this
            many bytes, least recently used evicted (shared safely by the workers and ranks of a node; see
            `kdcache.read.localcache`). Ignored for a cache on a local path.
        pad_to: fixed length L of every batch (None: the longest sequence of the batch); pad_token_id: input id at
            padding.
        compact_targets: serve the head as stored, for decoding on the GPU: `target_gap_planes` [B, L, P * k]
            (the shard's planar gap bytes, docs/FORMAT.md; Zarr caches: `target_ids`) and `target_codes` [B, L, k]
            (uint8/uint16 log-prob codes) plus `logprob_table` [levels] instead of `target_ids` /
            `target_logprobs` (3-5 instead of 12 bytes per entry through the host, and no decode on the host).
            `kdcache.losses` decode it themselves (`kdcache.read.collate.expand_targets` does it for other code). Not
            with `top_k` or a temperature.

    Batch (a dict; B = batch_size, L = length, k' = top_k or the cache's k, nT = temperatures):
        `input_ids`, `attention_mask`, `labels` [B, L] int64 (labels: next token, -100 at padding and at each
        sequence's last position, and where the cache stores no target); `loss_mask` [B, L] bool (positions with
        teacher targets: attention mask AND the cache's target mask); `target_ids` [B, L, k']
        int64 ascending; `target_logprobs` [B, L, k'] float32 (-inf at padding entries); `tail_logprob` [B, L]
        float32; `log_normalizers`, `tail_logprobs` [B, L, nT] float32; `entropy` [B, L] float32 (T = 1);
        `seq_id` [B] int64 (-1 for padded rows); `source` [B] int64 (index of the row's cache in the mixture, 0 for
        a single cache, -1 for padded rows); `batch_index` [] int64 (global batch index in the epoch);
        `temperatures` list of nT floats; `teacher_vocab_size` int.
    """

    def __init__(
        self,
        uri: str | Mixture | list,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        epoch: int = 0,
        drop_last: bool = False,
        shuffle_window_units: int = 4,
        top_k: int | None = None,
        temperature: float | None = None,
        student_vocab_size: int | None = None,
        tokenizer: Any = None,
        storage_options: dict[str, Any] | None = None,
        prefetch_units: int = 2,
        local_cache_dir: str | None = None,
        local_cache_bytes: int | None = None,
        pad_to: int | None = None,
        pad_token_id: int = 0,
        compact_targets: bool = False,
        num_partitions: int | None = None,
        batch_phases: int = 1,
        cross_tokenizer: bool = False,
        cross_mapping: str = "exact",
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 sequences, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed's are used)")
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if prefetch_units < 0 or epoch < 0 or shuffle_window_units < 1:
            raise ValueError("prefetch_units and epoch must be >= 0 and shuffle_window_units >= 1")
        if (num_partitions is not None and num_partitions < 1) or batch_phases < 1:
            raise ValueError(f"num_partitions and batch_phases must be >= 1, got {num_partitions}, {batch_phases}")
        if pad_to is not None and pad_to < 1:
            raise ValueError(f"pad_to must be >= 1 tokens, got {pad_to}")
        if compact_targets and (top_k is not None or (temperature is not None and temperature != 1.0)):
            raise ValueError("compact_targets serves the head as stored: use it without top_k and temperature")
        self.uri, self.storage_options = uri, storage_options
        self.mixture = as_mixture(uri)
        self.sources: list[Source] = self.mixture.sources if self.mixture is not None else [Source(uri)]
        self._local_cache = {"local_cache_dir": local_cache_dir, "local_cache_bytes": local_cache_bytes}
        self._readers: list[CacheReader] | None = [self._open(s) for s in self.sources]
        self._readers_pid = os.getpid()  # async fsspec filesystems (http, s3, gcs) do not survive a fork
        self._inherited_readers: list[CacheReader] | None = None
        self.manifest = self._readers[0].manifest
        if len(self._readers) > 1:
            check_compatible([r.manifest for r in self._readers], [s.uri for s in self.sources])
        if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")  # before any read
        targets = self.manifest["fingerprint_inputs"]["targets"]
        self.mode = targets.get("mode", "topk")
        self.num_samples = int(targets.get("samples", 0)) if self.mode != "topk" else 0
        if self.mode != "topk" and (top_k is not None or (temperature is not None and temperature != 1.0)):
            raise ValueError(
                f"{uri}: a {self.mode!r} cache serves its samples as stored; pass the temperature to the loss "
                "(kdcache.losses.sampled_kl reweights exactly at stored temperatures) and do not use top_k"
            )
        self._cross: CrossTokenizer | None = None
        if cross_tokenizer:  # a student with another tokenizer: its own ids and vocabulary (kdcache.read.xbatch)
            if tokenizer is None or compact_targets:
                raise ValueError("cross_tokenizer=True needs the student's tokenizer= and no compact_targets")
            self._cross = CrossTokenizer(
                load_teacher_pieces(self.reader.store, self.manifest),
                tokenizer,
                temperatures=self.reader.temperatures,
                temperature=temperature,
                top_k=top_k,
                logprob_table=logprob_table(self.reader.codec),
                mapping=cross_mapping,
                mode=self.mode,
                num_samples=self.num_samples,
            )
        for reader in self._readers:
            if self._cross is None:
                check_student(reader.manifest, student_vocab_size=student_vocab_size, tokenizer=tokenizer)
        if top_k is not None and not 1 <= top_k <= self.reader.k:
            raise ValueError(f"top_k must lie in [1, {self.reader.k}] (the cache's k), got {top_k}")
        if temperature is not None and stored_temperature_index(self.reader.temperatures, temperature) is None:
            warnings.warn(
                f"temperature {temperature} is not cached in {uri} (cached: {self.reader.temperatures}); batches "
                "carry the renormalized top-k head at this temperature with no tail (biased). Cache it for exact "
                "targets.",
                UserWarning,
                stacklevel=2,
            )
        self.batch_size, self.seed, self.shuffle, self.epoch = batch_size, seed, shuffle, epoch
        self.drop_last, self.shuffle_window_units = drop_last, shuffle_window_units
        self.top_k, self.temperature = top_k, temperature
        self.prefetch_units, self.pad_to, self.pad_token_id = prefetch_units, pad_to, pad_token_id
        self.compact_targets, self.batch_phases = compact_targets, batch_phases
        self._num_partitions = num_partitions
        self._pinned: tuple[int, int] | None = None  # (epoch, num_partitions) of an epoch resumed from a state
        self._rank, self._world_size = rank, world_size
        self._resolve_topology()
        self._unit_counts = [np.array([u["num_sequences"] for u in r.units], dtype=np.int64) for r in self._readers]
        self._draws = sequences_per_epoch([r.num_sequences for r in self._readers], self.mixture)
        self._source_fingerprints = [r.manifest["fingerprint"] for r in self._readers]
        self._fingerprint = self._mixture_fingerprint()
        self._logprob_table = logprob_table(self.reader.codec)  # codes -> float32 log-probs, built once (shared codec)
        self._resume: dict[str, Any] | None = None
        self._position: dict[str, Any] | None = None  # where this process's live iterator stands

    def _open(self, source: Source) -> CacheReader:
        options = source.storage_options if source.storage_options is not None else self.storage_options
        return CacheReader(source.uri, options, **self._local_cache)

    def _mixture_fingerprint(self) -> str:
        """The cache's fingerprint; for a mixture a digest of the sources' fingerprints and per-epoch counts."""
        if self.mixture is None:
            return self.manifest["fingerprint"]
        parts = [[r.manifest["fingerprint"], n] for r, n in zip(self._readers, self._draws)]
        return "mixture-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    # ---------------------------------------------------------------------------------------------------------
    # Topology

    def _resolve_topology(self) -> None:
        if self._rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def __getstate__(self) -> dict[str, Any]:
        self._resolve_topology()  # pickled in the main process for spawned workers: fix the rank there
        return {**self.__dict__, "_readers": None, "_inherited_readers": None}  # reopened from the manifests' URLs

    @property
    def readers(self) -> list[CacheReader]:
        """The opened caches, one per source (reopened lazily in a process that received a pickled dataset or was
        forked, e.g. a DataLoader worker)."""
        if self._readers is None or self._readers_pid != os.getpid():
            readers = [self._open(s) for s in self.sources]
            for source, reader, fingerprint in zip(self.sources, readers, self._source_fingerprints):
                if reader.manifest["fingerprint"] != fingerprint:
                    raise CacheMismatchError(
                        f"{source.uri}: the cache changed while it was being read (new fingerprint)"
                    )
            if self._readers is not None:
                # A forked copy of the parent's readers is kept, never closed or collected: closing its async
                # filesystem would unregister the parent's pooled sockets from the epoll instance both processes
                # share, and the parent's next request on them would hang.
                self._inherited_readers = self._readers
            self._readers, self._readers_pid = readers, os.getpid()
        return self._readers

    @property
    def reader(self) -> CacheReader:
        """The (first) opened cache."""
        return self.readers[0]

    @property
    def rank(self) -> int:
        self._resolve_topology()
        return 0 if self._rank is None else self._rank

    @property
    def world_size(self) -> int:
        self._resolve_topology()
        return 1 if self._world_size is None else self._world_size

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all ranks: batch_size * world_size."""
        return self.batch_size * self.world_size

    @property
    def num_sequences(self) -> int:
        """Sequences per epoch (a mixture: the sum of its sources' per-epoch counts)."""
        return int(sum(self._draws))

    @property
    def num_partitions(self) -> int:
        """Partitions of the current epoch's order."""
        return self.partitions_for(self.epoch)

    def partitions_for(self, epoch: int) -> int:
        """Partitions of `epoch`'s order: a resumed epoch's from its state, else the argument or the world size."""
        if self._pinned is not None and self._pinned[0] == epoch:
            return self._pinned[1]
        return self._num_partitions or self.world_size

    def __len__(self) -> int:
        """Batches each rank yields in a full epoch (the same on every rank)."""
        return num_global_batches(self.num_sequences, self.global_batch_size, self.drop_last)

    # ---------------------------------------------------------------------------------------------------------
    # Epochs and resume

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (call before each epoch). A loaded resume point of another epoch is dropped."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None

    def _identity(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window_units": self.shuffle_window_units,
            "drop_last": self.drop_last,
            "global_batch_size": self.global_batch_size,
            "batch_phases": self.batch_phases,
            "num_sequences": self.num_sequences,
            "fingerprint": self._fingerprint,
        }

    def state_after(self, global_batches_done: int, epoch: int | None = None) -> dict[str, Any]:
        """The state to save once the consumer has trained on global batches [0, global_batches_done) of `epoch`.

        `global_batches_done` is `int(batch["batch_index"]) + 1` of the last batch trained on; `epoch` defaults to
        the current one. A finished epoch becomes (epoch + 1, 0). Any rank may save it: all ranks are at the same
        global batch.
        """
        epoch = self.epoch if epoch is None else epoch
        if global_batches_done >= len(self):
            epoch, global_batches_done = epoch + 1, 0
        return self._state(epoch, global_batches_done)

    def _state(self, epoch: int, global_batches_done: int, worker: dict[str, int] | None = None) -> dict[str, Any]:
        return {
            **self._identity(),
            "num_partitions": self.partitions_for(epoch),
            "epoch": epoch,
            "global_batches_done": int(global_batches_done),
            "worker": worker,
        }

    def state_dict(self) -> dict[str, Any]:
        """This process's position: exact in the main process with num_workers=0 and per worker under torchdata's
        StatefulDataLoader. With a plain DataLoader and num_workers > 0 use `state_after(batch_index + 1)`."""
        pos = self._position
        if pos is None:  # no iterator yet: a pending resume point, or the epoch's start
            resume = self._resume or {}
            return self._state(self.epoch, resume.get("global_batches_done", 0), resume.get("worker"))
        if not pos["worker"]:
            return self.state_after(pos["next"], pos["epoch"])
        # In a worker global_batches_done is a lower bound (other workers' progress is unknown); the worker entry
        # (this worker's next batch) is exact, and is what a StatefulDataLoader hands back to this worker.
        worker = {"id": pos["worker_id"], "num_workers": pos["num_workers"], "next_batch": pos["next"]}
        return self._state(pos["epoch"], pos["first"], worker)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state` on the next iteration: its epoch, after its `global_batches_done` global batches.

        The resumed epoch keeps the state's `num_partitions` (on any world size); later epochs use this dataset's.

        Raises:
            ValueError: the state was made with another seed, shuffle, window, drop_last, batch_phases or global
                batch size, with another num_partitions than this dataset's explicit one, or by the order of
                version 1.
            CacheMismatchError: the state belongs to another cache or mixture.
        """
        version = state.get("version")
        if version != STATE_VERSION:
            if version == 1:
                raise ValueError(
                    f"dataset state of epoch {state.get('epoch')} has version 1: it was saved by the order before "
                    "partitioned reading, which version 2 does not reproduce, so it cannot continue exactly; start "
                    f"that epoch again (set_epoch({state.get('epoch')}), no load_state_dict) or the next one"
                )
            raise ValueError(f"dataset state version {version} is not {STATE_VERSION}")
        mine = self._identity()
        if state["fingerprint"] != mine["fingerprint"] or state["num_sequences"] != mine["num_sequences"]:
            raise CacheMismatchError(
                f"dataset state belongs to cache {state['fingerprint'][:24]} ({state['num_sequences']} sequences per "
                f"epoch), not {mine['fingerprint'][:24]} ({mine['num_sequences']} sequences per epoch)"
            )
        for key in ("seed", "shuffle", "shuffle_window_units", "drop_last", "global_batch_size", "batch_phases"):
            if state[key] != mine[key]:
                hint = " (batch_size * world_size must stay the same)" if key == "global_batch_size" else ""
                raise ValueError(f"cannot resume: state has {key}={state[key]!r}, this dataset {mine[key]!r}{hint}")
        epoch, partitions = int(state["epoch"]), int(state["num_partitions"])
        started = int(state["global_batches_done"]) > 0 or state.get("worker") is not None
        if started and self._num_partitions is not None and self._num_partitions != partitions:
            raise ValueError(
                f"cannot resume: state of epoch {epoch} has num_partitions={partitions}, this dataset "
                f"{self._num_partitions}; pass num_partitions={partitions} or None"
            )
        self.epoch = epoch
        self._pinned = (epoch, partitions) if started else None  # an epoch in progress keeps its order
        self._resume = {"epoch": self.epoch, "global_batches_done": int(state["global_batches_done"])}
        self._resume["worker"] = state.get("worker")
        self._position = None

    # ---------------------------------------------------------------------------------------------------------
    # Iteration

    def _plan(self) -> _Plan:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = 0
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == self.epoch:
            saved = resume.get("worker")
            if saved and info is not None and (saved["id"], saved["num_workers"]) == (worker_id, num_workers):
                first = saved["next_batch"] - worker_id  # this worker resumes its own sequence exactly
            else:
                first = resume["global_batches_done"]
        return _Plan(
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            first=first + worker_id,
            stride=num_workers,
            num_batches=len(self),
            worker_id=worker_id,
            num_workers=num_workers,
            num_partitions=self.partitions_for(self.epoch),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self._plan()
        self._position = {"epoch": plan.epoch, "first": plan.first - plan.worker_id, "next": plan.first}
        self._position.update(worker=get_worker_info() is not None, worker_id=plan.worker_id, num_workers=plan.stride)
        return self._consume(plan)

    def _consume(self, plan: _Plan) -> Iterator[dict[str, Any]]:
        produce = lambda: self._produce(plan)
        source = in_background(produce, _QUEUE_BATCHES) if self.prefetch_units > 0 else produce()
        try:
            for b, batch in source:
                self._position["next"] = b + plan.stride  # counted before the consumer sees batch b
                yield batch
        finally:
            source.close()

    def epoch_order(
        self, epoch: int, world_size: int | None = None, num_partitions: int | None = None
    ) -> tuple[EpochUnits, EpochOrder]:
        """The units `epoch` reads and their order at this (or the given) world size and partitions (index
        arithmetic only, nothing is read)."""
        world_size = self.world_size if world_size is None else world_size
        units = epoch_units(self._unit_counts, self._draws, seed=self.seed, epoch=epoch)

        def check_sizes(
            epoch_units_of_window: np.ndarray,
        ) -> None:  # counts are backed by real shards (hostile caches)
            for v in epoch_units_of_window.tolist():
                self.readers[int(units.source[v])].check_unit_sizes([int(units.unit[v])])

        order = EpochOrder(
            units.count,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            window_units=self.shuffle_window_units,
            num_partitions=num_partitions or self.partitions_for(epoch),
            batch_phases=self.batch_phases,
            global_batch_size=self.batch_size * world_size,
            before_window=check_sizes,
        )
        return units, order

    def _produce(self, plan: _Plan) -> Iterator[tuple[int, dict[str, Any]]]:
        """(global batch index, collated batch) for the plan's batches, units prefetched in first-use order.

        One thread collates (this one): numpy's copies and look-ups release the GIL, but a second collating thread
        measured 1.6x slower in all, not faster (the many short operations of a batch hand the GIL back and forth);
        the unit loads, which hold it little, are what runs in parallel."""
        self.readers  # noqa: B018 (reopened here, before the load threads start, in a forked or spawned worker)
        units, order = self.epoch_order(plan.epoch, plan.world_size, plan.num_partitions)

        def load_piece(piece: int) -> UnitRows:
            v = int(order.piece_unit[piece])
            return self._load_unit(int(units.source[v]), int(units.unit[v]))

        pieces = UnitPrefetcher(load_piece, order.piece_part, order.piece_window, self.prefetch_units, _load_threads())
        planned: deque[tuple[int, np.ndarray, np.ndarray, dict[int, int]]] = deque()
        batch_ids = iter(range(plan.first, plan.num_batches, plan.stride))

        def plan_more() -> bool:
            chunk = [b for _, b in zip(range(_PLAN_BATCHES), batch_ids)]
            if not chunk:
                return False
            layout = {"batch_size": self.batch_size, "world_size": plan.world_size}
            rows = batch_rows(order, chunk, rank=plan.rank, num_partitions=plan.num_partitions, **layout)
            for b, (piece, row, firsts) in zip(chunk, rows):
                planned.append((b, piece, row, firsts))
                pieces.announce(piece[piece >= 0])
            return True

        try:
            while planned or plan_more():
                b, piece, row, firsts = planned.popleft()
                pieces.need(piece[piece >= 0])
                while pieces.lookahead() < self.prefetch_units and len(planned) < _MAX_PLANNED_BATCHES and plan_more():
                    pass
                pieces.submit_ahead()
                pieces.release_before(firsts)
                seqs: list[dict[str, Any] | None] = []
                sources: list[int] = []
                for p, r in zip(piece.tolist(), row.tolist()):
                    if p < 0:
                        seqs.append(None)
                        sources.append(-1)
                        continue
                    v = int(order.piece_unit[p])
                    seqs.append(pieces.get(p).sequence(units.unit_row(v, r)))
                    sources.append(int(units.source[v]))
                yield b, self._collate(seqs, b, sources)
        finally:
            pieces.close()

    def _load_unit(self, source: int, index: int) -> UnitRows:
        """Fetch (checked against size and checksum), decompress and decode one unit of a source compactly; runs in a
        prefetch thread."""
        reader = self.readers[source]
        text = self._cross is not None  # the text behind the tokens, for a student with another tokenizer
        return reader.read_unit_rows(reader.units[index], planar=self.compact_targets, token_text=text)

    def _collate(self, seqs: list[dict[str, Any] | None], batch_index: int, sources: list[int]) -> dict[str, Any]:
        if self._cross is not None:
            return self._cross.batch(seqs, batch_index, sources, pad_to=self.pad_to, pad_token_id=self.pad_token_id)
        temps = list(self.reader.temperatures)
        a = collate_sequences(
            seqs,
            k=self.reader.k,
            num_temperatures=len(temps),
            pad_to=self.pad_to,
            pad_token_id=self.pad_token_id,
            logprob_table=self._logprob_table,
            compact=self.compact_targets,
        )
        if self.top_k is not None:
            a["target_ids"], a["target_logprobs"], a["tail_logprobs"] = keep_top_k(
                a["target_ids"], a["target_logprobs"], a["tail_logprobs"], a["log_normalizers"], temps, self.top_k
            )
        if self.temperature is not None and self.temperature != 1.0:  # an uncached T was warned about at construction
            a["target_logprobs"], a["log_normalizers"], a["tail_logprobs"], temps = apply_temperature(
                a["target_logprobs"], a["log_normalizers"], a["tail_logprobs"], temps, self.temperature
            )
        a["tail_logprob"] = np.ascontiguousarray(a["tail_logprobs"][..., 0])
        if "sample_counts" in a:
            a["sample_weights"] = sample_weights(
                a.pop("sample_counts"), a["tail_logprob"], self.num_samples, hybrid=self.mode == "hybrid"
            )
        if "target_codes" in a:
            a["logprob_table"] = self._logprob_table
        batch: dict[str, Any] = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in a.items()}
        batch["source"] = torch.tensor(sources, dtype=torch.int64)
        batch["temperatures"] = temps
        batch["batch_index"] = torch.tensor(batch_index, dtype=torch.int64)
        batch["teacher_vocab_size"] = int(self.manifest["fingerprint_inputs"]["teacher"]["padded_vocab_size"])
        return batch
