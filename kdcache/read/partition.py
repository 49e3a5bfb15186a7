"""Partitioned reading: which sequences of an epoch each rank and DataLoader worker reads (numpy only; no I/O).

    sizes = partition_sizes(19, global_batch_size=4, num_partitions=2, batch_phases=1)   # [10, 9]
    part, k = stream_positions(np.arange(19), global_batch_size=4, num_partitions=2, batch_phases=1)
    rank_positions(3, rank=1, batch_size=2, world_size=2, num_partitions=2)              # [13, 15]

The epoch's sequences are N positions 0..N-1, cut into global batches of G = batch_size * world_size. The layout is
a pure function of (N, G, P = `num_partitions`, C = `batch_phases`), never of the world size or the worker count:

- global batch b belongs to phase c = b mod C; inside its phase, position i = b * G + o (o < G) has the phase-local
  index j = (b div C) * G + o;
- j goes to partition q = j mod P of phase c, as that partition's k = (j div P)-th sequence. So every global batch
  draws about G / P sequences from each partition of its phase, and partitions (c, q) hold exactly the counts
  `partition_sizes` gives (they differ by at most one inside a phase): the epoch order can be cut into them with
  nothing padded but the incomplete last global batch.

Rank r of W takes the positions o = v, v + W, v + 2W, ... of every global batch (v = `virtual_rank(r, W, P)`, a
relabelling of the ranks), so it sees the partitions q = v (mod gcd(W, P)) only:

- W divides P: each rank reads P / W partitions and no other rank reads them (disjoint);
- P divides W: the W / P ranks r = p * W/P ... (p + 1) * W/P - 1 (consecutive ranks, usually one node) share
  partition p: each fetches its units, once per node with a shared `local_cache_dir`;
- otherwise ranks read P / gcd(W, P) partitions, each shared by W / gcd(W, P) ranks (correct, more fetches).

DataLoader worker w of a rank takes the rank's global batches w, w + n, ... (n workers): when n divides C, worker w
only meets the phases c = w + first (mod n), so the workers of a rank read disjoint partitions too.

`cut_pieces` maps partitions onto the epoch's (permuted) units: partitions take consecutive ranges of the
concatenated sequences, so a unit straddling a cut is split into two pieces, read by whoever owns each (whole-unit
reads fetch it twice). With U units and C * P partitions at most C * P - 1 units are split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Pieces",
    "cut_pieces",
    "partition_sizes",
    "rank_partitions",
    "rank_positions",
    "stream_positions",
    "virtual_rank",
]


def _check(global_batch_size: int, num_partitions: int, batch_phases: int) -> None:
    if global_batch_size < 1:
        raise ValueError(f"global batch size must be >= 1 sequences, got {global_batch_size}")
    if num_partitions < 1 or batch_phases < 1:
        raise ValueError(f"num_partitions and batch_phases must be >= 1, got {num_partitions}, {batch_phases}")


def phase_sizes(num_sequences: int, *, global_batch_size: int, batch_phases: int) -> np.ndarray:
    """[C] int64 sequences of each phase: phase c holds global batches b = c (mod C), all full but the last one."""
    full, rest = divmod(int(num_sequences), global_batch_size)
    c = np.arange(batch_phases, dtype=np.int64)
    sizes = (full // batch_phases + (c < full % batch_phases)) * global_batch_size
    sizes[full % batch_phases] += rest  # the incomplete last global batch is the last batch of its phase
    return sizes


def partition_sizes(
    num_sequences: int, *, global_batch_size: int, num_partitions: int, batch_phases: int
) -> np.ndarray:
    """[C * P] int64 sequences of partition (c, q) at index c * P + q; they sum to `num_sequences`."""
    _check(global_batch_size, num_partitions, batch_phases)
    phases = phase_sizes(num_sequences, global_batch_size=global_batch_size, batch_phases=batch_phases)
    q = np.arange(num_partitions, dtype=np.int64)
    return (phases[:, None] // num_partitions + (q[None, :] < phases[:, None] % num_partitions)).reshape(-1)


def stream_positions(
    positions: np.ndarray, *, global_batch_size: int, num_partitions: int, batch_phases: int
) -> tuple[np.ndarray, np.ndarray]:
    """(partition index c * P + q, index k inside that partition) of each epoch position (see the module docstring)."""
    _check(global_batch_size, num_partitions, batch_phases)
    i = np.asarray(positions, dtype=np.int64)
    b, o = np.divmod(i, global_batch_size)
    t, c = np.divmod(b, batch_phases)
    k, q = np.divmod(t * global_batch_size + o, num_partitions)
    return c * num_partitions + q, k


def virtual_rank(rank: int, world_size: int, num_partitions: int) -> int:
    """The residue class of positions rank `rank` takes. When P divides W, consecutive ranks share a partition (ranks
    of one node share its fetches through the node's local cache); otherwise it is the rank itself."""
    if world_size % num_partitions == 0:
        per_partition = world_size // num_partitions
        return (rank % per_partition) * num_partitions + rank // per_partition
    return rank


def rank_positions(
    batch_index: int, *, rank: int, batch_size: int, world_size: int, num_partitions: int
) -> np.ndarray:
    """[batch_size] int64 epoch positions of rank `rank`'s rows of global batch `batch_index`, ascending.

    Positions at or past the epoch's sequence count are padding rows (only in the last global batch).
    """
    v = virtual_rank(rank, world_size, num_partitions)
    start = batch_index * batch_size * world_size + v
    return start + world_size * np.arange(batch_size, dtype=np.int64)


def rank_partitions(rank: int, *, world_size: int, num_partitions: int) -> np.ndarray:
    """Partitions q (inside each phase) whose sequences rank `rank` reads: q = virtual rank (mod gcd(W, P))."""
    g = math.gcd(world_size, num_partitions)
    return np.arange(virtual_rank(rank, world_size, num_partitions) % g, num_partitions, g, dtype=np.int64)


@dataclass(frozen=True)
class Pieces:
    """The intersections of partitions with units, in partition order (then sequence order).

    Attributes (all [n] int64):
        part: partition index (c * P + q); slot: the unit's index in the epoch's unit sequence;
        start, stop: sequence range inside the unit; first: the piece's first index in the concatenated sequences.
    """

    part: np.ndarray
    slot: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    first: np.ndarray

    def __len__(self) -> int:
        return len(self.part)


def cut_pieces(unit_counts: np.ndarray, part_sizes: np.ndarray) -> Pieces:
    """Cut the concatenated sequences of `unit_counts` (units in reading order) into consecutive partitions of
    `part_sizes` sequences; a unit straddling a cut becomes two (or more) pieces. Empty units give no piece."""
    counts = np.asarray(unit_counts, dtype=np.int64)
    sizes = np.asarray(part_sizes, dtype=np.int64)
    unit_bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    part_bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if unit_bounds[-1] != part_bounds[-1]:
        raise ValueError(f"partitions hold {part_bounds[-1]} sequences, the units {unit_bounds[-1]}")
    cuts = np.unique(np.concatenate([unit_bounds, part_bounds]))
    first, end = cuts[:-1], cuts[1:]
    slot = np.searchsorted(unit_bounds, first, side="right") - 1  # the non-empty unit starting at or before `first`
    part = np.searchsorted(part_bounds, first, side="right") - 1
    return Pieces(part=part, slot=slot, start=first - unit_bounds[slot], stop=end - unit_bounds[slot], first=first)
