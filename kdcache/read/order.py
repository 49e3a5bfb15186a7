"""The read order of a cache for one epoch, and its split into global batches, ranks and workers (numpy only; no I/O).

    order = EpochOrder(unit_counts=[5, 3, 4], seed=0, epoch=2, shuffle=True, window_units=4)
    units, local = order.lookup(np.arange(0, 8))   # (unit index, sequence index inside the unit) of positions 0..7

The order is a pure function of (seed, epoch) and the manifest's per-unit `num_sequences`: the units are permuted,
then the sequences of each window of `window_units` consecutive units (in permuted order) are shuffled together, so a
reader keeps at most one window of units open and reads each unit sequentially. It does not depend on the number of
ranks or DataLoader workers.

Positions are split into global batches of `batch_size * world_size` first; rank r takes the r-th slice of
`batch_size` positions of every global batch. Position p is resolved window by window: only the window holding p is
materialized (O(number of units) + O(sequences of one window)), so resuming at any batch costs index arithmetic, not
decoding.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

__all__ = ["EpochOrder", "num_global_batches", "rank_positions"]

_WINDOW_CACHE = 2  # materialized windows kept (a batch can straddle two)


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


def rank_positions(batch_index: int, *, rank: int, batch_size: int, world_size: int) -> np.ndarray:
    """[batch_size] int64 positions of the epoch order in rank `rank`'s slice of global batch `batch_index`.

    Positions at or past the number of sequences are padding rows (only in the last global batch, drop_last=False).
    """
    start = batch_index * batch_size * world_size + rank * batch_size
    return np.arange(start, start + batch_size, dtype=np.int64)


class EpochOrder:
    """The epoch's sequence order over a cache's units.

    Args:
        unit_counts: sequences per unit, in manifest order (the manifest's `num_sequences`).
        seed, epoch: the order is a pure function of both (epoch >= 0).
        shuffle: False reads in manifest order.
        window_units: units whose sequences are shuffled together (>= 1); memory holds about this many units.
    """

    def __init__(self, unit_counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool, window_units: int):
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if window_units < 1:
            raise ValueError(f"shuffle_window_units must be >= 1 units, got {window_units}")
        self.counts = np.asarray(unit_counts, dtype=np.int64).reshape(-1)
        self.seed, self.epoch, self.shuffle, self.window_units = seed, epoch, shuffle, window_units
        num_units = len(self.counts)
        self.unit_perm = _rng(seed, epoch, 0).permutation(num_units) if shuffle else np.arange(num_units)
        self.num_windows = math.ceil(num_units / window_units)
        perm_starts = np.concatenate([[0], np.cumsum(self.counts[self.unit_perm])]).astype(np.int64)
        bounds = [min(w * window_units, num_units) for w in range(self.num_windows + 1)]
        self.window_starts = perm_starts[bounds]  # [num_windows + 1] first position of each window, then the total
        self.unit_window = np.empty(num_units, dtype=np.int64)  # window of each unit (by manifest index)
        self.unit_window[self.unit_perm] = np.arange(num_units) // window_units
        self.num_sequences = int(perm_starts[-1])
        self._windows: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def window_units_of(self, window: int) -> np.ndarray:
        """Manifest indices of the units in `window`, in permuted order."""
        return self.unit_perm[window * self.window_units : (window + 1) * self.window_units]

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        """Window index of each position (positions must be < num_sequences)."""
        return np.searchsorted(self.window_starts, positions, side="right") - 1

    def window(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit index [n], sequence index inside the unit [n]) of the window's positions, in order."""
        with self._lock:
            if window in self._windows:
                self._windows.move_to_end(window)
                return self._windows[window]
        units = self.window_units_of(window)
        counts = self.counts[units]
        unit_col = np.repeat(units, counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        local_col = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
        if self.shuffle:
            perm = _rng(self.seed, self.epoch, 1, window).permutation(len(unit_col))
            unit_col, local_col = unit_col[perm], local_col[perm]
        with self._lock:
            self._windows[window] = (unit_col, local_col)
            while len(self._windows) > _WINDOW_CACHE:
                self._windows.popitem(last=False)
        return unit_col, local_col

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unit index, sequence index inside the unit) of each position; every position must be < num_sequences."""
        positions = np.asarray(positions, dtype=np.int64)
        units = np.empty(len(positions), dtype=np.int64)
        local = np.empty(len(positions), dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.num_sequences):
            raise IndexError(
                f"positions must lie in [0, {self.num_sequences}), got {positions.min()}..{positions.max()}"
            )
        windows = self.window_of(positions)
        for w in np.unique(windows).tolist():
            sel = windows == w
            unit_col, local_col = self.window(w)
            offsets = positions[sel] - self.window_starts[w]
            units[sel], local[sel] = unit_col[offsets], local_col[offsets]
        return units, local
