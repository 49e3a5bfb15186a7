"""Capturing for students with another tokenizer (`targets.cross_tokenizer`): the worker's windows carry the text
behind every teacher token, and (end to end, through a real job) a student with another tokenizer reads the cache.

Run: ``python -m pytest tests/test_xtok_capture.py -q``
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import stdlib_texts, tiny_job_config, write_jsonl, write_text_corpus

from kdcache.capture.plan import plan_units
from kdcache.capture.worker import UnitWorker, WorkerSettings


@pytest.fixture(scope="module")
def texts():
    return [*stdlib_texts(4, max_chars=1200), "x = 'héllo ✓'  # not in the tiny alphabet\n" * 3]


def read_windows(teacher, corpus, out, *extra):
    cfg = tiny_job_config(teacher, corpus, out, "data.unit_bytes=1000000", "data.min_length=1", *extra)
    worker = UnitWorker(WorkerSettings.from_config(cfg, "0" * 64), device="cpu")
    (unit,) = plan_units(cfg.data.source, "jsonl", unit_bytes=cfg.data.unit_bytes)
    return worker, worker.read_windows(unit.to_dict())


def test_windows_carry_the_text_behind_their_tokens(tiny_teacher, texts, tmp_path):
    corpus = write_text_corpus(tmp_path / "data", [texts])
    worker, (windows, counts) = read_windows(tiny_teacher, corpus, tmp_path / "out")
    assert counts["short_windows_dropped"] == 0 and len(windows) > len(texts)  # documents span several windows
    for w in windows:
        assert len(w.token_text_ends) == len(w.input_ids) and w.token_text_ends[-1] == len(w.token_text)
    assert b"".join(w.token_text for w in windows) == "".join(texts).encode()  # every byte once, in order
    _, (plain, _) = read_windows(tiny_teacher, corpus, tmp_path / "out2", "targets.cross_tokenizer=false")
    assert all(w.token_text is None for w in plain)


@pytest.fixture(scope="module", params=[("parquet", "topk"), ("zarr", "hybrid")], ids=["parquet-topk", "zarr-hybrid"])
def xtok_cache(request, ray_session, tiny_teacher, texts, tmp_path_factory):
    from kdcache.capture.job import run_cache_job

    fmt, mode = request.param
    root = tmp_path_factory.mktemp("xtok-cache")
    corpus = write_text_corpus(root / "data", [texts[:3], texts[3:]])
    extra = [f"output.format={fmt}", f"targets.mode={mode}", "targets.k=8", "targets.head=4", "targets.samples=16"]
    cfg = tiny_job_config(tiny_teacher, corpus, root / "cache", "data.min_length=1", *extra)
    manifest = run_cache_job(cfg)  # targets.cross_tokenizer is on by default
    return str(root / "cache"), manifest


def test_a_student_with_another_tokenizer_reads_the_cache(xtok_cache, tiny_teacher, texts, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from kdcache.losses import distillation_loss
    from kdcache.pieces import PIECES_KEY
    from kdcache.read.dataset import KDCacheDataset
    from kdcache.read.reader import CacheReader
    from kdcache.store import Store
    from tests.tiny_models import build_tiny_tokenizer

    uri, manifest = xtok_cache
    assert manifest["fingerprint_inputs"]["targets"]["cross_tokenizer"] is True
    assert Store(uri).exists(PIECES_KEY)
    reader = CacheReader(uri)
    windows = {}  # seq_id -> the text behind the teacher's window, as stored
    for unit in reader.units:
        rows = reader.read_unit_rows(unit, token_text=True)
        for i in range(rows.num_sequences):
            seq = rows.sequence(i)
            windows[int(seq["seq_id"])] = bytes(seq["token_text"])
    assert b"".join(windows.values()) == "".join(texts).encode()  # every byte of the corpus once, in file order
    student = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "student", vocab_size=200))
    ds = KDCacheDataset(uri, batch_size=3, tokenizer=student, cross_tokenizer=True, shuffle=False)
    seen = 0
    for batch in ds:
        for row in range(batch["input_ids"].shape[0]):
            seq_id = int(batch["seq_id"][row])
            if seq_id < 0:
                continue
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            text = windows[seq_id].decode("utf-8")
            assert [i for i in ids if i != student.eos_token_id] == student(text, add_special_tokens=False)[
                "input_ids"
            ]
            if student.unk_token_id not in ids:  # <unk> decodes to nothing
                assert student.decode(ids, skip_special_tokens=True) == text
            seen += 1
        assert int(batch["target_ids"].max()) < len(student)
        logits = torch.randn(*batch["input_ids"].shape, len(student), requires_grad=True)
        distillation_loss(logits, batch, alpha=0.5).backward()
        assert torch.isfinite(logits.grad).all()
    assert seen == len(windows)
    same = KDCacheDataset(uri, batch_size=3, tokenizer=AutoTokenizer.from_pretrained(tiny_teacher))
    assert "unmapped_logprobs" not in next(iter(same))  # the teacher's own tokenizer: the usual batches
    text_bytes = sum(size for unit in reader.units for name, size in _columns(reader, unit).items() if "text" in name)
    assert 0 < text_bytes < 0.25 * sum(u["bytes"] for u in reader.units)


def _columns(reader, unit):
    return reader.format.column_bytes(bytes(reader.read_unit_bytes(unit)))


def test_a_chat_cache_teaches_a_student_with_another_tokenizer_only_the_assistants_turns(ray_session, tmp_path):
    """Chat windows have no source text: the worker stores what their tokens spell (the rendered conversation less
    the special tokens, as the tokenizer's own decode gives it), and a student with another tokenizer is taught
    exactly the bytes the teacher was (the assistant's), never the prompt's."""
    from test_chat_capture import conversations
    from tiny_models import CHAT_TEMPLATE, build_tiny_model
    from transformers import AutoTokenizer

    from kdcache.capture.job import run_cache_job
    from kdcache.pieces import spelled_text, token_pieces
    from kdcache.read.dataset import KDCacheDataset
    from kdcache.read.reader import CacheReader
    from tests.tiny_models import build_tiny_tokenizer

    teacher = tmp_path / "teacher"
    build_tiny_model("llama", teacher, vocab_size=320)
    build_tiny_tokenizer(teacher, vocab_size=256, chat_template=CHAT_TEMPLATE)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "chat.jsonl", conversations())
    cfg = tiny_job_config(teacher, tmp_path / "data", tmp_path / "cache", "data.format=chat", "data.max_length=64")
    run_cache_job(cfg)
    teacher_tok = AutoTokenizer.from_pretrained(teacher)
    reader = CacheReader(str(tmp_path / "cache"))
    taught = {}  # seq_id -> (text, byte ranges the teacher's targets are about)
    for unit in reader.units:
        rows = reader.read_unit_rows(unit, token_text=True)
        for seq in map(rows.sequence, range(rows.num_sequences)):
            text = bytes(seq["token_text"])
            plain = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
            assert text == teacher_tok.decode(seq["input_ids"], **plain).encode()
            ends = np.concatenate([[0], seq["token_text_ends"]])
            targets = np.flatnonzero(seq["target_mask"][:-1])  # position t's target is about token t + 1
            taught[int(seq["seq_id"])] = (text, [(int(ends[t + 1]), int(ends[t + 2])) for t in targets])
    student = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "student", vocab_size=200))
    pieces = token_pieces(student)
    ds = KDCacheDataset(str(tmp_path / "cache"), batch_size=2, tokenizer=student, cross_tokenizer=True, shuffle=False)
    rows_seen = prompt_bytes = 0
    for batch in ds:
        for row in range(batch["input_ids"].shape[0]):
            seq_id = int(batch["seq_id"][row])
            if seq_id < 0:
                continue
            rows_seen += 1
            text, ranges = taught[seq_id]
            valid = batch["attention_mask"][row].bool()
            ids, loss = batch["input_ids"][row][valid].numpy(), batch["loss_mask"][row][valid].numpy()
            spelled, s_ends = spelled_text(pieces, ids)
            assert spelled == text
            starts = np.concatenate([[0], s_ends[:-1]])
            assistant = np.zeros(len(text), dtype=bool)
            for lo, hi in ranges:
                assistant[lo:hi] = True
            prompt_bytes += int((~assistant).sum())
            learnt = np.zeros(len(text), dtype=bool)
            for s in np.flatnonzero(loss[:-1]):  # position s learns token s + 1's bytes
                learnt[starts[s + 1] : s_ends[s + 1]] = True
            assert not (learnt & ~assistant).any(), (seq_id, text)  # nothing of the prompt is taught
            assert learnt.sum() >= 0.9 * assistant.sum()  # and the assistant's bytes are (less any split at a cut)
    assert rows_seen == len(taught) and prompt_bytes > 0
