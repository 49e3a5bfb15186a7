"""Pure tensor math that turns teacher logits into the per-token soft targets kdcache stores (torch only; no I/O).

For each token position the teacher's full distribution over the vocabulary is summarised as:

- the k most probable ids (sorted ascending) and their log-probabilities at temperature 1;
- for every temperature T_j the log-normalizer ``logsumexp(z / T_j)`` over the full vocabulary, so a student can
  re-normalise the stored head at any cached temperature: ``log p_T(i) = z_i / T - log_normalizer_T`` and
  ``z_i = logprob_1(i) + log_normalizer_1``;
- for every temperature the exact log-mass of the tail (all ids not kept), computed as the logsumexp of the
  complement rather than ``log(1 - sum p)``, which loses every digit when the head holds nearly all the mass;
- the entropy of the full distribution at T = 1, in nats.

Usage::

    targets = select_topk(logits, k=32, temperatures=[1.0, 2.0])  # logits [N, V], any float dtype
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["SampledTargets", "TokenTargets", "sample_ids", "sample_targets", "select_topk", "tail_logprob_from_head"]


@dataclass
class TokenTargets:
    """Top-k soft targets for N token positions, with the exact tail mass and normalizers at each temperature.

    Attributes:
        ids: ``[N, k]`` int64, the k most probable token ids of each position, sorted ascending per row. Among equal
            logits at the k-th place the lowest ids are kept, so the same logits always give the same ids.
        logprobs: ``[N, k]`` float32, log-softmax at T = 1 of the logits at ``ids`` (aligned with ``ids``).
        log_normalizers: ``[N, nT]`` float32, ``logsumexp(z / T_j)`` over the full vocabulary for each temperature.
        tail_logprobs: ``[N, nT]`` float32, log of the probability mass at ``T_j`` of all ids not in ``ids``;
            ``-inf`` when there are none (k == V) or they all have ``-inf`` logits.
        entropy: ``[N]`` float32, entropy in nats of the full distribution at T = 1.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_normalizers: torch.Tensor
    tail_logprobs: torch.Tensor
    entropy: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Number of token positions N."""
        return int(self.ids.shape[0])

    @staticmethod
    def concat(parts: list[TokenTargets]) -> TokenTargets:
        """Concatenate targets of consecutive position ranges along the token axis.

        Args:
            parts: Non-empty list of targets with the same k and the same number of temperatures.

        Returns:
            Targets with ``N = sum(part.num_tokens)``, positions in the order of ``parts``.

        Raises:
            ValueError: ``parts`` is empty or the parts disagree on k or on the number of temperatures.
        """
        if not parts:
            raise ValueError("TokenTargets.concat needs at least one part; got an empty list")
        k, n_temps = parts[0].ids.shape[1], parts[0].log_normalizers.shape[1]
        for i, part in enumerate(parts):
            if part.ids.shape[1] != k or part.log_normalizers.shape[1] != n_temps:
                raise ValueError(
                    f"TokenTargets.concat: part {i} has k={part.ids.shape[1]} and "
                    f"{part.log_normalizers.shape[1]} temperatures, part 0 has k={k} and {n_temps}"
                )
        if len(parts) == 1:
            return parts[0]
        return TokenTargets(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts], dim=0) for f in fields(TokenTargets)}
        )


def _check_temperatures(temperatures: Sequence[float]) -> list[float]:
    temps = [float(t) for t in temperatures]
    if not temps or temps[0] != 1.0:
        raise ValueError(f"temperatures must start with 1.0 (the stored log-probs are at T=1); got {temps}")
    if any(not math.isfinite(t) or t <= 0.0 for t in temps):
        raise ValueError(f"temperatures must be finite and > 0; got {temps}")
    return temps


def _topk_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask ``[N, V]`` with exactly k True per row: the k largest, lowest ids first among equal values.

    ``torch.topk`` picks an unspecified subset of tied values (it can differ between devices and batch shapes), so
    the tie at the k-th value is resolved here explicitly.
    """
    kth = torch.topk(z, k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values  # [N, 1]
    above = z > kth
    at_kth = z == kth
    n_needed = k - above.sum(dim=-1, keepdim=True, dtype=torch.int32)  # [N, 1], >= 1
    rank_at_kth = at_kth.cumsum(dim=-1, dtype=torch.int32)  # 1-based rank among tied values, in id order
    return above | (at_kth & (rank_at_kth <= n_needed))


def select_topk(logits: torch.Tensor, k: int, temperatures: Sequence[float]) -> TokenTargets:
    """Summarise each row of logits by its top-k log-probs, exact tail masses and normalizers.

    All math is done in float32 whatever the input dtype. ``-inf`` logits (masked vocabulary entries) are valid and
    never produce NaN; they have probability 0 and contribute 0 to the entropy.

    Args:
        logits: ``[N, V]`` floating point (float32, bfloat16, float16, float64) teacher logits after every final
            transform of the architecture (softcapping, scaling).
        k: Number of ids to keep per position, ``1 <= k <= V``. ``k == V`` keeps every id (tail is ``-inf``).
        temperatures: Temperatures at which to record normalizers and tail masses; ``temperatures[0]`` must be 1.0.

    Returns:
        TokenTargets with ``ids [N, k]`` int64, ``logprobs [N, k]``, ``log_normalizers [N, nT]``,
        ``tail_logprobs [N, nT]`` and ``entropy [N]``, all float32, on the device of ``logits``.

    Raises:
        ValueError: ``logits`` is not 2-D floating point, ``k`` is out of range, ``temperatures`` is invalid, or a row
            holds NaN, ``+inf``, or no finite logit at all.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a 2-D floating point tensor [N, V]; got {tuple(logits.shape)} {logits.dtype}"
        )
    n_tokens, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V={vocab}]; got k={k}")
    temps = _check_temperatures(temperatures)
    z = logits.float()  # no copy when already float32: never modify z in place
    if bool(torch.isnan(z).any()) or bool(torch.isposinf(z).any()):
        raise ValueError("logits hold NaN or +inf; the teacher forward is numerically broken")

    keep = _topk_mask(z, k)
    # nonzero() walks rows in order and ids ascending within a row, which is exactly the stored layout.
    ids = keep.nonzero()[:, 1].reshape(n_tokens, k)
    z_rest = z.masked_fill(keep, float("-inf"))

    log_norms, tails = [], []
    for t in temps:
        scaled = z if t == 1.0 else z / t
        scaled_rest = z_rest if t == 1.0 else z_rest / t
        log_norm = torch.logsumexp(scaled, dim=-1)  # [N]
        log_norms.append(log_norm)
        # logsumexp of an all -inf row is -inf, and -inf minus a finite normalizer stays -inf: no NaN.
        tails.append(torch.logsumexp(scaled_rest, dim=-1) - log_norm)
    log_norm_1 = log_norms[0]
    if bool(torch.isneginf(log_norm_1).any()):
        raise ValueError("a row of logits is entirely -inf; every position needs at least one finite logit")

    logp = z - log_norm_1.unsqueeze(-1)  # [N, V], -inf where the logit is -inf
    # p * log p with 0 * log 0 := 0; exp underflow to 0 on very negative finite logp gives 0 as well.
    plogp = torch.where(torch.isneginf(logp), 0.0, logp.exp() * logp)
    entropy = (-plogp.sum(dim=-1)).clamp_min(0.0)  # rounding can dip a hair below 0 for a near one-hot row

    return TokenTargets(
        ids=ids,
        logprobs=logp.gather(-1, ids),
        log_normalizers=torch.stack(log_norms, dim=-1),
        tail_logprobs=torch.stack(tails, dim=-1),
        entropy=entropy,
    )


def tail_logprob_from_head(head_logprobs: torch.Tensor) -> torch.Tensor:
    """Log of the probability mass outside a stored head, ``log(1 - sum(exp(head_logprobs)))``, computed stably.

    Prefer the exact ``tail_logprobs`` from :func:`select_topk`; this is for heads whose tail was not stored. It
    loses relative precision when the head holds nearly all the mass (the information is simply not there).

    Args:
        head_logprobs: ``[..., k]`` floating point log-probabilities of disjoint ids.

    Returns:
        ``[...]`` tail log-mass in the input dtype (float32 for half inputs); ``-inf`` when the head mass rounds to
        1 or more.
    """
    x = head_logprobs.float() if head_logprobs.dtype in (torch.float16, torch.bfloat16) else head_logprobs
    log_head = torch.logsumexp(x, dim=-1).clamp_max(0.0)  # log of head mass, <= 0
    # log1mexp(a) = log(1 - exp(a)) for a <= 0: log(-expm1(a)) near 0, log1p(-exp(a)) far from 0 (Maechler 2012).
    near_zero = log_head > -math.log(2.0)
    return torch.where(near_zero, torch.log(-torch.expm1(log_head)), torch.log1p(-torch.exp(log_head)))


@dataclass
class SampledTargets:
    """Unique token ids drawn with replacement from the teacher distribution, with their counts.

    Rows are padded to the largest number of unique ids m in the batch: valid entries first (ids ascending),
    padding after them with id 0, count 0 and log-prob -inf.

    Attributes:
        ids: ``[N, m]`` int64 unique sampled ids.
        counts: ``[N, m]`` int32 number of draws of each id (sum over a row = num_samples, or 0 if nothing to draw).
        logprobs: ``[N, m]`` float32 teacher log-prob at T = 1 of each id (over the full vocabulary).
        num_samples: draws per position N_s.
    """

    ids: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor
    num_samples: int

    @staticmethod
    def concat(parts: list[SampledTargets]) -> SampledTargets:
        """Concatenate along the token axis, re-padding to the widest part."""
        width = max(p.ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return SampledTargets(
            ids=torch.cat([pad(p.ids, 0) for p in parts]),
            counts=torch.cat([pad(p.counts, 0) for p in parts]),
            logprobs=torch.cat([pad(p.logprobs, float("-inf")) for p in parts]),
            num_samples=parts[0].num_samples,
        )


def sample_ids(
    logits: torch.Tensor, num_samples: int, *, exclude: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> SampledTargets:
    """Draw `num_samples` ids per row with replacement from softmax(logits) restricted to ids not in `exclude`.

    Args:
        logits: ``[N, V]`` floating point teacher logits (T = 1).
        num_samples: draws per row, >= 1.
        exclude: optional ``[N, V]`` bool, True for ids that must not be drawn (the exact head in hybrid mode).
            A row with nothing left to draw gets no samples (all counts 0).
        generator: torch generator on the logits' device, for reproducible draws.

    Returns:
        SampledTargets; ``logprobs`` are log-softmax over the FULL vocabulary (not the restricted one).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    z = logits.float()
    n_tokens, vocab = z.shape
    logp_full = torch.log_softmax(z, dim=-1)
    zr = z if exclude is None else z.masked_fill(exclude, float("-inf"))
    drawable = torch.isfinite(zr).any(dim=-1)  # [N]
    probs = torch.softmax(zr.masked_fill(~drawable.unsqueeze(-1), 0.0), dim=-1)  # rows with nothing: uniform dummy
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # [N, S]
    counts_full = torch.zeros((n_tokens, vocab), dtype=torch.int32, device=z.device)
    counts_full.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
    counts_full[~drawable] = 0
    width = max(int((counts_full > 0).sum(dim=-1).max()) if n_tokens else 0, 1)
    arange = torch.arange(vocab, device=z.device)
    key = torch.where(counts_full > 0, arange, arange + vocab)  # drawn ids first, ascending
    order = torch.topk(key, width, dim=-1, largest=False, sorted=True).values
    valid = order < vocab
    ids = torch.where(valid, order, 0)
    counts = torch.where(valid, counts_full.gather(1, ids), 0)
    logprobs = torch.where(valid, logp_full.gather(1, ids), float("-inf"))
    return SampledTargets(ids=ids, counts=counts, logprobs=logprobs, num_samples=num_samples)


def sample_targets(
    logits: torch.Tensor,
    *,
    num_samples: int,
    head: int,
    temperatures: Sequence[float],
    generator: torch.Generator | None = None,
) -> tuple[TokenTargets, SampledTargets]:
    """Sampled (head = 0) or hybrid (head > 0) targets: an exact top-`head` head plus draws from the rest.

    With head = 0 every draw comes from the full distribution p (mode "sample": weights count / N estimate p).
    With head > 0 the draws come from p restricted to the ids outside the head and renormalized (mode "hybrid":
    weights tail_mass * count / N estimate the tail). Normalizers, tails and entropy are as in `select_topk`;
    with head = 0 the "tail" is the whole distribution (tail log-mass 0 at every temperature).

    Returns:
        (TokenTargets with ids ``[N, head]``, SampledTargets with ids ``[N, m]``).
    """
    n_tokens, vocab = logits.shape
    if head > 0:
        topk = select_topk(logits, head, temperatures)
        exclude = torch.zeros((n_tokens, vocab), dtype=torch.bool, device=logits.device)
        exclude.scatter_(1, topk.ids, True)
    else:
        one = select_topk(logits, 1, temperatures)
        empty = torch.zeros((n_tokens, 0), device=logits.device)
        topk = TokenTargets(
            ids=empty.long(),
            logprobs=empty.float(),
            log_normalizers=one.log_normalizers,
            tail_logprobs=torch.zeros_like(one.tail_logprobs),
            entropy=one.entropy,
        )
        exclude = None
    return topk, sample_ids(logits, num_samples, exclude=exclude, generator=generator)
