"""Pure tensor math that turns teacher logits into the per-token soft targets kdcache stores (torch only; no I/O).

For each token position the teacher's full distribution over the vocabulary is summarised as:

- the k most probable ids (sorted ascending) and their log-probabilities at temperature 1;
- for every temperature T_j the log-normalizer ``logsumexp(z / T_j)`` over the full vocabulary, so a student can
  re-normalise the stored head at any cached temperature: ``log p_T(i) = z_i / T - log_normalizer_T`` and
  ``z_i = logprob_1(i) + log_normalizer_1``;
- for every temperature the exact log-mass of the tail (all ids not kept), summed directly over the complement
  (exponentials with the head entries zeroed) rather than as ``log(1 - sum p)``, which loses every digit when the
  head holds nearly all the mass;
- the entropy of the full distribution at T = 1, in nats.

Usage::

    targets = select_topk(logits, k=32, temperatures=[1.0, 2.0])  # logits [N, V], any float dtype
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

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

    def rows(self, start: int, stop: int) -> TokenTargets:
        """Positions [start, stop) (views of the same arrays)."""
        return _map_arrays(self, lambda a: a[start:stop])

    def numpy(self) -> TokenTargets:
        """The same targets as numpy arrays on the host (what a shard writer encodes)."""
        return _map_arrays(self, lambda a: a.cpu().numpy())

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


def _map_arrays(targets, fn):
    """A copy of a targets dataclass with `fn` applied to each of its array fields."""
    return replace(
        targets, **{f.name: fn(getattr(targets, f.name)) for f in fields(targets) if f.name != "num_samples"}
    )


def _check_temperatures(temperatures: Sequence[float]) -> list[float]:
    temps = [float(t) for t in temperatures]
    if not temps or temps[0] != 1.0:
        raise ValueError(f"temperatures must start with 1.0 (the stored log-probs are at T=1); got {temps}")
    if any(not math.isfinite(t) or t <= 0.0 for t in temps):
        raise ValueError(f"temperatures must be finite and > 0; got {temps}")
    return temps


# Float32 bytes of one row block on CPU, per torch thread: select_topk runs every step (top-k, exponentials, sums)
# block by block, so the block, read once from memory, and its two float32 work buffers stay in the threads' share
# of the cache while every pass reuses them. Measured (AMD EPYC, 1 MiB L2 per core, 32 MiB shared L3, V = 32k and
# 128k, interleaved medians): on one thread 2-4 MiB blocks make the exp/sum passes 1.5x faster than 8 MiB ones,
# whose buffers no longer fit next to other processes' data, and select_topk 1.5x faster overall. Per thread, not
# fixed: every op on a block is one parallel region, and on cores shared with other processes each region can stall
# until a descheduled thread runs again, so more threads get proportionally larger (fewer) blocks: at 2 threads on
# 2 loaded cores, 2 MiB blocks brought bench/capture.py's ratio down to 0.42 (0.96-0.97 with 8 MiB, other runs).
# Above 2 threads not measured; capped at the size of a typical L3. On accelerators the whole chunk is one block.
_CPU_BLOCK_BYTES_PER_THREAD = 4 * 2**20
_CPU_BLOCK_BYTES_MAX = 32 * 2**20
# Input dtypes whose conversion to float32 is exact and order-preserving: ranked as they are, converted per block.
_EXACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Top-k prefilter on CPU (see `_topk_values`): ids per strided group, and the fewest groups (at least 4 per kept id)
# for which it pays. Measured on one thread ([r, V] blocks of 2 MiB): 0.4-0.75x of `torch.topk`'s time at V = 32k
# and 128k for k = 1-256; no clear gain below ~16k ids, where plain topk is used.
_PREFILTER_GROUP = 16
_PREFILTER_MIN_GROUPS = 1024


def _resolve_ties(rows: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """Exact top-k ids ``[r, k]`` of rows whose k-th value is tied with a value that ``torch.topk`` left out.

    ``torch.topk`` picks an unspecified subset of tied values (it can differ between devices and batch shapes). Every
    value strictly above the k-th is kept (all of them are among ``top_ids``); the remaining places go to the lowest
    ids whose value equals the k-th, found with a second ``topk`` over those ids.

    Args:
        rows: ``[r, V]`` logits of the tied rows (no NaN, no +inf).
        top_values: ``[r, k]`` the k largest values of each row, sorted descending.
        top_ids: ``[r, k]`` int64 ids of ``top_values``.

    Returns:
        ``[r, k]`` int64 ids, sorted ascending.
    """
    vocab, k = rows.shape[1], top_values.shape[1]
    kth = top_values[:, k - 1 :]  # [r, 1]
    above = top_values > kth  # [r, k]
    n_needed = k - above.sum(dim=-1, keepdim=True)  # [r, 1], >= 1
    arange = torch.arange(vocab, dtype=torch.int32, device=rows.device)
    tie_key = torch.where(rows == kth, arange, vocab)  # the id of each value equal to the k-th, V elsewhere
    tied_ids = torch.topk(tie_key, k, dim=-1, largest=False, sorted=True).values.long()  # lowest tied ids first
    take = torch.arange(k, device=rows.device) < n_needed
    candidates = torch.cat([torch.where(above, top_ids, vocab), torch.where(take, tied_ids, vocab)], dim=-1)
    return candidates.sort(dim=-1).values[:, :k]  # exactly k candidates are < V


def _cpu_block_bytes() -> int:
    """Float32 bytes of one row block on CPU for the current number of torch threads."""
    return min(_CPU_BLOCK_BYTES_PER_THREAD * torch.get_num_threads(), _CPU_BLOCK_BYTES_MAX)


def _topk_values(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row, sorted descending, with their ids: ``torch.topk(logits, k)``, cheaper.

    On CPU, for large vocabularies, the columns are split into ``G = V // 16`` strided groups (group j holds ids j,
    j + G, j + 2G, ...; the last ``V % 16`` ids form one more group) and ``topk`` runs on the group maxima, then
    on the 16 k ids of the k best groups plus the extra group. That is exact: every value above the row's k-th
    largest v lies in a group whose maximum is above v, and fewer than k groups can have one (each holds a distinct
    value above v), so all of them are among the k best groups; and those k groups hold at least k values >= v
    when more than k groups reach v, or every value >= v otherwise. So the values are the same multiset as
    ``topk``'s; only the choice among values tied at the k-th place may differ, and the caller resolves those
    ties by id anyway. The group maxima are one vectorised max over V (``amax`` propagates NaN like ``topk``
    ranks it: first), instead of ``topk``'s per-element heap work over the whole row.

    Args:
        logits: ``[r, V]`` logits (float32, bfloat16 or float16).
        k: ``1 <= k <= V``.

    Returns:
        (``[r, k]`` values sorted descending, ``[r, k]`` int64 ids).
    """
    rows, vocab = logits.shape
    groups = vocab // _PREFILTER_GROUP
    if logits.device.type != "cpu" or groups < max(_PREFILTER_MIN_GROUPS, 4 * k):
        return torch.topk(logits, k, dim=-1, sorted=True)
    main = logits[:, : groups * _PREFILTER_GROUP].view(rows, _PREFILTER_GROUP, groups)
    best_groups = torch.topk(main.amax(dim=1), k, dim=-1, sorted=False).indices  # [r, k]
    offsets = torch.arange(0, groups * _PREFILTER_GROUP, groups, device=logits.device)  # [16]
    candidates = (best_groups.unsqueeze(-1) + offsets).view(rows, -1)  # [r, 16 k]
    if vocab % _PREFILTER_GROUP:
        rest = torch.arange(groups * _PREFILTER_GROUP, vocab, device=logits.device).expand(rows, -1)
        candidates = torch.cat([candidates, rest], dim=-1)
    values, where = torch.topk(logits.gather(1, candidates), k, dim=-1, sorted=True)
    return values, candidates.gather(1, where)


def _select_ids(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids ``[N, k]`` int64 sorted ascending (lowest ids win ties at the k-th value), and row maxima ``[N]``.

    Raises:
        ValueError: a row holds NaN or +inf, or only -inf. ``topk`` and ``amax`` rank NaN above every number (on CPU
            and CUDA), so a row's maximum is NaN if it holds a NaN and +inf if it holds +inf: the maxima tell all.
    """
    n_tokens, vocab = logits.shape
    if k == vocab:
        ids, row_max = torch.arange(vocab, device=logits.device).expand(n_tokens, vocab), logits.amax(dim=-1)
    else:
        values, ids = _topk_values(logits, k + 1)  # the one pass over [N, V] for every row
        row_max = values[:, 0]
    if bool((row_max.isnan() | row_max.isposinf()).any()):
        raise ValueError("logits hold NaN or +inf; the teacher forward is numerically broken")
    if bool(row_max.isneginf().any()):
        raise ValueError("a row of logits is entirely -inf; every position needs at least one finite logit")
    if k == vocab:
        return ids, row_max.float()
    # The value just past the k-th says whether the k-th is tied with one that topk left out; only then is topk's
    # choice among equal values ambiguous, and only those rows (rare in float32, common in bfloat16) pay for the
    # exact rule: one compare and one topk pass more.
    tied = values[:, k] == values[:, k - 1]
    values, ids = values[:, :k], ids[:, :k]
    n_tied = int(tied.sum())
    if 2 * n_tied > n_tokens:  # the exact rule is right for every row; skip gathering the tied ones
        ids = _resolve_ties(logits, values, ids)
    elif n_tied:
        rows = tied.nonzero()[:, 0]
        ids = ids.clone()
        ids[rows] = _resolve_ties(logits[rows], values[rows], ids[rows])
    return ids.sort(dim=-1).values, row_max.float()


def _exp_sums(
    logits: torch.Tensor,
    row_max: torch.Tensor,
    ids: torch.Tensor,
    temps: list[float],
    buffers: tuple[torch.Tensor, torch.Tensor],
    rest: torch.Tensor,
    rest_dot: torch.Tensor,
) -> None:
    """Sums over the ids NOT in ``ids`` of ``exp((z - max) / T)`` per temperature, and of ``exp(z - max) (z - max)``.

    The exponentials are computed once per temperature and the head entries zeroed in place before summing, so a
    tail holding 1e-10 of the mass is summed directly and keeps its digits (no ``1 - head``). Sums are torch's
    cascade sums (a BLAS dot product accumulates naively and loses ~1e-4 at V = 32k). Temperatures are visited
    from the highest down, and ``exp(x / T)`` is taken as the square of ``exp(x / 2T)`` when 2T was just done
    (T = 1 after T = 2): one multiply instead of one exp, within a few float32 ulps, underflowing to 0 (through
    the same subnormals) where the exp would. Two ``[r, V]`` float32 buffers suffice: ``z - max`` and the current
    exponentials, squared in place; the entropy's products overwrite ``z - max`` once no temperature needs it
    (always for T in {1, 2, 4, ...}; a third buffer is allocated otherwise).

    Args:
        logits: ``[r, V]`` logits in an exact dtype (float32, bfloat16, float16).
        row_max: ``[r]`` float32 finite row maxima.
        ids: ``[r, k]`` int64 head ids.
        temps: temperatures; ``temps[0]`` is 1.
        buffers: two float32 work buffers of at least ``[r, V]`` (contents are overwritten).
        rest: ``[nT, r]`` float32 output, the tail sums per temperature.
        rest_dot: ``[r]`` float32 output, the tail sums of ``exp(z - max) (z - max)``, ``0 * -inf`` counted as 0.
    """
    shifted, e = buffers
    torch.sub(logits, row_max[:, None], out=shifted)  # z - max <= 0, in float32
    order = sorted(range(len(temps)), key=lambda j: -temps[j])
    prev_t = None
    for step, j in enumerate(order):
        t = temps[j]
        if prev_t == 2.0 * t:
            e.mul_(e)  # head entries are already 0
        else:
            torch.exp(shifted, out=e) if t == 1.0 else torch.exp(torch.mul(shifted, 1.0 / t, out=e), out=e)
            e.scatter_(1, ids, 0.0)
        torch.sum(e, dim=-1, out=rest[j])
        if t == 1.0:  # the entropy's tail sum
            later_from_shifted = any(temps[i] * 2.0 != temps[o] for o, i in zip(order[step:], order[step + 1 :]))
            product = torch.empty_like(shifted) if later_from_shifted else shifted
            torch.sum(torch.mul(e, shifted, out=product), dim=-1, out=rest_dot)
            if bool(rest_dot.isnan().any()):  # exp(-inf) * -inf: those terms are 0
                torch.sum(product.nan_to_num_(nan=0.0), dim=-1, out=rest_dot)
        prev_t = t


def select_topk(logits: torch.Tensor, k: int, temperatures: Sequence[float]) -> TokenTargets:
    """Summarise each row of logits by its top-k log-probs, exact tail masses and normalizers.

    All math is done in float32 whatever the input dtype. ``-inf`` logits (masked vocabulary entries) are valid and
    never produce NaN; they have probability 0 and contribute 0 to the entropy.

    Cost, per cache-sized block of rows on CPU (the whole input on an accelerator): one top-(k+1) selection (on CPU
    and V >= 16k a vectorised max over strided groups of 16 ids, then ``topk`` over the group maxima and the
    candidates of the best groups: see ``_topk_values``), then one exp (or, for T after 2T, one multiply) and one
    sum per temperature, plus a multiply and a sum for the entropy; rows whose k-th value is tied with an id outside
    the selection take one more compare and ``topk`` pass. Measured on one CPU thread: ~2 ns per row and vocabulary
    entry with T in {1, 2} (``python bench/capture.py``).

    Args:
        logits: ``[N, V]`` floating point (float32, bfloat16, float16, float64) teacher logits after every final
            transform of the architecture (softcapping, scaling). Never modified.
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
    n_temps, device = len(temps), logits.device
    if n_tokens == 0:
        empty = torch.empty((0, k), dtype=torch.float32, device=device)
        nt = torch.empty((0, n_temps), dtype=torch.float32, device=device)
        return TokenTargets(
            ids=empty.long(), logprobs=empty, log_normalizers=nt, tail_logprobs=nt.clone(), entropy=empty[:, 0]
        )
    z = logits if logits.dtype in _EXACT_DTYPES else logits.float()  # never modified in place

    # Row blocks sized for the cache on CPU (the whole chunk elsewhere): each block is read from memory once, then
    # ranked, exponentiated and summed while it is hot.
    block = max(1, _cpu_block_bytes() // (4 * vocab)) if device.type == "cpu" else n_tokens
    ids = torch.empty((n_tokens, k), dtype=torch.long, device=device)
    row_max = torch.empty(n_tokens, dtype=torch.float32, device=device)
    rest = torch.empty((n_temps, n_tokens), dtype=torch.float32, device=device)
    rest_dot = torch.empty(n_tokens, dtype=torch.float32, device=device)
    buffers = tuple(torch.empty((min(block, n_tokens), vocab), dtype=torch.float32, device=device) for _ in range(2))
    for start in range(0, n_tokens, block):
        stop = min(start + block, n_tokens)
        rows = z[start:stop]
        block_ids, block_max = _select_ids(rows, k)  # [r, k], [r] finite
        ids[start:stop], row_max[start:stop] = block_ids, block_max
        work = tuple(b[: stop - start] for b in buffers)
        _exp_sums(rows, block_max, block_ids, temps, work, rest[:, start:stop], rest_dot[start:stop])
    rest = rest.T  # [N, nT]

    head_shifted = z.gather(1, ids).float() - row_max.unsqueeze(-1)  # [N, k] z - max, -inf for -inf logits
    scale = torch.tensor([1.0 / t for t in temps], dtype=torch.float32, device=device)  # [nT]
    head_exp = torch.exp(head_shifted.unsqueeze(1) * scale[:, None])  # [N, nT, k]
    total = head_exp.sum(dim=-1) + rest  # [N, nT] sum of exp((z - max) / T) over V, >= 1 (the max gives exp(0))
    log_total = torch.log(total)
    log_norms = row_max.unsqueeze(-1) * scale + log_total
    # log 0 = -inf when nothing but -inf logits is left outside the head, and -inf minus a finite number is no NaN.
    tails = torch.log(rest) - log_total
    # H = -sum p log p with p = e / s, e = exp(z - max), s = sum e: H = log s - sum(e (z - max)) / s.
    head_dot = torch.where(head_exp[:, 0] > 0, head_exp[:, 0] * head_shifted, 0.0).sum(dim=-1)
    entropy = (log_total[:, 0] - (head_dot + rest_dot) / total[:, 0]).clamp_min(0.0)  # rounding can dip below 0

    return TokenTargets(
        ids=ids,
        logprobs=head_shifted - log_total[:, :1],
        log_normalizers=log_norms,
        tail_logprobs=tails,
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

    def rows(self, start: int, stop: int) -> SampledTargets:
        """Positions [start, stop) (views of the same arrays)."""
        return _map_arrays(self, lambda a: a[start:stop])

    def numpy(self) -> SampledTargets:
        """The same targets as numpy arrays on the host (what a shard writer encodes)."""
        return _map_arrays(self, lambda a: a.cpu().numpy())

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
    logits: torch.Tensor,
    num_samples: int,
    *,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
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
