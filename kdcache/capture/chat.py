"""Conversations and prompt/completion records: check them, render them with the chat template, find the trained
tokens.

A chat record holds a list of messages ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``; a
prompt/completion record a prompt (a string, or a list of messages) and a completion (a string). `parse_chat` and
`parse_prompt_completion` turn a record into a `ChatRecord` or raise `SourceError` naming the file, line or row, the
message and what is wrong. `ChatRenderer.render` turns a `ChatRecord` into token ids and an **assistant mask**: True
on the tokens the student learns (an assistant turn's content and the end-of-turn token the template puts inside the
turn; for prompt/completion, the completion only). The cache stores the target at position t (the distribution of
token t + 1) iff token t + 1 is an assistant token: `target_mask` shifts the mask by one.

Where the assistant tokens are:

* a template with ``{% generation %}`` ... ``{% endgeneration %}`` markers marks them itself (transformers'
  ``apply_chat_template(..., return_assistant_tokens_mask=True)``: every token overlapping a marked span);
* otherwise the conversation is rendered turn by turn: for assistant message i, the prompt before it (messages
  ``[:i]`` with the generation prompt) and the conversation through it (messages ``[:i + 1]``) must both tokenize to
  token prefixes of the whole conversation, and the tokens between the two are the turn's. A template that renders
  earlier turns differently once later ones follow, or whose text re-tokenizes across the boundary (a token that
  spans the end of the prompt and the start of the answer), is refused with a `SourceError` naming the record,
  instead of silently misaligning the mask.

A prompt given as a string is plain text (no template): the record's tokens are ``tokens(prompt)`` (with the
tokenizer's special tokens, e.g. BOS) followed by ``tokens(completion)`` (without), and the completion's tokens plus
EOS (when ``add_eos``) are trained. Tokenized apart, the prompt is exactly what a model is given at inference, and a
boundary that would merge in joint tokenization (a prompt ending in "\n", a completion starting with spaces) needs no
refusal.

No transformers import: the tokenizer is duck-typed (``apply_chat_template``, ``__call__``, ``eos_token_id``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.errors import ConfigError, SourceError
from kdcache.identity import tokenizer_chat_template

__all__ = [
    "ROLES",
    "ChatRecord",
    "ChatRenderer",
    "effective_chat_template",
    "has_generation_markers",
    "parse_chat",
    "parse_messages",
    "parse_prompt",
    "parse_prompt_completion",
    "read_chat_template",
    "target_mask",
]

ROLES = ("system", "user", "assistant", "tool")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the keyword transformers looks for
_INLINE_TEMPLATE = re.compile(r"\{%|\{\{")  # a data.chat_template value holding these is a template, not a path
MAX_TEMPLATE_BYTES = 1 << 20  # a chat template file larger than this is refused (real ones are a few KB)


@dataclass(frozen=True)
class ChatRecord:
    """One checked record, ready to render.

    Attributes:
        where: file and line (or row) of the record, for error messages.
        messages: the conversation (chat), or the prompt's messages followed by the completion as an assistant
            message (prompt_completion with a message-list prompt); None for a string prompt.
        prompt: prompt_completion with a string prompt: the prompt text (rendered without a template).
        completion: prompt_completion with a string prompt: the completion text.
        last_turn_only: only the last assistant turn is trained (prompt_completion: the completion).
    """

    where: str
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    completion: str | None = None
    last_turn_only: bool = False


def parse_messages(value: Any, where: str, key: str) -> tuple[dict[str, Any], ...]:
    """Check a list of messages; return them as plain dicts (keys with null values dropped, as transformers does).

    Args:
        value: the field's value (a list of mappings; Parquet gives structs as dicts).
        where: file and line or row; key: the config key naming the field, for the message.

    Raises:
        SourceError: not a non-empty list of mappings, or a message without a known ``role`` or a string ``content``.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise SourceError(f"{where}: {key} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        at = f"{where}: {key} message {i}"
        if not isinstance(message, dict):
            raise SourceError(f"{at}: expected an object with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if role is None:
            raise SourceError(f"{at}: missing 'role' (one of {', '.join(ROLES)})")
        if role not in ROLES:
            raise SourceError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if "content" not in message:
            raise SourceError(f"{at} ({role}): missing 'content' (a string)")
        if not isinstance(message["content"], str):
            raise SourceError(
                f"{at} ({role}): content must be a string, got {type(message['content']).__name__}; "
                "multimodal or structured content is not supported"
            )
        out.append(message)
    return tuple(out)


def parse_chat(record: Any, where: str, *, messages_field: str) -> ChatRecord | None:
    """A chat record -> `ChatRecord`; None for a null or empty conversation (an empty document).

    Raises:
        SourceError: not an object, a missing field, or malformed messages (see `parse_messages`).
    """
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if messages_field not in record:
        raise SourceError(f"{where}: missing field {messages_field!r} (data.messages_field)")
    value = record[messages_field]
    if value is None:
        return None
    messages = parse_messages(value, where, f"field {messages_field!r}")
    return ChatRecord(where, messages=messages) if messages else None


def parse_prompt_completion(record: Any, where: str, *, prompt_field: str, completion_field: str) -> ChatRecord | None:
    """A prompt/completion record -> `ChatRecord`; None when the completion is null or empty (nothing to learn).

    The prompt is a string (plain text) or a list of messages (rendered with the chat template and its generation
    prompt; the completion becomes the assistant's answer).

    Raises:
        SourceError: a missing field, a completion that is not a string, a prompt that is neither a string nor
            messages.
    """
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field, key in ((prompt_field, "data.prompt_field"), (completion_field, "data.completion_field")):
        if field not in record:
            raise SourceError(f"{where}: missing field {field!r} ({key})")
    prompt, completion = record[prompt_field], record[completion_field]
    if completion is None:
        return None
    if not isinstance(completion, str):
        raise SourceError(f"{where}: field {completion_field!r} must be a string, got {type(completion).__name__}")
    if not completion:
        return None
    if prompt is None:
        prompt = ""
    if isinstance(prompt, str):
        return ChatRecord(where, prompt=prompt, completion=completion, last_turn_only=True)
    messages = parse_messages(prompt, where, f"field {prompt_field!r}")
    if not messages:
        raise SourceError(f"{where}: field {prompt_field!r} is an empty list of messages")
    answer = {"role": "assistant", "content": completion}
    return ChatRecord(where, messages=(*messages, answer), last_turn_only=True)


def parse_prompt(record: Any, where: str, *, fmt: str, messages_field: str, prompt_field: str) -> ChatRecord:
    """A record whose prompt the teacher answers (`generate`): a chat record's conversation, or a prompt_completion
    record's prompt (a string, or a list of messages); a completion field, if any, is not read.

    Raises:
        SourceError: not an object, a missing field, malformed messages, or an empty prompt (nothing to answer).
    """
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    field, key = (messages_field, "data.messages_field") if fmt == "chat" else (prompt_field, "data.prompt_field")
    if field not in record:
        raise SourceError(f"{where}: missing field {field!r} ({key})")
    value = record[field]
    if fmt != "chat" and (value is None or isinstance(value, str)):
        if not (value or "").strip():
            raise SourceError(f"{where}: field {field!r} is an empty prompt; generation needs a prompt to answer")
        return ChatRecord(where, prompt=value)
    messages = parse_messages([] if value is None else value, where, f"field {field!r}")
    if not messages:
        raise SourceError(f"{where}: field {field!r} is an empty conversation; generation needs a prompt to answer")
    return ChatRecord(where, messages=messages)


def has_generation_markers(template: str) -> bool:
    """Whether a chat template marks assistant text with ``{% generation %}`` (transformers' keyword)."""
    return bool(_GENERATION_MARKER.search(template))


def read_chat_template(spec: str | None, storage_options: dict[str, Any] | None = None) -> str | None:
    """The ``data.chat_template`` setting as template text: inline Jinja as it is, else the content of the file or
    fsspec URL it names. None stays None (the tokenizer's own template is used).

    Raises:
        ConfigError: the file cannot be read, is larger than `MAX_TEMPLATE_BYTES`, or is not UTF-8.
    """
    if spec is None or _INLINE_TEMPLATE.search(spec):
        return spec
    from kdcache.store import open_url

    try:
        with open_url(spec, "rb", storage_options) as f:
            raw = f.read(MAX_TEMPLATE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"data.chat_template: {spec!r} is neither a Jinja template (no '{{%' or '{{{{') nor a readable file "
            f"({exc})"
        ) from None
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise ConfigError(f"data.chat_template: {spec} is larger than {MAX_TEMPLATE_BYTES} bytes; not a template")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data.chat_template: {spec} is not UTF-8 text (byte {exc.start})") from None


def effective_chat_template(tokenizer: Any, override: str | None) -> str | None:
    """The template records are rendered with: ``override`` (data.chat_template's text), else the tokenizer's
    default one, else None."""
    return override if override is not None else tokenizer_chat_template(tokenizer)


def target_mask(assistant: np.ndarray) -> np.ndarray:
    """Positions that get a target: ``out[t] = assistant[t + 1]`` (the target at t is the distribution of token
    t + 1); the last position has no next token.

    Args:
        assistant: ``[T]`` bool, True on the trained tokens.

    Returns:
        ``[T]`` bool.
    """
    assistant = np.asarray(assistant, dtype=bool)
    out = np.zeros(len(assistant), dtype=bool)
    out[:-1] = assistant[1:]
    return out


def _last_run(mask: np.ndarray) -> np.ndarray:
    """Only the last run of True values of ``mask`` (the last assistant turn)."""
    out = np.zeros_like(mask)
    true = np.flatnonzero(mask)
    if len(true):
        end = true[-1] + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        out[start:end] = True
    return out


class ChatRenderer:
    """Renders `ChatRecord`s into token ids and assistant masks with one tokenizer and template.

    Args:
        tokenizer: a transformers fast tokenizer (the teacher's).
        template: the chat template text (`effective_chat_template`); None when there is none (then only string
            prompts can be rendered).
        add_eos: append EOS after a string prompt's completion (and train it).
    """

    def __init__(self, tokenizer: Any, template: str | None, *, add_eos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.add_eos = add_eos
        self.markers = template is not None and has_generation_markers(template)

    def render(self, record: ChatRecord) -> tuple[list[int], np.ndarray]:
        """Token ids ``[T]`` of the record and its assistant mask ``[T]`` bool (see the module docstring).

        Raises:
            SourceError: the record cannot be rendered or its assistant tokens cannot be found safely (names the
                record and the reason).
        """
        if record.messages is None:
            return self._render_text(record)
        if self.template is None:
            raise SourceError(
                f"{record.where}: the tokenizer has no chat template to render messages with; set data.chat_template"
            )
        if self.markers:
            ids, mask = self._render_marked(record)
        else:
            ids, mask = self._render_by_turns(record)
        return ids, (_last_run(mask) if record.last_turn_only else mask)

    def render_prompt(self, record: ChatRecord) -> list[int]:
        """The token ids a model is given to answer ``record`` (a `parse_prompt` record): messages rendered with the
        template and its generation prompt, or a string prompt tokenized with the tokenizer's special tokens.

        Raises:
            SourceError: the conversation does not end with a user or tool message (there is nothing to answer), the
                template fails on it, or there is no template to render messages with.
        """
        if record.messages is None:
            return list(self.tokenizer(record.prompt or "", add_special_tokens=True)["input_ids"])
        if self.template is None:
            raise SourceError(
                f"{record.where}: the tokenizer has no chat template to render messages with; set data.chat_template"
            )
        last = record.messages[-1]["role"]
        if last not in ("user", "tool"):
            raise SourceError(
                f"{record.where}: the conversation's last message is the {last}'s; a prompt to answer ends with a "
                "user (or tool) message"
            )
        text = self._apply(record, record.messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _apply(self, record: ChatRecord, messages: Sequence[dict[str, Any]], **kw: Any) -> Any:
        try:
            return self.tokenizer.apply_chat_template(list(messages), chat_template=self.template, **kw)
        except Exception as exc:  # the template's own raise_exception(...) or a Jinja error on this record
            raise SourceError(f"{record.where}: the chat template fails on this conversation: {exc}") from None

    def _render_marked(self, record: ChatRecord) -> tuple[list[int], np.ndarray]:
        out = self._apply(record, record.messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return ids, np.asarray(out["assistant_masks"], dtype=bool).reshape(len(ids))

    def _render_by_turns(self, record: ChatRecord) -> tuple[list[int], np.ndarray]:
        messages = record.messages
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if record.last_turn_only:
            turns = turns[-1:]
        texts = [self._apply(record, messages, tokenize=False)]
        for i in turns:
            if i == 0:
                raise SourceError(
                    f"{record.where}: the conversation starts with an assistant message; without {{% generation %}} "
                    "markers in the template there is no prompt to tell its tokens from (drop it or add markers)"
                )
            texts.append(self._apply(record, messages[:i], tokenize=False, add_generation_prompt=True))
            texts.append(self._apply(record, messages[: i + 1], tokenize=False))
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = list(encoded[0])
        mask = np.zeros(len(ids), dtype=bool)
        for n, i in enumerate(turns):
            start = _prefix_length(ids, encoded[1 + 2 * n], record, f"the prompt before message {i}")
            stop = _prefix_length(ids, encoded[2 + 2 * n], record, f"the conversation through message {i}")
            if stop < start:
                raise SourceError(
                    f"{record.where}: the chat template renders message {i} (assistant) shorter than its prompt; "
                    "add {% generation %} markers to the template (data.chat_template)"
                )
            mask[start:stop] = True
        return ids, mask

    def _render_text(self, record: ChatRecord) -> tuple[list[int], np.ndarray]:
        prompt = list(self.tokenizer(record.prompt or "", add_special_tokens=True)["input_ids"])
        completion = self.tokenizer(record.completion or "", add_special_tokens=False)["input_ids"]
        ids, start = prompt + list(completion), len(prompt)
        eos = self.tokenizer.eos_token_id
        if self.add_eos and eos is not None:
            ids.append(int(eos))
        mask = np.zeros(len(ids), dtype=bool)
        mask[start:] = True
        return ids, mask


def _prefix_length(ids: Sequence[int], prefix: Sequence[int], record: ChatRecord, what: str) -> int:
    """len(prefix) when ``prefix`` is a token prefix of ``ids``; else a SourceError saying where they part."""
    n = len(prefix)
    if n <= len(ids) and list(ids[:n]) == list(prefix):
        return n
    at = next((j for j, (a, b) in enumerate(zip(ids, prefix)) if a != b), min(n, len(ids)))
    raise SourceError(
        f"{record.where}: {what} tokenizes differently alone than inside the whole record (tokens part at {at} of "
        f"{n}): a token spans the boundary between prompt and answer, or the template renders earlier turns "
        "differently once later ones follow, so the trained tokens cannot be told apart safely. Add {% generation "
        "%} markers to the chat template (data.chat_template), or end the prompt on a token boundary (e.g. no "
        "trailing space)"
    )
