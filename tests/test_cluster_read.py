"""Reading at cluster scale over a byte-counting HTTP server: 8 ranks fetch the cache about once per epoch (not 8
times), every sequence exactly once, equal steps; resume from 4 ranks at 8 and at 2; workers, nodes and resumes
that reuse what a node already holds."""

from __future__ import annotations

import json
import multiprocessing
import sys
import threading
import weakref
from pathlib import Path

import pytest
from fake_cache import write_fake_cache
from torch.utils.data import DataLoader

from kdcache.read.dataset import KDCacheDataset
from kdcache.read.partition import rank_positions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from counting_server import CountingServer  # noqa: E402

UNITS = 64
UNIT_SEQS = [18 + (u * 5) % 11 for u in range(UNITS)]  # 64 units of 18-28 sequences: 1,470 sequences
SHARDS = "cache/shards/"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, cache URL over HTTP, the cache's shard bytes)."""
    root = tmp_path_factory.mktemp("served")
    manifest = write_fake_cache(str(root / "cache"), num_units=UNITS, seqs_per_unit=UNIT_SEQS, k=8, vocab=64)
    with CountingServer(str(root)) as server:
        yield server, f"{server.url}/cache", sum(u["bytes"] for u in manifest["units"])


def read_ranks(uri: str, world: int, batch_size: int, state: dict | None = None, **kwargs) -> list[list[dict]]:
    """Every rank's batches, ranks simulated one after the other in this process."""
    out = []
    for rank in range(world):
        ds = KDCacheDataset(uri, batch_size=batch_size, rank=rank, world_size=world, seed=7, **kwargs)
        if state is not None:
            ds.load_state_dict(state)
        out.append(list(DataLoader(ds, batch_size=None)))
    return out


def global_order(per_rank: list[list[dict]], num_partitions: int) -> list[int]:
    """seq_ids of all ranks at their positions of each global batch (padding dropped)."""
    world, out = len(per_rank), []
    for batches in zip(*per_rank):
        b, bs = int(batches[0]["batch_index"]), len(batches[0]["seq_id"])
        rows = [0] * (bs * world)
        for rank, batch in enumerate(batches):
            pos = rank_positions(b, rank=rank, batch_size=bs, world_size=world, num_partitions=num_partitions)
            for p, i in zip((pos - b * bs * world).tolist(), batch["seq_id"].tolist()):
                rows[p] = i
        out += [i for i in rows if i >= 0]
    return out


def test_eight_ranks_fetch_the_cache_about_once(served):
    server, uri, cache_bytes = served
    server.reset()
    per_rank = read_ranks(uri, 8, batch_size=4)
    fetched = server.sent_bytes(SHARDS) / cache_bytes
    assert 1.0 <= fetched <= 1.15, fetched
    assert len({len(batches) for batches in per_rank}) == 1  # equal steps
    seen = [i for batches in per_rank for b in batches for i in b["seq_id"].tolist() if i >= 0]
    assert len(seen) == len(set(seen)) == sum(UNIT_SEQS)  # every sequence exactly once


def test_resume_from_four_ranks_continues_exactly_at_eight_and_at_two(served):
    server, uri, cache_bytes = served
    whole = global_order(read_ranks(uri, 4, batch_size=8), num_partitions=4)
    assert sorted(whole) == sorted(set(whole)) and len(whole) == sum(UNIT_SEQS)
    head = [batches[:10] for batches in read_ranks(uri, 4, batch_size=8)]
    ds = KDCacheDataset(uri, batch_size=8, rank=0, world_size=4, seed=7)
    state = json.loads(json.dumps(ds.state_after(10)))  # as a checkpoint would store it
    consumed = global_order(head, num_partitions=4)
    for world, batch_size in [(8, 4), (2, 16)]:
        server.reset()
        rest = read_ranks(uri, world, batch_size=batch_size, state=state)
        assert len({len(batches) for batches in rest}) == 1
        assert consumed + global_order(rest, num_partitions=4) == whole  # the same global order, continued
        # 2 ranks read 2 partitions each, disjoint; at 8 ranks pairs of ranks share a partition
        assert server.sent_bytes(SHARDS) <= (1.15 if world == 2 else 2.3) * cache_bytes


def test_workers_dividing_batch_phases_read_disjoint_units(served):
    server, uri, cache_bytes = served
    fetched = {}
    for phases in (1, 2):
        server.reset()
        ds = KDCacheDataset(uri, batch_size=4, rank=0, world_size=2, seed=7, batch_phases=phases)
        loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
        ids = [i for b in loader for i in b["seq_id"].tolist() if i >= 0]
        assert len(ids) == len(set(ids))
        fetched[phases] = server.sent_bytes(SHARDS) / cache_bytes
    assert fetched[2] <= 0.5 * 1.15 and fetched[1] >= 0.9  # rank 0 of 2: half the cache, once vs once per worker


def test_forked_workers_leave_the_parents_connections_working(served):
    """A forked DataLoader worker reopens the cache (an async filesystem cannot cross a fork) and leaves the copy of
    the parent's alone: closing it would unregister the parent's pooled sockets from their shared epoll instance, and
    the parent's next read over them would hang until aiohttp's 5-minute timeout."""
    _server, uri, _ = served
    for _ in range(2):
        ds = KDCacheDataset(uri, batch_size=4, rank=0, world_size=4, seed=7)  # a quarter of the cache, to be quick
        assert len(list(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"))) == len(ds)
        opened = threading.Event()
        thread = threading.Thread(
            target=lambda opened=opened: KDCacheDataset(uri, batch_size=4) and opened.set(), daemon=True
        )
        thread.start()
        thread.join(timeout=30)
        assert opened.is_set(), "the parent's read of index.json hangs after the forked workers exited"


def test_ranks_of_a_node_share_a_partition_through_its_local_cache(served, tmp_path):
    """8 ranks on 2 nodes resumed from a 4-partition state: the 2 ranks of a partition are neighbours on one node,
    so with a local cache per node the node fetches each shard once."""
    server, uri, cache_bytes = served
    fetched = {}
    for local in (False, True):
        server.reset()
        for rank in range(8):
            kw = {"local_cache_dir": str(tmp_path / f"node{rank // 4}"), "local_cache_bytes": 2**30} if local else {}
            ds = KDCacheDataset(uri, batch_size=4, rank=rank, world_size=8, seed=7, num_partitions=4, **kw)
            list(DataLoader(ds, batch_size=None))
        fetched[local] = server.sent_bytes(SHARDS) / cache_bytes
    assert fetched[False] >= 1.8 and fetched[True] <= 1.15, fetched


def test_a_resumed_rank_finds_its_open_windows_on_the_node(served, tmp_path):
    """Stopped mid-epoch and resumed on the same nodes at the same world size: the ranks read the same partitions,
    so what was fetched before the stop is read from the node's disk; the epoch costs about one cache in all."""
    server, uri, cache_bytes = served
    server.reset()
    states = []
    for rank in range(4):
        kw = {"local_cache_dir": str(tmp_path / f"node{rank // 2}"), "local_cache_bytes": 2**30}
        ds = KDCacheDataset(uri, batch_size=4, rank=rank, world_size=4, seed=7, **kw)
        for batch in DataLoader(ds, batch_size=None):
            if int(batch["batch_index"]) == 40:
                states.append(ds.state_after(41))
                break  # the job stops here; prefetch threads had loaded more
    for rank in range(4):
        kw = {"local_cache_dir": str(tmp_path / f"node{rank // 2}"), "local_cache_bytes": 2**30}
        ds = KDCacheDataset(uri, batch_size=4, rank=rank, world_size=4, seed=7, **kw)
        ds.load_state_dict(states[rank])
        list(DataLoader(ds, batch_size=None))
    assert server.sent_bytes(SHARDS) / cache_bytes <= 1.15


@pytest.mark.parametrize("world, partitions", [(1, 1), (2, 4)])
def test_memory_is_bounded_by_the_window_not_the_cache(served, world, partitions):
    """Decoded units alive at once stay within two windows of each partition the rank reads plus the prefetch depth,
    however many units the epoch reads."""
    _server, uri, _ = served
    ds = KDCacheDataset(uri, batch_size=4, rank=0, world_size=world, seed=7, num_partitions=partitions)
    ds.shuffle_window_units, ds.prefetch_units = 2, 2
    lock, counts = threading.Lock(), {"alive": 0, "peak": 0, "loads": 0}
    original = ds._load_unit

    def dropped() -> None:
        with lock:
            counts["alive"] -= 1

    def load(source: int, index: int):
        rows = original(source, index)
        with lock:
            counts["alive"] += 1
            counts["loads"] += 1
            counts["peak"] = max(counts["peak"], counts["alive"])
        weakref.finalize(rows, dropped)
        return rows

    ds._load_unit = load
    assert len(list(ds)) == len(ds)
    bound = 2 * 2 * (partitions // world) + 2  # two windows of 2 pieces per partition of the rank, 2 ahead
    assert counts["peak"] <= bound and counts["loads"] >= 3 * bound, counts


def _rank_process(uri: str, rank: int, world: int, out: str) -> None:
    ds = KDCacheDataset(uri, batch_size=4, rank=rank, world_size=world, seed=7)
    ids = [[int(i) for i in b["seq_id"].tolist()] for b in DataLoader(ds, batch_size=None)]
    Path(out, f"rank{rank}.json").write_text(json.dumps(ids))


def test_eight_processes_fetch_the_cache_about_once(served, tmp_path):
    server, uri, cache_bytes = served
    server.reset()
    ctx = multiprocessing.get_context("fork")  # the server thread stays in this process; ranks only read
    procs = [ctx.Process(target=_rank_process, args=(uri, r, 8, str(tmp_path))) for r in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 8
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(8)]
    assert len({len(ids) for ids in per_rank}) == 1
    seen = [i for ids in per_rank for batch in ids for i in batch if i >= 0]
    assert len(seen) == len(set(seen)) == sum(UNIT_SEQS)
    assert server.sent_bytes(SHARDS) / cache_bytes <= 1.15
