"""Capturing for students with another tokenizer (`targets.cross_tokenizer`): the worker's windows carry the text
behind every teacher token, and (end to end, through a real job) a student with another tokenizer reads the cache.

Run: ``python -m pytest tests/test_xtok_capture.py -q``
"""

from __future__ import annotations

import pytest
from conftest import stdlib_texts, tiny_job_config, write_text_corpus

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
