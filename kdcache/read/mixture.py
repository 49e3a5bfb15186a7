"""Mixtures of caches: several caches read as one dataset, each contributing a fixed share of every epoch.

    mix = Mixture([Source("s3://kd/web", weight=0.7), Source("s3://kd/code", weight=0.3)], epoch_sequences=100_000)
    ds = KDCacheDataset(mix, batch_size=8)                    # or KDCacheDataset([("s3://kd/web", 0.7), ...], ...)
    ds = KDCacheDataset(Mixture([Source(web, repeat=2.0), Source(code, choose=5_000)]), batch_size=8)

How many sequences each source gives per epoch (`sequences_per_epoch`), decided when the dataset is built:

- `weight`: all sources carry one; source s gives round(weight_s / sum(weights) * epoch_sequences) sequences (the
  largest remainders get the rounding, so the counts sum to epoch_sequences exactly). epoch_sequences defaults to
  the sources' total sequence count.
- otherwise each source has `repeat` (default 1.0: every sequence once; 2.0 twice; 0.25 a quarter of them) or
  `choose` (that many sequences).

Which sequences (`epoch_units`), a pure function of (seed, epoch): a source giving n sequences out of its N takes
every unit n div N times, then whole units of a (seed, epoch)-permutation of its units while they fit in the
remainder, then a random subset of one more unit. The result is a list of "epoch units" (source, unit, rows) that
`kdcache.read.order.EpochOrder` permutes, partitions and shuffles like the units of a single cache: every epoch unit is
read whole once, so a source's fetched bytes follow its share of the epoch (a subset unit is fetched whole).

All sources must hold targets that batch together (`check_compatible`): the same tokenizer (content hash and
size), teacher vocabulary, target mode, k, temperatures, sample count and codec. The batch's `source` [B] says
which source each row came from (-1 for padding rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.errors import CacheMismatchError
from kdcache.read.order import _rng

__all__ = ["EpochUnits", "Mixture", "Source", "as_mixture", "check_compatible", "epoch_units", "sequences_per_epoch"]

_SUBSET_TAG, _UNITS_TAG = 3, 2  # rng tags (0 and 1 are EpochOrder's)


@dataclass(frozen=True)
class Source:
    """One cache of a mixture: its URL and at most one of weight (share of the epoch), repeat (times its sequences
    per epoch) or choose (sequences per epoch). storage_options: fsspec options of this cache (default: the
    dataset's). name: a label for logs (default: the URL)."""

    uri: str
    weight: float | None = None
    repeat: float | None = None
    choose: int | None = None
    storage_options: dict[str, Any] | None = field(default=None, compare=False)
    name: str | None = None

    def __post_init__(self) -> None:
        given = [key for key in ("weight", "repeat", "choose") if getattr(self, key) is not None]
        if len(given) > 1:
            raise ValueError(f"mixture source {self.uri}: give at most one of weight, repeat, choose (got {given})")
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"mixture source {self.uri}: weight must be > 0, got {self.weight}")
        if self.repeat is not None and not (math.isfinite(self.repeat) and self.repeat > 0):
            raise ValueError(f"mixture source {self.uri}: repeat must be > 0, got {self.repeat}")
        if self.choose is not None and (int(self.choose) != self.choose or self.choose < 1):
            raise ValueError(f"mixture source {self.uri}: choose must be an integer >= 1 sequences, got {self.choose}")


class Mixture:
    """Several caches as one dataset (see the module docstring).

    Args:
        sources: `Source`s, or (uri, weight) pairs, or plain URIs (repeat 1).
        epoch_sequences: sequences per epoch when the sources carry weights (default: their total).
    """

    def __init__(self, sources: Sequence[Source | tuple[str, float] | str], *, epoch_sequences: int | None = None):
        items = [_source(s) for s in sources]
        if not items:
            raise ValueError("a mixture needs at least one source")
        weighted = [s.weight is not None for s in items]
        if any(weighted) and not all(weighted):
            missing = [s.uri for s, w in zip(items, weighted) if not w]
            raise ValueError(f"mixture: give every source a weight or none (no weight: {missing})")
        if epoch_sequences is not None and (not all(weighted) or int(epoch_sequences) < 1):
            raise ValueError("mixture: epoch_sequences (>= 1) goes with weighted sources only")
        self.sources: list[Source] = items
        self.epoch_sequences = None if epoch_sequences is None else int(epoch_sequences)

    def __repr__(self) -> str:
        return f"Mixture({self.sources!r}, epoch_sequences={self.epoch_sequences})"


def _source(item: Source | tuple[str, float] | str) -> Source:
    if isinstance(item, Source):
        return item
    if isinstance(item, str):
        return Source(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return Source(item[0], weight=float(item[1]))
    raise ValueError(f"mixture source {item!r}: expected a Source, a URI or a (uri, weight) pair")


def as_mixture(uri: Any) -> Mixture | None:
    """None for a single cache URL; the Mixture for a Mixture or a list of sources."""
    if isinstance(uri, str):
        return None
    if isinstance(uri, Mixture):
        return uri
    if isinstance(uri, (list, tuple)):
        return Mixture(uri)
    raise ValueError(f"expected a cache URL, a Mixture or a list of (uri, weight) pairs, got {type(uri).__name__}")


def sequences_per_epoch(sizes: Sequence[int], mixture: Mixture | None) -> list[int]:
    """Sequences each source gives per epoch, from the sources' sequence counts `sizes`."""
    if mixture is None:
        return [int(n) for n in sizes]
    sources = mixture.sources
    if sources[0].weight is not None:
        total = mixture.epoch_sequences if mixture.epoch_sequences is not None else int(sum(sizes))
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        quota = weights / weights.sum() * total
        counts = np.floor(quota).astype(np.int64)
        # Largest remainders first (ties: the earlier source), so the counts sum to `total` exactly.
        for i in np.argsort(-(quota - counts), kind="stable")[: total - int(counts.sum())]:
            counts[i] += 1
        draws = counts.tolist()
    else:
        draws = [s.choose if s.choose is not None else round((s.repeat or 1.0) * n) for s, n in zip(sources, sizes)]
    for s, n, d in zip(sources, sizes, draws):
        if d > 0 and n == 0:
            raise ValueError(f"mixture source {s.uri} holds no sequences but should give {d} per epoch")
    return [int(d) for d in draws]


@dataclass(frozen=True)
class EpochUnits:
    """The units an epoch reads (what `EpochOrder` orders), each a whole unit of a source or a subset of one.

    Attributes: source, unit, count [V] int64 (source index, manifest unit index, sequences); subsets: epoch unit ->
    sorted [count] row indices inside the unit, for the (at most one per source) partly read unit.
    """

    source: np.ndarray
    unit: np.ndarray
    count: np.ndarray
    subsets: dict[int, np.ndarray]

    def unit_row(self, index: int, row: int) -> int:
        """The unit's row of sequence `row` of epoch unit `index`."""
        subset = self.subsets.get(index)
        return row if subset is None else int(subset[row])


def epoch_units(unit_counts: Sequence[np.ndarray], draws: Sequence[int], *, seed: int, epoch: int) -> EpochUnits:
    """The epoch's units: for each source s, `draws[s]` sequences out of its units' `unit_counts[s]` (see the module
    docstring). A source read exactly once gives its units in manifest order, untouched by the seed."""
    source, unit, count, subsets = [], [], [], {}
    for s, (counts, n) in enumerate(zip(unit_counts, draws)):
        counts = np.asarray(counts, dtype=np.int64)
        total = int(counts.sum())
        whole, rest = divmod(int(n), total) if total else (0, 0)
        for _ in range(whole):
            source.append(np.full(len(counts), s))
            unit.append(np.arange(len(counts)))
            count.append(counts)
        if rest:
            perm = _rng(seed, epoch, _UNITS_TAG, s).permutation(len(counts))
            perm = perm[counts[perm] > 0]
            fits = np.cumsum(counts[perm]) <= rest
            taken = perm[fits]
            partial = int(perm[np.argmin(fits)]) if not fits.all() else None
            left = rest - int(counts[taken].sum())
            source.append(np.full(len(taken), s))
            unit.append(taken)
            count.append(counts[taken])
            if left:
                rows = _rng(seed, epoch, _SUBSET_TAG, s).choice(int(counts[partial]), size=left, replace=False)
                subsets[sum(len(u) for u in unit)] = np.sort(rows).astype(np.int64)
                source.append(np.array([s]))
                unit.append(np.array([partial]))
                count.append(np.array([left]))
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    return EpochUnits(source=cat(source), unit=cat(unit), count=cat(count), subsets=subsets)


_SAME = {  # what sources must share to batch together: (label, path into fingerprint_inputs)
    "tokenizer hash": ("tokenizer", "hash"),
    "tokenizer vocab_size": ("tokenizer", "vocab_size"),
    "teacher padded_vocab_size": ("teacher", "padded_vocab_size"),
    "targets mode": ("targets", "mode"),
    "targets k": ("targets", "k"),
    "targets temperatures": ("targets", "temperatures"),
    "targets samples": ("targets", "samples"),
    "codec": ("codec",),
}


def check_compatible(manifests: Sequence[dict[str, Any]], uris: Sequence[str]) -> None:
    """Raise `CacheMismatchError` naming the first setting in which a source differs from the first source."""
    for label, path in _SAME.items():
        values = []
        for manifest in manifests:
            value: Any = manifest["fingerprint_inputs"]
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            values.append(value)
        for uri, value in zip(uris[1:], values[1:]):
            if value != values[0]:
                raise CacheMismatchError(
                    f"mixture: {uri} has {label} {str(value)[:80]!r}, {uris[0]} has {str(values[0])[:80]!r}; "
                    "the caches of a mixture must share the tokenizer and the target settings"
                )
