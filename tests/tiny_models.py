"""Build tiny REAL Hugging Face causal LMs and a tiny byte-level BPE tokenizer offline, for tests.

Nothing is downloaded: models are built from a config with a fixed seed and saved with ``save_pretrained``, so tests
load them back through the same ``from_pretrained`` path a real teacher takes. The tokenizer is trained in well under
a second on Python standard-library sources, which every Python install has.

Usage::

    model_dir = build_tiny_model("gemma2", tmp_path / "gemma2")
    build_tiny_tokenizer(model_dir)  # same directory: the folder now loads like a hub checkpoint
"""

from __future__ import annotations

import inspect
import json
import string
import textwrap
from pathlib import Path

import torch

__all__ = [
    "ARCHS",
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATE_MERGING",
    "CHAT_TEMPLATE_PLAIN",
    "GEMMA2_FINAL_LOGIT_SOFTCAP",
    "SCALED_ARCHS",
    "build_tiny_model",
    "build_tiny_tokenizer",
]

ARCHS = ("llama", "qwen2", "gpt2", "gemma2")
SCALED_ARCHS = ("granite", "cohere")  # extra archs whose forward scales the final logits
GEMMA2_FINAL_LOGIT_SOFTCAP = 5.0  # logits; small enough that tanh visibly bends logits of std ~4
GRANITE_LOGITS_SCALING = 2.0  # Granite divides the logits by this
COHERE_LOGIT_SCALE = 0.5  # Cohere multiplies the logits by this
HIDDEN_SIZE = 64
HEAD_LOGIT_STD = 4.0  # target std of the output logits (nats), so distributions are far from uniform

_PAD, _BOS, _EOS, _UNK = "<pad>", "<s>", "</s>", "<unk>"  # ids 0, 1, 2, 3 in the trained tokenizer

# Chat templates for the tiny tokenizer. CHAT_TEMPLATE marks each assistant turn's content and its end-of-turn token
# (EOS) with {% generation %}; CHAT_TEMPLATE_PLAIN renders exactly the same text without the markers, so the
# turn-by-turn prefix diff must find the same tokens. Turns are separated by a newline *before* each header, so nothing
# of the template follows an assistant's EOS inside its turn.
_CHAT_BODY = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\n' -}}"
    "{%- if message['role'] == 'assistant' -%}OPEN{{- message['content'] + eos_token -}}CLOSE"
    "{%- else -%}{{- message['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- if messages -%}{{- '\n' -}}{%- endif -%}{{- '<|assistant|>\n' -}}"
    "{%- endif -%}"
)
CHAT_TEMPLATE = _CHAT_BODY.replace("OPEN", "{% generation %}").replace("CLOSE", "{% endgeneration %}")
CHAT_TEMPLATE_PLAIN = _CHAT_BODY.replace("OPEN", "").replace("CLOSE", "")
# No markers, and the generation prompt ends with a space that byte-level BPE glues to the answer's first word:
# "assistant: " + "Hello" tokenizes as [..., ":", " Hello"], never as [..., ":", " ", "Hello"]. Must be refused.
CHAT_TEMPLATE_MERGING = (
    "{%- for message in messages -%}{{- message['role'] + ': ' + message['content'] + eos_token -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
)


def _config(arch: str, vocab_size: int):
    """Return a tiny transformers config for ``arch`` (2 layers, hidden 64)."""
    import transformers

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=HIDDEN_SIZE,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=HIDDEN_SIZE,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=HIDDEN_SIZE, n_layer=2, n_head=4, n_positions=128, **common)
    if arch == "gemma2":
        return transformers.Gemma2Config(
            hidden_size=HIDDEN_SIZE,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            max_position_embeddings=128,
            sliding_window=4,  # tokens; shorter than the test sequences so the local layer differs from global
            final_logit_softcapping=GEMMA2_FINAL_LOGIT_SOFTCAP,
            attn_logit_softcapping=2.0,
            **common,
        )
    if arch in SCALED_ARCHS:
        llama_like = {
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            **common,
        }
        if arch == "granite":
            return transformers.GraniteConfig(logits_scaling=GRANITE_LOGITS_SCALING, **llama_like)
        return transformers.CohereConfig(logit_scale=COHERE_LOGIT_SCALE, **llama_like)
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS + SCALED_ARCHS}")


def build_tiny_model(arch: str, out_dir: Path, *, vocab_size: int = 256, seed: int = 0) -> Path:
    """Build a tiny randomly initialised causal LM and save it with ``save_pretrained``.

    The output head is re-drawn so logits have a std of about ``HEAD_LOGIT_STD``: with the default init the
    distributions would be nearly uniform and top-k comparisons would test little.

    Args:
        arch: One of ``ARCHS``: "llama", "qwen2" (tied embeddings), "gpt2", "gemma2" (final and attention logit
            softcapping, sliding window); or of ``SCALED_ARCHS``: "granite" (logits divided by
            ``GRANITE_LOGITS_SCALING``), "cohere" (logits multiplied by ``COHERE_LOGIT_SCALE``).
        out_dir: Directory to write ``config.json`` and ``model.safetensors`` into; created if missing.
        vocab_size: Rows of the embedding and output head.
        seed: Seed of the weight initialisation; the same seed gives the same weights.

    Returns:
        ``out_dir``.
    """
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _config(arch, vocab_size)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # shared with the input embedding when tied
        std = HEAD_LOGIT_STD / HIDDEN_SIZE**0.5
        head.copy_(torch.randn(head.shape, generator=generator) * std)
    model.save_pretrained(out_dir)
    return out_dir


def _training_text() -> list[str]:
    """Python sources of a few stdlib modules: present in every install, fixed for a given Python version."""
    return [inspect.getsource(module) for module in (json.encoder, json.decoder, string, textwrap)]


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 256, *, chat_template: str | None = None) -> Path:
    """Train a byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast`` into ``out_dir``.

    The alphabet is the bytes seen in the training text (not all 256), so ``len(tokenizer) == vocab_size`` holds
    for small vocabularies; ids 0, 1, 2, 3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``. A ``<unk>`` token is set
    because transformers 5 loads a directory whose config says "qwen2" as ``Qwen2Tokenizer``, which otherwise adds
    its own unk token past ``vocab_size`` (and re-tokenizes with its own pre-tokenizer regex; ids may differ).

    Args:
        out_dir: Directory to save the tokenizer files into (the model directory is fine); created if missing.
        vocab_size: Total vocabulary including the three special tokens.
        chat_template: Saved as the tokenizer's chat template (e.g. `CHAT_TEMPLATE`); None: no template.

    Returns:
        ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE(unk_token=_UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[_PAD, _BOS, _EOS, _UNK], show_progress=False)
    backend.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=_PAD, bos_token=_BOS, eos_token=_EOS, unk_token=_UNK
    )
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    return out_dir
