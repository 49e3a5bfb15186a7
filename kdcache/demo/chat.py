"""The demo chat set: questions about Python standard-library functions, answered with their docstrings.

Built offline from the running interpreter's own modules (`inspect`), so `configs/chat-quickstart.yaml` needs no
download. One conversation per public function or method that has a docstring (~1,500 on CPython 3.12), in four
shapes chosen by a hash of the function's name: a bare question; a question under a system prompt; a system prompt,
the question and a follow-up about the signature (two assistant turns); a question, an assistant that looks the
function up, a tool message with its signature, then the answer. The answer is the docstring (its first paragraphs,
up to `MAX_ANSWER_CHARS`). Train and valid are split by a hash of the name (`kdcache.demo.corpus.split_train_valid`).

The demo tokenizer's chat template, `DEMO_CHAT_TEMPLATE`, marks each assistant turn's content and its end-of-turn
token (EOS) with ``{% generation %}``. `kdcache.demo.assets.prepare_demo` writes the set and the template;
alone::

    python -m kdcache.demo.chat OUT_DIR          # OUT_DIR/train/part-00000.jsonl, OUT_DIR/valid/part-00000.jsonl
    python -m kdcache.demo.chat OUT_DIR --prompts

The prompt set (`write_prompts`, for distillation through generation, docs/GENERATE.md) is the same functions as
prompt/completion records in the language the demo teacher knows, Python source: the prompt is the function's
``def`` line and the opening of its docstring, the reference completion the docstring and its closing quotes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from kdcache.demo.corpus import split_train_valid

__all__ = [
    "CHAT_MODULES",
    "DEMO_CHAT_TEMPLATE",
    "DOCSTRING_STOP",
    "MAX_ANSWER_CHARS",
    "conversation",
    "def_prompt",
    "stdlib_docstrings",
    "write_chat",
    "write_prompts",
]

# Pure-Python standard-library modules (their functions have docstrings and signatures on every CPython build).
CHAT_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "colorsys", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "difflib", "email.utils", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "functools", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "html", "http.cookies",
    "inspect", "ipaddress", "json", "keyword", "linecache", "locale", "logging", "mimetypes", "netrc", "operator",
    "optparse", "pathlib", "pickle", "platform", "posixpath", "pprint", "queue", "quopri", "random", "reprlib",
    "sched", "secrets", "shlex", "shutil", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tokenize", "traceback", "types", "typing", "urllib.parse", "uuid", "warnings", "wave", "weakref",
    "zipfile",
)  # fmt: skip
MAX_ANSWER_CHARS = 600  # an answer is the docstring's first paragraphs up to this many characters
SYSTEM_PROMPT = "You are a concise assistant that answers questions about the Python standard library."
QUESTIONS = (
    "What does {name} do?",
    "Explain {name}.",
    "How do I use {name}?",
    "Describe the function {name}.",
)
# ChatML-like: every message is "<|role|>\n" + content + EOS + "\n"; an assistant's content and EOS are marked.
DEMO_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}{{- message['content'] + eos_token -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def _answer(doc: str, max_chars: int = MAX_ANSWER_CHARS) -> str:
    """The docstring's first paragraphs, as many as fit in ``max_chars`` (at least the first, cut at a word)."""
    paragraphs = [p.strip() for p in doc.split("\n\n") if p.strip()]
    out = paragraphs[0]
    if len(out) > max_chars:
        return out[:max_chars].rsplit(" ", 1)[0]
    for p in paragraphs[1:]:
        if len(out) + 2 + len(p) > max_chars:
            break
        out += "\n\n" + p
    return out


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def stdlib_docstrings(modules: tuple[str, ...] = CHAT_MODULES) -> list[tuple[str, str, str]]:
    """``(qualified name, signature, answer)`` of every public function and method with a docstring defined in
    ``modules``, sorted by name. Modules that fail to import are skipped."""
    out: dict[str, tuple[str, str]] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [(f"{module_name}.{name}", obj)] if inspect.isfunction(obj) else []
            if inspect.isclass(obj):
                members = [
                    (f"{module_name}.{name}.{attr}", value)
                    for attr, value in sorted(vars(obj).items())
                    if not attr.startswith("_") and inspect.isfunction(value)
                ]
            for qualified, function in members:
                doc = inspect.getdoc(function)
                if doc and doc.strip():
                    out[qualified] = (_signature(function), _answer(doc))
    return [(name, *out[name]) for name in sorted(out)]


def conversation(name: str, signature: str, answer: str) -> list[dict[str, str]]:
    """The messages of ``name``'s conversation (the shape and the question wording follow a hash of the name)."""
    digest = hashlib.sha256(name.encode()).digest()
    question = QUESTIONS[digest[1] % len(QUESTIONS)].format(name=name)
    shape = digest[0] % 4
    if shape == 0:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if shape == 1:
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    if shape == 2:
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "What is its signature?"},
            {"role": "assistant", "content": f"{name}{signature}"},
        ]
    tool = json.dumps({"name": name, "signature": f"{name.rsplit('.', 1)[-1]}{signature}"})
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"Let me look up {name}."},
        {"role": "tool", "content": tool},
        {"role": "assistant", "content": answer},
    ]


DOCSTRING_STOP = '"""'  # a generated docstring ends here (the stop string of the prompt set's generate section)
MAX_SIGNATURE_CHARS = 160  # longer signatures (reprs of default values) are left out of the prompt set


def def_prompt(name: str, signature: str) -> str:
    """The prompt of ``name``'s record in the prompt set: its ``def`` line and the opening of its docstring (a method
    is indented inside its class, as in its module's source)."""
    parts = name.split(".")
    is_method = len(parts) >= 3 and parts[-2][:1].isupper()
    indent = "    " if is_method else ""
    return f"{indent}def {parts[-1]}{signature}:\n{indent}    {DOCSTRING_STOP}"


def write_prompts(out_dir: Path, *, modules: tuple[str, ...] = CHAT_MODULES, valid_fraction: float = 0.1) -> dict:
    """Write the prompt set as ``out_dir/train/part-00000.jsonl`` and ``out_dir/valid/part-00000.jsonl``, one
    prompt_completion record ``{"name", "prompt", "completion"}`` per function (`def_prompt`; the completion is the
    docstring's first paragraphs and the closing quotes), split by name like the chat set. Functions whose signature
    is longer than `MAX_SIGNATURE_CHARS` or shows an object's address (a default value's repr, different in every
    process) are left out: the set is the same in every run.

    Returns:
        ``{"train": records, "valid": records}``.
    """
    items = {
        name: (def_prompt(name, sig), f"{answer}{DOCSTRING_STOP}")
        for name, sig, answer in stdlib_docstrings(modules)
        if len(sig) <= MAX_SIGNATURE_CHARS and " at 0x" not in sig
    }
    if len(items) < 2:
        raise ValueError(f"write_prompts: only {len(items)} documented functions in {modules}")
    train, valid = split_train_valid([(name, prompt) for name, (prompt, _) in items.items()], valid_fraction)
    counts = {}
    for split, part in (("train", train), ("valid", valid)):
        folder = Path(out_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "part-00000.jsonl", "w", encoding="utf-8") as f:
            for name, prompt in part:
                record = {"name": name, "prompt": prompt, "completion": items[name][1]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts[split] = len(part)
    return counts


def write_chat(out_dir: Path, *, modules: tuple[str, ...] = CHAT_MODULES, valid_fraction: float = 0.1) -> dict:
    """Write the chat set as ``out_dir/train/part-00000.jsonl`` and ``out_dir/valid/part-00000.jsonl``, one record
    ``{"name", "messages"}`` per function.

    Returns:
        ``{"train": conversations, "valid": conversations}``.
    """
    items = {name: conversation(name, sig, answer) for name, sig, answer in stdlib_docstrings(modules)}
    if len(items) < 2:
        raise ValueError(f"write_chat: only {len(items)} documented functions in {modules}")
    docs = [(name, json.dumps(messages)) for name, messages in items.items()]
    train, valid = split_train_valid(docs, valid_fraction)
    counts = {}
    for split, part in (("train", train), ("valid", valid)):
        folder = Path(out_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "part-00000.jsonl", "w", encoding="utf-8") as f:
            for name, _ in part:
                f.write(json.dumps({"name": name, "messages": items[name]}, ensure_ascii=False) + "\n")
        counts[split] = len(part)
    return counts


if __name__ == "__main__":  # python -m kdcache.demo.chat OUT_DIR [--prompts]
    if "--prompts" in sys.argv[1:]:
        args = [a for a in sys.argv[1:] if a != "--prompts"]
        print(json.dumps(write_prompts(Path(args[0] if args else ".kdcache/demo/prompts"))))
    else:
        print(json.dumps(write_chat(Path(sys.argv[1] if len(sys.argv) > 1 else ".kdcache/demo/assets/chat"))))
