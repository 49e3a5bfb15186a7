"""Caching conversations with a tiny real teacher that has a chat template: the teacher's head runs only at the target
positions; the worker stores targets exactly where the template's assistant mask (shifted by one) says, equal to
``log_softmax(model(window).logits)`` there, windows long conversations without losing the boundary positions, and
skips and counts what has nothing to learn; read back, the cache's `loss_mask` is that mask, and a stored position
costs about what a text cache's token does.

Run: ``python -m pytest tests/test_chat_capture.py -q``
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import record_writes, tiny_job_config, write_jsonl
from tiny_models import CHAT_TEMPLATE, CHAT_TEMPLATE_PLAIN, build_tiny_model, build_tiny_tokenizer

from kdcache.capture.plan import plan_units
from kdcache.capture.sources import make_seq_id
from kdcache.capture.teacher import Teacher
from kdcache.capture.worker import UnitWorker, WorkerSettings

K = 8
MAX_LENGTH = 64  # tokens per window: the long conversations below span several

SYSTEM = "You answer questions about the Python standard library, briefly and exactly, citing the docstring."
LONG_ANSWER = " ".join(f"Step {i}: call json.dumps on item {i} and write it out." for i in range(6))


def conversations() -> list[dict]:
    """Multi-turn, system prompts, a tool message, conversations longer than a window, one with no assistant."""
    return [
        {"messages": [{"role": "user", "content": "What does len do?"}, {"role": "assistant", "content": "Counts."}]},
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What does json.dumps do?"},
                {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
                {"role": "tool", "content": '{"name": "json.loads"}'},
                {"role": "user", "content": "And json.loads?"},
                {"role": "assistant", "content": "Deserialize s to a Python object."},
            ]
        },
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "No answer here."}]},
        {
            "messages": [
                {"role": "system", "content": SYSTEM + " " + SYSTEM},  # longer than a window: window 0 has no target
                {"role": "user", "content": "How do I write many items?"},
                {"role": "assistant", "content": LONG_ANSWER},  # spans a window boundary
                {"role": "user", "content": "Thanks."},
                {"role": "assistant", "content": "You are welcome."},
            ]
        },
    ]


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has `CHAT_TEMPLATE` (generation markers)."""
    out = tmp_path_factory.mktemp("chat-teacher") / "llama"
    build_tiny_model("llama", out, vocab_size=320)
    build_tiny_tokenizer(out, vocab_size=256, chat_template=CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def model(chat_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(chat_teacher, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(chat_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_teacher)


def make_worker(teacher: Path, corpus: Path, out: Path, *extra: str) -> tuple[UnitWorker, dict]:
    cfg = tiny_job_config(
        teacher,
        corpus,
        out,
        f"targets.k={K}",
        "data.format=chat",
        f"data.max_length={MAX_LENGTH}",
        "data.unit_bytes=1000000",
        "cluster.batch_tokens=128",
        *extra,
    )
    worker = UnitWorker(WorkerSettings.from_config(cfg, "0" * 64), device="cpu")
    (unit,) = plan_units(cfg.data.source, cfg.data.format, unit_bytes=cfg.data.unit_bytes)
    return worker, unit.to_dict()


def expected_windows(tokenizer, path: Path, records: list[dict]) -> dict[int, tuple[list[int], np.ndarray]]:
    """{seq_id: (input_ids, target mask)} from transformers' own assistant mask, shifted by one, then windowed;
    windows without a target and conversations without an assistant token left out."""
    out, offset = {}, 0
    for record, line in zip(records, path.read_bytes().splitlines(keepends=True)):
        enc = tokenizer.apply_chat_template(record["messages"], return_dict=True, return_assistant_tokens_mask=True)
        ids, assistant = enc["input_ids"], np.array(enc["assistant_masks"], dtype=bool)
        targets = np.zeros(len(ids), dtype=bool)
        targets[:-1] = assistant[1:]
        for w, start in enumerate(range(0, len(ids), MAX_LENGTH)):
            window = targets[start : start + MAX_LENGTH]
            if window.any():
                out[make_seq_id(str(path), f"b{offset}", w)] = (ids[start : start + MAX_LENGTH], window)
        offset += len(line)
    return out


# ------------------------------------------------------------------------------------------------ teacher


def test_teacher_head_runs_only_at_the_target_positions(chat_teacher):
    teacher = Teacher(str(chat_teacher), dtype="float32", device="cpu", chunk_bytes=320 * 4 * 5)  # 5 rows a chunk
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 256, (3, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    selected = (torch.rand(ids.shape, generator=generator) < 0.4) & mask.bool()
    rows = []
    teacher.map_logit_chunks(ids, mask, lambda z: rows.append(z.shape[0]), target_mask=selected)
    assert sum(rows) == int(selected.sum())  # the head saw the selected positions only
    full = teacher.compute_targets(ids, mask, k=K, temperatures=[1.0, 2.0])
    part = teacher.compute_targets(ids, mask, k=K, temperatures=[1.0, 2.0], target_mask=selected)
    at = selected[mask.bool()]  # the selected rows among every valid position, row-major
    assert torch.equal(part.ids, full.ids[at])
    torch.testing.assert_close(part.logprobs, full.logprobs[at])
    torch.testing.assert_close(part.log_normalizers, full.log_normalizers[at])
    sampled = teacher.compute_sampled_targets(
        ids, mask, num_samples=12, head=2, temperatures=[1.0], target_mask=selected, generator=generator
    )
    assert sampled[0].num_tokens == sampled[1].ids.shape[0] == int(selected.sum())
    with pytest.raises(ValueError, match="inside attention_mask"):
        teacher.compute_targets(ids, mask, k=K, temperatures=[1.0], target_mask=torch.ones_like(selected))
    teacher.head_kind = "whole"  # the path of models whose head cannot be split from the body: one row's forward
    whole = teacher.compute_targets(ids, mask, k=K, temperatures=[1.0, 2.0], target_mask=selected)
    assert torch.equal(whole.ids, part.ids)
    torch.testing.assert_close(whole.logprobs, part.logprobs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ worker


@pytest.mark.parametrize("template", ["markers", "plain"])
def test_worker_stores_targets_exactly_at_assistant_positions(
    chat_teacher, model, tokenizer, tmp_path, monkeypatch, template
):
    records = conversations()
    path = write_jsonl(tmp_path / "data" / "chat.jsonl", records)
    extra = [] if template == "markers" else [f"data.chat_template={json.dumps(CHAT_TEMPLATE_PLAIN)}"]
    worker, unit = make_worker(chat_teacher, path.parent, tmp_path / "out", *extra)
    calls = record_writes(worker, monkeypatch)
    record = worker.process(unit)

    expected = expected_windows(tokenizer, path, records)
    assert {c["seq_id"] for c in calls} == set(expected) and len(calls) == len(expected)
    assert record["no_assistant_tokens"] == 1  # the unanswered conversation
    assert record["windows_without_targets"] >= 1  # the long system prompt's first window
    assert record["num_target_tokens"] == sum(int(m.sum()) for _, m in expected.values())
    assert record["num_target_tokens"] < 0.6 * record["num_tokens"]  # prompt positions of stored windows: no target
    boundary = 0
    for call in calls:
        ids, mask = expected[call["seq_id"]]
        assert call["input_ids"].tolist() == ids
        assert call["mask"].dtype == np.bool_ and call["mask"].tolist() == mask.tolist()
        boundary += bool(mask[-1]) and len(ids) == MAX_LENGTH  # the target of the next window's first token
        head = call["head"]
        assert head.ids.shape == (int(mask.sum()), K)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)[torch.from_numpy(mask)]
        ref = torch.topk(logp, K, dim=-1)
        np.testing.assert_array_equal(head.ids, np.sort(ref.indices.numpy(), axis=1))
        np.testing.assert_allclose(head.logprobs, np.take_along_axis(logp.numpy(), head.ids, axis=1), atol=1e-4)
        np.testing.assert_allclose(head.entropy, -(logp.exp() * logp).sum(-1).numpy(), atol=1e-4)
    assert boundary >= 1  # an assistant turn crosses a window boundary and its first token there keeps its target


def test_positions_all_stores_every_position(chat_teacher, tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "data" / "chat.jsonl", conversations())
    worker, unit = make_worker(chat_teacher, path.parent, tmp_path / "out", "targets.positions=all")
    calls = record_writes(worker, monkeypatch)
    record = worker.process(unit)
    assert all(c["mask"] is None and c["head"].ids.shape[0] == len(c["input_ids"]) for c in calls)
    assert record["num_target_tokens"] == record["num_tokens"] and "no_assistant_tokens" not in record
    rendered = [tokenizer.apply_chat_template(r["messages"])["input_ids"] for r in conversations()]
    assert record["num_tokens"] == sum(len(ids) for ids in rendered)  # every conversation, every token


def test_prompt_completion_stores_the_completion_only(chat_teacher, tokenizer, tmp_path, monkeypatch):
    records = [
        {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
        {"prompt": [{"role": "user", "content": "Say hi."}], "completion": "Hi."},
    ]
    path = write_jsonl(tmp_path / "data" / "pc.jsonl", records)
    worker, unit = make_worker(chat_teacher, path.parent, tmp_path / "out", "data.format=prompt_completion")
    calls = record_writes(worker, monkeypatch)
    worker.process(unit)
    trained = []
    for call in calls:
        next_tokens = call["input_ids"][1:][call["mask"][:-1]]  # the tokens the stored targets predict
        trained.append(tokenizer.decode(next_tokens.tolist()))
    assert sorted(trained) == ["    return a + b\n</s>", "Hi.</s>"]  # calls come in batch order


def test_malformed_conversation_fails_the_unit_naming_the_line(chat_teacher, tmp_path):
    records = [conversations()[0], {"messages": [{"role": "user", "content": {"text": "hi"}}]}]
    path = write_jsonl(tmp_path / "data" / "bad.jsonl", records)
    worker, unit = make_worker(chat_teacher, path.parent, tmp_path / "out")
    from kdcache.errors import SourceError

    with pytest.raises(SourceError, match=r"bad\.jsonl: line 2: field 'messages' message 0 \(user\): content must"):
        worker.process(unit)
    assert worker.store.list_names("commits") == []


# ------------------------------------------------------------------------------------------------ read back


@pytest.fixture(scope="module")
def caches(ray_session, chat_teacher, tokenizer, tmp_path_factory):
    """The same conversations cached as chat (assistant positions) and, rendered to text, as a text cache."""
    from kdcache.capture.job import run_cache_job
    from kdcache.demo.chat import stdlib_docstrings

    root = tmp_path_factory.mktemp("chat-caches")
    # Prompts and answers of the same kind (docstrings) and no shared prompt: targets at a prompt repeated from record
    # to record (a system prompt) or at the template's boilerplate compress better than targets inside answers, so
    # the text cache's bytes per token would otherwise be low for reasons that have nothing to do with the storage.
    docs = [doc for _, _, doc in stdlib_docstrings(("json", "textwrap", "base64", "heapq", "fnmatch"))]
    records = conversations() + [
        {"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}
        for a, b in zip(docs[0::2], docs[1::2])
    ]
    chat = write_jsonl(root / "chat" / "c.jsonl", records)
    rendered = [{"text": tokenizer.apply_chat_template(r["messages"], tokenize=False)} for r in records]
    text = write_jsonl(root / "text" / "t.jsonl", rendered)
    common = [f"data.max_length={MAX_LENGTH}", "cluster.num_actors=1", "targets.k=64", "data.unit_bytes=1000000"]
    chat_manifest = run_cache_job(tiny_job_config(chat_teacher, chat.parent, root / "c1", "data.format=chat", *common))
    text_manifest = run_cache_job(
        tiny_job_config(chat_teacher, text.parent, root / "c2", "data.add_eos=false", *common)
    )
    return {"chat": (chat, records, chat_manifest, root / "c1"), "text": (text_manifest, root / "c2")}


def test_read_back_loss_mask_is_the_assistant_mask_shifted(caches, tokenizer):
    from kdcache.read.reader import open_cache

    path, records, manifest, uri = caches["chat"]
    expected = expected_windows(tokenizer, path, records)
    seqs = list(open_cache(str(uri)).iter_sequences())
    assert {int(s["seq_id"]) for s in seqs} == set(expected)
    for s in seqs:
        ids, mask = expected[int(s["seq_id"])]
        assert s["input_ids"].tolist() == ids and s["loss_mask"].astype(bool).tolist() == mask.tolist()
        assert (s["target_ids"][~mask] == -1).all() and (s["target_ids"][mask] >= 0).all()


def test_bytes_per_stored_position_match_a_text_cache(caches):
    from kdcache.formats import get_format
    from kdcache.formats.base import split_sequences
    from kdcache.read.reader import open_cache

    _, _, chat, uri = caches["chat"]
    text, _ = caches["text"]
    stored = chat["stats"].get("num_target_tokens") or sum(u["num_target_tokens"] for u in chat["units"])
    per_target, per_token = chat["stats"]["total_bytes"] / stored, text["stats"]["bytes_per_token"]
    assert stored < 0.85 * chat["stats"]["num_tokens"]  # the prompts' positions hold no target
    assert abs(per_target / per_token - 1) < 0.10, (per_target, per_token)
    # The storage itself: the same target rows written without the positions that have no target take about as
    # many bytes (what remains is the prompt's input ids), so shard bytes scale with the trained tokens.
    cache = open_cache(str(uri))
    (unit,) = cache.units
    data = cache.read_unit(unit)
    writer = get_format("parquet").ShardWriter(k=cache.k, num_temperatures=1, codec=cache.codec)
    for seq_id, rows in split_sequences(data):
        m = data.target_mask[rows]
        head = {
            "ids": data.target_ids[rows][m],
            "logprobs": data.target_logprobs[rows][m],
            "log_normalizers": data.log_normalizers[rows][m],
            "tail_logprobs": data.tail_logprobs[rows][m],
            "entropy": data.entropy[rows][m],
        }
        writer.add(seq_id, data.input_ids[rows][m], SimpleNamespace(**head))
    # the cache also stores the text behind its tokens (targets.cross_tokenizer), which the rewrite leaves out
    text_bytes = cache.format.column_bytes(bytes(cache.read_unit_bytes(unit))).get("token_text", 0)
    assert unit["bytes"] - text_bytes < 1.02 * len(writer.finish())
