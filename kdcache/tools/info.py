"""A cache's summary: what `kdcache info` prints (`--json`: `cache_summary`, else `format_summary`).

    print(format_summary(cache_summary("s3://bucket/kd/llama-top64")))

Reads `index.json` (or, for a cache whose job has not finished, `fingerprint.json` and the commit records' names).
"""

from __future__ import annotations

import json
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.manifest import COMMITS_DIR, FINGERPRINT_KEY, read_manifest
from kdcache.store import Store

__all__ = ["cache_summary", "format_summary"]


def cache_summary(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A cache's summary as plain data (what `kdcache info --json` prints)."""
    store = Store(uri, storage_options)
    manifest = read_manifest(store)
    if manifest is None:
        try:
            claimed = json.loads(store.read_bytes(FINGERPRINT_KEY))
        except FileNotFoundError:
            raise KdcacheError(f"{uri}: no kdcache cache here (no index.json, no fingerprint.json)") from None
        inputs = claimed["fingerprint_inputs"]
        commits = [n for n in store.list_names(COMMITS_DIR) if n.endswith(".json")]
        return {
            "uri": uri,
            "complete": False,
            "fingerprint": claimed["fingerprint"],
            "teacher": (claimed.get("names") or {}).get("teacher") or inputs["teacher"].get("model"),
            "k": inputs["targets"]["k"],
            "format": inputs["shard_format"],
            "committed_units": len(commits),
            "num_sequences": None,
            "num_tokens": None,
            "total_bytes": None,
        }
    inputs, stats = manifest["fingerprint_inputs"], manifest["stats"]
    # how the job named its teacher (the recorded config); the identity itself is content (weights_fingerprint)
    named = (manifest.get("config") or {}).get("teacher") or inputs["teacher"]
    return {
        "uri": uri,
        "complete": bool(manifest["complete"]),
        "fingerprint": manifest["fingerprint"],
        "format": manifest["shard_format"],
        "format_version": manifest["format_version"],
        "teacher": named.get("model"),
        "teacher_revision": named.get("revision"),
        "weights_fingerprint": inputs["teacher"].get("weights_fingerprint"),
        "model_type": inputs["teacher"].get("model_type"),
        "vocab_size": inputs["tokenizer"]["vocab_size"],
        "padded_vocab_size": inputs["teacher"]["padded_vocab_size"],
        "tokenizer_hash": inputs["tokenizer"]["hash"],
        "mode": inputs["targets"]["mode"],
        "k": inputs["targets"]["k"],
        "temperatures": inputs["targets"]["temperatures"],
        "max_length": inputs["windowing"]["max_length"],
        "num_units": stats["num_units"],
        "num_sequences": stats["num_sequences"],
        "num_tokens": stats["num_tokens"],
        "total_bytes": stats["total_bytes"],
        "bytes_per_token": stats["bytes_per_token"],
        # per stored top-k entry: meaningful for topk caches only (hybrid/sample also store samples, sample has k=0)
        "bytes_per_entry": stats["bytes_per_token"] / inputs["targets"]["k"]
        if inputs["targets"]["mode"] == "topk" and stats["num_tokens"]
        else None,
        "real_token_fraction": stats["real_token_fraction"],
        "empty_documents": stats["empty_documents"],
        "last_run": {k: v for k, v in stats["last_run"].items() if k != "failures"}
        | {"failures": len(stats["last_run"]["failures"])},
        "created_by": manifest["created_by"],
        "telemetry": {
            name: {key: t[key] for key in ("mean", "std", "p10", "p50", "p90")}
            for name, t in (stats.get("telemetry") or {}).items()
        },
    }


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable lines for `kdcache info`."""
    if not s["complete"]:
        return (
            f"kdcache cache at {s['uri']}: INCOMPLETE ({s['committed_units']} units committed, no index.json yet)\n"
            f"  teacher {s['teacher']}, top-{s['k']}, {s['format']}; rerun the same job to finish it"
        )
    lr = s["last_run"]
    return "\n".join(
        [
            f"kdcache cache at {s['uri']}: complete ({s['created_by']}, format v{s['format_version']}, {s['format']})",
            f"  teacher      {s['teacher']} ({s['model_type']}) revision={s['teacher_revision']}",
            f"  vocab        {s['vocab_size']:,} tokens, {s['padded_vocab_size']:,} logits (padded); "
            f"tokenizer sha256 {s['tokenizer_hash'][:12]}",
            f"  targets      {s['mode']} k={s['k']}, temperatures {s['temperatures']}, windows of {s['max_length']}",
            f"  contents     {s['num_sequences']:,} sequences, {s['num_tokens']:,} tokens in {s['num_units']} units",
            f"  size         {s['total_bytes']:,} bytes"
            + (f" = {s['bytes_per_token']:.1f} bytes/token" if s["num_tokens"] else " (no tokens: an empty input)")
            + (f" ({s['bytes_per_entry']:.2f} bytes per top-k entry)" if s["bytes_per_entry"] is not None else ""),
            f"  last run     {lr['units']} units, {lr['tokens']:,} tokens in {lr['wall_time_s']:.1f}s "
            f"({lr['tokens_per_s']:,.0f} tok/s), {lr['failures']} failures; real-token fraction "
            f"{s['real_token_fraction']:.3f}",
            *[
                f"  {name:<12} mean {t['mean']:.3f}, p10 {t['p10']:.3f}, median {t['p50']:.3f}, p90 {t['p90']:.3f}"
                for name, t in (
                    ("entropy", s["telemetry"].get("entropy")),
                    ("captured", s["telemetry"].get("captured_mass")),
                )
                if t and t["p50"] is not None  # None: no token to describe (an empty input)
            ],
            f"  fingerprint  {s['fingerprint']}",
        ]
    )
