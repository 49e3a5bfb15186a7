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

__all__ = ["build_parser", "main"]

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


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
    from kdcache.capture.job import _in_ray_job, run_cache_job
    from kdcache.capture.submit import check_local_inputs
    from kdcache.config import load_config
    from kdcache.tools.info import cache_summary, format_summary

    cfg = load_config(args.config, args.overrides)
    check_local_inputs(cfg, in_ray_job=_in_ray_job())
    before = _complete_cache(cfg.output.uri, cfg.output.storage_options)
    manifest = run_cache_job(cfg)
    if before is not None and before["fingerprint"] == manifest["fingerprint"]:
        print(f"{cfg.output.uri}: the cache is complete (made earlier); nothing to compute")
    print(format_summary(cache_summary(cfg.output.uri, cfg.output.storage_options)))
    return 0 if manifest["complete"] else 1


def _cmd_submit(args: argparse.Namespace) -> int:
    from kdcache.capture.submit import run_submit

    return run_submit(args)


def _cmd_info(args: argparse.Namespace) -> int:
    from kdcache.tools.info import cache_summary, format_summary

    summary = cache_summary(args.uri)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kdcache.capture.job import run_cache_job, shutdown_ray
    from kdcache.config import CHAT_FORMATS, KDCacheConfig, load_config
    from kdcache.demo.assets import prepare_demo
    from kdcache.tools.info import cache_summary, format_summary

    workdir = Path(args.workdir)
    print("[demo] kdcache demo: a tiny teacher trained here on the Python standard library (not a real model)")
    assets = prepare_demo(workdir / "assets", progress=not args.quiet)

    def demo_config(chat: bool) -> KDCacheConfig:
        source = assets.chat_train_dir if chat else assets.train_dir  # one corpus part: the demo stays short
        overrides = [
            f"teacher.model={assets.teacher_dir}",
            f"data.source={source}/part-00000.jsonl",
            f"output.uri={workdir / ('chat-cache' if chat else 'cache')}",
            *args.overrides,
        ]
        return load_config(args.config, overrides)

    cfg = demo_config(chat=False)
    chat = cfg.data.format in CHAT_FORMATS  # e.g. --config configs/chat-quickstart.yaml: the demo chat set
    if chat:
        cfg = demo_config(chat=True)
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
        demo_cache = workdir / ("chat-cache" if chat else "cache")
        if cfg.output.uri != str(demo_cache):
            raise  # the user's own output: never deleted
        # the demo owns its workdir: a cache left by another kdcache version or demo config is rebuilt
        print(f"[demo] replacing the demo cache made with other settings ({str(exc).split(': ', 1)[-1][:160]})")
        shutil.rmtree(demo_cache)
        run_cache_job(cfg)
    print(format_summary(cache_summary(cfg.output.uri)))
    if args.student_steps <= 0:
        return 0
    shutdown_ray()  # the teacher actors are done: free the cores for the students
    from kdcache.demo.students import demo_students

    demo_students(
        assets.teacher_dir,
        assets.chat_valid_dir if chat else assets.valid_dir,
        cfg.output.uri,
        workdir / "students.png",
        steps=args.student_steps,
        progress=not args.quiet,
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from kdcache.tools.report import write_report

    written = write_report(args.uri, args.out)
    for name, path in written.items():
        print(f"{name:<16} {path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from kdcache.tools.verify import verify_cache

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
