"""Divergences between log-probability vectors, and the per-row student computations of the cached-target losses.

The divergences (`kl`, `forward_kl`, `reverse_kl`, `jsd`, `tvd`) take teacher and student log-probabilities
``[..., n]`` and reduce the last axis; entries of ``-inf`` are zero mass and never produce NaN gradients. The row
functions (`bucket_rows`, `renormalized_rows`, `sampled_rows`, `cross_entropy_rows`, `uld_rows`) are the
`kdcache.losses.autograd.RowLoss` callables that `kdcache.losses` evaluates chunk by chunk: each gets ``x``, one chunk
of student logits divided by the temperature (``[C, V]`` float32 or float64), and that chunk's teacher data ``[C,
...]``, and returns ``[C]``. Pure torch functions; the public losses with their batch checks live in `kdcache.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "NEG_INF",
    "bucket_rows",
    "cross_entropy_rows",
    "forward_kl",
    "jsd",
    "kl",
    "log1mexp",
    "masked_log_softmax",
    "renormalized_rows",
    "reverse_kl",
    "sampled_rows",
    "student_buckets",
    "tvd",
    "uld_rows",
]

NEG_INF = float("-inf")


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends; ``-inf`` where ``x >= 0``."""
    x = x.clamp(max=0.0)
    safe = torch.where(x < 0, x, -1.0)
    out = torch.where(safe > -math.log(2.0), torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe)))
    return torch.where(x < 0, out, NEG_INF)


def masked_log_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """Log-softmax over the valid entries of the last axis; invalid entries (and rows with none) are ``-inf``."""
    any_valid = valid.any(-1, keepdim=True)
    x = x.masked_fill(~valid, NEG_INF).masked_fill(~any_valid, 0.0)
    return torch.log_softmax(x, -1).masked_fill(~valid, NEG_INF)


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``sum a (log a - log b)`` over the last axis with ``0 log 0 = 0``."""
    a = log_a.exp()
    positive = a > 0
    diff = torch.where(positive, log_a, 0.0) - torch.where(positive, log_b, 0.0)
    return torch.where(positive, a * diff, 0.0).sum(-1)


def forward_kl(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(p || q) from teacher log-probs ``lp`` and student log-probs ``lq``."""
    return kl(lp, lq)


def reverse_kl(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(q || p) from teacher log-probs ``lp`` and student log-probs ``lq``."""
    return kl(lq, lp)


def jsd(lp: Tensor, lq: Tensor, *, beta: float) -> Tensor:
    """``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q`` (TRL's generalised JSD)."""
    if beta == 0.0:
        return kl(lp, lq)
    if beta == 1.0:
        return kl(lq, lp)
    empty = (lp == NEG_INF) & (lq == NEG_INF)
    log_m = torch.logaddexp(
        torch.where(empty, 0.0, lp) + math.log(beta), torch.where(empty, 0.0, lq) + math.log1p(-beta)
    ).masked_fill(empty, NEG_INF)
    return beta * kl(lp, log_m) + (1.0 - beta) * kl(lq, log_m)


def tvd(lp: Tensor, lq: Tensor) -> Tensor:
    """Total variation ``0.5 * sum |p - q|``."""
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


# --------------------------------------------------------------------------------------------------------------
# Per-row student computations (x is one chunk of student logits / T, [C, V], float32 or float64)


def student_buckets(x: Tensor, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Student log-probs at the head ids ``[C, k]`` (-inf where invalid) and of the rest of the vocab ``[C]``."""
    vocab = x.shape[-1]
    normalizer = torch.logsumexp(x, -1, keepdim=True)
    head = (x.gather(-1, ids) - normalizer).masked_fill(~valid, NEG_INF)
    # Padding ids point at a dummy column so they never hide a real id from the complement.
    in_head = torch.zeros(x.shape[0], vocab + 1, dtype=torch.bool, device=x.device)
    in_head = in_head.scatter_(-1, ids.masked_fill(~valid, vocab), True)[:, :vocab]
    empty = in_head.all(-1, keepdim=True)  # k == V: no complement, and logsumexp of all -inf has a NaN gradient
    complement = x.masked_fill(in_head, NEG_INF).masked_fill(empty, 0.0)
    tail = (torch.logsumexp(complement, -1, keepdim=True) - normalizer).masked_fill(empty, NEG_INF)
    return head, tail.squeeze(-1)


def bucket_rows(x: Tensor, data: dict[str, Tensor], *, divergence: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``divergence`` on k + 1 outcomes: the head ids (``data["ids"]``, ``data["valid"]``, teacher ``data["head"]``)
    and one bucket for the rest (teacher ``data["tail"]``)."""
    lq_head, lq_tail = student_buckets(x, data["ids"], data["valid"])
    lp = torch.cat([data["head"], data["tail"].unsqueeze(-1)], -1)
    lq = torch.cat([lq_head, lq_tail.unsqueeze(-1)], -1)
    return divergence(lp, lq)


def renormalized_rows(x: Tensor, data: dict[str, Tensor], *, divergence: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``divergence`` between the renormalised teacher head and the student on the head ids, renormalised."""
    return divergence(data["head"], masked_log_softmax(x.gather(-1, data["ids"]), data["valid"]))


def sampled_rows(x: Tensor, data: dict[str, Tensor]) -> Tensor:
    """``sum_i w_i (log p_i - log q_i)`` over the sampled ids, plus the exact head KL when ``data`` has head_ids."""
    normalizer = torch.logsumexp(x, -1, keepdim=True)
    lq = x.gather(-1, data["sample_ids"]) - normalizer
    loss = (data["sample_weights"] * (data["sample_logprobs"] - lq)).sum(-1)
    if "head_ids" in data:  # hybrid: exact head term
        lq_head = (x.gather(-1, data["head_ids"]) - normalizer).masked_fill(~data["head_valid"], NEG_INF)
        loss = loss + kl(data["head"], lq_head)
    return loss


def cross_entropy_rows(x: Tensor, data: dict[str, Tensor]) -> Tensor:
    """``-log q(label)`` with ``data["labels"]`` ``[C]`` int64."""
    return torch.logsumexp(x, -1) - x.gather(-1, data["labels"].unsqueeze(-1)).squeeze(-1)


def uld_rows(x: Tensor, data: dict[str, Tensor]) -> Tensor:
    """ULD on one bucket: ``sum_i |p_(i) - q_(i)| + |P_rest - Q_rest|`` between sorted probability vectors.

    The bucket is every id outside ``data["ids"]`` (where ``data["valid"]``; none valid: the whole vocabulary). The
    teacher's side is ``data["sorted"]`` ``[C, u]`` (log-probs of the entries of the bucket known one by one,
    descending, -inf padding) and ``data["bucket"]`` ``[C]`` (log of the bucket's mass); the student's is its u
    largest probabilities in the bucket, descending, and the bucket's mass. ``P_rest`` / ``Q_rest`` are what is left
    of each bucket past those u entries. The L1 distance of sorted vectors is the Wasserstein distance of ULD (Boizard
    et al., 2024); cutting both after u entries and comparing the rest as one outcome makes it a lower bound of the
    full-vocabulary one (triangle inequality).
    """
    normalizer = torch.logsumexp(x, -1, keepdim=True)
    vocab, width = x.shape[-1], data["sorted"].shape[-1]
    in_head = torch.zeros(x.shape[0], vocab + 1, dtype=torch.bool, device=x.device)
    in_head = in_head.scatter_(-1, data["ids"].masked_fill(~data["valid"], vocab), True)[:, :vocab]
    bucket = x.masked_fill(in_head, NEG_INF)
    top = bucket.topk(min(width, vocab), dim=-1).values - normalizer
    if top.shape[-1] < width:
        top = torch.cat([top, top.new_full((top.shape[0], width - top.shape[-1]), NEG_INF)], -1)
    q_sorted = top.exp()
    empty = in_head.all(-1, keepdim=True)
    q_bucket = (torch.logsumexp(bucket.masked_fill(empty, 0.0), -1, keepdim=True) - normalizer).exp()
    q_bucket = q_bucket.masked_fill(empty, 0.0).squeeze(-1)
    p_sorted = data["sorted"].exp()
    p_rest = (data["bucket"].exp() - p_sorted.sum(-1)).clamp(min=0.0)
    q_rest = (q_bucket - q_sorted.sum(-1)).clamp(min=0.0)
    return (p_sorted - q_sorted).abs().sum(-1) + (p_rest - q_rest).abs()
