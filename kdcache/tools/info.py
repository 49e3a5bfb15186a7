"""A cache's summary: what `kdcache info` prints (`--json`: `cache_summary`, else `format_summary`).

    print(format_summary(cache_summary("s3://bucket/kd/llama-top64")))

Reads `index.json` (or, for a cache whose job has not finished, `fingerprint.json` and the commit records' names).
"""

from __future__ import annotations

import json
from typing import Any

from kdcache.errors import CorruptShardError, KdcacheError
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
        except (OSError, ValueError, RecursionError) as exc:
            raise CorruptShardError(f"{store.url(FINGERPRINT_KEY)}: cannot be read ({str(exc)[:200]})") from None
        inputs = claimed.get("fingerprint_inputs") if isinstance(claimed, dict) else None
        if not isinstance(inputs, dict) or not all(
            isinstance(inputs.get(key), dict) for key in ("teacher", "targets")
        ):
            raise CorruptShardError(f"{store.url(FINGERPRINT_KEY)}: not a kdcache fingerprint record")
        commits = [n for n in store.list_names(COMMITS_DIR) if n.endswith(".json")]
        return {
            "uri": uri,
            "complete": False,
            "fingerprint": str(claimed.get("fingerprint")),
            "teacher": str((claimed.get("names") or {}).get("teacher") or inputs["teacher"].get("model")),
            "k": inputs["targets"].get("k"),
            "format": str(inputs.get("shard_format")),
            "committed_units": len(commits),
            "num_sequences": None,
            "num_tokens": None,
            "total_bytes": None,
        }
    inputs, stats, units = manifest["fingerprint_inputs"], manifest["stats"], manifest["units"]
    # how the job named its teacher (the recorded config); the identity itself is content (weights_fingerprint)
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    named = config.get("teacher") if isinstance(config.get("teacher"), dict) else inputs["teacher"]
    # counts from the (validated) units; stats' other entries are informational and read defensively
    num_tokens = sum(u["num_tokens"] for u in units)
    num_target_tokens = sum(u["num_target_tokens"] for u in units)
    total_bytes = sum(u["bytes"] for u in units)
    last_run = stats.get("last_run") if isinstance(stats.get("last_run"), dict) else {}
    telemetry = stats.get("telemetry") if isinstance(stats.get("telemetry"), dict) else {}
    k = inputs["targets"]["k"]
    return {
        "uri": uri,
        "complete": bool(manifest["complete"]),
        "fingerprint": manifest["fingerprint"],
        "format": manifest["shard_format"],
        "format_version": manifest["format_version"],
        "teacher": str(named.get("model")),
        "teacher_revision": str(named.get("revision")),
        "weights_fingerprint": inputs["teacher"].get("weights_fingerprint"),
        "model_type": str(inputs["teacher"].get("model_type")),
        "vocab_size": inputs["tokenizer"]["vocab_size"],
        "padded_vocab_size": inputs["teacher"]["padded_vocab_size"],
        "tokenizer_hash": str(inputs["tokenizer"].get("hash")),
        "mode": inputs["targets"]["mode"],
        "k": inputs["targets"]["k"],
        "temperatures": inputs["targets"]["temperatures"],
        "max_length": (inputs.get("windowing") if isinstance(inputs.get("windowing"), dict) else {}).get("max_length"),
        "num_units": len(units),
        "num_sequences": sum(u["num_sequences"] for u in units),
        "num_tokens": num_tokens,
        "num_target_tokens": num_target_tokens,
        # positions that carry teacher targets (the trained tokens): 1 unless the cache was written with target masks
        "target_token_fraction": num_target_tokens / max(num_tokens, 1),
        "total_bytes": total_bytes,
        "bytes_per_token": total_bytes / max(num_tokens, 1),
        # per stored top-k entry of the positions with targets: meaningful for topk caches only (hybrid/sample also
        # store samples, sample has k=0)
        "bytes_per_entry": total_bytes / num_target_tokens / k
        if inputs["targets"]["mode"] == "topk" and num_target_tokens
        else None,
        "real_token_fraction": _number(stats.get("real_token_fraction")),
        "empty_documents": _number(stats.get("empty_documents")),
        "last_run": {
            "units": _number(last_run.get("units")),
            "tokens": _number(last_run.get("tokens")),
            "wall_time_s": _number(last_run.get("wall_time_s")),
            "tokens_per_s": _number(last_run.get("tokens_per_s")),
            "failures": len(last_run["failures"]) if isinstance(last_run.get("failures"), list) else 0,
        },
        "created_by": str(manifest.get("created_by")),
        # what the cache came from, for people (absent from caches written before it was recorded)
        **_provenance(manifest),
        "telemetry": {
            name: {key: _number(t.get(key)) for key in ("mean", "std", "p10", "p50", "p90")}
            for name, t in telemetry.items()
            if isinstance(t, dict)
        },
    }


def _short(value: Any, limit: int = 200) -> str | None:
    """A manifest's informational text (a list joined), shortened; None for null."""
    if value is None:
        return None
    if isinstance(value, list):
        value = ", ".join(map(str, value[:8]))
    return str(value)[:limit]


def _provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    """``license`` and ``generation`` of the manifest's provenance, as plain checked values (None when absent): a
    malformed entry shows as unknown, never fails `kdcache info`."""
    prov = manifest.get("provenance") if isinstance(manifest.get("provenance"), dict) else {}
    teacher = prov.get("teacher") if isinstance(prov.get("teacher"), dict) else None
    lic = None
    if teacher is not None:
        lic = {key: _short(teacher.get(key)) for key in ("license", "source", "license_name", "license_link")}
    gen = prov.get("generation") if isinstance(prov.get("generation"), dict) else None
    if gen is not None:
        numbers = ("n", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "prompts", "sequences")
        gen = {key: _number(gen.get(key)) for key in (*numbers, "generated_tokens", "generated_tokens_per_s")} | {
            "engine": _short(gen.get("engine"), 20),
            "stop": [_short(x, 40) for x in gen["stop"][:8]] if isinstance(gen.get("stop"), list) else [],
        }
    return {"license": lic, "generation": gen}


def _number(value: Any) -> float:
    """A JSON number of the manifest's informational stats, or 0 when it is something else."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


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
            f"  contents     {s['num_sequences']:,} sequences, {s['num_tokens']:,} tokens in {s['num_units']} units; "
            f"{s['num_target_tokens']:,} with targets (trained-token fraction {s['target_token_fraction']:.3f})",
            f"  size         {s['total_bytes']:,} bytes"
            + (f" = {s['bytes_per_token']:.1f} bytes/token" if s["num_tokens"] else " (no tokens: an empty input)")
            + (
                f" ({s['bytes_per_entry']:.2f} bytes per top-k entry of a trained token)"
                if s["bytes_per_entry"] is not None
                else ""
            ),
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
            *_provenance_lines(s),
            f"  fingerprint  {s['fingerprint']}",
        ]
    )


def _provenance_lines(s: dict[str, Any]) -> list[str]:
    """The teacher's license and, for a generated cache, how it was generated (lines of `format_summary`)."""
    lines = []
    lic = s.get("license")
    if lic is not None:
        name = lic.get("license")
        if name:
            detail = "".join(f"; {lic[key]}" for key in ("license_name", "license_link") if lic.get(key))
            lines.append(
                f"  license      {name} ({lic.get('source')}{detail}): check what it allows before training "
                "a model on the teacher's outputs"
            )
        else:
            lines.append(
                "  license      not declared by the model card or config (teacher.license sets it): check the "
                "teacher's terms before training a model on its outputs"
            )
    g = s.get("generation")
    if g:
        sampling = f"temperature {g['temperature']:g}, top_p {g['top_p']:g}, top_k {g['top_k'] or 'off'}"
        sampling = "greedy" if g["temperature"] == 0 else f"{sampling}, seed {g['seed']}"
        stops = f", stop {g['stop']}" if g.get("stop") else ""
        lines += [
            f"  generated    {g['sequences']:,} responses to {g['prompts']:,} prompts (n={g['n']}) by the teacher, "
            f"engine {g['engine']}: {sampling}, max_new_tokens {g['max_new_tokens']}{stops}",
            f"               {g['generated_tokens']:,} tokens generated at {g['generated_tokens_per_s']:,.1f} tok/s "
            "per actor",
        ]
    return lines
