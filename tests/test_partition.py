"""The partition layout (kdcache.read.partition): exact sizes, a bijection onto the partitions, global batches that do
not depend on the world size, disjoint ranks and workers where the counts divide, and pieces that cover every unit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdcache.read.order import EpochOrder, num_global_batches
from kdcache.read.partition import (
    cut_pieces,
    partition_sizes,
    rank_partitions,
    rank_positions,
    stream_positions,
    virtual_rank,
)

LAYOUTS = [  # (sequences, global batch size, partitions, phases)
    (1000, 16, 8, 1),
    (1003, 16, 8, 1),
    (1003, 24, 4, 3),
    (37, 8, 16, 2),  # more partitions than sequences per global batch
    (5, 8, 4, 1),  # less than one global batch
]


@pytest.mark.parametrize("n, g, p, c", LAYOUTS)
def test_positions_map_one_to_one_onto_partitions_of_exact_sizes(n, g, p, c):
    sizes = partition_sizes(n, global_batch_size=g, num_partitions=p, batch_phases=c)
    assert sizes.sum() == n and len(sizes) == p * c
    per_phase = sizes.reshape(c, p)
    assert (per_phase.max(1) - per_phase.min(1) <= 1).all()  # balanced inside every phase
    part, k = stream_positions(np.arange(n), global_batch_size=g, num_partitions=p, batch_phases=c)
    assert (k < sizes[part]).all()
    assert len(set(zip(part.tolist(), k.tolist()))) == n  # a bijection onto {(part, k): k < size}
    b = np.arange(n) // g
    assert (part // p == b % c).all()  # a global batch draws from its phase's partitions only


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 8, 16])
def test_ranks_split_every_global_batch_and_read_their_partitions(p, w):
    g, n = 48, 1000  # 48 divides by every world size used
    bs = g // w
    sizes = partition_sizes(n, global_batch_size=g, num_partitions=p, batch_phases=1)
    touched = []
    for b in range(num_global_batches(n, g, drop_last=False)):
        rows = [rank_positions(b, rank=r, batch_size=bs, world_size=w, num_partitions=p) for r in range(w)]
        assert sorted(np.concatenate(rows).tolist()) == list(range(b * g, (b + 1) * g))  # the same set at any W
        assert all(len(r) == bs for r in rows)  # equal rows per rank
    for r in range(w):
        pos = np.concatenate(
            [rank_positions(b, rank=r, batch_size=bs, world_size=w, num_partitions=p) for b in range(3)]
        )
        part, _ = stream_positions(pos, global_batch_size=g, num_partitions=p, batch_phases=1)
        assert set(part.tolist()) <= set(rank_partitions(r, world_size=w, num_partitions=p).tolist())
        touched.append(set(part.tolist()))
    g_ = math.gcd(w, p)
    assert all(len(t) == p // g_ for t in touched)
    if p % w == 0:  # disjoint partitions
        assert sum(len(t) for t in touched) == p and set().union(*touched) == set(range(p))
    if w % p == 0:  # consecutive ranks share a partition
        assert [min(t) for t in touched] == [r // (w // p) for r in range(w)]
    assert sizes.sum() == n


def test_virtual_rank_is_a_relabelling():
    for w, p in [(8, 2), (8, 8), (6, 4), (12, 3), (1, 5)]:
        assert sorted(virtual_rank(r, w, p) for r in range(w)) == list(range(w))


@pytest.mark.parametrize("workers, phases", [(2, 2), (2, 4), (3, 3)])
def test_workers_dividing_the_phases_read_disjoint_partitions(workers, phases):
    g, p, n = 12, 2, 2000
    for first in (0, 5):  # a resumed iteration starts at any batch
        seen = []
        for w in range(workers):
            batches = np.arange(first + w, num_global_batches(n, g, False), workers)
            pos = np.concatenate(
                [rank_positions(b, rank=1, batch_size=6, world_size=2, num_partitions=p) for b in batches]
            )
            part, _ = stream_positions(pos[pos < n], global_batch_size=g, num_partitions=p, batch_phases=phases)
            seen.append(set(part.tolist()))
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])


def test_cut_pieces_cover_every_unit_once():
    counts = np.array([5, 0, 9, 1, 30, 2, 0, 7])
    sizes = np.array([10, 10, 10, 10, 14])
    pieces = cut_pieces(counts, sizes)
    covered = {(int(s), r) for s, a, z in zip(pieces.slot, pieces.start, pieces.stop) for r in range(a, z)}
    assert covered == {(u, r) for u, c in enumerate(counts) for r in range(c)}
    assert np.bincount(pieces.part, weights=pieces.stop - pieces.start).tolist() == sizes.tolist()
    split = np.bincount(pieces.slot, minlength=len(counts)) > 1
    assert split.sum() <= len(sizes) - 1 and split[4]  # the 30-sequence unit spans several partitions
    with pytest.raises(ValueError, match="partitions hold 50 sequences, the units 54"):
        cut_pieces(counts, sizes[:-1].tolist() + [10])


def test_order_reads_each_piece_in_one_window_of_its_partition():
    counts = np.full(40, 25)
    order = EpochOrder(counts, seed=3, epoch=1, shuffle=True, window_units=4, num_partitions=8, global_batch_size=16)
    pieces, _rows, windows = order.lookup(np.arange(order.num_sequences))
    assert (order.piece_window[pieces] == windows).all()
    assert len(order.piece_unit) <= 40 + 7  # at most P - 1 units are split
    part, _ = stream_positions(np.arange(order.num_sequences), global_batch_size=16, num_partitions=8, batch_phases=1)
    assert (order.piece_part[pieces] == part).all()
