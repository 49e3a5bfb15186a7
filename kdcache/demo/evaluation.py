"""Student models and how they are measured: build a small Llama student, cut held-out validation windows with the
teacher's distributions on them, and evaluate a student against the true next token and against the teacher.

    valid = make_validation(teacher, tokenizer, read_texts(assets.valid_dir), windows=16, length=256)
    model = build_student(StudentSpec("h64-L1", 64, 1, 2), vocab_size=teacher.config.vocab_size)
    metrics = evaluate(model, valid)        # {"ce", "kl", "ece", "accuracy", "confidence"}

    chats = make_chat_validation(teacher, tokenizer, read_conversations(assets.chat_valid_dir), length=256)

Metrics: cross-entropy against the true next token, KL(teacher || student) over the full vocabulary, and the expected
calibration error of the top-1 prediction; on held-out conversations (`make_chat_validation`) only at the positions
whose next token is an assistant's, the positions a chat cache stores targets for; `bits_per_byte` compares models
with different tokenizers. The math (`dense_forward_kl`, `kl_to_teacher`, `expected_calibration_error`) is pure
functions on tensors; transformers is imported inside `build_student`. The training loop is in
`kdcache.demo.training`, the comparison of runs in `kdcache.demo.students`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdcache.demo.teacher import token_stream

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = [
    "ECE_BINS",
    "StudentSpec",
    "ValidationSet",
    "bits_per_byte",
    "build_student",
    "dense_forward_kl",
    "evaluate",
    "expected_calibration_error",
    "kl_to_teacher",
    "make_chat_validation",
    "make_validation",
    "num_parameters",
    "read_conversations",
    "read_texts",
]

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error


# --------------------------------------------------------------------------------------------------- students


@dataclass(frozen=True)
class StudentSpec:
    """Shape of a Llama student (the tokenizer and the output vocabulary are the teacher's).

    Attributes:
        name: Short label, e.g. ``"h64-L1"``.
        hidden_size: Model width.
        num_layers: Decoder layers.
        heads: Attention heads (``hidden_size`` must be a multiple).
    """

    name: str
    hidden_size: int
    num_layers: int
    heads: int


def build_student(spec: StudentSpec, *, vocab_size: int, tokenizer: Any = None, seed: int = 0) -> LlamaForCausalLM:
    """An untrained ``LlamaForCausalLM`` with ``vocab_size`` output columns (the teacher's padded vocabulary).

    Word embeddings are tied to the output head; the MLP is ``4 * hidden_size`` wide; the global torch RNG is left
    untouched.

    Args:
        spec: Width, depth and heads.
        vocab_size: Logit columns; at least the teacher's padded vocabulary (a cache refuses fewer).
        tokenizer: Supplies bos / eos / pad ids when given.
        seed: Seeds the weight initialisation.

    Returns:
        The model, float32, train mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.hidden_size % spec.heads:
        raise ValueError(
            f"student {spec.name}: hidden_size {spec.hidden_size} is not a multiple of heads {spec.heads}"
        )
    ids = {}
    if tokenizer is not None:
        ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=4 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------- metrics


def dense_forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(teacher || student) on dense logits, mean over the positions where ``mask`` is true.

    Args:
        student_logits: ``[B, T, V]`` float.
        teacher_logits: ``[B, T, V']`` float, ``V' <= V`` (student columns past ``V'`` get teacher probability 0).
        mask: ``[B, T]`` bool; None means every position.

    Returns:
        Scalar float32 tensor (0 when no position is selected), differentiable w.r.t. ``student_logits``.
    """
    vocab = teacher_logits.shape[-1]
    if student_logits.shape[-1] < vocab:
        raise ValueError(f"student vocab {student_logits.shape[-1]} < teacher vocab {vocab}")
    if mask is None:
        mask = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
    s = student_logits[mask].float()  # [N, V]
    log_p = torch.log_softmax(teacher_logits[mask].float(), -1)  # [N, V']
    log_q = torch.log_softmax(s, -1)[:, :vocab]
    per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    return per_row.sum() / max(int(mask.sum()), 1)


def kl_to_teacher(student_logits: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Per-position KL(teacher || student) over the full vocabulary.

    Args:
        student_logits: ``[..., V]`` float.
        teacher_logprobs: ``[..., V']`` float log-softmax of the teacher, ``V' <= V``.

    Returns:
        ``[...]`` float32, in nats.
    """
    vocab = teacher_logprobs.shape[-1]
    log_q = torch.log_softmax(student_logits.float(), -1)[..., :vocab]
    log_p = teacher_logprobs.float()
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def expected_calibration_error(confidence: Tensor, correct: Tensor, *, bins: int = ECE_BINS) -> float:
    """Expected calibration error of top-1 predictions with ``bins`` equal-width confidence bins.

    ``ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|`` with bin b = ``(b / bins, (b + 1) / bins]`` (a
    confidence of exactly 0 goes to the first bin), as in Guo et al. (2017).

    Args:
        confidence: ``[N]`` float in [0, 1], the probability of the predicted token.
        correct: ``[N]`` bool, whether the predicted token is the true one.
        bins: Number of bins.

    Returns:
        The ECE as a fraction in [0, 1] (0.0 for N = 0).
    """
    confidence = confidence.reshape(-1).double()
    correct = correct.reshape(-1).double()
    if confidence.numel() != correct.numel():
        raise ValueError(f"confidence has {confidence.numel()} entries, correct {correct.numel()}")
    n = confidence.numel()
    if n == 0:
        return 0.0
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return float((acc_sum - conf_sum).abs().sum() / n)  # sum_b n_b/N |acc_b - conf_b| = sum_b |acc_sum - conf_sum|/N


# --------------------------------------------------------------------------------------------------- validation


@dataclass
class ValidationSet:
    """Held-out windows and the teacher's distributions on them.

    Attributes:
        input_ids: ``[N, L]`` int64.
        labels: ``[N, L]`` int64, the true next token of every position.
        teacher_logprobs: ``[N, L, V]`` float32, the teacher's log-softmax at every position.
        teacher: The teacher's own metrics on these windows (``ce``, ``ece``, ``accuracy``, ``entropy``, ``params``;
            ``curve_ce`` on the curve windows only).
        curve_windows: Windows used for the intermediate points of training curves (the first ones); final
            metrics use all N.
        mask: ``[N, L]`` bool, the positions measured (held-out conversations: where the next token is an
            assistant's); None: every position.
    """

    input_ids: Tensor
    labels: Tensor
    teacher_logprobs: Tensor
    teacher: dict[str, float] = field(default_factory=dict)
    curve_windows: int | None = None
    mask: Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.labels.numel()) if self.mask is None else int(self.mask.sum())


def read_texts(folder: str | Path) -> list[str]:
    """The ``text`` field of every record of the ``*.jsonl`` files in ``folder`` (sorted by file name)."""
    texts = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"])
    if not texts:
        raise ValueError(f"{folder}: no jsonl records with a 'text' field")
    return texts


def make_validation(
    teacher: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    windows: int,
    length: int,
    curve_windows: int | None = None,
    batch_windows: int = 8,
) -> ValidationSet:
    """Cut ``windows`` windows of ``length + 1`` tokens, spread evenly over the packed texts, and run the teacher.

    The texts are tokenized and packed as ``<bos> text <eos> <bos> ...``; window i's inputs are its first ``length``
    tokens and its labels the last ``length``.

    Args:
        teacher: A causal LM returning ``.logits`` ``[B, L, V]``.
        tokenizer: A transformers fast tokenizer (``backend_tokenizer``, ``bos_token_id``, ``eos_token_id``).
        texts: Held-out documents.
        windows: Number of windows N.
        length: Tokens per window L.
        curve_windows: Windows used for curve points (default: all).
        batch_windows: Windows per teacher forward.

    Returns:
        The set, with the teacher's own CE / ECE / accuracy / entropy.

    Raises:
        ValueError: Fewer than ``windows * (length + 1)`` tokens of text.
    """
    stream = token_stream(tokenizer, texts)
    need = windows * (length + 1)
    if len(stream) < need:
        raise ValueError(f"validation text has {len(stream)} tokens, need {need}; use fewer windows or shorter ones")
    step = (len(stream) - (length + 1)) // max(windows - 1, 1)
    data = torch.tensor([stream[i * step : i * step + length + 1] for i in range(windows)], dtype=torch.long)
    input_ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    parts = []
    teacher.eval()
    with torch.no_grad():
        for lo in range(0, windows, batch_windows):
            logits = teacher(input_ids=input_ids[lo : lo + batch_windows]).logits.float()
            parts.append(torch.log_softmax(logits, -1))
    valid = ValidationSet(input_ids, labels, _teacher_logprobs(teacher, input_ids, batch_windows))
    valid.curve_windows = curve_windows
    valid.teacher = _teacher_metrics(valid, num_parameters(teacher))
    return valid


def _teacher_logprobs(teacher: torch.nn.Module, input_ids: Tensor, batch_windows: int) -> Tensor:
    """The teacher's log-softmax ``[N, L, V]`` float32 on right-padded windows, ``batch_windows`` at a time."""
    parts = []
    teacher.eval()
    with torch.no_grad():
        for lo in range(0, input_ids.shape[0], batch_windows):
            logits = teacher(input_ids=input_ids[lo : lo + batch_windows]).logits.float()
            parts.append(torch.log_softmax(logits, -1))
    return torch.cat(parts)


def _teacher_metrics(valid: ValidationSet, params: int) -> dict[str, float]:
    """The teacher's own CE / accuracy / ECE / entropy on the measured positions (``curve_ce``: curve windows)."""
    logprobs, labels = valid.teacher_logprobs, valid.labels
    mask = torch.ones(labels.shape, dtype=torch.bool) if valid.mask is None else valid.mask
    confidence, predicted = logprobs.max(-1)
    token_ce = -logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [N, L]
    curve = valid.curve_windows
    return {
        "ce": float(token_ce[mask].mean()),
        "curve_ce": float(token_ce[:curve][mask[:curve]].mean()),  # on the windows the curves are drawn on
        "kl": 0.0,
        "accuracy": float((predicted == labels)[mask].double().mean()),
        "ece": expected_calibration_error(confidence.exp()[mask], (predicted == labels)[mask]),
        "entropy": float(-(logprobs.exp() * logprobs).sum(-1)[mask].mean()),
        "params": params,
    }


def read_conversations(folder: str | Path, field: str = "messages") -> list[list[dict[str, Any]]]:
    """The ``messages`` of every record of the ``*.jsonl`` files in ``folder`` (sorted by file name)."""
    out = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line)[field])
    if not out:
        raise ValueError(f"{folder}: no jsonl records with a {field!r} field")
    return out


def make_chat_validation(
    teacher: torch.nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, Any]]],
    *,
    length: int,
    windows: int | None = None,
    curve_windows: int | None = None,
    batch_windows: int = 8,
) -> ValidationSet:
    """Held-out conversations as a cache of them sees them, measured where a chat cache stores targets.

    Each conversation is rendered with the tokenizer's chat template and cut into windows of ``length`` tokens
    (`kdcache.capture.chat.ChatRenderer`, as the caching job does); a position is measured when its next token is an
    assistant token (the window's last position too: its label is the next window's first token). Windows without
    such a position are dropped. Rows are right-padded to the longest window (padding is never measured).

    Args:
        teacher: A causal LM returning ``.logits``. tokenizer: with the chat template the cache was made with.
        conversations: Lists of ``{"role", "content"}`` messages.
        length: Tokens per window (the cache's ``data.max_length``).
        windows: Keep the first this many windows (default all). curve_windows: Windows for curve points.
        batch_windows: Windows per teacher forward.
    """
    from kdcache.capture.chat import ChatRecord, ChatRenderer, parse_messages, target_mask

    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    rows: list[tuple[list[int], list[int], list[bool]]] = []
    for i, messages in enumerate(conversations):
        where = f"conversation {i}"
        ids, assistant = renderer.render(ChatRecord(where, parse_messages(messages, where, "messages")))
        targets = target_mask(assistant)
        for start in range(0, len(ids), length):
            stop = min(start + length, len(ids))
            if targets[start:stop].any():
                labels = ids[start + 1 : stop + 1] + [0] * (stop + 1 - len(ids))  # 0: no next token (never measured)
                rows.append((ids[start:stop], labels, targets[start:stop].tolist()))
    rows = rows[:windows]
    if not rows:
        raise ValueError("make_chat_validation: no window of the conversations has an assistant token")
    longest = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([r[0] + [pad] * (longest - len(r[0])) for r in rows], dtype=torch.long)
    labels = torch.tensor([r[1] + [0] * (longest - len(r[1])) for r in rows], dtype=torch.long)
    mask = torch.tensor([r[2] + [False] * (longest - len(r[2])) for r in rows], dtype=torch.bool)
    valid = ValidationSet(input_ids, labels, _teacher_logprobs(teacher, input_ids, batch_windows), mask=mask)
    valid.curve_windows = curve_windows
    valid.teacher = _teacher_metrics(valid, num_parameters(teacher))
    return valid


def evaluate(
    model: torch.nn.Module, valid: ValidationSet, *, windows: int | None = None, batch_windows: int = 8
) -> dict[str, float]:
    """A student's metrics on the validation windows (the first ``windows`` of them; default all).

    Returns:
        ``ce`` (nats per token against the true next token), ``kl`` (mean KL(teacher || student), nats), ``ece``
        (top-1, `ECE_BINS` bins, a fraction), ``accuracy`` (top-1) and ``confidence`` (mean top-1 probability).
    """
    n = valid.input_ids.shape[0] if windows is None else min(windows, valid.input_ids.shape[0])
    was_training = model.training
    model.eval()
    ce, kl, confs, corrects = [], [], [], []
    with torch.no_grad():
        for lo in range(0, n, batch_windows):
            hi = min(lo + batch_windows, n)
            logits = model(input_ids=valid.input_ids[lo:hi]).logits.float()
            labels = valid.labels[lo:hi]
            measured = torch.ones(labels.shape, dtype=torch.bool) if valid.mask is None else valid.mask[lo:hi]
            log_q = torch.log_softmax(logits, -1)
            ce.append(-log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)[measured])
            kl.append(kl_to_teacher(logits, valid.teacher_logprobs[lo:hi])[measured])
            conf, predicted = log_q.max(-1)
            confs.append(conf.exp()[measured])
            corrects.append((predicted == labels)[measured])
    model.train(was_training)
    confidence, correct = torch.cat(confs).reshape(-1), torch.cat(corrects).reshape(-1)
    return {
        "ce": float(torch.cat(ce).double().mean()),
        "kl": float(torch.cat(kl).double().mean()),
        "ece": expected_calibration_error(confidence, correct),
        "accuracy": float(correct.double().mean()),
        "confidence": float(confidence.double().mean()),
    }


def bits_per_byte(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_texts: int = 8) -> float:
    """Bits per byte of held-out texts: the model's negative log-likelihood of every token of each text (after its
    tokenizer's BOS), in bits, summed and divided by the texts' UTF-8 bytes. It does not depend on the tokenizer, so it
    compares students with different ones.

    Args:
        model: A causal LM returning ``.logits`` ``[B, L, V]``; texts must fit its positions (one BOS + the tokens).
        tokenizer: A fast tokenizer with a BOS token (it conditions each text's first token).
        texts: Held-out texts, each scored on its own.
        batch_texts: Texts per forward.

    Raises:
        ValueError: The tokenizer has no BOS token.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("bits_per_byte: the tokenizer has no BOS token to condition each text's first token on")
    rows = [[bos, *tokenizer(text, add_special_tokens=False)["input_ids"]] for text in texts]
    total_bits, total_bytes = 0.0, sum(len(text.encode("utf-8")) for text in texts)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(rows), batch_texts):
            part = rows[lo : lo + batch_texts]
            length = max(len(r) for r in part)
            ids = torch.zeros(len(part), length, dtype=torch.long)
            mask = torch.zeros(len(part), length, dtype=torch.long)
            for i, r in enumerate(part):
                ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            logq = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            nll = -logq[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            total_bits += float((nll * mask[:, 1:]).double().sum()) / math.log(2)
    model.train(was_training)
    return total_bits / max(total_bytes, 1)
