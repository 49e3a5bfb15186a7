"""Conversations and prompt/completion records: parsing with clear errors, rendering with the chat template, the
assistant mask (generation markers or the turn-by-turn prefix diff, refused when unsafe), the config keys, the
fingerprint and the student check. No model: `test_chat_capture.py` runs the teacher on conversations.

Run: ``python -m pytest tests/test_chat.py -q``
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl
from tiny_models import CHAT_TEMPLATE, CHAT_TEMPLATE_MERGING, CHAT_TEMPLATE_PLAIN, build_tiny_tokenizer

from kdcache.capture.chat import (
    ChatRecord,
    ChatRenderer,
    has_generation_markers,
    parse_prompt_completion,
    read_chat_template,
    target_mask,
)
from kdcache.capture.plan import plan_units
from kdcache.capture.sources import iter_documents
from kdcache.config import load_config
from kdcache.errors import CacheMismatchError, ConfigError, SourceError
from kdcache.identity import check_student, fingerprint_inputs, fingerprint_of

# A conversation with a system prompt, two assistant turns and a tool message in between.
CONVERSATION = (
    {"role": "system", "content": "You answer questions about the Python standard library."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
    {"role": "tool", "content": '{"module": "json", "name": "loads"}'},
    {"role": "user", "content": "And json.loads?"},
    {"role": "assistant", "content": "Deserialize s to a Python object."},
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny byte-level BPE tokenizer with `CHAT_TEMPLATE` (generation markers)."""
    from transformers import AutoTokenizer

    path = build_tiny_tokenizer(tmp_path_factory.mktemp("chat-tok"), chat_template=CHAT_TEMPLATE)
    return AutoTokenizer.from_pretrained(path)


def trained_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


# ------------------------------------------------------------------------------------------------ rendering


def test_generation_markers_and_prefix_diff_find_the_same_assistant_tokens(tokenizer):
    record = ChatRecord("f.jsonl: line 1", messages=CONVERSATION)
    marked = ChatRenderer(tokenizer, CHAT_TEMPLATE)
    plain = ChatRenderer(tokenizer, CHAT_TEMPLATE_PLAIN)
    assert marked.markers and not plain.markers
    ids, mask = marked.render(record)
    ids_plain, mask_plain = plain.render(record)
    assert ids == ids_plain and mask.tolist() == mask_plain.tolist()
    # exactly the assistants' contents and their end-of-turn tokens: no header, no system/user/tool text
    assert trained_text(tokenizer, ids, mask) == (
        "Serialize obj to a JSON formatted str.</s>Deserialize s to a Python object.</s>"
    )
    expected = tokenizer.apply_chat_template(list(CONVERSATION), return_dict=True, return_assistant_tokens_mask=True)
    assert ids == expected["input_ids"] and mask.tolist() == [bool(m) for m in expected["assistant_masks"]]
    starts = np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1
    assert len(starts) == 2  # two turns, separated by prompt tokens


def test_a_template_that_retokenizes_across_the_boundary_is_refused(tokenizer):
    # "assistant: " + "self ..." tokenizes as [":", " self"]; alone the prompt ends [":", " "]
    record = ChatRecord(
        "f.jsonl: line 7",
        messages=({"role": "user", "content": "Name the instance argument"}, {"role": "assistant", "content": "self"}),
    )
    with pytest.raises(SourceError, match=r"f\.jsonl: line 7: the prompt before message 1 tokenizes differently"):
        ChatRenderer(tokenizer, CHAT_TEMPLATE_MERGING).render(record)


def test_a_template_error_names_the_record(tokenizer):
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(SourceError, match=r"line 3: the chat template fails on this conversation: .*alternate"):
        ChatRenderer(tokenizer, template).render(ChatRecord("f.jsonl: line 3", messages=CONVERSATION))


def test_prompt_completion_trains_only_the_completion(tokenizer):
    text = ChatRecord("p: line 1", prompt="def add(a, b):\n", completion="    return a + b\n", last_turn_only=True)
    ids, mask = ChatRenderer(tokenizer, None, add_eos=True).render(text)
    prompt = tokenizer("def add(a, b):\n")["input_ids"]  # the prompt exactly as a model is given it alone
    assert ids[: len(prompt)] == prompt and not mask[: len(prompt)].any() and ids[-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, ids, mask) == "    return a + b\n</s>"  # "\n" + "    " would merge if joined
    # a message prompt (with an earlier assistant turn) + the completion as the assistant's answer: only the answer
    record = parse_prompt_completion(
        {"prompt": list(CONVERSATION[:5]), "completion": "Parse a JSON document."},
        "p: line 2",
        prompt_field="prompt",
        completion_field="completion",
    )
    for template in (CHAT_TEMPLATE, CHAT_TEMPLATE_PLAIN):
        ids, mask = ChatRenderer(tokenizer, template).render(record)
        assert trained_text(tokenizer, ids, mask) == "Parse a JSON document.</s>"
        assert ids == tokenizer.apply_chat_template([*CONVERSATION[:5], record.messages[-1]])["input_ids"]


def test_messages_without_a_template_are_refused(tokenizer):
    with pytest.raises(SourceError, match="no chat template.*data.chat_template"):
        ChatRenderer(tokenizer, None).render(ChatRecord("f: line 1", messages=CONVERSATION))


def test_target_mask_is_the_assistant_mask_shifted_by_one():
    assistant = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    assert target_mask(assistant).tolist() == [False, True, True, False, True, False]
    assert target_mask(np.zeros(0, bool)).tolist() == []


# ------------------------------------------------------------------------------------------------ records


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"content": "hi"}], r"message 0: missing 'role'"),
        ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], r"message 1: role 'bot' is not one"),
        ([{"role": "user", "content": ["a", "b"]}], r"message 0 \(user\): content must be a string, got list"),
        ([{"role": "assistant"}], r"message 0 \(assistant\): missing 'content'"),
        (["hello"], r"message 0: expected an object"),
        ("hello", r"must be a list of messages, got str"),
    ],
)
def test_malformed_chat_records_name_file_line_and_message(tmp_path, messages, error):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": list(CONVERSATION)}, {"messages": messages}])
    (unit,) = plan_units(str(path), "chat", unit_bytes=1 << 20)
    docs = iter_documents(unit.to_dict(), fmt="chat", text_field="text", ids_field=None)
    assert next(docs).chat.messages == CONVERSATION
    with pytest.raises(SourceError, match=rf"c\.jsonl: line 2: field 'messages' {error}"):
        next(docs)


def test_missing_fields_are_named_with_their_config_key(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversation": []}])
    (unit,) = plan_units(str(path), "chat", unit_bytes=1 << 20)
    with pytest.raises(SourceError, match=r"line 1: missing field 'messages' \(data.messages_field\)"):
        list(iter_documents(unit.to_dict(), fmt="chat", text_field="text", ids_field=None))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": 3}, {"prompt": "a"}])
    (unit,) = plan_units(str(path), "prompt_completion", unit_bytes=1 << 20)
    docs = iter_documents(unit.to_dict(), fmt="prompt_completion", text_field="text", ids_field=None)
    with pytest.raises(SourceError, match=r"line 1: field 'completion' must be a string, got int"):
        next(docs)


def test_chat_records_from_parquet_and_empty_records(tmp_path):
    rows = [list(CONVERSATION), [], None, [{"role": "user", "content": "x", "name": None}]]
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": rows}), path, row_group_size=2)
    units = plan_units(str(tmp_path / "*.parquet"), "chat", unit_bytes=1 << 20)
    assert [u.kind for u in units] == ["row_group", "row_group"]
    docs = [d for u in units for d in iter_documents(u.to_dict(), fmt="chat", text_field="text", ids_field=None)]
    assert [d.locator for d in docs] == ["r0", "r1", "r2", "r3"]
    assert docs[0].chat.messages == CONVERSATION  # struct fields absent from a message come back as nulls: dropped
    assert docs[1].chat is None and docs[2].chat is None  # empty conversations are empty documents
    assert docs[3].chat.messages == ({"role": "user", "content": "x"},)
    assert "r3" in docs[3].chat.where or "row 3" in docs[3].chat.where


def test_prompt_completion_records(tmp_path):
    records = [
        {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"},
        {"prompt": "unanswered", "completion": None},
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    (unit,) = plan_units(str(path), "prompt_completion", unit_bytes=1 << 20)
    docs = list(iter_documents(unit.to_dict(), fmt="prompt_completion", text_field="text", ids_field=None))
    assert (docs[0].chat.prompt, docs[0].chat.completion, docs[0].chat.messages) == ("Q: 2+2?\nA:", " 4", None)
    assert docs[1].chat.messages[-1] == {"role": "assistant", "content": "hello"} and docs[1].chat.last_turn_only
    assert docs[2].chat is None


# ------------------------------------------------------------------------------------------------ config, identity


def chat_config(*extra: str):
    return load_config(None, ["teacher.model=m", "data.source=x.jsonl", "output.uri=/tmp/c", *extra])


def test_positions_default_by_format_and_bad_combinations_name_the_key():
    assert chat_config().targets.positions == "all"
    assert chat_config("data.format=chat").targets.positions == "assistant"
    assert chat_config("data.format=prompt_completion").targets.positions == "assistant"
    assert chat_config("data.format=chat", "targets.positions=all").targets.positions == "all"
    for extra, key in [
        (("targets.positions=assistant",), "targets.positions: assistant needs data.format chat"),
        (("data.format=chat", "targets.positions=some"), "targets.positions: must be one of all, assistant"),
        (("data.chat_template='{{ x }}'",), "data.chat_template: only used with data.format chat"),
        (("data.format=chat", "data.ids_field=ids"), "data.ids_field: not supported with data.format=chat"),
        (("data.format=chat", "data.messages_field="), "data.messages_field: must be a record field name"),
    ]:
        with pytest.raises(ConfigError, match=key):
            chat_config(*extra)


def test_chat_template_setting_inline_or_file(tmp_path):
    assert read_chat_template("{{ messages }}") == "{{ messages }}"
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    assert read_chat_template(str(tmp_path / "t.jinja")) == CHAT_TEMPLATE
    assert has_generation_markers(CHAT_TEMPLATE) and not has_generation_markers(CHAT_TEMPLATE_PLAIN)
    with pytest.raises(ConfigError, match="data.chat_template: .*neither a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))


FILES = [("/data/chat.jsonl", 1000)]  # the input files as (absolute URL, size)


def test_fingerprint_covers_the_template_and_the_positions():
    info = {"padded_vocab_size": 320}
    tok = {"name": "t", "hash": "h", "vocab_size": 256}
    chat = chat_config("data.format=chat")
    base = fingerprint_of(fingerprint_inputs(chat, info, tok, FILES, CHAT_TEMPLATE))
    assert fingerprint_of(fingerprint_inputs(chat, info, tok, FILES, CHAT_TEMPLATE_PLAIN)) != base
    every_position = chat_config("data.format=chat", "targets.positions=all")
    assert fingerprint_of(fingerprint_inputs(every_position, info, tok, FILES, CHAT_TEMPLATE)) != base
    assert fingerprint_of(fingerprint_inputs(chat, info, tok, FILES, CHAT_TEMPLATE)) == base
    inputs = fingerprint_inputs(chat, info, tok, FILES, CHAT_TEMPLATE)
    assert inputs["targets"]["positions"] == "assistant" and len(inputs["data"]["chat_template_sha256"]) == 64
    assert "chat_template_sha256" not in fingerprint_inputs(chat_config(), info, tok, FILES)["data"]


def test_student_check_compares_the_chat_template(tokenizer):
    from kdcache.identity import tokenizer_fingerprint

    tok = {"name": "teacher", **tokenizer_fingerprint(tokenizer)}
    inputs = fingerprint_inputs(chat_config("data.format=chat"), {"padded_vocab_size": 320}, tok, FILES, CHAT_TEMPLATE)
    manifest = {"fingerprint_inputs": json.loads(json.dumps(inputs))}
    check_student(manifest, tokenizer=tokenizer)  # the same template
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        check_student(manifest, tokenizer=tokenizer)  # a student without a template: nothing to compare
        tokenizer.chat_template = CHAT_TEMPLATE_PLAIN
        with pytest.raises(CacheMismatchError, match="student chat template sha256 .* rendered with"):
            check_student(manifest, tokenizer=tokenizer)
        text_cache = {"fingerprint_inputs": fingerprint_inputs(chat_config(), {"padded_vocab_size": 320}, tok, FILES)}
        check_student(text_cache, tokenizer=tokenizer)  # a text cache has no template to compare
    finally:
        tokenizer.chat_template = original
