"""Distillation through generation with a tiny real teacher: the teacher answers prompts (`generate` section), and the
worker caches its exact targets on prompt + response. Each sequence starts with the rendered prompt; targets at the
generated positions equal ``log_softmax(model(prompt + response).logits)`` in every target mode; greedy generation is
``model.generate`` token for token; a response does not depend on its batch; stop strings end a response; a rerun
into another URI and a driver killed mid-job then rerun write byte-identical shards; bad prompts and settings fail
naming what is wrong; the manifest and `kdcache info` show the generation settings and the teacher's license; the
shards carry ``prompt_id`` / ``sample_index`` (Parquet columns DuckDB reads, Zarr arrays) through `iter_sequences`
and batches, and ``loss_mask`` reads back as the response's positions; a student trains from the cache.

Run: ``python -m pytest tests/test_generate.py -q`` (~1 min on 2 cores, the driver-kill test included)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cluster_helpers import kill_driver_after_commits
from conftest import record_writes, tiny_job_config, write_jsonl
from tiny_models import CHAT_TEMPLATE, build_tiny_model, build_tiny_tokenizer

from kdcache.capture.generate import (
    GenerationRow,
    HFEngine,
    batch_rows,
    draw_seed,
    find_stop,
    finish_response,
    prompt_id,
    response_seq_id,
    stop_token_ids,
)
from kdcache.capture.plan import plan_units
from kdcache.capture.worker import UnitWorker, WorkerSettings
from kdcache.config import GenerateConfig, load_config
from kdcache.errors import ConfigError, SourceError

ROOT = Path(__file__).resolve().parents[1]
K = 8
MAX_LENGTH = 128  # tokens: prompt + response (the tiny teacher's positions)
LICENSE_CARD = "---\nlicense: other\nlicense_name: tiny-teacher-license\nlicense_link: LICENSE\n---\n# Tiny teacher\n"

QUESTIONS = [
    "What does len do?",
    "Explain json.dumps.",
    "How do I use textwrap.fill?",
    "Describe heapq.heappush.",
    "What is base64.b64encode for?",
    "What does fnmatch.fnmatch return?",
]


def chat_prompts() -> list[dict]:
    """Conversations ending in a user turn: bare questions, a system prompt, a tool message."""
    out = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS[:3]]
    out.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[3]}]})
    out.append(
        {
            "messages": [
                {"role": "user", "content": "What is b64encode?"},
                {"role": "assistant", "content": "Looking."},
                {"role": "tool", "content": '{"f": 1}'},
            ]
        }
    )
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a chat template and a model card declaring its license."""
    out = tmp_path_factory.mktemp("gen-teacher") / "llama"
    build_tiny_model("llama", out, vocab_size=320)
    build_tiny_tokenizer(out, vocab_size=256, chat_template=CHAT_TEMPLATE)
    (out / "README.md").write_text(LICENSE_CARD)
    return out


@pytest.fixture(scope="module")
def model(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


def gen_config(teacher: Path, corpus: Path, out: Path, *extra: str):
    return tiny_job_config(
        teacher,
        corpus,
        out,
        f"targets.k={K}",
        "data.format=chat",
        f"data.max_length={MAX_LENGTH}",
        "cluster.batch_tokens=256",
        "generate.n=2",
        "generate.max_new_tokens=16",
        *extra,
    )


def make_worker(teacher: Path, corpus: Path, out: Path, *extra: str) -> tuple[UnitWorker, dict]:
    cfg = gen_config(teacher, corpus, out, "data.unit_bytes=1000000", *extra)
    worker = UnitWorker(WorkerSettings.from_config(cfg, "0" * 64), device="cpu")
    (unit,) = plan_units(cfg.data.source, cfg.data.format, unit_bytes=cfg.data.unit_bytes)
    return worker, unit.to_dict()


def line_offsets(path: Path) -> list[str]:
    """The locator ("b<byte offset>") of every line of a jsonl file."""
    out, offset = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        out.append(f"b{offset}")
        offset += len(line)
    return out


def rendered_prompt(tokenizer, record: dict) -> list[int]:
    return tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True)["input_ids"]


# ------------------------------------------------------------------------------------------------ pure parts


def test_finish_response_cuts_at_eos_stop_string_or_cap():
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # token i is the letter a + i
    assert finish_response([0, 1, 2, 9, 3], max_new_tokens=10, eos_ids=[9]) == [0, 1, 2, 9]  # EOS kept
    assert finish_response([0, 1, 2, 3], max_new_tokens=2, eos_ids=[9]) == [0, 1]
    assert find_stop(decode, [0, 1, 2, 3, 2, 3], ["cd"]) == 3  # the token that completes the first "cd"
    assert find_stop(decode, [0, 1], ["cd"]) is None
    out = finish_response([0, 1, 2, 3, 9], max_new_tokens=10, eos_ids=[9], stops=["bc", "zz"], decode=decode)
    assert out == [0, 1, 2]
    assert finish_response([0, 9, 1, 2], max_new_tokens=10, eos_ids=[9], stops=["bc"], decode=decode) == [0, 9]


def test_batches_and_seeds():
    lengths = [5, 3, 5, 3, 4]
    assert batch_rows(lengths, 2) == [[1, 3], [4, 0], [2]]  # by (length, index), cut every 2 rows
    assert batch_rows(lengths, 4, "equal_length") == [[1, 3], [4], [0, 2]]
    assert batch_rows(lengths, 4, "one_row") == [[1], [3], [4], [0], [2]]
    assert prompt_id("a.jsonl", "b0") != prompt_id("a.jsonl", "b10") != prompt_id("b.jsonl", "b10")
    assert response_seq_id("a.jsonl", "b0", 0) != response_seq_id("a.jsonl", "b0", 1)
    seeds = {draw_seed(s, p, i) for s in (0, 1) for p in (7, 8) for i in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    tok = SimpleNamespace(eos_token_id=2)
    assert stop_token_ids([7, 2], tok) == [2, 7] and stop_token_ids(None, tok) == [2]


def test_generate_config_is_optional_and_checked(tmp_path):
    base = ["teacher.model=t", "data.source=x.jsonl", "output.uri=o", "data.format=chat"]
    assert load_config(None, base).generate is None  # absent: no generation
    cfg = load_config(None, [*base, "generate.n=3"])
    assert cfg.generate == GenerateConfig(n=3) and cfg.to_dict()["generate"]["n"] == 3
    bad = {
        "generate.engine=tgi": "generate.engine: must be one of hf, vllm",
        "generate.temperature=0": "generate.n: greedy",  # with n=2
        "generate.top_p=0": r"generate.top_p: must be in \(0, 1\]",
        "generate.top_k=-1": "generate.top_k",
        "generate.max_new_tokens=0": "generate.max_new_tokens: must be >= 1",
        "generate.stop=['']": r"generate.stop\[0\]",
        "generate.unknown=1": "generate.unknown: unknown key",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, "generate.n=2", override])
    with pytest.raises(ConfigError, match="generate: prompts come from data.format chat or prompt_completion"):
        load_config(None, [*base[:3], "data.format=jsonl", "generate.n=1"])
    secret = load_config(None, [*base, "generate.engine_options={api_token: abc, gpu_memory_utilization: 0.4}"])
    assert secret.to_record()["generate"]["engine_options"] == {"api_token": "(hidden)", "gpu_memory_utilization": 0.4}


def test_teacher_license_from_override_model_card_or_config(tmp_path):
    from kdcache.capture.provenance import card_license, teacher_license
    from kdcache.tools.info import format_summary

    assert card_license("---\nlicense: apache-2.0\ntags: [x]\n---\ntext") == {"license": "apache-2.0"}
    assert card_license("# no front matter\nlicense: mit") is None
    assert card_license("---\nlicense: [: bad\n---") is None  # broken YAML: unknown, not an error
    folder = tmp_path / "t"
    folder.mkdir()
    assert teacher_license(str(folder)) == {"license": None, "source": "not declared"}
    (folder / "config.json").write_text(json.dumps({"license": "mit"}))
    assert teacher_license(str(folder)) == {"license": "mit", "source": "config.json"}
    (folder / "README.md").write_text(LICENSE_CARD)
    found = teacher_license(str(folder))
    assert found["license"] == "other" and found["source"] == "model card" and found["license_link"] == "LICENSE"
    assert teacher_license(str(folder), override="cc-by-nc-4.0") == {
        "license": "cc-by-nc-4.0",
        "source": "teacher.license",
    }
    (folder / "README.md").write_text("---\nlicense: mit\n---\n" + "x" * (1 << 20))  # larger than a card: not read
    assert teacher_license(str(folder))["source"] == "config.json"
    base = {"complete": True, "uri": "u", "created_by": "kdcache", "format_version": 2, "format": "parquet",
            "teacher": "t", "model_type": "llama", "teacher_revision": None, "vocab_size": 2, "padded_vocab_size": 2,
            "tokenizer_hash": "0" * 12, "mode": "topk", "k": 1, "temperatures": [1.0], "max_length": 8,
            "num_sequences": 0, "num_tokens": 0, "num_target_tokens": 0, "target_token_fraction": 0, "num_units": 0,
            "total_bytes": 0, "bytes_per_token": 0,
            "bytes_per_entry": None, "real_token_fraction": 0, "telemetry": {}, "fingerprint": "f",
            "last_run": {"units": 0, "tokens": 0, "wall_time_s": 0.0, "tokens_per_s": 0.0, "failures": 0}}  # fmt: skip
    text = format_summary({**base, "license": {"license": None, "source": "not declared"}, "generation": None})
    assert "license      not declared by the model card or config (teacher.license sets it)" in text


def test_demo_prompt_set_is_signatures_with_their_docstrings(tmp_path):
    from kdcache.demo.chat import DOCSTRING_STOP, def_prompt, write_prompts

    assert def_prompt("json.dumps", "(obj)") == 'def dumps(obj):\n    """'
    assert def_prompt("json.JSONEncoder.encode", "(self, o)") == '    def encode(self, o):\n        """'
    counts = write_prompts(tmp_path, modules=("json", "textwrap"))
    records = [json.loads(line) for s in ("train", "valid") for line in (tmp_path / s / "part-00000.jsonl").open()]
    assert len(records) == counts["train"] + counts["valid"] and counts["valid"] >= 1
    assert all(r["prompt"].endswith(DOCSTRING_STOP) and r["completion"].endswith(DOCSTRING_STOP) for r in records)
    assert {"json.dumps", "textwrap.fill"} <= {r["name"] for r in records}


# ------------------------------------------------------------------------------------------------ the engine


def test_greedy_equals_model_generate_token_for_token(model, tokenizer):
    prompts = [rendered_prompt(tokenizer, r) for r in chat_prompts()]
    prompts.append(tokenizer("def add(a, b):")["input_ids"])  # a string prompt, of another length
    stop = stop_token_ids(model.generation_config.eos_token_id, tokenizer)
    engine = HFEngine(model, tokenizer, GenerateConfig(temperature=0, max_new_tokens=24, batch_size=3), stop_ids=stop)
    outputs = engine.generate([GenerationRow(p, 0, 24) for p in prompts])
    for prompt, raw in zip(prompts, outputs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24)[0, len(prompt) :]
        expected = finish_response(ref.tolist(), max_new_tokens=24, eos_ids=stop)
        assert finish_response(raw, max_new_tokens=24, eos_ids=stop) == expected


def test_sampled_responses_do_not_depend_on_their_batch(model, tokenizer):
    prompts = [rendered_prompt(tokenizer, r) for r in chat_prompts()]
    rows = [GenerationRow(p, draw_seed(0, i, s), 20) for i, p in enumerate(prompts[:3]) for s in range(2)]
    stop = stop_token_ids(model.generation_config.eos_token_id, tokenizer)
    settings = GenerateConfig(temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=20, batch_size=6)
    together = HFEngine(model, tokenizer, settings, stop_ids=stop).generate(rows)
    settings.batch_size = 1
    alone = HFEngine(model, tokenizer, settings, stop_ids=stop).generate(rows)
    cut = [finish_response(o, max_new_tokens=20, eos_ids=stop) for o in together]
    assert cut == [finish_response(o, max_new_tokens=20, eos_ids=stop) for o in alone]
    assert cut[0] != cut[1]  # two samples of one prompt differ (their own streams)
    # top_k=1 leaves one candidate: sampling is then greedy
    settings.top_k, settings.batch_size = 1, 6
    greedy = HFEngine(model, tokenizer, GenerateConfig(temperature=0, max_new_tokens=20), stop_ids=stop).generate(rows)
    top1 = HFEngine(model, tokenizer, settings, stop_ids=stop).generate(rows)
    assert [finish_response(o, max_new_tokens=20, eos_ids=stop) for o in top1] == [
        finish_response(o, max_new_tokens=20, eos_ids=stop) for o in greedy
    ]


def test_a_stop_string_ends_the_response_at_the_token_that_completes_it(model, tokenizer):
    prompt = rendered_prompt(tokenizer, chat_prompts()[0])
    stop = stop_token_ids(model.generation_config.eos_token_id, tokenizer)
    settings = GenerateConfig(temperature=0, max_new_tokens=24)
    free = HFEngine(model, tokenizer, settings, stop_ids=stop).generate([GenerationRow(prompt, 0, 24)])[0]
    free = finish_response(free, max_new_tokens=24, eos_ids=stop)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    cut = next(i for i in range(3, len(free)) if decode(free[i : i + 1]).strip())  # a token with visible text
    string = decode(free[: cut + 1])[-2:]
    end = find_stop(decode, free, [string])
    settings.stop = [string]
    raw = HFEngine(model, tokenizer, settings, stop_ids=stop).generate([GenerationRow(prompt, 0, 24)])[0]
    response = finish_response(raw, max_new_tokens=24, eos_ids=stop, stops=[string], decode=decode)
    assert response == free[: end + 1] and string in decode(response) and string not in decode(response[:-1])
    assert len(raw) < 24 or len(free) < 24  # generation stopped early, not only cut afterwards


def test_vllm_engine_missing_is_a_clear_config_error(teacher_dir, tmp_path, monkeypatch):
    from kdcache.capture.job import run_cache_job

    monkeypatch.setitem(sys.modules, "vllm", None)  # as when it is not installed (it is not, here)
    path = write_jsonl(tmp_path / "data" / "p.jsonl", chat_prompts()[:1])
    with pytest.raises(ConfigError, match=r"generate.engine: vllm is not installed.*kdcache\[vllm\]"):
        make_worker(teacher_dir, path.parent, tmp_path / "out", "generate.engine=vllm")  # an actor's start
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(ConfigError, match=r"generate.engine: vllm is not installed in this environment"):
        run_cache_job(gen_config(teacher_dir, path.parent, tmp_path / "job", "generate.engine=vllm"))  # the driver
    assert not (tmp_path / "job").exists()  # refused before any work


# ------------------------------------------------------------------------------------------------ the worker


@pytest.mark.parametrize("mode", ["topk", "hybrid", "sample"])
def test_sequences_are_prompt_then_response_with_exact_targets_on_the_response(
    teacher_dir, model, tokenizer, tmp_path, monkeypatch, mode
):
    records = chat_prompts()
    path = write_jsonl(tmp_path / "data" / "p.jsonl", records)
    extra = [f"targets.mode={mode}", "targets.head=4", "targets.samples=16", "targets.temperatures=[1.0,2.0]"]
    worker, unit = make_worker(teacher_dir, path.parent, tmp_path / "out", *extra)
    calls = record_writes(worker, monkeypatch)
    record = worker.process(unit)

    assert record["prompts"] == len(records) and record["generated_sequences"] == 2 * len(records)
    assert len(calls) == 2 * len(records) and record["timing_s"]["generate"] > 0
    locators = line_offsets(path)
    seen = set()
    for call in calls:
        pid, sample = call["fields"]["prompt_id"], call["fields"]["sample_index"]
        index = [prompt_id(str(path), loc) for loc in locators].index(pid)
        seen.add((index, sample))
        assert call["seq_id"] == response_seq_id(str(path), locators[index], sample)
        prompt = rendered_prompt(tokenizer, records[index])
        ids = call["input_ids"]
        assert ids[: len(prompt)].tolist() == prompt  # every sequence starts with the rendered prompt
        response = ids[len(prompt) :]
        assert 1 <= len(response) <= 16 and (response[-1] == 2 or len(response) == 16)  # EOS or max_new_tokens
        assert 2 not in response[:-1].tolist()
        mask = call["mask"]
        assert mask.tolist() == [len(prompt) - 1 <= t < len(ids) - 1 for t in range(len(ids))]
        with torch.no_grad():  # what a second teacher forward gives on prompt + response
            z = model(torch.tensor([ids.tolist()])).logits[0].double()[torch.from_numpy(mask)]
        logp = torch.log_softmax(z, -1)
        head = call["head"]
        assert head.ids.shape[0] == int(mask.sum())
        if mode != "sample":
            kept = K if mode == "topk" else 4
            np.testing.assert_array_equal(head.ids, np.sort(torch.topk(logp, kept).indices.numpy(), axis=1))
            np.testing.assert_allclose(head.logprobs, np.take_along_axis(logp.numpy(), head.ids, 1), atol=1e-4)
        normalizers = torch.stack([torch.logsumexp(z, -1), torch.logsumexp(z / 2, -1)], -1)  # T = 1 and 2
        np.testing.assert_allclose(head.log_normalizers, normalizers.numpy(), atol=1e-4)
        np.testing.assert_allclose(head.entropy, -(logp.exp() * logp).sum(-1).numpy(), atol=1e-4)
        if mode != "topk":
            drawn = call["samples"]
            valid = drawn.counts > 0
            assert (drawn.counts.sum(1) == 16).all()
            np.testing.assert_allclose(
                drawn.logprobs[valid], np.take_along_axis(logp.numpy(), drawn.ids, 1)[valid], atol=1e-4
            )
    assert seen == {(i, s) for i in range(len(records)) for s in range(2)}


def test_reprocessing_a_unit_gives_the_same_bytes(teacher_dir, tmp_path):
    path = write_jsonl(tmp_path / "data" / "p.jsonl", chat_prompts())
    extra = ("targets.mode=hybrid", "targets.head=4", "targets.samples=8", "generate.temperature=1.0")
    first, unit = make_worker(teacher_dir, path.parent, tmp_path / "a", *extra)
    a = first.process(unit)
    again = first.process(unit)  # the same unit again (a retry): it loses the commit, its shard had the same bytes
    assert again["duplicate"] and again["sha256"] == a["sha256"]
    fresh, _ = make_worker(teacher_dir, path.parent, tmp_path / "b", *extra)
    assert fresh.process(unit)["sha256"] == a["sha256"]  # another worker, another URI: identical shard bytes
    # another batch size changes which responses share a forward, not their draws: the same tokens
    other, _ = make_worker(teacher_dir, path.parent, tmp_path / "c", *extra, "generate.batch_size=3")
    assert read_inputs(tmp_path / "c", other.process(unit)) == read_inputs(tmp_path / "a", a)


def read_inputs(uri: Path, record: dict) -> dict[int, list[int]]:
    from kdcache.formats import get_format
    from kdcache.formats.base import split_sequences

    data = get_format("parquet").read_shard((uri / record["path"]).read_bytes(), k=4, num_temperatures=1)
    return {seq: data.input_ids[rows].tolist() for seq, rows in split_sequences(data)}


def test_prompt_completion_prompts_and_string_prompts(teacher_dir, tokenizer, tmp_path, monkeypatch):
    records = [
        {"prompt": "def add(a, b):\n"},  # no completion field: none is read
        {"prompt": [{"role": "user", "content": "Say hi."}], "completion": "ignored"},
    ]
    path = write_jsonl(tmp_path / "data" / "pc.jsonl", records)
    worker, unit = make_worker(
        teacher_dir, path.parent, tmp_path / "out", "data.format=prompt_completion", "generate.temperature=0",
        "generate.n=1", "targets.positions=all",
    )  # fmt: skip
    calls = record_writes(worker, monkeypatch)
    worker.process(unit)
    string = tokenizer(records[0]["prompt"])["input_ids"]  # plain text with the tokenizer's special tokens
    prompts = [string, rendered_prompt(tokenizer, {"messages": records[1]["prompt"]})]
    for prompt in prompts:
        assert sum(c["input_ids"][: len(prompt)].tolist() == prompt for c in calls) == 1
    assert all(c["mask"] is None for c in calls)  # positions all: a target at every position
    assert all(c["head"].ids.shape[0] == len(c["input_ids"]) for c in calls)


@pytest.mark.parametrize(
    ("records", "fmt", "message"),
    [
        ([{"prompt": "x " * 200}], "prompt_completion", r"p\.jsonl: line 1: the prompt has \d+ tokens, data.max_len"),
        ([{"prompt": ""}], "prompt_completion", r"p\.jsonl: line 1: field 'prompt' is an empty prompt"),
        ([{"prompt": None}], "prompt_completion", r"p\.jsonl: line 1: field 'prompt' is an empty prompt"),
        ([{"messages": []}], "chat", r"p\.jsonl: line 1: field 'messages' is an empty conversation"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
            "chat",
            r"line 1: the conversation's last message is the assistant's; a prompt to answer ends with a user",
        ),
        ([{"text": "hi"}], "chat", r"line 1: missing field 'messages' \(data.messages_field\)"),
    ],
)
def test_bad_prompts_fail_naming_the_record(teacher_dir, tmp_path, records, fmt, message):
    path = write_jsonl(tmp_path / "data" / "p.jsonl", [chat_prompts()[0], *records] if fmt == "chat" else records)
    if fmt == "chat":
        message = message.replace("line 1", "line 2")
    worker, unit = make_worker(teacher_dir, path.parent, tmp_path / "out", f"data.format={fmt}")
    with pytest.raises(SourceError, match=message):
        worker.process(unit)
    assert worker.store.list_names("commits") == []


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_shards_store_prompt_id_and_sample_index(fmt, tmp_path):
    import duckdb

    from kdcache.codec import CodecParams
    from kdcache.formats import get_format
    from kdcache.formats.base import split_sequences
    from kdcache.formats.rows import logprob_table
    from kdcache.read.collate import collate_sequences
    from kdcache.read.reader import sequence_dict

    rng = np.random.default_rng(0)

    def head(t):
        ids = np.stack([rng.choice(50, 4, replace=False) for _ in range(t)])
        lps = -rng.random((t, 4)).astype(np.float32) - 1
        norms, tails = np.zeros((t, 1), np.float32), np.full((t, 1), -0.5, np.float32)
        return SimpleNamespace(ids=ids, logprobs=lps, log_normalizers=norms, tail_logprobs=tails, entropy=np.ones(t))

    writer = get_format(fmt).ShardWriter(k=4, num_temperatures=1, row_group_tokens=8)  # several row groups
    fields = [(2**62 + 5, 0), (2**62 + 5, 1), (17, 0)]
    for s, (pid, sample) in enumerate(fields):
        writer.add(10 + s, np.arange(5 + s), head(5 + s), sequence_fields={"prompt_id": pid, "sample_index": sample})
    with pytest.raises(ValueError, match="every sequence of a shard carries the same sequence fields"):
        writer.add(99, np.arange(3), head(3))
    with pytest.raises(ValueError, match="unknown sequence field 'prompt'"):
        writer.add(98, np.arange(3), head(3), sequence_fields={"prompt": 1})
    with pytest.raises(ValueError, match="'sample_index' = 4294967296 does not fit int32"):
        writer.add(97, np.arange(3), head(3), sequence_fields={"prompt_id": 1, "sample_index": 2**32})
    data = writer.finish()
    fmt_module = get_format(fmt)
    shard = fmt_module.read_shard(data, k=4, num_temperatures=1)
    got = [sequence_dict(seq, shard, rows) for seq, rows in split_sequences(shard)]
    assert [(int(s["prompt_id"]), int(s["sample_index"])) for s in got] == fields
    rows = fmt_module.read_rows(data, k=4, num_temperatures=1, codec=CodecParams(), vocab_size=50)
    seqs = [rows.sequence(i) for i in range(3)]
    batch = collate_sequences([*seqs, None], k=4, num_temperatures=1, logprob_table=logprob_table(CodecParams()))
    assert batch["prompt_id"].tolist() == [2**62 + 5, 2**62 + 5, 17, -1]
    assert batch["sample_index"].tolist() == [0, 1, 0, -1]
    if fmt == "parquet":  # plain columns for any Parquet reader
        (tmp_path / "s.parquet").write_bytes(data)
        query = f"select seq_id, any_value(prompt_id), any_value(sample_index), count(*) from '{tmp_path}/s.parquet'"
        assert duckdb.sql(query + " group by seq_id order by seq_id").fetchall() == [
            (10 + s, pid, sample, 5 + s) for s, (pid, sample) in enumerate(fields)
        ]
    else:
        arrays = fmt_module.read_arrays(data, k=4, num_temperatures=1, codec=CodecParams())
        assert arrays["prompt_id"].tolist() == [f[0] for f in fields]


# ------------------------------------------------------------------------------------------------ the job


@pytest.fixture(scope="module")
def prompt_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen-prompts")
    records = chat_prompts()
    more = [{"messages": [{"role": "user", "content": f"{q} In {n} words."}]} for n in (3, 5) for q in QUESTIONS]
    write_jsonl(root / "a.jsonl", records + more[:4])
    write_jsonl(root / "b.jsonl", more[4:])
    return root


JOB = ("generate.temperature=1.0", "generate.top_p=0.95", "targets.mode=hybrid", "targets.head=4",
       "targets.samples=8", "data.unit_bytes=400", "cluster.max_retries=2")  # fmt: skip


def shard_hashes(manifest: dict) -> list[tuple[str, str]]:
    return [(u["unit_id"], u["sha256"]) for u in manifest["units"]]


@pytest.fixture(scope="module")
def generated_cache(ray_session, teacher_dir, prompt_corpus, tmp_path_factory):
    from kdcache.capture.job import run_cache_job

    out = tmp_path_factory.mktemp("gen-cache") / "c"
    manifest = run_cache_job(gen_config(teacher_dir, prompt_corpus, out, *JOB))
    assert manifest["stats"]["num_units"] >= 4
    return out, manifest


def test_job_records_generation_and_license_and_info_shows_them(generated_cache, teacher_dir):
    from kdcache.tools.info import cache_summary, format_summary

    out, manifest = generated_cache
    prov = manifest["provenance"]
    assert prov["teacher"]["license"] == "other" and prov["teacher"]["license_name"] == "tiny-teacher-license"
    assert prov["teacher"]["source"] == "model card"
    gen = prov["generation"]
    settings = (gen["n"], gen["max_new_tokens"], gen["temperature"], gen["top_p"], gen["engine"])
    assert settings == (2, 16, 1.0, 0.95, "hf")
    assert gen["prompts"] == 5 + 12 and gen["sequences"] == 2 * gen["prompts"]
    assert gen["generated_tokens"] == sum(u["generated_tokens"] for u in manifest["units"]) > 0
    assert gen["generated_tokens_per_s"] > 0 and gen["actor_generated_tokens_per_s"]
    assert manifest["fingerprint_inputs"]["generate"]["stop_token_ids"] == [2]
    assert manifest["stats"]["num_sequences"] == gen["sequences"]
    from kdcache.tools.verify import verify_cache

    report = verify_cache(str(out), deep=True)
    assert not report.problems and report.units == manifest["stats"]["num_units"]
    text = format_summary(cache_summary(str(out)))
    assert "license      other (model card; tiny-teacher-license; LICENSE)" in text
    assert "34 responses to 17 prompts (n=2) by the teacher, engine hf: temperature 1" in text
    assert "tokens generated at" in text


def test_reading_exposes_prompt_id_and_sample_index(generated_cache, prompt_corpus, tokenizer):
    from kdcache.read.dataset import KDCacheDataset
    from kdcache.read.reader import open_cache

    out, manifest = generated_cache
    ids = {}
    for path in sorted(prompt_corpus.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for loc, record in zip(line_offsets(path), records):
            ids[prompt_id(str(path), loc)] = rendered_prompt(tokenizer, record)
    pairs = set()
    for seq in open_cache(str(out)).iter_sequences():
        prompt = ids[int(seq["prompt_id"])]
        assert seq["input_ids"][: len(prompt)].tolist() == prompt
        pairs.add((int(seq["prompt_id"]), int(seq["sample_index"])))
    assert pairs == {(p, s) for p in ids for s in (0, 1)}
    batch = next(iter(KDCacheDataset(str(out), batch_size=4, seed=0)))
    assert batch["prompt_id"].dtype == torch.int64 and set(batch["sample_index"].tolist()) <= {0, 1}
    assert set(batch["prompt_id"].tolist()) <= set(ids)


def test_loss_mask_read_back_is_the_response(generated_cache, prompt_corpus, tokenizer):
    from kdcache.read.dataset import KDCacheDataset
    from kdcache.read.reader import open_cache

    out, manifest = generated_cache
    lengths = {}
    for path in sorted(prompt_corpus.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for loc, record in zip(line_offsets(path), records):
            lengths[prompt_id(str(path), loc)] = len(rendered_prompt(tokenizer, record))
    stored = 0
    for seq in open_cache(str(out)).iter_sequences():
        mask, p = seq["loss_mask"].astype(bool), lengths[int(seq["prompt_id"])]
        # a target at the prompt's last position (it predicts the response's first token) through the response's
        # next-to-last one: the generated text is input_ids[p:]
        assert mask.tolist() == [p - 1 <= t < len(mask) - 1 for t in range(len(mask))]
        assert (seq["target_ids"][~mask] == -1).all() and (seq["target_ids"][mask] >= 0).all()
        assert tokenizer.decode(seq["input_ids"][p:].tolist())  # the response, recoverable with the tokenizer
        stored += int(mask.sum())
    assert stored == manifest["stats"]["num_target_tokens"] == manifest["provenance"]["generation"]["generated_tokens"]
    batch = next(iter(KDCacheDataset(str(out), batch_size=4, seed=0)))
    assert not batch["loss_mask"][:, 0].any() and (batch["labels"][~batch["loss_mask"]] == -100).all()


def test_a_student_with_another_tokenizer_learns_only_the_responses(generated_cache, tmp_path):
    """A generated sequence has no source text: the cache stores what its tokens spell, and a student with another
    tokenizer reads it in its own ids and is taught the response's bytes only, never the prompt's."""
    from transformers import AutoTokenizer

    from kdcache.pieces import spelled_text, token_pieces
    from kdcache.read.dataset import KDCacheDataset
    from kdcache.read.reader import CacheReader

    out, _ = generated_cache
    reader = CacheReader(str(out))
    response_start = {}  # seq_id -> (the stored text, the byte where the response begins)
    for unit in reader.units:
        rows = reader.read_unit_rows(unit, token_text=True)
        for seq in map(rows.sequence, range(rows.num_sequences)):
            first = int(np.argmax(seq["target_mask"]))  # the prompt's last position: its target is the response's
            response_start[int(seq["seq_id"])] = (bytes(seq["token_text"]), int(seq["token_text_ends"][first]))
    student = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "student", vocab_size=200))
    pieces, taught = token_pieces(student), 0
    for batch in KDCacheDataset(str(out), batch_size=4, tokenizer=student, cross_tokenizer=True, shuffle=False):
        for row in np.flatnonzero(batch["seq_id"].numpy() >= 0):
            text, start = response_start[int(batch["seq_id"][row])]
            valid = batch["attention_mask"][row].bool()
            spelled, ends = spelled_text(pieces, batch["input_ids"][row][valid].numpy())
            assert spelled == text
            learnt = np.flatnonzero(batch["loss_mask"][row][valid].numpy()[:-1])  # position s learns token s + 1
            assert (ends[learnt] >= start).all()  # token s + 1 starts at ends[s]: inside the response
            taught += len(learnt)
    assert taught > 0


def test_generation_settings_are_part_of_the_identity(generated_cache, teacher_dir, prompt_corpus, tmp_path):
    from kdcache.capture.job import compute_fingerprint
    from kdcache.identity import fingerprint_of

    _, clean = generated_cache
    same = compute_fingerprint(gen_config(teacher_dir, prompt_corpus, tmp_path / "x", *JOB))
    assert fingerprint_of(same) == clean["fingerprint"]  # another URI, same settings: the same cache
    for override in ("generate.seed=1", "generate.n=3", "generate.top_p=0.9", "generate.stop=['##']"):
        changed = compute_fingerprint(gen_config(teacher_dir, prompt_corpus, tmp_path / "x", *JOB, override))
        assert fingerprint_of(changed) != clean["fingerprint"], override
    plain = compute_fingerprint(tiny_job_config(teacher_dir, prompt_corpus, tmp_path / "y", "data.format=chat"))
    assert "generate" not in plain  # caches without generation keep their fingerprints


@pytest.mark.slow
def test_driver_killed_mid_job_then_rerun_gives_the_same_bytes(generated_cache, teacher_dir, prompt_corpus, tmp_path):
    from kdcache.capture.job import run_cache_job
    from kdcache.store import Store

    _, clean = generated_cache
    uri = tmp_path / "killed"
    cfg = gen_config(teacher_dir, prompt_corpus, uri, *JOB, "cluster.num_actors=1")
    store = Store(str(uri))
    # unit 2 stalls, so the job is certainly unfinished when the driver dies
    committed = kill_driver_after_commits(
        cfg,
        tmp_path,
        store,
        faults=[{"unit_index": 2, "action": "stall", "seconds": 300}],
        env={"PYTHONPATH": str(ROOT)},
    )
    assert not store.exists("index.json") and 2 <= committed < clean["stats"]["num_units"]
    manifest = run_cache_job(gen_config(teacher_dir, prompt_corpus, uri, *JOB))
    assert manifest["stats"]["last_run"]["units"] == manifest["stats"]["num_units"] - committed
    assert shard_hashes(manifest) == shard_hashes(clean)


def test_train_student_job_on_a_generated_cache(generated_cache, tmp_path):
    from transformers import LlamaConfig

    out, _ = generated_cache
    LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128,
    ).to_json_file(str(tmp_path / "student.json"))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += [str(ROOT / "jobs" / "train_student.py"), "--cache", str(out), "--student", str(tmp_path / "student.json")]
    cmd += ["--steps", "3", "--batch-size", "4", "--alpha", "0.5"]  # soft targets + CE on the responses
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["cache"] == str(out) and lines[0]["generated"]["n"] == 2 and lines[0]["license"] == "other"
    assert [line["step"] for line in lines if "step" in line] == [1, 2, 3]
    assert math.isfinite(lines[-1]["final_loss"])


# ------------------------------------------------------------------------------------------------ the loss


def test_distillation_loss_ce_only_on_the_positions_with_targets():
    from kdcache.losses import cross_entropy, distillation_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 10)
    labels = torch.randint(0, 10, (2, 6))
    labels[:, -1] = -100
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:5] = True  # the response's positions
    mask[1, 1:3] = True
    batch = {"labels": labels, "loss_mask": mask}
    got = distillation_loss(logits, batch, alpha=0.0)
    expected = cross_entropy(logits, labels.masked_fill(~mask, -100))
    torch.testing.assert_close(got, expected)
    assert not torch.isclose(got, cross_entropy(logits, labels))  # the prompt's labels are not trained
