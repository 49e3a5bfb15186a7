"""`kdcache report`: a cache's telemetry and costs as PNG charts plus an ``index.html`` that shows them.

Reads the manifest (``index.json``) and the footer of one shard, never the token data, and writes into ``out_dir``:

- ``entropy.png``: histogram of the teacher's per-token entropy at T = 1 (nats), mean and median marked;
- ``captured_mass.png``: histogram of the teacher probability held by the stored ids of each token (head plus unique
  sampled ids), i.e. how much of the distribution the cache keeps exactly;
- ``bytes_per_token.png``: stored bytes per token of each column (Parquet) or array (Zarr) of the largest shard (the
  format's ``column_bytes``, from the footer or zip directory alone; metadata and framing are their own bar);
- ``throughput.png``: tokens cached over the job's wall-clock time (from each unit's ``finished_at`` and
  ``num_tokens``) and tokens/s per time bin;
- ``index.html``: a summary table and the four charts.

matplotlib (the ``plot`` extra) is imported here only, and drawn through its Agg canvas without pyplot, so nothing
opens a window and no global backend state changes. Usage::

    kdcache report s3://bucket/kd/cache --out report/
    write_report("/data/cache", "report/")  # -> {"entropy": Path, ..., "html": Path}
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import numpy as np

from kdcache.errors import CorruptShardError, KdcacheError

__all__ = ["CHARTS", "shard_column_bytes", "throughput_series", "write_report"]

CHARTS = {  # file stem -> heading in index.html
    "entropy": "Teacher entropy per token",
    "captured_mass": "Probability mass captured by the stored ids",
    "bytes_per_token": "Bytes per token by column",
    "throughput": "Throughput over the job",
}
FIGSIZE = (7.0, 4.0)  # inches
DPI = 110
FOOTER = "(footer + metadata)"  # pseudo-column: file bytes not in any column chunk
STAGES = ("read", "forward", "encode", "write")  # timing_s keys of a unit, in pipeline order


def shard_column_bytes(fmt: ModuleType, source: bytes | BinaryIO, total_bytes: int) -> dict[str, int]:
    """Stored bytes of each column of one shard (the format's ``column_bytes``: only its footer or directory is
    read), plus ``FOOTER``: the rest of the file's ``total_bytes`` (metadata, framing)."""
    sizes = fmt.column_bytes(source)
    return sizes | {FOOTER: max(int(total_bytes) - sum(sizes.values()), 0)}


def throughput_series(units: Sequence[dict[str, Any]]) -> dict[str, np.ndarray] | None:
    """Tokens cached over the job's wall-clock time, from the units that recorded ``finished_at`` (unix seconds).

    The job's start is the earliest ``finished_at - timing_s.total`` (else the earliest ``finished_at``). The
    throughput counts each unit's tokens as spread evenly over its own ``[finished_at - total, finished_at]``, so
    units running at once on several actors add up; units without ``timing_s.total`` are binned by finish time.

    Returns:
        None when no unit recorded ``finished_at`` (e.g. a cache written by an older kdcache), else float64 arrays:
        ``t`` [n] finish times in seconds since the start, sorted; ``tokens`` [n] per unit; ``cumulative`` [n];
        ``rate_edges`` [m + 1] seconds and ``rate`` [m] tokens/s, piecewise constant between the edges.
    """
    timed = sorted(
        (u for u in units if isinstance(u.get("finished_at"), (int, float))), key=lambda u: u["finished_at"]
    )
    if not timed:
        return None
    finished = np.array([u["finished_at"] for u in timed], dtype=np.float64)
    tokens = np.array([u["num_tokens"] for u in timed], dtype=np.float64)
    totals = np.array([float((u.get("timing_s") or {}).get("total", 0.0)) for u in timed])
    start = float(min((finished - totals).min(), finished[0]))
    t = finished - start
    spans = totals > 0
    if spans.any():
        lo, hi = (t - totals)[spans], t[spans]
        edges = np.unique(np.concatenate([[0.0], lo, hi]))
        mids = (edges[:-1] + edges[1:]) / 2
        active = (lo[None, :] <= mids[:, None]) & (mids[:, None] < hi[None, :])  # [segments, units]
        rate = (active * (tokens[spans] / totals[spans])[None, :]).sum(axis=1)
    else:
        edges = np.linspace(0.0, max(float(t[-1]), 1e-9), int(np.clip(len(t) // 2, 1, 30)) + 1)
        rate = np.histogram(t, bins=edges, weights=tokens)[0] / np.diff(edges)
    return {"t": t, "tokens": tokens, "cumulative": np.cumsum(tokens), "rate_edges": edges, "rate": rate}


# ------------------------------------------------------------------------------------------------ charts


def _figure(figsize: tuple[float, float] = FIGSIZE) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _placeholder(path: Path, title: str, message: str) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _save(fig, path)


def _plot_histogram(
    path: Path, stats: dict[str, Any] | None, *, title: str, xlabel: str, reference: tuple[float, str] | None = None
) -> Path:
    """Bar histogram of a manifest telemetry entry (``bin_edges``, ``counts``, ``mean``, ``p50``)."""
    if not stats or not stats.get("count"):
        return _placeholder(path, title, "no telemetry in this cache's manifest")
    edges = np.asarray(stats["bin_edges"], dtype=np.float64)
    counts = np.asarray(stats["counts"], dtype=np.float64)
    share = counts / counts.sum()
    fig = _figure()
    ax = fig.add_subplot()
    ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color="#4C72B0", edgecolor="white", linewidth=0.4)
    ax.axvline(stats["mean"], color="#C44E52", linestyle="--", label=f"mean {stats['mean']:.3g}")
    if stats.get("p50") is not None:
        ax.axvline(stats["p50"], color="#55A868", linestyle=":", label=f"median {stats['p50']:.3g}")
    nonzero = np.flatnonzero(counts)
    hi = edges[min(nonzero[-1] + 2, len(edges) - 1)] if nonzero.size else edges[-1]
    lo = edges[max(nonzero[0] - 1, 0)] if nonzero.size else edges[0]
    if reference is not None and lo <= reference[0] <= max(hi, reference[0]) and reference[0] <= edges[-1]:
        ax.axvline(reference[0], color="0.4", linewidth=1.0, label=reference[1])
        hi = max(hi, reference[0] * 1.03)
    ax.set_xlim(lo, min(hi, edges[-1]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of tokens")
    ax.set_title(f"{title} ({stats['count']:,} tokens)")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def _plot_column_bytes(path: Path, sizes: dict[str, int], num_tokens: int, where: str) -> Path:
    title = "Bytes per token by column"
    if not sizes or num_tokens <= 0:
        return _placeholder(path, title, "no shard with tokens to measure")
    names = sorted(sizes, key=sizes.get)
    values = np.array([sizes[n] / num_tokens for n in names])
    fig = _figure((7.0, max(2.5, 0.32 * len(names) + 1.2)))
    ax = fig.add_subplot()
    colors = ["0.6" if n == FOOTER else "#4C72B0" for n in names]
    bars = ax.barh(names, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize="small")
    ax.set_xlim(0, values.max() * 1.18 if values.max() > 0 else 1)
    ax.set_xlabel("compressed bytes per token")
    ax.set_title(f"{title}: {values.sum():.1f} B/token in total\n{where}", fontsize="medium")
    return _save(fig, path)


def _plot_throughput(path: Path, units: Sequence[dict[str, Any]]) -> Path:
    title = "Throughput over the job"
    series = throughput_series(units)
    if series is None:
        return _placeholder(path, title, "no unit recorded finished_at (cache written by an older kdcache?)")
    t, cumulative = series["t"], series["cumulative"]
    end = max(float(series["rate_edges"][-1]), float(t[-1]), 1e-9)
    fig = _figure((7.0, 5.0))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.step(np.concatenate([[0.0], t]), np.concatenate([[0.0], cumulative]), where="post", color="#4C72B0")
    top.plot(t, cumulative, "o", markersize=3, color="#4C72B0")
    top.set_ylabel("tokens cached")
    top.set_title(f"{title}: {int(cumulative[-1]):,} tokens from {len(t)} timed units in {end:.1f} s")
    bottom.stairs(series["rate"], series["rate_edges"], fill=True, color="#8DA0CB", label="all actors")
    bottom.axhline(cumulative[-1] / end, color="#C44E52", linestyle="--", label=f"mean {cumulative[-1] / end:,.0f}")
    bottom.set_ylabel("tokens/s")
    bottom.set_xlabel("seconds since the first unit started")
    bottom.legend(loc="best", fontsize="small")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ report


def _largest_shard_sizes(
    store: Any, fmt: ModuleType, units: Sequence[dict[str, Any]]
) -> tuple[dict[str, int], int, str]:
    """Column sizes of the unit with the most tokens (footer read only), its token count and a description."""
    candidates = [u for u in units if u.get("num_tokens")]
    if not candidates:
        return {}, 0, ""
    unit = max(candidates, key=lambda u: u["num_tokens"])
    try:
        with store.open(unit["path"]) as handle:
            sizes = shard_column_bytes(fmt, handle, unit["bytes"])
    except FileNotFoundError:
        raise KdcacheError(f"{store.url(unit['path'])}: shard of unit {unit['unit_id']} is missing") from None
    return sizes, int(unit["num_tokens"]), f"shard of unit {unit['unit_id']} ({unit['num_tokens']:,} tokens)"


def _summary_rows(manifest: dict[str, Any], uri: str) -> list[tuple[str, str]]:
    inputs, stats = manifest["fingerprint_inputs"], manifest["stats"]
    targets = inputs["targets"]
    mode = targets.get("mode", "topk")
    stored = {
        "topk": f"topk, k={targets['k']}",
        "hybrid": f"hybrid, exact head of {targets['k']} + {targets.get('samples')} draws/token from the tail",
        "sample": f"sample, {targets.get('samples')} draws/token",
    }.get(mode, f"{mode}, k={targets['k']}")
    # as the job named it (the recorded config); the fingerprint identifies the teacher by content
    teacher = ((manifest.get("config") or {}).get("teacher") or inputs["teacher"]).get("model", "?")
    rows = [
        ("cache", uri),
        ("complete", str(bool(manifest["complete"]))),
        ("teacher", f"{teacher} (padded vocab {inputs['teacher']['padded_vocab_size']:,})"),
        ("targets", f"{stored}; temperatures {targets['temperatures']}"),
        (
            "contents",
            f"{stats['num_sequences']:,} sequences, {stats['num_tokens']:,} tokens, {stats['num_units']} units",
        ),
        (
            "size",
            f"{stats['total_bytes']:,} bytes = {stats['bytes_per_token']:.1f} bytes/token"
            if stats["num_tokens"]
            else f"{stats['total_bytes']:,} bytes (no tokens: an empty input)",
        ),
    ]
    for name, label in (("entropy", "entropy (nats)"), ("captured_mass", "captured mass")):
        t = (stats.get("telemetry") or {}).get(name)
        if t and t.get("count"):
            rows.append(
                (label, f"mean {t['mean']:.3f}, p10 {t['p10']:.3f}, median {t['p50']:.3f}, p90 {t['p90']:.3f}")
            )
    last = stats.get("last_run") or {}
    if last.get("units"):
        rows.append(
            (
                "last run",
                f"{last['units']} units, {last['tokens']:,} tokens in {last['wall_time_s']:.1f} s "
                f"({last['tokens_per_s']:,.0f} tokens/s), {len(last.get('failures', []))} failures",
            )
        )
    stage_s = {s: sum((u.get("timing_s") or {}).get(s, 0.0) for u in manifest["units"]) for s in STAGES}
    if any(stage_s.values()):
        rows.append(("worker time", ", ".join(f"{s} {v:.1f} s" for s, v in stage_s.items())))
    return rows


def _write_html(path: Path, rows: list[tuple[str, str]], charts: dict[str, Path]) -> Path:
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    figures = "\n".join(
        f'<h2>{html.escape(CHARTS[name])}</h2>\n<img src="{html.escape(p.name)}" alt="{html.escape(CHARTS[name])}">'
        for name, p in charts.items()
    )
    path.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>kdcache report</title>\n"
        "<style>body{font-family:sans-serif;max-width:860px;margin:2em auto}"
        "th{text-align:left;padding-right:1em;vertical-align:top}img{max-width:100%}</style></head>\n"
        f"<body><h1>kdcache report</h1>\n<table>\n{table}\n</table>\n{figures}\n</body></html>\n",
        encoding="utf-8",
    )
    return path


def write_report(uri: str, out_dir: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the report's PNG charts and ``index.html`` for the cache at ``uri`` into ``out_dir``.

    Args:
        uri: Cache root (any fsspec URL); it must hold an ``index.json``.
        out_dir: Local folder, created if missing; existing report files are overwritten.
        storage_options: fsspec options for ``uri``.

    Returns:
        ``{"entropy", "captured_mass", "bytes_per_token", "throughput", "html"}`` -> written file path.

    Raises:
        KdcacheError: No manifest at ``uri`` (the job has not finished), or the largest unit's shard is missing.
    """
    from kdcache.formats import get_format
    from kdcache.manifest import read_manifest
    from kdcache.store import Store

    store = Store(uri, storage_options)
    manifest = read_manifest(store)
    if manifest is None:
        raise KdcacheError(f"{store.url('index.json')}: no manifest; the cache is missing or its job has not finished")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes, shard_tokens, where = _largest_shard_sizes(store, get_format(manifest["shard_format"]), manifest["units"])
    vocab = manifest["fingerprint_inputs"]["teacher"]["padded_vocab_size"]
    try:  # the statistics and telemetry are informational: malformed ones are reported, not a traceback
        telemetry = manifest["stats"].get("telemetry") or {}
        charts = {
            "entropy": _plot_histogram(
                out / "entropy.png",
                telemetry.get("entropy"),
                title="Teacher entropy",
                xlabel="entropy at T = 1 (nats)",
                reference=(math.log(vocab), f"uniform over V: ln {vocab:,}") if vocab > 1 else None,
            ),
            "captured_mass": _plot_histogram(
                out / "captured_mass.png",
                telemetry.get("captured_mass"),
                title="Captured mass",
                xlabel="teacher probability of the stored ids (head + unique samples)",
            ),
            "bytes_per_token": _plot_column_bytes(out / "bytes_per_token.png", sizes, shard_tokens, where),
            "throughput": _plot_throughput(out / "throughput.png", manifest["units"]),
        }
        html = _write_html(out / "index.html", _summary_rows(manifest, uri), charts)
    except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:
        raise CorruptShardError(
            f"{store.url('index.json')}: malformed statistics or telemetry ({type(exc).__name__}: {exc})"
        ) from None
    return charts | {"html": html}
