"""Distillation benchmark: students trained from kdcache caches of every target mode, against online full KD and
hard labels, on the same data and steps.

    python bench/distill.py                  # the demo teacher, 4 caches, 2 student sizes: ~12 min on 2 CPU cores
    python bench/distill.py --quick          # a tiny teacher, corpus and students: well under a minute
    python bench/distill.py --out DIR        # results.json, table.md and curves-*.png go to DIR

Setup (full run): the teacher is the demo's 2-layer Llama trained on the Python standard library
(`kdcache.demo.assets.prepare_demo`: built once into ``.kdcache/demo/assets`` and shared with ``kdcache demo``); train
and valid are split by file. A subset of the train split (documents spread over the library, ``--train-kb``) is cached
once per target mode with `run_cache_job` on a local Ray with 2 teacher actors: top-8, top-32, sample N=50 and
hybrid head 8 + N=50. Then students of two sizes (Llama h64/1 layer and h96/2 layers, the teacher's tokenizer and
padded vocabulary) are trained for the same number of steps on the same batches (all caches hold the same sequences,
and `KDCacheDataset`'s order depends only on the seed and the unit sizes, checked below) with:

- each cache's targets and its mode's loss (`forward_kl_tail` for top-k, `sampled_kl` for sample / hybrid), pure KD;
- the top-8 cache with the common renormalized top-k loss (`renormalized_topk_kl`), the literature's top-k baseline;
- online full KD: the teacher runs in the loop, forward KL on its dense logits;
- hard labels: cross-entropy against the next token, no teacher.

Reported per student, on held-out windows of the valid split: cross-entropy against the true next token, KL(teacher
|| student) over the full vocabulary, expected calibration error of the top-1 prediction (15 bins), wall time of
training (single-threaded torch, see `TrainSettings.threads`), the teacher pass of each cache (once, and amortized
over the students trained from it) and the cache's bytes. With ``--seeds 2`` the first (smaller) student is trained
twice per row, with another initialisation and batch order; the table gives the mean and ± half the difference. The
column "paired Δ vs online KD" compares each run with the online-KD run of the same size and seed (same
initialisation, same batches), which cancels most of the seed-to-seed noise.

Every number but the wall times is deterministic for a given cache (top-k caches are byte-identical across reruns;
sampled caches draw with seeds derived from the unit ids, which include the source path, so another ``--out`` draws
other samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import torch  # noqa: E402

from kdcache.demo import evaluation as ev  # noqa: E402
from kdcache.demo import students as st  # noqa: E402
from kdcache.demo import training as tr  # noqa: E402

FULL: dict[str, Any] = {
    "demo": None,  # prepare_demo's defaults (the assets `kdcache demo` uses)
    "train_kb": 450,  # KB of train-split text cached (~130k tokens)
    "max_length": 256,  # tokens per cached sequence
    "unit_bytes": 65536,  # input bytes per work unit (several units per actor)
    "students": [ev.StudentSpec("h64-L1", 64, 1, 2), ev.StudentSpec("h96-L2", 96, 2, 3)],
    "steps": 200,
    "batch": 8,
    "eval_every": 25,
    "valid_windows": 64,  # windows of max_length tokens for the final metrics
    "curve_windows": 16,  # the first ones, for the curve points
    "seeds": 2,
}
QUICK: dict[str, Any] = {
    "demo": {"max_files": 24, "train_steps": 40, "corpus_files": 2},
    "train_kb": 40,
    "max_length": 64,
    "unit_bytes": 8192,
    "students": [ev.StudentSpec("h32-L1", 32, 1, 2), ev.StudentSpec("h48-L2", 48, 2, 2)],
    "steps": 12,
    "batch": 4,
    "eval_every": 4,
    "valid_windows": 4,
    "curve_windows": 2,
    "seeds": 1,
}
# key -> (label, `targets.*` overrides) of the caches; "top-8" also feeds the renormalized row and, when present, the
# baselines' batches (every cache holds the same sequences, so any of them gives the same batches).
CACHES: dict[str, tuple[str, dict[str, Any]]] = {
    "top-8": ("top-8", {"mode": "topk", "k": 8}),
    "top-32": ("top-32", {"mode": "topk", "k": 32}),
    "sample": ("sample N=50", {"mode": "sample", "samples": 50}),
    "hybrid": ("hybrid 8 + N=50", {"mode": "hybrid", "head": 8, "samples": 50}),
}
# (row label, targets, cache key or None for "the first cache", loss override)
ROWS: list[tuple[str, str, str | None, str | None]] = [
    *((f"{label} cache", "cache", key, None) for key, (label, _) in CACHES.items()),
    ("top-8 renormalized", "cache", "top-8", "renormalized_topk_kl"),
    ("online full KD", "online", None, None),
    ("hard labels (CE)", "hard", None, None),
]


# ------------------------------------------------------------------------------------------------ data and caches


def write_train_subset(train_dir: Path, out: Path, kilobytes: int) -> dict[str, Any]:
    """Documents of the train split spread evenly over it (every n-th file) up to ``kilobytes`` of text."""
    records = [json.loads(line) for path in sorted(train_dir.glob("*.jsonl")) for line in path.open(encoding="utf-8")]
    total = sum(len(r["text"].encode()) for r in records)
    stride = max(1, round(total / (kilobytes * 1000)))
    chosen, size = [], 0
    for offset in range(stride):  # a second pass from another offset if the first fell short
        for r in records[offset::stride]:
            if size >= kilobytes * 1000:
                break
            if r not in chosen:
                chosen.append(r)
                size += len(r["text"].encode())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    return {"path": str(out), "documents": len(chosen), "bytes": size, "of_documents": len(records)}


def build_caches(
    teacher_dir: Path, source: Path, out: Path, settings: dict[str, Any], keys: list[str]
) -> dict[str, dict[str, Any]]:
    """One fresh cache per key of `CACHES` (local Ray, 2 actors); returns key -> uri, seconds, bytes, stats."""
    import ray

    from kdcache.capture.job import run_cache_job
    from kdcache.config import load_config

    started_ray = not ray.is_initialized()
    t0 = time.perf_counter()
    if started_ray:
        ray.init(
            address="local",
            num_cpus=max(2, os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            logging_level="WARNING",
            log_to_driver=False,
        )
    ray_seconds = time.perf_counter() - t0
    caches = {}
    try:
        for key in keys:
            name, targets = CACHES[key]
            uri = out / key
            shutil.rmtree(uri, ignore_errors=True)  # fresh: the teacher pass is what is timed
            overrides = [
                f"teacher.model={teacher_dir}",
                f"data.source={source}",
                f"data.max_length={settings['max_length']}",
                f"data.unit_bytes={settings['unit_bytes']}",
                f"output.uri={uri}",
                "targets.temperatures=[1.0]",
                "cluster.num_actors=2",
                "cluster.progress=false",
                *(f"targets.{field}={value}" for field, value in targets.items()),
            ]
            cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
            t0 = time.perf_counter()
            manifest = run_cache_job(cfg)
            seconds = time.perf_counter() - t0
            stats = manifest["stats"]
            caches[key] = {
                "label": name,
                "uri": str(uri),
                "seconds": seconds,
                "bytes": stats["total_bytes"],
                "bytes_per_token": stats["bytes_per_token"],
                "tokens": stats["num_tokens"],
                "sequences": stats["num_sequences"],
                "units": [(u["unit_id"], u["num_sequences"]) for u in manifest["units"]],
                "captured_mass": (stats.get("telemetry") or {}).get("captured_mass", {}).get("mean"),
            }
            print(
                f"[bench] cached {name}: {stats['num_tokens']:,} tokens, {stats['total_bytes']:,} B in {seconds:.1f} s"
            )
    finally:
        if started_ray:
            ray.shutdown()  # frees the cores for the students
    first = caches[keys[0]]["units"]
    for key, info in caches.items():  # same units -> same sequences -> the same batch order for every student
        if info["units"] != first:
            raise RuntimeError(f"cache {key} holds other units than cache {keys[0]}: the data order would differ")
    return caches | {"_ray_start_seconds": ray_seconds}


# ------------------------------------------------------------------------------------------------ table


def _agg(values: list[float], scale: float = 1.0, digits: int = 3, *, signed: bool = False) -> str:
    """Mean of ``values`` (times ``scale``), with ± half their spread when there are several."""
    mean = sum(values) / len(values)
    text = f"{scale * mean:+.{digits}f}" if signed else f"{scale * mean:.{digits}f}"
    if len(values) > 1:
        text += f" ± {scale * (max(values) - min(values)) / 2:.{digits}f}"
    return text


def summarize(results: list[st.RunResult], caches: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (student, row label): metrics over seeds, timings, cache bytes."""
    uri_to_key = {info["uri"]: key for key, info in caches.items() if not key.startswith("_")}
    users: dict[str, int] = {}
    for r in results:
        if r.run.targets == "cache":
            users[r.run.cache_uri] = users.get(r.run.cache_uri, 0) + 1
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        label = r.label.split(" | ")[1]
        row = rows.setdefault(
            (r.run.spec.name, label),
            {"student": r.run.spec.name, "row": label, "targets": r.run.targets, "params": r.params, "runs": []},
        )
        row["runs"].append(r)
        if r.run.targets == "cache":
            cache = caches[uri_to_key[r.run.cache_uri]]
            row["cache"] = uri_to_key[r.run.cache_uri]
            row["cache_seconds"] = cache["seconds"]
            row["cache_share_seconds"] = cache["seconds"] / users[r.run.cache_uri]
            row["cache_bytes"] = cache["bytes"]
            row["cache_bytes_per_token"] = cache["bytes_per_token"]
    online = {(r.run.spec.name, r.run.seed): r.final for r in results if r.run.targets == "online"}
    out = []
    for row in rows.values():
        runs = row.pop("runs")
        for key in ("ce", "kl", "ece", "accuracy", "confidence"):
            row[key] = [r.final[key] for r in runs]
        # Paired with online full KD (same student size, seed, initialisation and batches): far less noisy than the
        # spread over seeds, since both runs share the initialisation and the data order.
        for key in ("ce", "kl", "ece"):
            pairs = [(r.final[key], online.get((r.run.spec.name, r.run.seed))) for r in runs]
            row[f"{key}_vs_online"] = [a - b[key] for a, b in pairs if b is not None]
        row["train_seconds"] = [r.train_seconds for r in runs]
        row["seeds"] = [r.run.seed for r in runs]
        out.append(row)
    return out


def format_table(rows: list[dict[str, Any]], teacher: dict[str, float]) -> str:
    """The markdown table: means over seeds, ± half the spread when there are two or more."""
    lines = [
        "| student (params) | targets | valid CE | KL(teacher‖student) | ECE (%) | paired Δ vs online KD: CE / KL "
        "| train s | cache s (once) | train + cache share s | cache MB (B/token) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| teacher (reference, {teacher['params']:,}) | — | {teacher['ce']:.3f} | 0 | {100 * teacher['ece']:.2f} "
        "| — | — | — | — | — |",
    ]
    for r in rows:
        train = sum(r["train_seconds"]) / len(r["train_seconds"])
        if "cache_seconds" in r:
            timing = f"{r['cache_seconds']:.1f} | {train + r['cache_share_seconds']:.1f}"
            size = f"{r['cache_bytes'] / 1e6:.2f} ({r['cache_bytes_per_token']:.1f})"
        else:
            timing, size = f"— | {train:.1f}", "—"
        paired = "—"
        if r["targets"] != "online" and r["ce_vs_online"]:
            paired = f"{_agg(r['ce_vs_online'], signed=True)} / {_agg(r['kl_vs_online'], signed=True)}"
        lines.append(
            f"| {r['student']} ({r['params']:,}) | {r['row']} | {_agg(r['ce'])} | {_agg(r['kl'])} "
            f"| {_agg(r['ece'], 100, 2)} | {paired} | {train:.1f} | {timing} | {size} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def run(
    settings: dict[str, Any], out: Path, *, assets_dir: Path, seed: int = 0, keys: list[str] | None = None
) -> dict[str, Any]:
    """Everything: assets, caches, students; returns the JSON-able results (also written to ``out``).

    ``keys`` selects caches of `CACHES` (default all); rows whose cache is not built are skipped. Torch's thread
    count and transformers' progress bars are restored afterwards (the benchmark may run inside a test session).
    """
    from transformers.utils import logging as hf_logging

    keys = list(CACHES) if keys is None else keys
    unknown = sorted(set(keys) - set(CACHES))
    if unknown or not keys:
        raise ValueError(f"unknown caches {unknown}; choose among {', '.join(CACHES)}")
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run(settings, out, assets_dir=assets_dir, seed=seed, keys=keys)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _run(settings: dict[str, Any], out: Path, *, assets_dir: Path, seed: int, keys: list[str] | None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.demo.assets import prepare_demo

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    assets = prepare_demo(assets_dir, progress=False, **(settings["demo"] or {}))
    assets_seconds = time.perf_counter() - t0
    subset = write_train_subset(assets.train_dir, out / "data" / "train.jsonl", settings["train_kb"])
    print(f"[bench] train subset: {subset['documents']} of {subset['of_documents']} files, {subset['bytes']:,} B")
    caches = build_caches(assets.teacher_dir, Path(subset["path"]), out / "caches", settings, keys)

    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    torch.set_num_threads(1)
    valid = ev.make_validation(
        teacher,
        tokenizer,
        ev.read_texts(assets.valid_dir),
        windows=settings["valid_windows"],
        length=settings["max_length"],
        curve_windows=settings["curve_windows"],
    )
    train = tr.TrainSettings(
        steps=settings["steps"], batch_size=settings["batch"], eval_every=settings["eval_every"], data_seed=seed
    )
    runs = []
    for i, spec in enumerate(settings["students"]):
        for s in range(settings["seeds"] if i == 0 else 1):  # the second seed for the first (smaller) student
            for label, targets, cache, loss in ROWS:
                if cache is not None and cache not in caches:
                    continue
                uri = caches[cache or keys[0]]["uri"]
                runs.append(st.StudentRun(f"{spec.name} | {label}", spec, targets, uri, seed=seed + s, loss=loss))
    print(f"[bench] training {len(runs)} students, {train.steps} steps of {train.batch_size} sequences each")
    results = st.train_runs(
        runs, teacher=teacher, valid=valid, settings=train, tokenizer=tokenizer, log=lambda s: print(f"[bench] {s}")
    )
    rows = summarize(results, caches)
    table = format_table(rows, valid.teacher)
    plots = []
    for spec in settings["students"]:
        mine = [
            dataclasses.replace(r, label=r.label.split(" | ")[1])
            for r in results
            if r.run.spec == spec and r.run.seed == seed
        ]
        title = f"student {spec.name}: validation curves (seed {seed}), {train.steps} steps of {train.batch_size} seqs"
        plots.append(str(st.plot_curves(mine, out / f"curves-{spec.name}.png", valid=valid, title=title)))
    setup = {
        "settings": {k: v for k, v in settings.items() if k != "students"}
        | {"students": [vars(s) for s in settings["students"]]},
        "train": vars(train),
        "teacher_dir": str(assets.teacher_dir),
        "assets_seconds": assets_seconds,
        "train_subset": subset,
        "valid_tokens": valid.tokens,
        "teacher": valid.teacher,
        "ray_start_seconds": caches.pop("_ray_start_seconds"),
        "caches": {name: {k: v for k, v in info.items() if k != "units"} for name, info in caches.items()},
        "seconds": time.perf_counter() - started,
        "cpus": os.cpu_count(),
        "torch_threads": train.threads,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    report = {"setup": setup, "rows": rows, "runs": [r.to_dict() for r in results], "table": table, "plots": plots}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "table.md").write_text(table + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Students distilled from kdcache caches vs online KD and hard labels."
    )
    parser.add_argument("--quick", action="store_true", help="tiny teacher, corpus and students (well under a minute)")
    parser.add_argument("--out", type=Path, help="output folder (default .kdcache/bench-distill[-quick])")
    parser.add_argument(
        "--assets", type=Path, help="demo assets folder (default .kdcache/demo/assets; quick: in --out)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per student")
    parser.add_argument("--seeds", type=int, help="seeds of the first student (2 in the full run)")
    parser.add_argument("--train-kb", type=int, help="KB of train text cached")
    parser.add_argument("--caches", default=",".join(CACHES), help=f"caches to build, of {','.join(CACHES)}")
    parser.add_argument("--seed", type=int, default=0, help="first seed (student init and batch order)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("steps", "seeds", "train_kb"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out = args.out or REPO / ".kdcache" / ("bench-distill-quick" if args.quick else "bench-distill")
    assets_dir = args.assets or (out / "assets" if args.quick else REPO / ".kdcache" / "demo" / "assets")
    keys = [key.strip() for key in args.caches.split(",") if key.strip()]
    report = run(settings, out, assets_dir=assets_dir, seed=args.seed, keys=keys)
    s = report["setup"]
    print()
    print(report["table"])
    print(
        f"\nvalid: {s['valid_tokens']:,} held-out tokens; teacher entropy {s['teacher']['entropy']:.2f} nats. "
        f"Ray start {s['ray_start_seconds']:.1f} s. Total {s['seconds']:.0f} s on {s['cpus']} CPUs, "
        f"load average {' '.join(s['loadavg'] or [])} at the end."
    )
    print(f"curves: {', '.join(report['plots'])}; results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
