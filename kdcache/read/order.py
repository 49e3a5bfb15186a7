"""The read order of an epoch: units permuted, cut into partitions, shuffled in windows (numpy only; no I/O).

    order = EpochOrder([5, 3, 4], seed=0, epoch=2, shuffle=True, window_units=4, num_partitions=2,
                       batch_phases=1, global_batch_size=4)
    piece, row, window = order.lookup(np.arange(0, 8))   # piece of positions 0..7, sequence row inside its unit

The order is a pure function of (seed, epoch, the units' sequence counts, num_partitions P, batch_phases C and the
global batch size G); not of the number of ranks or DataLoader workers:

1. the units are permuted (seed, epoch) and their sequences concatenated;
2. the concatenation is cut into C * P partitions of the sizes `kdcache.read.partition.partition_sizes` gives (equal up
   to one sequence inside a phase); a unit straddling a cut becomes two pieces;
3. inside each partition, the sequences of every window of `window_units` consecutive pieces are shuffled together,
   so a reader keeps at most one window of pieces per partition open and reads each unit once;
4. epoch position i is the k-th sequence of partition (c, q) by `kdcache.read.partition.stream_positions`: global
batches
   cycle through the phases and every global batch draws evenly from the partitions of its phase.

Position i is resolved window by window: only the windows holding the asked positions are materialized
(O(number of units) + O(sequences of a window)), so resuming at any batch costs index arithmetic, not decoding.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from kdcache.read.partition import cut_pieces, partition_sizes, rank_positions, stream_positions

__all__ = ["EpochOrder", "batch_rows", "num_global_batches"]


def _rng(seed: int, *tags: int) -> np.random.Generator:
    """A generator that is a pure function of (seed, tags); negative seeds map to their 64-bit two's complement."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, *[int(t) for t in tags]]))


def num_global_batches(num_sequences: int, global_batch_size: int, drop_last: bool) -> int:
    """Global batches in an epoch: the incomplete last one is dropped (`drop_last`) or kept and padded."""
    if global_batch_size < 1:
        raise ValueError(f"global batch size must be >= 1 sequences, got {global_batch_size}")
    if drop_last:
        return num_sequences // global_batch_size
    return math.ceil(num_sequences / global_batch_size)


class EpochOrder:
    """The epoch's sequence order over a list of units.

    Args:
        unit_counts: sequences per unit (the manifest's `num_sequences`, or an epoch's mixture units).
        seed, epoch: the order is a pure function of both (epoch >= 0).
        shuffle: False keeps the units in the given order and does not shuffle windows.
        window_units: pieces of a partition whose sequences are shuffled together (>= 1); a reader holds about this
            many units per partition it reads.
        num_partitions, batch_phases, global_batch_size: the partition layout (`kdcache.read.partition`).
        before_window: called with the units (indices into unit_counts) of a window before its order is built: a
            reader checks there that those units' counts are backed by real shards (the arrays are sized by them).

    Attributes:
        unit_perm: [U] the units in reading order. piece_unit, piece_part, piece_start, piece_stop, piece_window:
        [n] each piece's unit (index into unit_counts), partition, row range inside the unit and window.
        window_part: [num_windows] each window's partition. num_sequences: the epoch's sequences.
    """

    def __init__(
        self,
        unit_counts: Sequence[int] | np.ndarray,
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        window_units: int,
        num_partitions: int = 1,
        batch_phases: int = 1,
        global_batch_size: int = 1,
        before_window: Callable[[np.ndarray], None] | None = None,
    ):
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if window_units < 1:
            raise ValueError(f"shuffle_window_units must be >= 1 units, got {window_units}")
        self.counts = np.asarray(unit_counts, dtype=np.int64).reshape(-1)
        self.seed, self.epoch, self.shuffle, self.window_units = seed, epoch, shuffle, window_units
        self.layout = {"global_batch_size": global_batch_size, "num_partitions": num_partitions}
        self.layout["batch_phases"] = batch_phases
        num_units = len(self.counts)
        self.unit_perm = _rng(seed, epoch, 0).permutation(num_units) if shuffle else np.arange(num_units)
        self.num_sequences = int(self.counts.sum())
        sizes = partition_sizes(self.num_sequences, **self.layout)
        self.part_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [C * P + 1]
        pieces = cut_pieces(self.counts[self.unit_perm], sizes)
        self.piece_unit = self.unit_perm[pieces.slot]
        self.piece_part, self.piece_start, self.piece_stop = pieces.part, pieces.start, pieces.stop
        # Windows: runs of window_units consecutive pieces inside one partition, numbered in concatenation order.
        index = np.arange(len(pieces), dtype=np.int64)
        new_part = np.ones(len(pieces), dtype=bool)
        new_part[1:] = pieces.part[1:] != pieces.part[:-1]
        part_first = np.maximum.accumulate(np.where(new_part, index, 0))  # first piece of each piece's partition
        opens = new_part | ((index - part_first) % window_units == 0)
        self.piece_window = np.cumsum(opens) - 1
        self.window_first_piece = np.concatenate([index[opens], [len(pieces)]]).astype(np.int64)
        self.window_starts = np.concatenate([pieces.first[opens], [self.num_sequences]]).astype(np.int64)
        self.window_part = pieces.part[opens]
        self.num_windows = len(self.window_part)
        self._windows: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_windows = max(2, 2 * len(sizes))  # a batch meets about one window of each partition it reads
        self._lock = threading.Lock()
        self._before_window = before_window

    def window(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(piece [n], sequence row inside the piece's unit [n]) of the window's sequences, in reading order."""
        with self._lock:
            if window in self._windows:
                self._windows.move_to_end(window)
                return self._windows[window]
        pieces = np.arange(self.window_first_piece[window], self.window_first_piece[window + 1])
        if self._before_window is not None:
            self._before_window(np.unique(self.piece_unit[pieces]))
        lengths = self.piece_stop[pieces] - self.piece_start[pieces]
        piece_col = np.repeat(pieces, lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        shift = np.repeat(offsets - self.piece_start[pieces], lengths)  # row = start of the piece + index inside it
        row_col = np.arange(int(lengths.sum()), dtype=np.int64) - shift
        if self.shuffle:
            perm = _rng(self.seed, self.epoch, 1, window).permutation(len(piece_col))
            piece_col, row_col = piece_col[perm], row_col[perm]
        with self._lock:
            self._windows[window] = (piece_col, row_col)
            while len(self._windows) > self._cached_windows:
                self._windows.popitem(last=False)
        return piece_col, row_col

    def concatenated(self, positions: np.ndarray) -> np.ndarray:
        """Index of each epoch position in the partition-ordered concatenation (positions < num_sequences)."""
        part, k = stream_positions(positions, **self.layout)
        return self.part_starts[part] + k

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(piece, sequence row inside the piece's unit, window) of each position (< num_sequences)."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.num_sequences):
            raise IndexError(
                f"positions must lie in [0, {self.num_sequences}), got {positions.min()}..{positions.max()}"
            )
        flat = self.concatenated(positions)
        windows = np.searchsorted(self.window_starts, flat, side="right") - 1
        pieces = np.empty(len(positions), dtype=np.int64)
        rows = np.empty(len(positions), dtype=np.int64)
        for w in np.unique(windows).tolist():
            sel = windows == w
            piece_col, row_col = self.window(w)
            offsets = flat[sel] - self.window_starts[w]
            pieces[sel], rows[sel] = piece_col[offsets], row_col[offsets]
        return pieces, rows, windows


def batch_rows(
    order: EpochOrder, batches: Sequence[int], *, rank: int, batch_size: int, world_size: int, num_partitions: int
) -> list[tuple[np.ndarray, np.ndarray, dict[int, int]]]:
    """Rank `rank`'s rows of each global batch in `batches`: (piece [batch_size], row inside the piece's unit
    [batch_size], both -1 at padding rows, {partition: the first window of it the batch reads}); a partition's
    windows before that one are done with, since each partition's positions only move forward."""
    pos = np.stack(
        [
            rank_positions(b, rank=rank, batch_size=batch_size, world_size=world_size, num_partitions=num_partitions)
            for b in batches
        ]
    )
    real = pos < order.num_sequences
    piece, row, window = np.full(pos.shape, -1), np.full(pos.shape, -1), np.full(pos.shape, -1)
    piece[real], row[real], window[real] = order.lookup(pos[real])
    out = []
    for i in range(len(batches)):
        firsts: dict[int, int] = {}
        for w in window[i][real[i]].tolist():
            part = int(order.window_part[w])
            firsts[part] = min(firsts.get(part, w), w)
        out.append((piece[i], row[i], firsts))
    return out
