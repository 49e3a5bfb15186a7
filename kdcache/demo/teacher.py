"""The demo teacher: a byte-level BPE tokenizer and a tiny Llama trained on the demo corpus (a demo, not a real model).

`kdcache.demo.assets.prepare_demo` calls these in this order::

    tokenizer = train_tokenizer(texts, out_dir)        # 2048 learned tokens + 4 specials, saved with save_pretrained
    model = build_teacher(tokenizer)                   # 2-layer Llama, vocabulary padded to a multiple of 64
    stats = train_teacher(model, tokenizer, texts, steps=400, seconds=None)   # deterministic, ~20 s on 2 cores

tokenizers, transformers and torch are imported inside the functions that use them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcache.demo.threads import ThreadChooser, available_cpus

if TYPE_CHECKING:  # heavy imports stay inside the functions that use them
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "VOCAB_PAD_MULTIPLE",
    "build_teacher",
    "padded_vocab_size",
    "token_stream",
    "train_teacher",
    "train_tokenizer",
]

VOCAB_PAD_MULTIPLE = 64  # the model's vocabulary (logit rows) is padded up to a multiple of this
SPECIAL_TOKENS = {"unk_token": "<|unk|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def train_tokenizer(
    texts: Iterable[str],
    out_dir: Path,
    *,
    vocab_size: int = 2048,
    model_max_length: int = 512,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and save it with ``save_pretrained(out_dir)``.

    The tokenizer has ``vocab_size`` learned tokens (256 bytes + merges; fewer if the text is too small) plus 4
    special tokens ``<|unk|> <|bos|> <|eos|> <|pad|>`` at ids 0-3. Like Llama's it prepends ``<|bos|>`` when
    ``add_special_tokens=True``. Decoding with ``skip_special_tokens=True`` returns the text exactly.

    Args:
        texts: Training text.
        out_dir: Where ``tokenizer.json`` / ``tokenizer_config.json`` go (created if missing).
        vocab_size: Learned tokens, not counting the special tokens.
        model_max_length: Recorded in the tokenizer config (tokens).
        chat_template: Saved as the tokenizer's chat template (None: none).

    Returns:
        The ``transformers`` fast tokenizer; ``len(tokenizer)`` counts the special tokens too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials),  # the trainer counts special tokens inside vocab_size
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def padded_vocab_size(tokenizer_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Round a tokenizer's size up to a multiple of ``multiple`` (the model's logit rows)."""
    return -(-tokenizer_size // multiple) * multiple


def build_teacher(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    heads: int = 4,
    max_position: int = 512,
    seed: int = 0,
    intermediate_size: int | None = None,
) -> LlamaForCausalLM:
    """Build an untrained ``LlamaForCausalLM`` sized for ``tokenizer``, vocabulary padded to a multiple of 64.

    ``config.vocab_size`` is the padded size (the logits' last dimension); ``config.tokenizer_vocab_size`` records
    ``len(tokenizer)``. Rows past the tokenizer are never targets, so training drives their probability toward 0,
    as in real padded checkpoints. Word embeddings are tied to the output head. The global torch RNG is untouched.

    Args:
        tokenizer: Supplies the vocabulary size and the bos / eos / pad ids.
        hidden_size: Model width.
        num_layers: Decoder layers.
        heads: Attention heads (no grouped-query attention).
        max_position: ``max_position_embeddings`` (tokens).
        seed: Seeds the weight initialisation.
        intermediate_size: MLP width; default ``4 * hidden_size``.

    Returns:
        The model in float32, train mode.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        tokenizer_vocab_size=len(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> list[int]:
    """Concatenate ``<|bos|> text <|eos|>`` for every text, as token ids."""
    texts = list(texts)
    # The backend tokenizer skips transformers' per-call overhead and its "sequence longer than max" warning.
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream: list[int] = []
    for enc in encodings:
        stream.append(tokenizer.bos_token_id)
        stream.extend(enc.ids)
        stream.append(tokenizer.eos_token_id)
    return stream


def train_teacher(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: Iterable[str],
    *,
    steps: int | None = None,
    seconds: float | None = 30.0,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place with AdamW on next-token prediction over random windows of the packed texts.

    Runs ``steps`` steps, or until ``seconds`` have passed, whichever comes first (give ``seconds=None`` for a
    deterministic run). Learning rate: linear warmup, then cosine decay to 10% over the run's progress. Uses as many
    torch threads as this process has CPUs, or 1 while other processes compete for them (see
    `kdcache.demo.threads.ThreadChooser`), then restores the previous setting.

    Args:
        model: A causal LM (e.g. from `build_teacher`); left in eval mode.
        tokenizer: Tokenizes ``texts``; each text becomes ``<|bos|> ... <|eos|>``, all packed into one stream.
        texts: Training documents.
        steps: Optimizer steps; ``None`` means bounded by ``seconds`` only.
        seconds: Wall-clock budget (s); ``None`` means bounded by ``steps`` only.
        seq_len: Tokens per window.
        batch_size: Windows per step.
        lr: Peak learning rate.
        seed: Seeds the window sampling.
        progress: Show a tqdm bar.

    Returns:
        ``{"steps", "first_loss", "last_loss", "seconds", "tokens_per_step", "steps_by_threads"}``; losses in nats
        per token, ``first_loss`` of the first batch (before any update), ``last_loss`` the mean over the last 10%
        of steps (at least 1, at most 20) to smooth batch-to-batch noise.

    Raises:
        ValueError: Neither ``steps`` nor ``seconds`` given, or texts shorter than one window.
    """
    import torch
    from tqdm.auto import tqdm

    if steps is None and seconds is None:
        raise ValueError("train_teacher: give steps, seconds or both")
    stream = torch.tensor(token_stream(tokenizer, texts), dtype=torch.long)
    if len(stream) <= seq_len:
        raise ValueError(f"train_teacher: {len(stream)} tokens of text, need more than seq_len={seq_len}")
    warmup_steps = max(1, min(20, steps // 10)) if steps else 10
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    previous_threads = torch.get_num_threads()
    chooser = ThreadChooser(available_cpus())
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="training demo teacher", unit="step", disable=not progress, leave=False)
    model.train()
    try:
        step = 0
        while True:
            elapsed = time.perf_counter() - start
            done = max(step / steps if steps else 0.0, elapsed / seconds if seconds else 0.0)
            if done >= 1.0:
                break
            if step < warmup_steps:
                scale = (step + 1) / warmup_steps
            else:
                scale = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * done))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
            input_ids = stream[starts[:, None] + offsets]  # [batch_size, seq_len] int64
            threads = chooser.threads()
            torch.set_num_threads(threads)
            step_start = time.perf_counter()
            loss = model(input_ids=input_ids, labels=input_ids).loss  # HF shifts labels by one inside
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            chooser.record(threads, time.perf_counter() - step_start, timed=step > 0)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
        model.eval()
    if not losses:
        raise ValueError("train_teacher: no step ran (seconds too small?)")
    tail = losses[-max(1, min(20, len(losses) // 10)) :]
    return {
        "steps": len(losses),
        "first_loss": losses[0],
        "last_loss": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - start, 3),
        "tokens_per_step": batch_size * seq_len,
        "steps_by_threads": chooser.steps_by_threads,
    }
