"""The `kdcache` command line.

kdcache cache CONFIG [key=value ...]   run or resume a caching job (embedded Ray when cluster.address is null)
kdcache info URI [--json]              summary of a cache: teacher, k, sequences, tokens, bytes, complete or not
kdcache verify URI [--deep]            check every shard against the manifest (--deep: checksums, decode all)
kdcache demo [--workdir DIR]           build a tiny teacher offline, cache a corpus with 2 actors, print the summary
kdcache submit CONFIG [k=v ...] --address http://HEAD:8265   submit the caching job to a Ray cluster (Ray Jobs)
kdcache report URI --out DIR           PNG plots and an HTML page of a cache's telemetry, sizes and throughput
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from kdcache.errors import CacheMismatchError, KdcacheError

__all__ = ["cache_summary", "main"]

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def cache_summary(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A cache's summary as plain data (what `kdcache info --json` prints)."""
    from kdcache.manifest import COMMITS_DIR, FINGERPRINT_KEY, read_manifest
    from kdcache.store import Store

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
            "teacher": inputs["teacher"]["model"],
            "k": inputs["targets"]["k"],
            "format": inputs["shard_format"],
            "committed_units": len(commits),
            "num_sequences": None,
            "num_tokens": None,
            "total_bytes": None,
        }
    inputs, stats = manifest["fingerprint_inputs"], manifest["stats"]
    return {
        "uri": uri,
        "complete": bool(manifest["complete"]),
        "fingerprint": manifest["fingerprint"],
        "format": manifest["shard_format"],
        "format_version": manifest["format_version"],
        "teacher": inputs["teacher"]["model"],
        "teacher_revision": inputs["teacher"]["revision"],
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
        if inputs["targets"]["mode"] == "topk"
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
            f"  size         {s['total_bytes']:,} bytes = {s['bytes_per_token']:.1f} bytes/token"
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
                if t
            ],
            f"  fingerprint  {s['fingerprint']}",
        ]
    )


def _complete_cache(uri: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a complete cache at `uri`, or None (none yet, or not readable: the job will say why)."""
    from kdcache.manifest import read_manifest
    from kdcache.store import Store

    try:
        manifest = read_manifest(Store(uri, storage_options, retries=0))  # a peek: the job itself retries
    except (KdcacheError, OSError, ValueError):
        return None
    return manifest if manifest is not None and manifest["complete"] else None


def _cmd_cache(args: argparse.Namespace) -> int:
    from kdcache.config import load_config
    from kdcache.job import _in_ray_job, run_cache_job
    from kdcache.submit import check_local_inputs

    cfg = load_config(args.config, args.overrides)
    check_local_inputs(cfg, in_ray_job=_in_ray_job())
    before = _complete_cache(cfg.output.uri, cfg.output.storage_options)
    manifest = run_cache_job(cfg)
    if before is not None and before["fingerprint"] == manifest["fingerprint"]:
        print(f"{cfg.output.uri}: the cache is complete (made earlier); nothing to compute")
    print(format_summary(cache_summary(cfg.output.uri, cfg.output.storage_options)))
    return 0 if manifest["complete"] else 1


def _cmd_submit(args: argparse.Namespace) -> int:
    from kdcache.submit import run_submit

    return run_submit(args)


def _cmd_info(args: argparse.Namespace) -> int:
    summary = cache_summary(args.uri)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kdcache.config import load_config
    from kdcache.demo import prepare_demo
    from kdcache.job import run_cache_job

    workdir = Path(args.workdir)
    print("[demo] kdcache demo: a tiny teacher trained here on the Python standard library (not a real model)")
    assets = prepare_demo(workdir / "assets", progress=not args.quiet)
    overrides = [
        f"teacher.model={assets.teacher_dir}",
        f"data.source={assets.train_dir}/part-00000.jsonl",  # one of the corpus parts: the demo stays short
        f"output.uri={workdir / 'cache'}",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    before = _complete_cache(cfg.output.uri, cfg.output.storage_options)
    if before is None:
        print(
            f"[demo] caching {cfg.data.source} with {cfg.cluster.num_actors} actors on local Ray -> {cfg.output.uri}"
        )
    try:
        manifest = run_cache_job(cfg)
        if before is not None and before["fingerprint"] == manifest["fingerprint"]:
            print(
                f"[demo] {cfg.output.uri}: the cache is complete (made by an earlier run); nothing to compute "
                "(`make clean` deletes it)"
            )
    except CacheMismatchError as exc:
        if cfg.output.uri != str(workdir / "cache"):
            raise  # the user's own output: never deleted
        # the demo owns its workdir: a cache left by another kdcache version or demo config is rebuilt
        print(f"[demo] replacing the demo cache made with other settings ({str(exc).split(': ', 1)[-1][:160]})")
        shutil.rmtree(workdir / "cache")
        run_cache_job(cfg)
    print(format_summary(cache_summary(cfg.output.uri)))
    if args.student_steps <= 0:
        return 0
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the teacher actors are done: free the cores for the students
    from kdcache.students import demo_students

    demo_students(
        assets.teacher_dir,
        assets.valid_dir,
        cfg.output.uri,
        workdir / "students.png",
        steps=args.student_steps,
        progress=not args.quiet,
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from kdcache.report import write_report

    written = write_report(args.uri, args.out)
    for name, path in written.items():
        print(f"{name:<16} {path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from kdcache.verify import verify_cache

    report = verify_cache(args.uri, deep=args.deep, workers=args.workers)
    print(report.format())
    return 0 if report.ok else 1


URI_HELP = "the cache: a local folder or an fsspec URL (s3://bucket/path, gs://...): its job's output.uri"
EXAMPLES = """examples:
  kdcache demo                                      tiny teacher, cache and students, offline (what `make run` runs)
  kdcache cache configs/quickstart.yaml             run, resume or skip (complete) the job the config describes
  kdcache cache configs/llama8b-gpu.yaml targets.k=32 cluster.num_actors=16   key=value overrides any config key
  kdcache submit configs/llama8b-gpu.yaml --address http://HEAD:8265 --working-dir . --wait
  kdcache info .kdcache/demo/cache                  teacher, targets, sizes, last run (--json for scripts)
  kdcache verify s3://bucket/kd/llama8b-top64 --deep
  kdcache report .kdcache/demo/cache --out report/

`kdcache COMMAND --help` describes a command; configs/*.yaml and README.md describe the config keys."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdcache",
        description="Offline teacher-logit cache for knowledge distillation: run the teacher once over a corpus\n"
        "(on an embedded or a remote Ray cluster), store compressed per-token soft targets, train many students.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kdcache {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cache", help="run or resume a caching job")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. targets.k=16")
    p.set_defaults(func=_cmd_cache)
    p = sub.add_parser("submit", help="submit a caching job to a Ray cluster's job server")
    p.add_argument("config", help="YAML config file (inside --working-dir when one is given)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, passed on to the job")
    p.add_argument("--address", help="job server URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--working-dir", help="local folder uploaded as the job's working_dir (e.g. the repository)")
    p.add_argument("--pip", action="append", default=[], help="package for the job's runtime_env (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job env var (repeatable)")
    p.add_argument("--runtime-env-json", help="a runtime_env as JSON, below the flags above")
    p.add_argument("--submission-id", help="a fixed job id (Ray refuses a second job with the same id)")
    p.add_argument("--wait", action="store_true", help="wait for the end, print the logs; exit 1 unless it succeeded")
    p.add_argument("--dry-run", action="store_true", help="print the request instead of sending it")
    p.set_defaults(func=_cmd_submit)
    p = sub.add_parser("info", help="summarize a cache")
    p.add_argument("uri", help=URI_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("verify", help="check every shard against the manifest (exit 1 naming each bad shard)")
    p.add_argument("uri", help=URI_HELP)
    p.add_argument("--deep", action="store_true", help="also sha256, decode everything and check invariants")
    p.add_argument("--workers", type=int, default=8, help="shards checked concurrently")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("demo", help="tiny end-to-end demo, offline: teacher, cache on local Ray, students")
    p.add_argument("--workdir", default=".kdcache/demo", help="where the demo's teacher, corpus and cache go")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--config", default=str(REPO_CONFIGS / "quickstart.yaml"), help="base config")
    p.add_argument("--student-steps", type=int, default=100, help="steps per demo student after caching (0: none)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("report", help="charts of a cache's telemetry, bytes and throughput, with an index.html")
    p.add_argument("uri", help=URI_HELP)
    p.add_argument("--out", required=True, help="folder for the PNGs and index.html (created if missing)")
    p.set_defaults(func=_cmd_report)
    return parser


def _version() -> str:
    from kdcache import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except KdcacheError as exc:
        print(f"kdcache: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file, folder or connection the command needs (missing, refused, not allowed)
        print(f"kdcache: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
