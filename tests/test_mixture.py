"""Mixtures of caches (kdcache.read.mixture through KDCacheDataset): 0.7 / 0.3 of an epoch of 10,000 sequences, the
batch says where each row came from, repeat / choose counts, exact resume on another world size, incompatible caches
refused."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from fake_cache import write_fake_cache

from kdcache.errors import CacheMismatchError
from kdcache.read.dataset import KDCacheDataset
from kdcache.read.mixture import Mixture, Source, epoch_units, sequences_per_epoch
from kdcache.read.partition import rank_positions

WEB_UNITS, WEB_SEQS = 100, 30  # 3,000 sequences
CODE_UNITS, CODE_SEQS = 80, 25  # 2,000 sequences


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mix")
    small = {"k": 4, "vocab": 32, "min_len": 3, "max_len": 6}
    write_fake_cache(str(root / "web"), num_units=WEB_UNITS, seqs_per_unit=WEB_SEQS, seed=1, **small)
    write_fake_cache(str(root / "code"), num_units=CODE_UNITS, seqs_per_unit=CODE_SEQS, seed=2, **small)
    write_fake_cache(str(root / "other_tok"), num_units=2, seqs_per_unit=3, seed=3, tokenizer_hash="x", **small)
    write_fake_cache(str(root / "k8"), num_units=2, seqs_per_unit=3, seed=4, **{**small, "k": 8})
    return {name: str(root / name) for name in ("web", "code", "other_tok", "k8")}


def ids_of(uri: str) -> set[int]:
    from kdcache.read.reader import open_cache

    return {int(s["seq_id"]) for s in open_cache(uri).iter_sequences()}


def rows(batches: list[dict]) -> list[tuple[int, int]]:
    """(source, seq_id) of every real row, in order."""
    out = []
    for b in batches:
        out += [(s, i) for s, i in zip(b["source"].tolist(), b["seq_id"].tolist()) if i >= 0]
    return out


def global_rows(per_rank: list[list[dict]], num_partitions: int) -> list[tuple[int, int]]:
    """(source, seq_id) of all ranks' rows at their positions of each global batch."""
    world, out = len(per_rank), []
    for batches in zip(*per_rank):
        b, bs = int(batches[0]["batch_index"]), len(batches[0]["seq_id"])
        slots = [(-1, -1)] * (bs * world)
        for rank, batch in enumerate(batches):
            pos = rank_positions(b, rank=rank, batch_size=bs, world_size=world, num_partitions=num_partitions)
            for p, row in zip(
                (pos - b * bs * world).tolist(), zip(batch["source"].tolist(), batch["seq_id"].tolist())
            ):
                slots[p] = row
        out += [row for row in slots if row[1] >= 0]
    return out


def test_weights_give_their_shares_of_an_epoch(caches):
    mix = Mixture([Source(caches["web"], weight=0.7), Source(caches["code"], weight=0.3)], epoch_sequences=10_000)
    ds = KDCacheDataset(mix, batch_size=50, seed=3)
    got = rows(list(ds))
    assert len(got) == len(ds) * 50 == 10_000
    share = sum(s == 0 for s, _ in got) / len(got)
    assert abs(share - 0.7) <= 0.02
    for half in (got[:5000], got[5000:]):  # mixed along the epoch, not one cache after the other
        assert abs(sum(s == 0 for s, _ in half) / len(half) - 0.7) <= 0.05
    web, code = ids_of(caches["web"]), ids_of(caches["code"])
    web_counts = Counter(i for s, i in got if s == 0)
    code_counts = Counter(i for s, i in got if s == 1)
    assert set(web_counts) == web and set(code_counts) == code  # the batch names the right cache
    assert set(web_counts.values()) == {2, 3} and sum(web_counts.values()) == 7000  # 7,000 of 3,000: 2 or 3 times
    assert set(code_counts.values()) == {1, 2} and sum(code_counts.values()) == 3000


def test_repeat_and_choose_counts(caches):
    mix = Mixture([Source(caches["web"], repeat=0.5), Source(caches["code"], choose=300)])
    ds = KDCacheDataset(mix, batch_size=64, seed=1)
    assert ds.num_sequences == 1800
    got = rows(list(ds))
    assert Counter(s for s, _ in got) == {0: 1500, 1: 300}
    assert len(set(got)) == len(got)  # under one pass per source, nothing repeats
    ds.set_epoch(1)
    units0, _ = ds.epoch_order(0)
    units1, _ = ds.epoch_order(1)
    assert not np.array_equal(units0.unit, units1.unit)  # another subset each epoch
    again, _ = KDCacheDataset(mix, batch_size=64, seed=1).epoch_order(1)
    assert np.array_equal(again.unit, units1.unit) and again.subsets.keys() == units1.subsets.keys()


def test_mixture_resumes_exactly_on_another_world_size(caches):
    mix = [(caches["web"], 0.7), (caches["code"], 0.3)]  # the list form
    uninterrupted = [list(KDCacheDataset(mix, batch_size=25, rank=r, world_size=2, seed=5)) for r in range(2)]
    whole = global_rows(uninterrupted, num_partitions=2)
    head = [batches[:40] for batches in uninterrupted]
    state = KDCacheDataset(mix, batch_size=25, rank=1, world_size=2, seed=5).state_after(40)
    resumed = KDCacheDataset(mix, batch_size=50, seed=5)
    resumed.load_state_dict(state)
    assert global_rows(head, 2) + global_rows([list(resumed)], 2) == whole
    with pytest.raises(CacheMismatchError, match="mixture-"):  # another mixture is another dataset
        KDCacheDataset([(caches["web"], 0.6), (caches["code"], 0.4)], batch_size=50, seed=5).load_state_dict(state)


def test_single_cache_rows_come_from_source_zero(caches):
    batch = next(iter(KDCacheDataset(caches["code"], batch_size=4)))
    assert batch["source"].tolist() == [0, 0, 0, 0]


def test_incompatible_caches_and_bad_mixtures_are_refused(caches):
    with pytest.raises(CacheMismatchError, match=r"other_tok has tokenizer hash 'x'.*must share the tokenizer"):
        KDCacheDataset([(caches["web"], 1.0), (caches["other_tok"], 1.0)], batch_size=2)
    with pytest.raises(CacheMismatchError, match="targets k"):
        KDCacheDataset([(caches["web"], 1.0), (caches["k8"], 1.0)], batch_size=2)
    with pytest.raises(ValueError, match="every source a weight or none"):
        Mixture([Source(caches["web"], weight=0.5), Source(caches["code"], repeat=2.0)])
    with pytest.raises(ValueError, match="at most one of weight, repeat, choose"):
        Source(caches["web"], weight=0.5, choose=10)
    with pytest.raises(ValueError, match="weight must be > 0"):
        Source(caches["web"], weight=0.0)
    with pytest.raises(ValueError, match="epoch_sequences"):
        Mixture([caches["web"]], epoch_sequences=10)


def test_sequences_per_epoch_round_to_the_total():
    mix = Mixture([Source("a", weight=1), Source("b", weight=1), Source("c", weight=1)], epoch_sequences=100)
    assert sequences_per_epoch([10, 10, 10], mix) == [34, 33, 33]
    units = epoch_units([np.array([4, 0, 6]), np.array([5, 5])], [13, 3], seed=0, epoch=0)
    assert units.count.sum() == 16 and np.bincount(units.source, weights=units.count).tolist() == [13, 3]
    for v, subset in units.subsets.items():  # partly read units: distinct sorted rows inside the unit
        assert len(subset) == units.count[v] and (np.diff(subset) > 0).all()
