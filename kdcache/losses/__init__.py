"""Distillation losses that read cached teacher targets instead of a live teacher (torch only; pure functions).

Every loss takes student logits ``[B, T, V]`` (any float dtype) and a batch dict from the cache reader, and returns
a scalar: the mean over unmasked positions of a per-position divergence, differentiable w.r.t. the student logits.

Batch keys read (shapes per batch; ``k`` head entries, ``m`` samples, ``nT`` stored temperatures):

- ``target_ids`` ``[B, T, k]`` int64 and ``target_logprobs`` ``[B, T, k]`` float: the teacher's top-k ids and their
  log-probs at T = 1 (log-softmax over the full vocabulary). Entries whose log-prob is ``-inf`` are padding (id 0).
- ``tail_logprob`` ``[B, T]`` float: log teacher mass outside the head at T = 1 (``-inf`` when there is none). When
  absent it is derived as ``log(1 - sum head)``, which loses digits when the head holds nearly all the mass.
- ``temperatures`` (list of floats, index 0 == 1.0), ``log_normalizers`` ``[B, T, nT]`` and ``tail_logprobs``
  ``[B, T, nT]``: ``logsumexp(z / T_j)`` of the raw teacher logits and the exact tail mass at each ``T_j``. At a stored
  temperature the head is exact: ``log p_T(i) = (logprob_i + log_normalizers[..., 0]) / T - log_normalizers[..., j]``.
  At any other temperature (or without normalizers) the bucket losses fall back to the renormalised top-k
  representation on both sides (teacher head and student restricted to the head ids, each renormalised, no tail
  bucket; forward KL then equals :func:`renormalized_topk_kl`), and a :class:`TemperatureFallbackWarning` says so.
- ``sample_ids`` ``[B, T, m]`` int64, ``sample_weights`` ``[B, T, m]`` float, ``sample_logprobs`` ``[B, T, m]`` float:
  sampled targets (modes "sample" and "hybrid", read by :func:`sampled_kl` only). Each row lists unique ids; padding
  entries have weight 0. Weights are importance weights whose sum over a row estimates the teacher distribution:
  ``count / N`` for N draws with replacement from p (mode "sample"), or ``tail_mass * count / N`` for draws from p
  restricted to the ids outside the head and renormalised (mode "hybrid", where ``target_ids``/``target_logprobs`` hold
  the exact head). ``sample_logprobs`` is the teacher's log p at T = 1 of each sampled id.
- ``loss_mask`` ``[B, T]`` bool or 0/1 (optional): the positions with teacher targets (`KDCacheDataset`: attention
  mask AND the cache's target mask). Default: ``labels != -100`` when ``labels`` is present, else
  ``attention_mask``, else every position. Every loss averages over it only; :func:`distillation_loss` also leaves
  the positions outside it out of the CE term.
- ``labels`` ``[B, T]`` int64 next-token labels (-100 = ignore), read by :func:`distillation_loss` for the CE term.
- ``unmapped_logprobs`` ``[B, T, u]`` float (cross-tokenizer batches, `kdcache.read.xbatch`): the teacher's head
  entries that have no student counterpart, descending, inside the tail bucket; read by :func:`uld_loss`. On such a
  batch ``target_ids`` are the student's ids and the bucket losses compare the mapped distribution as they would a
  head (docs/TARGETS.md, "Students with another tokenizer").
- ``teacher_vocab_size`` (optional int): the teacher's padded vocabulary. A student with fewer columns raises
  ``ValueError``; without the key only the largest cached id is checked. Student columns past the teacher's vocabulary
  get teacher probability 0 (they fall in the student's tail bucket).

Head + tail bucket representation: :func:`forward_kl_tail`, :func:`reverse_kl`, :func:`jsd` and :func:`tvd` compare
the two distributions on k + 1 outcomes, the head ids and one bucket holding all remaining mass. The student's tail
is ``logsumexp`` of its logits over the complement of the head minus its normalizer (no ``log(1 - sum q)``). With
k = V every one of them equals its dense counterpart exactly. :func:`renormalized_topk_kl` is the common biased
baseline; :func:`sampled_kl` is unbiased: the expectation over draws of its gradient is the full forward-KL gradient.
:func:`uld_loss` compares sorted probability vectors (ULD), which needs no common vocabulary.

Temperature: each loss divides student logits (and the teacher, as above) by ``temperature`` but does not scale by
``T**2``; :func:`distillation_loss` applies the usual ``T**2`` factor to the KD term.

Memory: positions are flattened to the unmasked ones and processed ``chunk_tokens`` at a time; the float32 copy of
the student's logits exists for one chunk only. A custom autograd function computes each chunk's gradient during the
forward pass and keeps one gradient buffer in the student's dtype (double backward is not supported).

Layout: this module is the public entry point (batch checks, teacher targets, the losses); the chunked autograd
machinery is in `kdcache.losses.autograd`, the divergences and per-row student computations in
`kdcache.losses.divergences`, the device-side decoding of compact batches in `kdcache.losses.compact`.

Usage::

    loss = distillation_loss(logits, batch, alpha=0.5, temperature=2.0)  # the estimator that fits the cache
    loss.backward()

`distillation_loss(kind=None)` (the default) picks the estimator that fits the batch: `sampled_kl` when it holds
sampled targets (`sample`/`hybrid` caches), else `forward_kl_tail`. An explicit `kind` that reads only the head of
a batch with sampled targets warns once (:class:`IgnoredSamplesWarning`): the draws are ignored.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kdcache.losses import divergences
from kdcache.losses.autograd import compute_dtype, mean_over_rows
from kdcache.losses.compact import expand_targets
from kdcache.losses.divergences import (
    bucket_rows,
    cross_entropy_rows,
    log1mexp,
    masked_log_softmax,
    renormalized_rows,
    sampled_rows,
    uld_rows,
)

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "IgnoredSamplesWarning",
    "TemperatureFallbackWarning",
    "cross_entropy",
    "default_kind",
    "distillation_loss",
    "forward_kl_tail",
    "jsd",
    "renormalized_topk_kl",
    "reverse_kl",
    "sampled_kl",
    "tvd",
    "uld_loss",
]

IGNORE_INDEX = -100  # label value that CE and the default loss mask skip
_NEG_INF = float("-inf")


class TemperatureFallbackWarning(UserWarning):
    """The requested temperature is not stored in the cache, so the teacher head is renormalised (approximate)."""


class IgnoredSamplesWarning(UserWarning):
    """The chosen loss reads only the exact head of a batch that also holds sampled targets (a hybrid cache)."""


# --------------------------------------------------------------------------------------------------------------
# Batch validation and teacher targets


def _require(batch: Mapping[str, Any], key: str, loss: str) -> Tensor:
    if key not in batch or batch[key] is None:
        raise ValueError(f"{loss}: the batch has no {key!r}; keys present: {sorted(batch)}")
    return batch[key]


def _check_student(student_logits: Tensor, batch: Mapping[str, Any], ids: Sequence[Tensor], loss: str) -> None:
    """Raise ValueError when the student's logits do not line up with the cached targets."""
    if student_logits.ndim != 3 or not student_logits.is_floating_point():
        raise ValueError(f"{loss}: student logits must be a float [B, T, V] tensor, got {tuple(student_logits.shape)}")
    vocab = student_logits.shape[-1]
    for tensor in ids:
        if tuple(tensor.shape[:2]) != tuple(student_logits.shape[:2]):
            raise ValueError(
                f"{loss}: student logits are [B, T] = {tuple(student_logits.shape[:2])} but cached targets are "
                f"{tuple(tensor.shape[:2])}; align the batch before the loss"
            )
    teacher_vocab = batch.get("teacher_vocab_size")
    if teacher_vocab is not None:
        teacher_vocab = int(torch.as_tensor(teacher_vocab).reshape(-1)[0])
        if vocab < teacher_vocab:
            raise ValueError(
                f"{loss}: student vocab size {vocab} is smaller than teacher vocab size {teacher_vocab}; "
                "pad the student's output layer to at least the teacher's vocabulary"
            )
        return
    for tensor in ids:
        largest = int(tensor.max()) if tensor.numel() else -1
        if largest >= vocab:
            raise ValueError(
                f"{loss}: student vocab size {vocab} is smaller than teacher vocab size (at least {largest + 1}, "
                f"from cached id {largest}); pad the student's output layer to the teacher's vocabulary"
            )


def _loss_mask(batch: Mapping[str, Any], shape: torch.Size, device: torch.device) -> Tensor:
    """``[B, T]`` bool: ``loss_mask``, else ``labels != -100``, else ``attention_mask``, else all true."""
    for key in ("loss_mask", "labels", "attention_mask"):
        if batch.get(key) is not None:
            value = batch[key]
            mask = value != IGNORE_INDEX if key == "labels" else value.bool()
            if tuple(mask.shape) != tuple(shape):
                raise ValueError(f"batch {key!r} has shape {tuple(mask.shape)}, expected [B, T] = {tuple(shape)}")
            return mask.to(device)
    return torch.ones(shape, dtype=torch.bool, device=device)


def _check_temperature(temperature: float, loss: str) -> float:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{loss}: temperature must be a positive finite number, got {temperature}")
    return temperature


def _stored_temperature(batch: Mapping[str, Any], temperature: float, loss: str, stacklevel: int) -> int | None:
    """Index j of ``temperature`` among the stored temperatures; None, with a warning, when it is not stored."""
    temps = batch.get("temperatures")
    if temps is not None and batch.get("log_normalizers") is not None:
        temps = torch.as_tensor(temps, dtype=torch.float64)
        temps = temps[0] if temps.ndim == 2 else temps  # collated per-sample lists: every row is the same list
        for j, stored in enumerate(temps.tolist()):
            if math.isclose(stored, temperature, rel_tol=1e-6):
                return j
        stored_text = f"stored temperatures are {temps.tolist()}"
    else:
        stored_text = "the batch has no 'temperatures'/'log_normalizers'"
    warnings.warn(
        f"{loss}: temperature {temperature} is not in the cache ({stored_text}); falling back to the teacher's "
        "top-k head and the student's head ids, both renormalised (biased, no tail). Cache this temperature for "
        "exact targets.",
        TemperatureFallbackWarning,
        stacklevel=stacklevel + 1,
    )
    return None


def _temperature_offset(batch: Mapping[str, Any], j: int, temperature: float, dtype: torch.dtype) -> Tensor:
    """``[B, T, 1]`` offset c with ``log p_T = log p_1 / T + c`` at stored temperature index j."""
    normalizers = batch["log_normalizers"].to(dtype)
    return normalizers[..., :1] / temperature - normalizers[..., j : j + 1]


def _teacher_head_tail(
    batch: Mapping[str, Any], temperature: float, dtype: torch.dtype, loss: str
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Teacher head log-probs ``[B, T, k]``, tail log-mass ``[B, T]`` and head validity ``[B, T, k]`` at T.

    At an unstored temperature the head is renormalised over the valid top-k and the tail is None.
    """
    logprobs = _require(batch, "target_logprobs", loss).to(dtype)
    valid = logprobs > _NEG_INF
    logprobs = logprobs.masked_fill(~valid, _NEG_INF)
    if temperature == 1.0:
        tail = batch.get("tail_logprob")
        tail = log1mexp(torch.logsumexp(logprobs, -1)) if tail is None else tail.to(dtype)
        return logprobs, tail, valid
    j = _stored_temperature(batch, temperature, loss, stacklevel=4)  # user -> loss -> _bucket_loss -> here
    if j is None:
        return masked_log_softmax(logprobs / temperature, valid), None, valid
    head = logprobs / temperature + _temperature_offset(batch, j, temperature, dtype)
    tails = batch.get("tail_logprobs")
    tail = log1mexp(torch.logsumexp(head, -1)) if tails is None else tails[..., j].to(dtype)
    return head, tail, valid


# --------------------------------------------------------------------------------------------------------------
# Public losses


def _bucket_loss(
    student_logits: Tensor,
    batch: Mapping[str, Any],
    divergence: Callable[[Tensor, Tensor], Tensor],
    loss: str,
    temperature: float,
    chunk_tokens: int,
    renormalize: bool = False,
) -> Tensor:
    temperature = _check_temperature(temperature, loss)
    batch = expand_targets(batch)  # a compact batch's head, decoded on the logits' device
    ids = _require(batch, "target_ids", loss)
    _check_student(student_logits, batch, [ids], loss)
    if renormalize:
        logprobs = _require(batch, "target_logprobs", loss).to(compute_dtype(student_logits))
        valid = logprobs > _NEG_INF
        head, tail = masked_log_softmax(logprobs / temperature, valid), None
    else:
        head, tail, valid = _teacher_head_tail(batch, temperature, compute_dtype(student_logits), loss)
    data = {"ids": ids.long(), "valid": valid, "head": head}
    if tail is None:  # renormalised top-k on both sides, no tail bucket
        row_loss = functools.partial(renormalized_rows, divergence=divergence)
    else:
        data["tail"] = tail
        row_loss = functools.partial(bucket_rows, divergence=divergence)
    mask = _loss_mask(batch, ids.shape[:2], student_logits.device)
    return mean_over_rows(student_logits, mask, data, row_loss, temperature=temperature, chunk_tokens=chunk_tokens)


def forward_kl_tail(
    student_logits: Tensor, batch: Mapping[str, Any], *, temperature: float = 1.0, chunk_tokens: int = 1024
) -> Tensor:
    """Forward KL(p_teacher || q_student) over the k head ids plus one tail bucket, mean over unmasked positions.

    Exact at T = 1 and at every stored temperature; with k = V it equals the dense KL.

    Args:
        student_logits: ``[B, T, V]`` any float dtype, ``V >=`` the teacher's vocabulary.
        batch: Reads ``target_ids``, ``target_logprobs``, ``tail_logprob``; optionally ``temperatures``,
            ``log_normalizers``, ``tail_logprobs``, ``loss_mask``/``labels``/``attention_mask`` and
            ``teacher_vocab_size``.
        temperature: Softmax temperature of both teacher and student (no ``T**2`` factor here).
        chunk_tokens: Positions evaluated at once; bounds the float32 ``[chunk_tokens, V]`` working set.

    Returns:
        Scalar float32 (float64 for float64 logits) tensor.

    Raises:
        ValueError: The batch lacks a key, shapes disagree, or the student's vocabulary is smaller than the teacher's.
    """
    return _bucket_loss(student_logits, batch, divergences.forward_kl, "forward_kl_tail", temperature, chunk_tokens)


def reverse_kl(
    student_logits: Tensor, batch: Mapping[str, Any], *, temperature: float = 1.0, chunk_tokens: int = 1024
) -> Tensor:
    """Reverse KL(q_student || p_teacher) on the head + tail buckets; arguments as :func:`forward_kl_tail`."""
    return _bucket_loss(student_logits, batch, divergences.reverse_kl, "reverse_kl", temperature, chunk_tokens)


def jsd(
    student_logits: Tensor,
    batch: Mapping[str, Any],
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> Tensor:
    """Generalised Jensen-Shannon divergence on the head + tail buckets.

    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``; ``beta = 0`` is the
    forward KL and ``beta = 1`` the reverse KL (TRL's convention). Other arguments as :func:`forward_kl_tail`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must lie in [0, 1], got {beta}")
    divergence = functools.partial(divergences.jsd, beta=float(beta))
    return _bucket_loss(student_logits, batch, divergence, "jsd", temperature, chunk_tokens)


def tvd(
    student_logits: Tensor, batch: Mapping[str, Any], *, temperature: float = 1.0, chunk_tokens: int = 1024
) -> Tensor:
    """Total variation ``0.5 * sum |p - q|`` on the head + tail buckets; arguments as :func:`forward_kl_tail`."""
    return _bucket_loss(student_logits, batch, divergences.tvd, "tvd", temperature, chunk_tokens)


def renormalized_topk_kl(
    student_logits: Tensor, batch: Mapping[str, Any], *, temperature: float = 1.0, chunk_tokens: int = 1024
) -> Tensor:
    """KL between the teacher head renormalised to 1 and the student restricted to the head ids and renormalised.

    The common biased baseline: it ignores the tail and its gradient is not the full-KD gradient. It needs only
    ``target_ids`` and ``target_logprobs`` and is the same at any temperature, stored or not. Arguments and return
    value as :func:`forward_kl_tail`.
    """
    return _bucket_loss(
        student_logits,
        batch,
        divergences.forward_kl,
        "renormalized_topk_kl",
        temperature,
        chunk_tokens,
        renormalize=True,
    )


def sampled_kl(
    student_logits: Tensor,
    batch: Mapping[str, Any],
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    hybrid: bool | None = None,
) -> Tensor:
    """Unbiased sampled forward KL: ``sum_i w_i (log p_i - log q_i)`` (+ the exact head term in hybrid mode).

    Over draws, ``E[sum_i w_i f(id_i)] = sum_v p_v f(v)``, so both the loss and its gradient w.r.t. the student
    logits are unbiased estimates of the full forward KL and its gradient. At a stored temperature T the weights are
    importance-reweighted, ``w_i p_T(i) / p(i)``, and stay unbiased; at an unstored one they are self-normalised over
    the cached support (``p^(1/T)`` up to a constant estimated from the same draws) with a warning.

    Args:
        student_logits: ``[B, T, V]`` any float dtype.
        batch: Reads ``sample_ids``, ``sample_weights``, ``sample_logprobs`` and, in hybrid mode, ``target_ids`` and
            ``target_logprobs``; the optional keys as :func:`forward_kl_tail`.
        temperature: Softmax temperature of teacher and student.
        chunk_tokens: Positions evaluated at once.
        hybrid: Add the exact head term from ``target_ids``; None means "when ``target_ids`` is in the batch".

    Returns:
        Scalar float32 (float64 for float64 logits) tensor.
    """
    loss = "sampled_kl"
    temperature = _check_temperature(temperature, loss)
    batch = expand_targets(batch)  # a compact batch's head, decoded on the logits' device
    dtype = compute_dtype(student_logits)
    ids = _require(batch, "sample_ids", loss).long()
    weights = _require(batch, "sample_weights", loss).to(dtype)
    logprobs = _require(batch, "sample_logprobs", loss).to(dtype)
    hybrid = batch.get("target_ids") is not None if hybrid is None else hybrid
    head_ids = _require(batch, "target_ids", loss).long() if hybrid else None
    _check_student(student_logits, batch, [ids] if head_ids is None else [ids, head_ids], loss)
    valid = (weights > 0) & (logprobs > _NEG_INF)
    weights, logprobs = weights.masked_fill(~valid, 0.0), logprobs.masked_fill(~valid, 0.0)
    head = head_valid = None
    if hybrid:
        head = _require(batch, "target_logprobs", loss).to(dtype)
        head_valid = head > _NEG_INF
        head = head.masked_fill(~head_valid, _NEG_INF)
    if temperature != 1.0:
        j = _stored_temperature(batch, temperature, loss, stacklevel=2)
        if j is not None:
            offset = _temperature_offset(batch, j, temperature, dtype)
        else:  # estimate log Z_T = log sum_v p_v^(1/T) from the head and the weighted draws
            log_terms = (weights.log() + logprobs * (1.0 / temperature - 1.0)).masked_fill(~valid, _NEG_INF)
            if hybrid:
                log_terms = torch.cat([log_terms, head / temperature], -1)
            log_z = torch.logsumexp(log_terms, -1, keepdim=True)
            offset = -log_z.masked_fill(log_z == _NEG_INF, 0.0)
        tempered = logprobs / temperature + offset
        weights = (weights * (tempered - logprobs).exp()).masked_fill(~valid, 0.0)
        logprobs = tempered.masked_fill(~valid, 0.0)
        if hybrid:
            head = head / temperature + offset
    data = {"sample_ids": ids, "sample_weights": weights, "sample_logprobs": logprobs}
    if hybrid:
        data.update(head_ids=head_ids, head_valid=head_valid, head=head)
    mask = _loss_mask(batch, ids.shape[:2], student_logits.device)
    return mean_over_rows(student_logits, mask, data, sampled_rows, temperature=temperature, chunk_tokens=chunk_tokens)


def uld_loss(
    student_logits: Tensor, batch: Mapping[str, Any], *, temperature: float = 1.0, chunk_tokens: int = 1024
) -> Tensor:
    """Universal Logit Distillation on sorted probability vectors (Boizard et al., 2024), mean over unmasked positions.

    ULD compares the teacher's and the student's probabilities sorted in descending order, ``sum_i |p_(i) -
    q_(i)|``, which needs no correspondence between the two vocabularies. On a cross-tokenizer batch (one with
    ``unmapped_logprobs``, `kdcache.read.xbatch`) it covers the part that does not map: the teacher's entries
    without a student counterpart, sorted, against the student's largest probabilities outside the mapped ids, the
    rest of each tail bucket as one more outcome. Add it to the forward KL on the mapped ids (GOLD-style hybrid)::

        loss = distillation_loss(logits, batch, kind="forward_kl") + 0.5 * uld_loss(logits, batch)

    On any other batch it compares the teacher's head, sorted, plus its tail bucket with the student's k largest
    probabilities plus the rest of its vocabulary (plain ULD, cut after k entries: a lower bound of the full one).

    Args:
        student_logits: ``[B, T, V]`` any float dtype.
        batch: Reads ``target_ids``, ``target_logprobs``, ``tail_logprob`` and, on cross-tokenizer batches,
            ``unmapped_logprobs`` ``[B, T, u]``; the optional keys as :func:`forward_kl_tail`.
        temperature: Softmax temperature of teacher and student; a cross-tokenizer batch holds one temperature, so
            it takes only 1 (give the dataset the temperature instead).
        chunk_tokens: Positions evaluated at once.

    Returns:
        Scalar float32 (float64 for float64 logits) tensor, in [0, 2].
    """
    loss = "uld_loss"
    temperature = _check_temperature(temperature, loss)
    batch = expand_targets(batch)
    ids = _require(batch, "target_ids", loss).long()
    _check_student(student_logits, batch, [ids], loss)
    dtype = compute_dtype(student_logits)
    if batch.get("unmapped_logprobs") is not None:
        if temperature != 1.0:
            raise ValueError(
                f"{loss}: a cross-tokenizer batch holds the teacher at one temperature; call the loss at 1.0 and give "
                "the dataset temperature= (a stored one) to distill at another"
            )
        valid = _require(batch, "target_logprobs", loss) > _NEG_INF
        tail = _require(batch, "tail_logprob", loss).to(dtype)
        data = {"ids": ids, "valid": valid, "sorted": batch["unmapped_logprobs"].to(dtype), "bucket": tail}
    else:
        head, tail, valid = _teacher_head_tail(batch, temperature, dtype, loss)
        head_sum = torch.logsumexp(head, -1)
        bucket = head_sum if tail is None else torch.logaddexp(head_sum, tail)  # the whole distribution: ~0
        ordered = head.masked_fill(~valid, _NEG_INF).sort(-1, descending=True).values
        data = {"ids": ids, "valid": torch.zeros_like(valid), "sorted": ordered, "bucket": bucket}
    mask = _loss_mask(batch, ids.shape[:2], student_logits.device)
    return mean_over_rows(student_logits, mask, data, uld_rows, temperature=temperature, chunk_tokens=chunk_tokens)


def cross_entropy(student_logits: Tensor, labels: Tensor, *, chunk_tokens: int = 1024) -> Tensor:
    """Token cross-entropy at temperature 1, mean over labels that are not -100, chunked like the KD losses.

    Args:
        student_logits: ``[B, T, V]`` any float dtype.
        labels: ``[B, T]`` int64 next-token labels aligned with the logits; -100 is ignored.
        chunk_tokens: Positions evaluated at once.

    Returns:
        Scalar float32 (float64 for float64 logits) tensor; 0 when every label is ignored.
    """
    _check_student(student_logits, {}, [labels], "cross_entropy")
    mask = labels != IGNORE_INDEX
    data = {"labels": labels.long().masked_fill(~mask, 0)}
    return mean_over_rows(student_logits, mask, data, cross_entropy_rows, temperature=1.0, chunk_tokens=chunk_tokens)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl_tail,
    "forward_kl_tail": forward_kl_tail,
    "renormalized_topk_kl": renormalized_topk_kl,
    "sampled_kl": sampled_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "uld": uld_loss,
}


SAMPLE_LOSSES = ("sampled_kl",)  # the kinds that read a batch's sampled targets
_warned_ignored: set[str] = set()  # kinds already warned about (once per process and kind)


def default_kind(batch: Mapping[str, Any]) -> str:
    """The estimator that fits a batch: ``"sampled_kl"`` when it holds sampled targets, else ``"forward_kl"``."""
    return "sampled_kl" if batch.get("sample_ids") is not None else "forward_kl"


def distillation_loss(
    student_logits: Tensor,
    batch: Mapping[str, Any],
    *,
    kind: str | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    **loss_kwargs: Any,
) -> Tensor:
    """``alpha * T**2 * KD + (1 - alpha) * CE``, the usual mix of a distillation term and the hard-label loss.

    CE is taken where ``labels`` are set and ``loss_mask`` (when the batch has one) is on: on a cache of the teacher's
    own responses (docs/GENERATE.md) that is the generated tokens, so the mix is sequence-level KD (CE on the
    teacher's samples) plus token-level KD (its soft targets on them); ``alpha = 0`` is sequence-level KD alone.

    Args:
        student_logits: ``[B, T, V]`` any float dtype.
        batch: As the chosen loss reads it, plus ``labels`` ``[B, T]`` int64 for the CE term (unless ``alpha == 1``).
        kind: A key of :data:`LOSSES`; None (the default): :func:`default_kind` of the batch. A kind that reads
            only the head of a batch with sampled targets warns once (:class:`IgnoredSamplesWarning`).
        alpha: Weight of the KD term in [0, 1]; the term left out at 0 or 1 is not computed.
        temperature: KD temperature; the KD term is multiplied by ``temperature**2`` so its gradient scale does not
            depend on T. CE is always at temperature 1.
        chunk_tokens: Positions evaluated at once.
        **loss_kwargs: Passed to the KD loss (``beta`` for ``jsd``, ``hybrid`` for ``sampled_kl``).

    Returns:
        Scalar tensor.

    Raises:
        ValueError: Unknown ``kind``, ``alpha`` outside [0, 1], or missing ``labels`` when CE is needed.
    """
    if kind is None:
        kind = default_kind(batch)
    elif kind not in LOSSES:
        raise ValueError(f"distillation_loss: unknown kind {kind!r}; choose one of {sorted(LOSSES)}")
    elif kind not in SAMPLE_LOSSES and batch.get("sample_ids") is not None and kind not in _warned_ignored:
        _warned_ignored.add(kind)
        warnings.warn(
            f"distillation_loss: kind={kind!r} reads only the exact head of this batch and ignores its sampled "
            "targets (a hybrid cache): the tail is one bucket, its shape unused. kind=None or 'sampled_kl' uses "
            "the draws (unbiased). Warned once.",
            IgnoredSamplesWarning,
            stacklevel=2,
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation_loss: alpha must lie in [0, 1], got {alpha}")
    total = student_logits.new_zeros((), dtype=compute_dtype(student_logits))
    if alpha > 0.0:
        kd = LOSSES[kind](student_logits, batch, temperature=temperature, chunk_tokens=chunk_tokens, **loss_kwargs)
        total = total + alpha * temperature**2 * kd
    if alpha < 1.0:
        labels = _require(batch, "labels", "distillation_loss")
        if batch.get("loss_mask") is not None:  # positions without a teacher target (a prompt) train no CE either
            labels = labels.masked_fill(~_loss_mask(batch, labels.shape, labels.device), IGNORE_INDEX)
        total = total + (1.0 - alpha) * cross_entropy(student_logits, labels, chunk_tokens=chunk_tokens)
    return total
