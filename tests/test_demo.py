"""Tests of `kdcache.demo`: the stdlib corpus, the BPE tokenizer, the tiny trained teacher, idempotent prepare_demo.

One small demo (40 stdlib files, 120 training steps, ~8 s on 2 idle cores) is built per module and shared; the
tests that rebuild use even smaller settings.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from kdcache.demo import assets as demo
from kdcache.demo import teacher as demo_teacher
from kdcache.demo.assets import DemoAssets, prepare_demo
from kdcache.demo.corpus import split_train_valid, stdlib_documents, write_corpus
from kdcache.demo.teacher import SPECIAL_TOKENS, build_teacher, train_teacher
from kdcache.demo.threads import ThreadChooser

SMALL = {"train_steps": 120, "max_files": 40, "corpus_files": 3, "progress": False}
TINY = {"max_files": 12, "corpus_files": 2, "progress": False}  # for tests that build more than once


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return prepare_demo(tmp_path_factory.mktemp("demo") / "assets", **SMALL)


def _read_jsonl(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            records.append(json.loads(line))
    return records


def _fail_training(*args, **kwargs):
    raise RuntimeError("train_teacher must not run here")


# ------------------------------------------------------------------------------------------------ corpus


def test_stdlib_documents_sorted_deterministic_and_filtered():
    docs = stdlib_documents(30)
    names = [name for name, _ in docs]
    assert len(docs) == 30
    assert names == sorted(names) and len(set(names)) == len(names)
    assert docs == stdlib_documents(30)
    assert all(text.strip() for _, text in docs)
    everything = [name for name, _ in stdlib_documents()]
    for name in everything:
        parts = name.split("/")
        assert name.endswith(".py")
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts[:-1]), name
    assert set(names) <= set(everything)
    assert len({name.split("/")[0] for name in names}) > 10  # spread over the library, not only the first files


def test_split_is_deterministic_disjoint_and_stable_per_file():
    docs = stdlib_documents(200)
    train, valid = split_train_valid(docs)
    assert (train, valid) == split_train_valid(list(docs))
    train_names, valid_names = {n for n, _ in train}, {n for n, _ in valid}
    assert not train_names & valid_names
    assert train_names | valid_names == {n for n, _ in docs}
    assert 0.03 < len(valid) / len(docs) < 0.2
    # A file's side depends on its name only: the split of a subset agrees with the split of the whole.
    sub_train, sub_valid = split_train_valid(docs[::2])
    assert {n for n, _ in sub_valid} == valid_names & {n for n, _ in docs[::2]}
    assert {n for n, _ in sub_train} == train_names & {n for n, _ in docs[::2]}


def test_split_keeps_both_sides_and_rejects_bad_input():
    train, valid = split_train_valid([("a.py", "x"), ("b.py", "y")], valid_fraction=0.01)
    assert len(train) == 1 and len(valid) == 1
    assert split_train_valid([("a.py", "x")], valid_fraction=0.0) == ([("a.py", "x")], [])
    with pytest.raises(ValueError, match="valid_fraction"):
        split_train_valid([("a.py", "x")], valid_fraction=1.0)
    with pytest.raises(ValueError, match="unique"):
        split_train_valid([("a.py", "x"), ("a.py", "y")])


def test_write_corpus_shards_parse_in_order(tmp_path: Path):
    docs = [(f"m{i}.py", f"print({i})\n# é ✓\n") for i in range(7)]
    paths = write_corpus(docs, tmp_path / "c", files=3)
    assert [p.name for p in paths] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    records = _read_jsonl(tmp_path / "c")
    assert [(r["name"], r["text"]) for r in records] == docs
    assert len(write_corpus(docs[:2], tmp_path / "d", files=5)) == 2  # never an empty shard
    with pytest.raises(ValueError, match="files"):
        write_corpus(docs, tmp_path / "e", files=0)
    with pytest.raises(ValueError, match="no documents"):
        write_corpus([], tmp_path / "f", files=1)


def test_prepared_corpus_is_split_by_file(assets: DemoAssets):
    train, valid = _read_jsonl(assets.train_dir), _read_jsonl(assets.valid_dir)
    assert len(list(assets.train_dir.glob("*.jsonl"))) == SMALL["corpus_files"]
    assert train and valid and all(r["text"].strip() for r in train + valid)
    expected_train, expected_valid = split_train_valid(stdlib_documents(SMALL["max_files"]))
    assert [(r["name"], r["text"]) for r in train] == expected_train
    assert [(r["name"], r["text"]) for r in valid] == expected_valid
    assert assets.info["train_files"] == len(train) and assets.info["valid_files"] == len(valid)


# ------------------------------------------------------------------------------------------------ teacher


def test_tokenizer_round_trips_and_vocab_is_padded(assets: DemoAssets):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    for text in ["def f(x):\n    return x ** 2  # héllo ✓ 🐍\n", "  leading spaces\r\n\ttabs", ""]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # Llama-style: bos prepended
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == set(
        SPECIAL_TOKENS.values()
    )
    assert len(tokenizer) == 2048 + 4
    config = AutoConfig.from_pretrained(assets.teacher_dir)
    assert config.vocab_size % 64 == 0 and config.vocab_size > len(tokenizer)
    assert config.vocab_size == assets.info["model_vocab_size"] == 2112
    assert config.tokenizer_vocab_size == assets.info["tokenizer_vocab_size"] == len(tokenizer)


def test_build_teacher_is_seeded_and_leaves_global_rng_alone(assets: DemoAssets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    state = torch.random.get_rng_state()
    a = build_teacher(tokenizer, hidden_size=32, num_layers=1, heads=2, seed=3)
    b = build_teacher(tokenizer, hidden_size=32, num_layers=1, heads=2, seed=3)
    c = build_teacher(tokenizer, hidden_size=32, num_layers=1, heads=2, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert wa.shape == (2112, 32)


def test_teacher_learned_and_is_far_from_uniform(assets: DemoAssets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats = assets.info["stats"]
    log_v = math.log(assets.info["model_vocab_size"])
    assert stats["steps"] == SMALL["train_steps"]
    assert abs(stats["first_loss"] - log_v) < 0.5  # an untrained model is near uniform
    assert stats["last_loss"] < stats["first_loss"] - 2.0

    model = AutoModelForCausalLM.from_pretrained(assets.teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    for folder in (assets.train_dir, assets.valid_dir):  # the cached corpus, and held-out files
        ids = [tokenizer(r["text"])["input_ids"][:128] for r in _read_jsonl(folder)]
        input_ids = torch.tensor([x for x in ids if len(x) == 128][:4])  # [4, 128] int64
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits  # [4, 128, padded V] float32
        assert logits.shape[-1] == assets.info["model_vocab_size"]
        logp = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1).mean().item()
        assert entropy < log_v - 1.25, folder.name
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).item()
        assert loss < log_v - 1.25, folder.name
        # The padding rows past the tokenizer are never targets: training pushes their probability down.
        assert logp[..., len(tokenizer) :].exp().sum(-1).max().item() < 0.01


def test_train_teacher_time_bound_and_argument_checks(assets: DemoAssets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    model = build_teacher(tokenizer, hidden_size=32, num_layers=1, heads=2)
    texts = [r["text"] for r in _read_jsonl(assets.valid_dir)]
    threads = torch.get_num_threads()
    stats = train_teacher(model, tokenizer, texts, steps=None, seconds=0.5, seq_len=32, batch_size=2, progress=False)
    assert stats["steps"] >= 1 and stats["tokens_per_step"] == 64
    assert torch.get_num_threads() == threads  # restored
    assert not model.training
    with pytest.raises(ValueError, match="steps, seconds"):
        train_teacher(model, tokenizer, texts, steps=None, seconds=None)
    with pytest.raises(ValueError, match="seq_len"):
        train_teacher(model, tokenizer, ["x"], steps=1, seq_len=64, progress=False)


def test_thread_chooser_falls_back_to_one_thread_while_cpus_are_contended():
    chooser = ThreadChooser(2, probe_steps=3, backoff_steps=2)
    step_seconds = {1: 0.10, 2: 0.06}  # idle cores: two threads are faster
    used = []

    def run(n: int) -> None:
        for _ in range(n):
            threads = chooser.threads()
            used.append(threads)
            chooser.record(threads, step_seconds[threads], timed=len(used) > 1)

    run(6)
    assert used == [1, 1, 1, 2, 2, 2]
    step_seconds[2] = 1.0  # another process holds a core: barriers wait for time slices
    run(6)
    assert used[6:] == [2, 2, 1, 1, 2, 2]  # two slow steps -> back off for 2 steps -> retry
    assert chooser.steps_by_threads == {"1": 5, "2": 7}
    assert ThreadChooser(1).threads() == 1


# ------------------------------------------------------------------------------------------------ prepare_demo


def test_prepare_demo_second_call_reuses_assets(assets: DemoAssets, monkeypatch: pytest.MonkeyPatch):
    workdir = assets.teacher_dir.parent
    marker = workdir / demo.MARKER_NAME
    mtime = marker.stat().st_mtime_ns
    monkeypatch.setattr(demo_teacher, "train_teacher", _fail_training)
    monkeypatch.setattr(demo_teacher, "train_tokenizer", _fail_training)
    start = time.perf_counter()
    again = prepare_demo(workdir, **SMALL)
    assert time.perf_counter() - start < 2.0
    assert again == assets and again.info == assets.info
    assert marker.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in workdir.iterdir()) == ["chat", "demo.json", "teacher", "train", "valid"]


def test_demo_chat_set_renders_with_the_demo_template(assets: DemoAssets):
    """The chat set of `configs/chat-quickstart.yaml`: well-formed conversations, split by function name; the demo
    tokenizer's template marks exactly each assistant's content and its end-of-turn token."""
    from transformers import AutoTokenizer

    from kdcache.capture.chat import ChatRecord, ChatRenderer, parse_messages

    train, valid = _read_jsonl(assets.chat_train_dir), _read_jsonl(assets.chat_valid_dir)
    assert len(train) > 500 and len(valid) > 20 and not {r["name"] for r in train} & {r["name"] for r in valid}
    assert assets.info["chat_conversations"] == {"train": len(train), "valid": len(valid)}
    shapes = {tuple(m["role"] for m in r["messages"]) for r in train}
    assert ("system", "user", "assistant", "user", "assistant") in shapes and any("tool" in s for s in shapes)
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    assert renderer.markers
    for record in train[:40]:
        messages = parse_messages(record["messages"], "chat", "messages")
        ids, mask = renderer.render(ChatRecord("chat", messages=messages))
        answers = "".join(m["content"] + "<|eos|>" for m in messages if m["role"] == "assistant")
        assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == answers


def test_prepare_demo_rebuilds_on_new_settings_deterministically(tmp_path: Path):
    first = prepare_demo(tmp_path, train_steps=3, **TINY)
    tokenizer_json = (first.teacher_dir / "tokenizer.json").read_bytes()
    second = prepare_demo(tmp_path, train_steps=4, **TINY)
    assert second.info["stats"]["steps"] == 4 and first.info["stats"]["steps"] == 3
    assert second.info["settings"]["train_steps"] == 4
    assert json.loads((tmp_path / "demo.json").read_text()) == second.info
    # Same seed and corpus: the same tokenizer, the same initial model and the same first batch.
    assert (second.teacher_dir / "tokenizer.json").read_bytes() == tokenizer_json
    assert second.info["stats"]["first_loss"] == pytest.approx(first.info["stats"]["first_loss"], abs=1e-4)


def test_interrupted_rebuild_never_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    prepare_demo(tmp_path, train_steps=2, **TINY)
    monkeypatch.setattr(demo_teacher, "train_teacher", _fail_training)
    with pytest.raises(RuntimeError, match="must not run"):
        prepare_demo(tmp_path, train_steps=5, **TINY)
    assert not (tmp_path / demo.MARKER_NAME).exists()
    assert not list(tmp_path.glob(".building-*"))
    with pytest.raises(RuntimeError, match="must not run"):  # the old settings no longer count as built either
        prepare_demo(tmp_path, train_steps=2, **TINY)
