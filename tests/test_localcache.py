"""The local disk cache of a remote cache's shards: hits skip the store, LRU eviction under the limit, corrupted copies
re-fetched, many processes on one directory, and batches identical to reading without it."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import uuid

import numpy as np
import pytest
import torch
from fake_cache import write_fake_cache
from torch.utils.data import DataLoader

from kdcache.read.dataset import KDCacheDataset
from kdcache.read.localcache import LocalShardCache
from kdcache.read.reader import CacheReader, open_cache

UNIT_SEQS = [3, 4, 2, 5, 3, 4]


@pytest.fixture(scope="module")
def remote() -> str:
    """A cache on memory:// (a remote store as far as the reader is concerned; forked processes see it too)."""
    uri = f"memory://kdlocal-{uuid.uuid4().hex[:8]}/cache"
    write_fake_cache(uri, num_units=len(UNIT_SEQS), seqs_per_unit=UNIT_SEQS, k=8, vocab=64, max_len=40)
    return uri


def counting(reader: CacheReader) -> list[str]:
    """Record every shard the reader fetches from its store."""
    fetched: list[str] = []
    original = reader.store.read_bytes

    def read_bytes(relpath: str) -> bytes:
        if relpath.startswith("shards/"):
            fetched.append(relpath)
        return original(relpath)

    reader.store.read_bytes = read_bytes
    return fetched


def sequences(reader: CacheReader) -> list[dict]:
    return list(reader.iter_sequences())


def assert_same_sequences(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def cached_files(directory) -> dict[str, int]:
    return {e.name: e.stat().st_size for e in os.scandir(directory) if len(e.name) == 64}


def test_hits_avoid_the_remote_read(remote, tmp_path):
    plain = sequences(open_cache(remote))
    first = open_cache(remote, local_cache_dir=str(tmp_path), local_cache_bytes=2**30)
    fetched = counting(first)
    assert_same_sequences(sequences(first), plain)
    assert len(fetched) == len(UNIT_SEQS) and first.local_cache.misses == len(UNIT_SEQS)
    assert set(cached_files(tmp_path)) == {u["sha256"] for u in first.units}
    again = open_cache(remote, local_cache_dir=str(tmp_path), local_cache_bytes=2**30)  # e.g. the next epoch's worker
    fetched = counting(again)
    assert_same_sequences(sequences(again), plain)
    assert fetched == [] and again.local_cache.hits == len(UNIT_SEQS)


def test_dataset_batches_are_identical_with_the_local_cache(remote, tmp_path):
    def batches(**kwargs) -> list[dict]:
        ds = KDCacheDataset(remote, batch_size=3, seed=1, **kwargs)
        return list(DataLoader(ds, batch_size=None))

    plain = batches()
    for _ in range(2):  # cold, then warm
        cached = batches(local_cache_dir=str(tmp_path), local_cache_bytes=2**30)
        assert len(cached) == len(plain)
        for a, b in zip(plain, cached):
            for key, value in a.items():
                assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key
    assert len(cached_files(tmp_path)) == len(UNIT_SEQS)


def test_lru_eviction_keeps_the_directory_under_the_limit(remote, tmp_path):
    units = open_cache(remote).units
    limit = sum(sorted(u["bytes"] for u in units)[-3:])  # room for any three shards, not four
    reader = open_cache(remote, local_cache_dir=str(tmp_path), local_cache_bytes=limit)
    for u in units[:3]:
        reader.read_unit_bytes(u)
        assert sum(cached_files(tmp_path).values()) <= limit
    assert len(cached_files(tmp_path)) == 3
    for age, u in enumerate(units[:3]):  # distinct use times whatever the filesystem's mtime resolution: 0 oldest
        os.utime(tmp_path / u["sha256"], (1000 + age, 1000 + age))
    reader.read_unit_bytes(units[0])  # a hit: unit 0 becomes the most recently used, unit 1 the least
    reader.read_unit_bytes(units[3])
    held = set(cached_files(tmp_path))
    assert units[1]["sha256"] not in held and {units[0]["sha256"], units[3]["sha256"]} <= held
    assert sum(cached_files(tmp_path).values()) <= limit and reader.local_cache.evicted >= 1
    for u in units:
        reader.read_unit_bytes(u)
        assert sum(cached_files(tmp_path).values()) <= limit


def test_a_shard_larger_than_the_limit_is_not_kept(remote, tmp_path):
    reader = open_cache(remote, local_cache_dir=str(tmp_path), local_cache_bytes=100)
    assert_same_sequences(sequences(reader), sequences(open_cache(remote)))
    assert cached_files(tmp_path) == {}


def test_corrupted_or_truncated_local_copies_are_fetched_again(remote, tmp_path):
    plain = sequences(open_cache(remote))
    sequences(open_cache(remote, local_cache_dir=str(tmp_path), local_cache_bytes=2**30))
    units = open_cache(remote).units
    flipped, truncated = tmp_path / units[1]["sha256"], tmp_path / units[4]["sha256"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    reader = open_cache(remote, local_cache_dir=str(tmp_path), local_cache_bytes=2**30)
    fetched = counting(reader)
    assert_same_sequences(sequences(reader), plain)
    assert sorted(fetched) == sorted([units[1]["path"], units[4]["path"]])
    assert reader.local_cache.corrupt == 2
    for name in cached_files(tmp_path):  # the copies were replaced by good ones
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == name


def _read_epochs(remote: str, directory: str, limit: int, epochs: int, out) -> None:
    """One 'rank': a dataset with 2 DataLoader workers and prefetch threads, on the shared directory."""
    try:
        ds = KDCacheDataset(remote, batch_size=2, seed=5, local_cache_dir=directory, local_cache_bytes=limit)
        result = []
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            result.append([b["target_ids"].sum().item() + b["seq_id"].sum().item() for b in DataLoader(ds, None)])
            result.append(
                [b["target_logprobs"].nan_to_num(neginf=0).sum().item() for b in DataLoader(ds, None, num_workers=2)]
            )
        out.put(result)
    except BaseException as exc:  # pragma: no cover - reported to the parent
        out.put(repr(exc))


def test_concurrent_processes_and_threads_share_one_directory(remote, tmp_path):
    """Three processes (each with 2 DataLoader workers and prefetch threads) and extra threads read through one
    directory whose limit forces evictions all the time: every result equals the uncached one, nothing partial or
    corrupt is served or left behind, and the directory ends under its limit."""
    units = open_cache(remote).units
    limit = sum(sorted(u["bytes"] for u in units)[-2:])
    directory = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("fork")  # children see the parent's memory:// store
    expected = ctx.Queue()
    _read_epochs(remote, str(tmp_path / "alone"), 2**30, 2, expected)
    reference = expected.get()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_read_epochs, args=(remote, directory, limit, 2, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            reader = open_cache(remote, local_cache_dir=directory, local_cache_bytes=limit)
            for _ in range(3):
                for u in units:
                    data = reader.read_unit_bytes(u)
                    assert hashlib.sha256(data).hexdigest() == u["sha256"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    results = [queue.get(timeout=300) for _ in procs]
    for t in threads:
        t.join()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert not errors, errors
    for result in results:
        assert result == reference
    files = cached_files(directory)
    assert sum(files.values()) <= limit
    assert not [n for n in os.listdir(directory) if n.startswith(".tmp-")]
    for name in files:
        assert hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest() == name


def test_local_paths_are_read_in_place(tmp_path):
    uri = str(tmp_path / "local")
    write_fake_cache(uri, num_units=2, seqs_per_unit=2)
    reader = open_cache(uri, local_cache_dir=str(tmp_path / "lc"), local_cache_bytes=2**30)
    assert reader.local_cache is None
    sequences(reader)
    assert not (tmp_path / "lc").exists()


def test_arguments(remote, tmp_path):
    with pytest.raises(ValueError, match="local_cache_bytes"):
        open_cache(remote, local_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="local_cache_bytes must be > 0"):
        LocalShardCache(str(tmp_path), 0)
    with pytest.raises(ValueError, match="sha256"):
        LocalShardCache(str(tmp_path), 10).get({"sha256": "../etc/passwd", "bytes": 1})
    (tmp_path / "notes.txt").write_text("not a shard")  # a stranger's file is neither counted nor evicted
    cache = LocalShardCache(str(tmp_path), 10)
    cache.put("ab" * 32, b"0123456789")
    cache.put("cd" * 32, b"0123456789")
    assert (tmp_path / "notes.txt").exists() and cache.total_bytes() == 10
