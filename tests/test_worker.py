"""Tests for kdcache.capture.worker without Ray: the pipelined `UnitWorker.process` writes the same shard as encoding
every batch after the forwards, errors on either thread stop the unit before anything is written, and `BatchEncoder`.

Run: ``python -m pytest tests/test_worker.py -q``
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from conftest import stdlib_texts, tiny_job_config, write_text_corpus

from kdcache.capture.plan import plan_units
from kdcache.capture.worker import BatchEncoder, UnitWorker, WorkerSettings, make_batches, pad_batch
from kdcache.formats import get_format
from kdcache.formats.base import TokenBuffer


@pytest.fixture(scope="module")
def unit_corpus(tmp_path_factory):
    """One jsonl file of documents longer than a window: several batches of mixed lengths in one unit."""
    return write_text_corpus(tmp_path_factory.mktemp("corpus"), [stdlib_texts(6, max_chars=1500)])


def make_worker(teacher, corpus, out, *extra: str) -> tuple[UnitWorker, dict]:
    cfg = tiny_job_config(teacher, corpus, out, "data.unit_bytes=1000000", "cluster.batch_tokens=192", *extra)
    worker = UnitWorker(WorkerSettings.from_config(cfg, "0" * 64), device="cpu")
    (unit,) = plan_units(cfg.data.source, "jsonl", unit_bytes=cfg.data.unit_bytes)
    return worker, unit.to_dict()


def serial_shard(worker: UnitWorker, unit: dict) -> bytes:
    """The shard as the worker wrote it before pipelining: every forward, then `add` in read order."""
    s = worker.settings
    writer = worker.shard_writer(unit)
    windows, _ = worker.read_windows(unit)
    lengths = [len(w.input_ids) for w in windows]
    per_window = {}
    for batch_index, batch in enumerate(make_batches(lengths, s.batch_tokens)):
        ids, mask = pad_batch([windows[i].input_ids for i in batch])
        head, samples = worker.compute(ids, mask, unit["unit_id"], batch_index)
        offset = 0
        for i in batch:
            rows = (offset, offset + lengths[i])
            per_window[i] = (head.rows(*rows), None if samples is None else samples.rows(*rows))
            offset += lengths[i]
    for i, w in enumerate(windows):
        text = None if w.token_text is None else (w.token_text, w.token_text_ends)  # targets.cross_tokenizer
        writer.add(w.seq_id, w.input_ids, *per_window[i], token_text=text)
    return writer.finish()


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("targets.mode=hybrid", "targets.head=4", "targets.samples=12"),
        ("output.format=zarr",),
    ],
    ids=["topk-parquet", "hybrid-parquet", "topk-zarr"],
)
def test_pipelined_process_writes_the_serial_shard(tiny_teacher, unit_corpus, tmp_path, extra) -> None:
    worker, unit = make_worker(tiny_teacher, unit_corpus, tmp_path / "out", *extra)
    record = worker.process(unit)
    windows, _ = worker.read_windows(unit)
    lengths = [len(w.input_ids) for w in windows]
    assert len(make_batches(lengths, worker.settings.batch_tokens)) >= 3  # really pipelined
    assert record["path"].endswith(get_format(worker.settings.output.format).SUFFIX)
    data = worker.store.read_bytes(record["path"])
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert data == serial_shard(worker, unit)
    assert record["num_sequences"] == len(windows) and record["num_tokens"] == sum(len(w.input_ids) for w in windows)
    timing = record["timing_s"]
    assert set(timing) == {"read", "forward", "encode", "encode_overlapped", "write", "total"}
    assert timing["encode_overlapped"] > 0 and timing["total"] >= timing["forward"]
    assert not [t for t in threading.enumerate() if t.name == "kdcache-encoder"]


def test_an_encoder_error_fails_the_unit_and_writes_nothing(tiny_teacher, unit_corpus, tmp_path, monkeypatch):
    worker, unit = make_worker(tiny_teacher, unit_corpus, tmp_path / "out")
    original, calls = TokenBuffer.encode_sequence, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("broken encoder (test)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TokenBuffer, "encode_sequence", failing)
    with pytest.raises(ValueError, match="broken encoder"):
        worker.process(unit)
    assert worker.store.list_names("shards") == [] and worker.store.list_names("commits") == []
    assert not [t for t in threading.enumerate() if t.name == "kdcache-encoder"]


def test_a_forward_error_stops_the_encoder_and_writes_nothing(tiny_teacher, unit_corpus, tmp_path, monkeypatch):
    worker, unit = make_worker(tiny_teacher, unit_corpus, tmp_path / "out")
    original = worker.compute

    def failing(ids, mask, unit_id, batch_index, target_mask=None):
        if batch_index == 2:
            raise RuntimeError("teacher failed (test)")
        return original(ids, mask, unit_id, batch_index, target_mask)

    monkeypatch.setattr(worker, "compute", failing)
    with pytest.raises(RuntimeError, match="teacher failed"):
        worker.process(unit)
    assert worker.store.list_names("shards") == [] and worker.store.list_names("commits") == []
    assert not [t for t in threading.enumerate() if t.name == "kdcache-encoder"]
    monkeypatch.undo()
    assert worker.process(unit)["num_tokens"] > 0  # the worker is still usable: the next attempt commits


def test_batch_encoder_keeps_order_and_bounds_its_queue() -> None:
    done, gate, waiting = [], threading.Event(), []
    encoder = BatchEncoder(lambda i: (gate.wait(), done.append(i)), max_queued=2)
    for i in range(3):  # one in encode (blocked on the gate), two queued
        encoder.submit(i)
    blocked = threading.Thread(target=lambda: (encoder.submit(3), waiting.append(True)))
    blocked.start()
    time.sleep(0.2)
    assert not waiting, "submit must block while max_queued items wait"
    gate.set()
    blocked.join(timeout=10)
    encoder.finish()
    assert waiting and done == [0, 1, 2, 3] and encoder.busy_s > 0


def test_batch_encoder_raises_its_error_on_submit_and_finish() -> None:
    done = []

    def encode(i: int) -> None:
        if i == 1:
            raise KeyError("item 1")
        done.append(i)

    encoder = BatchEncoder(encode)
    encoder.submit(0)
    encoder.submit(1)
    deadline = time.monotonic() + 10
    with pytest.raises(KeyError, match="item 1"):
        while time.monotonic() < deadline:
            encoder.submit(2)  # raises once the encoder has failed; until then items queue up and are dropped
            time.sleep(0.01)
    with pytest.raises(KeyError, match="item 1"):
        encoder.finish()
    assert done == [0]


def test_batch_encoder_abort_drops_queued_items_and_does_not_raise() -> None:
    done, gate = [], threading.Event()

    def encode(i: int) -> None:
        gate.wait()
        if i == 0:
            raise ValueError("dropped with the abort")
        done.append(i)

    encoder = BatchEncoder(encode, max_queued=4)
    for i in range(4):
        encoder.submit(i)
    threading.Timer(0.1, gate.set).start()
    encoder.abort()  # the caller's own error wins; the encoder's is not raised
    assert done == []  # item 0 failed, the queued ones were dropped
