"""KDCacheDataset on fake caches: exactly once, equal steps, deterministic order, O(1) resume, read-time choices."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from fake_cache import fake_logits, write_fake_cache
from torch.utils.data import DataLoader

from kdcache.errors import CacheMismatchError, CorruptShardError
from kdcache.read.dataset import KDCacheDataset
from kdcache.read.order import EpochOrder
from kdcache.read.partition import rank_positions
from kdcache.read.reader import open_cache

UNIT_SEQS = [4, 3, 5, 0, 7]  # 19 sequences: divides by none of the global batch sizes used below; one empty unit
VOCAB, K = 64, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("kd") / "cache")
    write_fake_cache(uri, num_units=len(UNIT_SEQS), seqs_per_unit=UNIT_SEQS, k=K, vocab=VOCAB, temperatures=(1.0, 2.0))
    return uri


@pytest.fixture(scope="module")
def sequences(cache) -> dict[int, dict]:
    return {int(s["seq_id"]): s for s in open_cache(cache).iter_sequences()}


def seq_ids(batches: list[dict]) -> list[list[int]]:
    return [b["seq_id"].tolist() for b in batches]


def run(ds: KDCacheDataset, num_workers: int = 0) -> list[dict]:
    return list(DataLoader(ds, batch_size=None, num_workers=num_workers))


def interleave(per_rank: list[list[list[int]]], num_partitions: int | None = None) -> list[int]:
    """The global order seen by all ranks: each rank's rows put back at their positions of each global batch
    (`kdcache.read.partition.rank_positions`; num_partitions defaults to the world size, as in the dataset)."""
    world = len(per_rank)
    out = []
    for b, batches in enumerate(zip(*per_rank)):
        bs = len(batches[0])
        rows = [0] * (bs * world)
        for rank, part in enumerate(batches):
            kw = {"batch_size": bs, "world_size": world, "num_partitions": num_partitions or world}
            for pos, i in zip(rank_positions(b, rank=rank, **kw).tolist(), part):
                rows[pos - b * bs * world] = i
        out += rows
    return out


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once_and_equal_steps(cache, sequences, world_size, num_workers, drop_last):
    n, bs = sum(UNIT_SEQS), 2
    global_bs = bs * world_size
    per_rank = []
    for rank in range(world_size):
        ds = KDCacheDataset(cache, batch_size=bs, rank=rank, world_size=world_size, drop_last=drop_last, seed=3)
        batches = run(ds, num_workers)
        assert len(batches) == len(ds)
        for b in batches:
            pad = b["seq_id"] < 0
            assert not b["attention_mask"][pad].any() and not b["loss_mask"][pad].any()
            assert (b["labels"][pad] == -100).all()
        per_rank.append(seq_ids(batches))
    counts = {len(batches) for batches in per_rank}
    expected = n // global_bs if drop_last else -(-n // global_bs)
    assert counts == {expected}  # equal steps on every rank: DDP cannot hang
    seen = [i for i in interleave(per_rank) if i >= 0]
    assert len(seen) == len(set(seen))  # no duplicates across ranks and workers
    all_ids = set(sequences)
    if drop_last:
        assert len(seen) == expected * global_bs and set(seen) <= all_ids
    else:
        assert set(seen) == all_ids


def test_order_ignores_ranks_and_workers(cache):
    """With num_partitions fixed, the same global batch size over 1, 2 or 3 ranks (any worker count) covers the same
    sequences in order (by default num_partitions is the world size, so the order is a function of it)."""
    orders = []
    for world_size, bs, workers in [(1, 6, 0), (2, 3, 2), (3, 2, 0), (3, 2, 2)]:
        kw = {"batch_size": bs, "world_size": world_size, "seed": 5, "num_partitions": 6}
        per_rank = [seq_ids(run(KDCacheDataset(cache, rank=r, **kw), workers)) for r in range(world_size)]
        orders.append(interleave(per_rank, num_partitions=6))
    assert all(order == orders[0] for order in orders)


def test_deterministic_and_epoch_dependent(cache):
    ds = KDCacheDataset(cache, batch_size=3, seed=11)
    first, again, workers = seq_ids(run(ds)), seq_ids(run(ds)), seq_ids(run(ds, num_workers=2))
    assert first == again == workers
    ds.set_epoch(1)
    epoch1 = seq_ids(run(ds))
    assert epoch1 != first and sorted(sum(epoch1, [])) == sorted(sum(first, []))
    assert seq_ids(run(KDCacheDataset(cache, batch_size=3, seed=11, epoch=1))) == epoch1
    assert seq_ids(run(KDCacheDataset(cache, batch_size=3, seed=12))) != first


def test_no_shuffle_is_manifest_order(cache, sequences):
    ds = KDCacheDataset(cache, batch_size=4, shuffle=False)
    assert [i for i in sum(seq_ids(run(ds)), []) if i >= 0] == list(sequences)


@pytest.mark.parametrize("partitions, phases", [(1, 1), (2, 1), (3, 2)])
def test_windows_mix_only_their_pieces(partitions, phases):
    counts = [3, 4, 5, 6, 7, 0, 2]
    order = EpochOrder(
        counts,
        seed=1,
        epoch=0,
        shuffle=True,
        window_units=2,
        num_partitions=partitions,
        batch_phases=phases,
        global_batch_size=4,
    )
    pieces, rows, windows = order.lookup(np.arange(order.num_sequences))
    for w in range(order.num_windows):
        mine = np.arange(order.window_first_piece[w], order.window_first_piece[w + 1])
        assert set(pieces[windows == w].tolist()) == set(mine.tolist())  # every piece of the window, nothing else
        assert len(mine) <= 2 and set(order.piece_part[mine].tolist()) == {order.window_part[w]}
    units = order.piece_unit[pieces]
    assert ((rows >= order.piece_start[pieces]) & (rows < order.piece_stop[pieces])).all()
    pairs = set(zip(units.tolist(), rows.tolist()))
    assert pairs == {(u, i) for u, c in enumerate(counts) for i in range(c)}  # a permutation of all sequences


def test_batches_match_the_cache(cache, sequences):
    """Rows, labels, masks and targets are the cached sequence, padded."""
    for b in run(KDCacheDataset(cache, batch_size=4, seed=2)):
        length = b["input_ids"].shape[1]
        for row, sid in enumerate(b["seq_id"].tolist()):
            if sid < 0:
                continue
            seq, n = sequences[sid], len(sequences[sid]["input_ids"])
            assert b["input_ids"][row, :n].tolist() == seq["input_ids"].tolist()
            assert b["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
            assert b["loss_mask"][row].tolist() == [True] * n + [False] * (length - n)
            assert b["labels"][row].tolist() == seq["input_ids"][1:].tolist() + [-100] * (length - n + 1)
            assert torch.equal(b["target_ids"][row, :n], torch.from_numpy(seq["target_ids"]))
            assert torch.equal(b["target_logprobs"][row, :n], torch.from_numpy(seq["target_logprobs"]))
            assert torch.equal(b["tail_logprob"][row, :n], torch.from_numpy(seq["tail_logprob"]))
            assert torch.isneginf(b["target_logprobs"][row, n:]).all()
        assert b["temperatures"] == [1.0, 2.0] and b["teacher_vocab_size"] == VOCAB


def test_pad_to(cache):
    batches = run(KDCacheDataset(cache, batch_size=4, pad_to=12))
    assert {tuple(b["input_ids"].shape) for b in batches} == {(4, 12)}
    with pytest.raises(ValueError, match="more than pad_to=3"):
        run(KDCacheDataset(cache, batch_size=4, pad_to=3))


# ------------------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_batch_index(cache, num_workers):
    full = seq_ids(run(KDCacheDataset(cache, batch_size=2, seed=4, epoch=1)))
    ds = KDCacheDataset(cache, batch_size=2, seed=4, epoch=1)
    head = []
    for batch in DataLoader(ds, batch_size=None, num_workers=num_workers):
        head.append(batch["seq_id"].tolist())
        if len(head) == 4:
            state = ds.state_after(int(batch["batch_index"]) + 1)  # counted at the consumer
            break
    assert state["epoch"] == 1 and state["global_batches_done"] == 4
    resumed = KDCacheDataset(cache, batch_size=2, seed=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the training loop's call for the resumed epoch keeps the resume point
    assert head + seq_ids(run(resumed, num_workers)) == full
    resumed.set_epoch(2)  # the next epoch starts at its beginning
    assert len(run(resumed)) == len(full)


def test_state_dict_counts_in_process(cache):
    full = seq_ids(run(KDCacheDataset(cache, batch_size=3, seed=1)))
    ds = KDCacheDataset(cache, batch_size=3, seed=1)
    it = iter(ds)
    head = [next(it)["seq_id"].tolist() for _ in range(2)]
    state = ds.state_dict()
    it.close()
    assert state["global_batches_done"] == 2 and {"epoch", "seed"} <= set(state)
    ds2 = KDCacheDataset(cache, batch_size=3, seed=1)
    ds2.load_state_dict(state)
    assert head + seq_ids(run(ds2)) == full


def test_resume_with_another_world_size(cache):
    """2 ranks x batch 2 for three steps, then 1 rank x batch 4: the global order continues exactly (the resumed
    epoch keeps the 2 partitions it started with)."""
    uninterrupted = KDCacheDataset(cache, batch_size=4, seed=9, num_partitions=2)
    whole = [i for i in sum(seq_ids(run(uninterrupted)), []) if i >= 0]
    per_rank, states = [], []
    for rank in range(2):
        ds = KDCacheDataset(cache, batch_size=2, rank=rank, world_size=2, seed=9)
        batches = run(ds)[:3]
        per_rank.append(seq_ids(batches))
        states.append(ds.state_after(int(batches[-1]["batch_index"]) + 1))
    assert states[0] == states[1]
    resumed = KDCacheDataset(cache, batch_size=4, rank=0, world_size=1, seed=9)
    resumed.load_state_dict(states[0])
    rest = sum(seq_ids(run(resumed)), [])
    assert [i for i in interleave(per_rank) + rest if i >= 0] == whole
    assert states[0]["num_partitions"] == 2 and resumed.num_partitions == 2
    resumed.set_epoch(1)  # the next epoch: the world size of now
    assert resumed.num_partitions == 1
    with pytest.raises(ValueError, match="num_partitions=2"):
        KDCacheDataset(cache, batch_size=4, seed=9, num_partitions=4).load_state_dict(states[0])
    with pytest.raises(ValueError, match="global_batch_size"):
        KDCacheDataset(cache, batch_size=3, seed=9).load_state_dict(states[0])
    with pytest.raises(ValueError, match="seed"):
        KDCacheDataset(cache, batch_size=4, seed=8).load_state_dict(states[0])


def test_state_of_the_order_before_partitions_is_refused(cache):
    ds = KDCacheDataset(cache, batch_size=2, seed=4)
    old = {**ds.state_after(3), "version": 1}
    with pytest.raises(ValueError, match=r"version 1: it was saved by the order before partitioned .*set_epoch\(0\)"):
        ds.load_state_dict(old)


def test_resume_reads_no_skipped_unit(cache):
    """Resuming at the last batch decodes only the unit it needs: skipping is index arithmetic."""
    ds = KDCacheDataset(cache, batch_size=2, shuffle=False, shuffle_window_units=1, prefetch_units=0)
    loaded = []
    original = ds._load_unit
    ds._load_unit = lambda source, index: loaded.append(index) or original(source, index)
    ds.load_state_dict(ds.state_after(len(ds) - 1))
    (last,) = run(ds)
    assert loaded == [4] and last["seq_id"].tolist() == [last["seq_id"][0].item(), -1]


def test_stateful_dataloader_resume(cache):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    full = seq_ids(run(KDCacheDataset(cache, batch_size=2, seed=6)))
    loader = stateful.StatefulDataLoader(KDCacheDataset(cache, batch_size=2, seed=6), batch_size=None, num_workers=2)
    head = []
    for batch in loader:
        head.append(batch["seq_id"].tolist())
        if len(head) == 3:
            state = loader.state_dict()
            break
    del loader
    loader = stateful.StatefulDataLoader(KDCacheDataset(cache, batch_size=2, seed=6), batch_size=None, num_workers=2)
    loader.load_state_dict(state)
    assert head + seq_ids(list(loader)) == full


# ------------------------------------------------------------------------------------------------------------------
# Read-time choices


def dense_reference(sid: int, length: int, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(fake_logits(sid, length, VOCAB).double() / temperature, dim=-1)


def real_rows(batch: dict):
    for row, sid in enumerate(batch["seq_id"].tolist()):
        if sid >= 0:
            yield row, sid, int(batch["attention_mask"][row].sum())


def complement_logsumexp(dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return dense.scatter(-1, ids, float("-inf")).logsumexp(-1)


def test_top_k_keeps_the_largest_and_folds_the_tail(cache, sequences):
    for b in run(KDCacheDataset(cache, batch_size=4, top_k=3)):
        assert b["target_ids"].shape[-1] == 3
        for row, sid, n in real_rows(b):
            ids, lps = b["target_ids"][row, :n], b["target_logprobs"][row, :n]
            assert (ids[:, 1:] > ids[:, :-1]).all()  # still ascending by id
            stored = torch.from_numpy(sequences[sid]["target_logprobs"])
            assert torch.allclose(lps.sort(-1).values, stored.topk(3, -1).values.sort(-1).values)
            for j, t in enumerate([1.0, 2.0]):
                tail = complement_logsumexp(dense_reference(sid, n, t), ids)  # exact dense tail outside the 3 ids
                assert torch.allclose(b["tail_logprobs"][row, :n, j].double(), tail, atol=0.03)
            assert torch.equal(b["tail_logprob"][row, :n], b["tail_logprobs"][row, :n, 0])


def test_stored_temperature_is_exact(cache, sequences):
    for top_k in (None, 4):
        for b in run(KDCacheDataset(cache, batch_size=4, temperature=2.0, top_k=top_k)):
            assert b["temperatures"] == [1.0, 0.5]  # re-based: the batch describes the teacher at T = 2
            for row, sid, n in real_rows(b):
                dense = dense_reference(sid, n, 2.0)
                ids = b["target_ids"][row, :n]
                # exact up to the codec: each stored log-prob's quantization error at T = 1, halved at T = 2
                seq = sequences[sid]
                stored_ids = torch.from_numpy(seq["target_ids"])
                error_t1 = (
                    torch.from_numpy(seq["target_logprobs"]).double() - dense_reference(sid, n).gather(-1, stored_ids)
                ).abs()
                bound = error_t1.gather(-1, torch.searchsorted(stored_ids, ids)) / 2 + 1e-4
                assert ((b["target_logprobs"][row, :n].double() - dense.gather(-1, ids)).abs() <= bound).all()
                assert torch.allclose(b["tail_logprob"][row, :n].double(), complement_logsumexp(dense, ids), atol=0.03)
                # entry 1 (0.5 relative to T = 2) is the teacher at T = 1
                assert torch.allclose(
                    b["log_normalizers"][row, :n, 1].double(),
                    fake_logits(sid, n, VOCAB).double().logsumexp(-1),
                    atol=1e-4,
                )


def test_stored_temperature_matches_the_loss_at_that_temperature(cache):
    losses = pytest.importorskip("kdcache.losses")
    plain = run(KDCacheDataset(cache, batch_size=4, seed=1))
    tempered = run(KDCacheDataset(cache, batch_size=4, seed=1, temperature=2.0))
    for a, b in zip(plain, tempered):
        logits = torch.randn(*a["input_ids"].shape, VOCAB, generator=torch.Generator().manual_seed(0))
        expected = losses.forward_kl_tail(logits, a, temperature=2.0)
        assert torch.allclose(losses.forward_kl_tail(logits / 2.0, b), expected, atol=1e-5)


def test_unstored_temperature_warns_and_renormalizes(cache):
    with pytest.warns(UserWarning, match="temperature 3.0 is not cached"):
        ds = KDCacheDataset(cache, batch_size=4, temperature=3.0)
    for b in run(ds):
        assert b["temperatures"] == [1.0]
        for row, sid, n in real_rows(b):
            ids = b["target_ids"][row, :n]
            head = torch.log_softmax(fake_logits(sid, n, VOCAB).double().gather(-1, ids) / 3.0, -1)
            assert torch.allclose(b["target_logprobs"][row, :n].double(), head, atol=0.02)
            assert torch.isneginf(b["tail_logprob"][row, :n]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KDCacheDataset(cache, batch_size=4, temperature=2.0)  # a cached temperature: silent


def test_bad_top_k(cache):
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, 8\]"):
        KDCacheDataset(cache, batch_size=2, top_k=9)


# ------------------------------------------------------------------------------------------------------------------
# Student checks and failures


def test_student_vocab_check(tmp_path):
    uri = str(tmp_path / "c")
    write_fake_cache(uri, num_units=1, seqs_per_unit=2, k=4, vocab=128, tokenizer_vocab=100)
    with pytest.raises(CacheMismatchError, match="student vocab 96 < teacher padded vocab 128"):
        KDCacheDataset(uri, batch_size=1, student_vocab_size=96)
    KDCacheDataset(uri, batch_size=1, student_vocab_size=128)
    KDCacheDataset(uri, batch_size=1, student_vocab_size=160)  # extra student columns are fine
    with pytest.raises(CacheMismatchError, match="student tokenizer vocab 90 != teacher tokenizer vocab 100"):
        KDCacheDataset(uri, batch_size=1, tokenizer=list(range(90)))
    KDCacheDataset(uri, batch_size=1, tokenizer=list(range(100)))


def test_tokenizer_hash_check(tmp_path):
    from tiny_models import build_tiny_tokenizer
    from transformers import AutoTokenizer

    from kdcache.identity import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok", vocab_size=96))
    size = len(tok)
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    fp = tokenizer_fingerprint(tok)["hash"]
    write_fake_cache(same, num_units=1, seqs_per_unit=1, k=4, vocab=128, tokenizer_vocab=size, tokenizer_hash=fp)
    write_fake_cache(
        other, num_units=1, seqs_per_unit=1, k=4, vocab=128, tokenizer_vocab=size, tokenizer_hash="x" * 64
    )
    KDCacheDataset(same, batch_size=1, tokenizer=tok, student_vocab_size=128)
    with pytest.raises(CacheMismatchError, match=f"student tokenizer hash .* \\(both vocab {size}\\)"):
        KDCacheDataset(other, batch_size=1, tokenizer=tok)


def test_corrupt_shard_fails_naming_it(tmp_path):
    uri = str(tmp_path / "c")
    manifest = write_fake_cache(uri, num_units=2, seqs_per_unit=3)
    path = tmp_path / "c" / manifest["units"][1]["path"]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=manifest["units"][1]["path"]):
        run(KDCacheDataset(uri, batch_size=2, shuffle=False))


def test_early_stop_leaves_no_threads(cache):
    before = threading.active_count()
    ds = KDCacheDataset(cache, batch_size=1)
    for _ in zip(range(2), ds):
        pass
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_topology_arguments(cache):
    with pytest.raises(ValueError, match="both rank and world_size"):
        KDCacheDataset(cache, batch_size=2, rank=0)
    with pytest.raises(ValueError, match="rank must lie"):
        KDCacheDataset(cache, batch_size=2, rank=2, world_size=2)
    ds = KDCacheDataset(cache, batch_size=2)
    assert (ds.rank, ds.world_size) == (0, 1)  # torch.distributed is not initialized here


def test_rank_is_fixed_when_pickled_for_spawned_workers(cache, monkeypatch):
    """Built before init_process_group, pickled (spawned DataLoader workers) after: the copy has the group's rank."""
    import pickle

    ds = KDCacheDataset(cache, batch_size=2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    copy = pickle.loads(pickle.dumps(ds))
    monkeypatch.undo()
    assert (copy.rank, copy.world_size) == (1, 2)
