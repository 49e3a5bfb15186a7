"""Chat benchmark: a cache of conversations with targets at every position vs only where the student learns (the
assistants' tokens), and students trained on the assistant-only cache vs hard labels on the same responses.

    python bench/chat.py                 # the demo teacher and chat set: ~6 min on 2 CPU cores
    python bench/chat.py --quick         # a tiny teacher, 60 conversations, a few steps: well under a minute
    python bench/chat.py --out DIR       # results.json and table.md go to DIR

Setup (full run): the corpus is the demo chat set (`kdcache.demo.chat`: questions about standard-library functions
answered with their docstrings; train and valid split by function name). The teacher is the demo's 2-layer Llama
trained on the Python standard library (`kdcache.demo.assets.prepare_demo`, built once into ``.kdcache/demo/assets``;
its tokenizer's chat template marks assistant turns with ``{% generation %}``), by default further trained on the
rendered train conversations (``--instruct-steps``, an "instruct" teacher that knows the chat format; 0 keeps the
base teacher, which has never seen a conversation). The train split is cached twice
with `run_cache_job` on a local Ray with 2 teacher actors, with hybrid targets (exact top-8 + 50 draws from the rest:
the mode whose students matched online full KD in bench/distill.py), once with ``targets.positions: all`` and once
with ``assistant``. Reported per cache: tokens, stored target positions, bytes, bytes per token and per
stored position, and the teacher pass's wall time (the head runs only at the stored positions).

Reading cost: `UnitWorker.read_windows` (read, render, tokenize, window) over the same train conversations, best of
3 on one thread: pre-rendered as text, as chat with the demo template (``{% generation %}`` markers), and with the
same template stripped of its markers (the checked turn-by-turn prefix diff).

Then students (Llama h64/1 layer, the teacher's tokenizer and padded vocabulary) are trained for the same steps:

- KD from the assistant-only cache (`sampled_kl`, the hybrid mode's loss, at the stored positions);
- hard labels: cross-entropy against the true next token at the same positions, on the same batches, no teacher;
- KD from the every-position cache (the prompt positions trained too), for reference.

Measured on the held-out conversations at the positions whose next token is an assistant's
(`kdcache.demo.evaluation.make_chat_validation`): cross-entropy against the true next token and KL(teacher || student)
over the full vocabulary, plus the expected calibration error of the top-1 prediction.
"""

from __future__ import annotations

import argparse
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
    "conversations": None,  # every conversation of the train split
    "instruct_steps": 300,  # AdamW steps of 8 x 128 tokens on the rendered train conversations (0: base teacher)
    "targets": {"mode": "hybrid", "head": 8, "samples": 50},
    "max_length": 256,
    "unit_bytes": 65536,
    "student": ev.StudentSpec("h64-L1", 64, 1, 2),
    "steps": 300,
    "batch": 8,
    "eval_every": 50,
    "valid_windows": None,  # every held-out window with an assistant token
    "curve_windows": 32,
    "seeds": 2,
}
QUICK: dict[str, Any] = {
    "demo": {"max_files": 24, "train_steps": 40, "corpus_files": 2},
    "conversations": 60,
    "instruct_steps": 5,
    "targets": {"mode": "hybrid", "head": 4, "samples": 16},
    "max_length": 128,
    "unit_bytes": 8192,
    "student": ev.StudentSpec("h32-L1", 32, 1, 2),
    "steps": 8,
    "batch": 4,
    "eval_every": 4,
    "valid_windows": 8,
    "curve_windows": 4,
    "seeds": 1,
}
POSITIONS = ("all", "assistant")
# (row label, targets of the run, cache the batches come from)
ROWS = [
    ("KD, assistant-only cache", "cache", "assistant"),
    ("hard labels on the same responses (CE)", "hard", "assistant"),
    ("KD, every-position cache", "cache", "all"),
]


def write_train(chat_train_dir: Path, out: Path, limit: int | None) -> dict[str, Any]:
    """The chat train split (its first ``limit`` conversations) as one jsonl file."""
    lines = (chat_train_dir / "part-00000.jsonl").read_text(encoding="utf-8").splitlines()[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {"path": str(out), "conversations": len(lines), "bytes": out.stat().st_size}


def stored_positions(uri: str) -> tuple[int, int]:
    """(tokens, positions with a stored target) of a cache, counted from what it reads back (``loss_mask``)."""
    from kdcache.read.reader import open_cache

    tokens = stored = 0
    for seq in open_cache(uri).iter_sequences():
        tokens += len(seq["input_ids"])
        stored += int(seq["loss_mask"].sum())
    return tokens, stored


def instruct_teacher(teacher_dir: Path, source: Path, out: Path, steps: int) -> tuple[Path, dict[str, Any]]:
    """The demo teacher further trained on the rendered conversations of ``source`` for ``steps`` steps (next-token
    loss on every token, deterministic), saved with its tokenizer in ``out``; ``steps == 0`` returns the teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.demo.teacher import train_teacher

    if steps == 0:
        return teacher_dir, {}
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    texts = []
    for line in source.read_text(encoding="utf-8").splitlines():
        text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        texts.append(text.removeprefix(tokenizer.bos_token))  # train_teacher adds BOS and EOS around each text
    stats = train_teacher(model, tokenizer, texts, steps=steps, seconds=None, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, stats


def bench_rendering(teacher_dir: Path, source: Path, out: Path, max_length: int) -> list[dict[str, Any]]:
    """Tokens per second of `UnitWorker.read_windows` on ``source``: as pre-rendered text, as chat with the template's
    markers, as chat with the template without markers (prefix diff). Best of 3."""
    from transformers import AutoTokenizer

    from kdcache.capture.plan import plan_units
    from kdcache.capture.worker import UnitWorker, WorkerSettings
    from kdcache.config import load_config

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    lines = source.read_text(encoding="utf-8").splitlines()
    text = out / "rendered.jsonl"
    rendered = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in lines]
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in rendered), encoding="utf-8")
    plain = out / "template-without-markers.jinja"
    plain.write_text(tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    cases = {
        "text (pre-rendered)": [f"data.source={text}", "data.format=jsonl", "data.add_eos=false"],
        "chat, template with {% generation %} markers": [f"data.source={source}", "data.format=chat"],
        "chat, same template without markers (prefix diff)": [
            f"data.source={source}",
            "data.format=chat",
            f"data.chat_template={plain}",
        ],
    }
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in cases.items():
            base = [f"teacher.model={teacher_dir}", f"output.uri={out / 'unused'}", f"data.max_length={max_length}"]
            cfg = load_config(None, [*base, "data.unit_bytes=1000000000", *extra])
            worker = UnitWorker(WorkerSettings.from_config(cfg, "0" * 64), device="cpu")
            (unit,) = plan_units(cfg.data.source, cfg.data.format, unit_bytes=cfg.data.unit_bytes)
            seconds = []
            for _ in range(3):
                t0 = time.perf_counter()
                windows, _ = worker.read_windows(unit.to_dict())
                seconds.append(time.perf_counter() - t0)
            tokens = sum(len(w.input_ids) for w in windows)
            targets = sum(len(w.input_ids) if w.target_mask is None else int(w.target_mask.sum()) for w in windows)
            rows.append({"input": name, "tokens": tokens, "targets": targets, "seconds": min(seconds)})
    finally:
        torch.set_num_threads(threads)
    return rows


def build_caches(teacher_dir: Path, source: Path, out: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One fresh cache per positions mode (local Ray, 2 actors): bytes, tokens, stored positions, seconds."""
    import ray

    from kdcache.capture.job import run_cache_job
    from kdcache.config import load_config

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address="local",
            num_cpus=max(2, os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            logging_level="WARNING",
            log_to_driver=False,
        )
    caches = {}
    try:
        for positions in POSITIONS:
            uri = out / positions
            shutil.rmtree(uri, ignore_errors=True)  # fresh: the teacher pass is what is timed
            overrides = [
                f"teacher.model={teacher_dir}",
                f"data.source={source}",
                f"data.max_length={settings['max_length']}",
                f"data.unit_bytes={settings['unit_bytes']}",
                f"output.uri={uri}",
                *(f"targets.{key}={value}" for key, value in settings["targets"].items()),
                f"targets.positions={positions}",
                "targets.temperatures=[1.0]",
                "cluster.num_actors=2",
                "cluster.progress=false",
            ]
            cfg = load_config(REPO / "configs" / "chat-quickstart.yaml", overrides)
            t0 = time.perf_counter()
            manifest = run_cache_job(cfg)
            seconds = time.perf_counter() - t0
            tokens, stored = stored_positions(str(uri))
            total = manifest["stats"]["total_bytes"]
            caches[positions] = {
                "uri": str(uri),
                "seconds": seconds,
                "sequences": manifest["stats"]["num_sequences"],
                "tokens": tokens,
                "stored_positions": stored,
                "bytes": total,
                "bytes_per_token": total / tokens,
                "bytes_per_stored_position": total / stored,
                "forward_seconds": sum((u.get("timing_s") or {}).get("forward", 0.0) for u in manifest["units"]),
            }
            print(
                f"[bench] positions={positions}: {tokens:,} tokens, {stored:,} targets, {total:,} B in {seconds:.1f} s"
            )
    finally:
        if started_ray:
            ray.shutdown()  # frees the cores for the students
    return caches


def _agg(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    mean = sum(values) / len(values)
    text = f"{scale * mean:.{digits}f}"
    if len(values) > 1:
        text += f" ± {scale * (max(values) - min(values)) / 2:.{digits}f}"
    return text


def format_tables(
    caches: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
    teacher: dict[str, float],
    rendering: list[dict[str, Any]],
) -> str:
    """The cache table, the reading-cost table and the student table (markdown)."""
    lines = [
        "| cache | sequences | tokens | stored targets | MB | B/token | B/stored target | teacher pass s "
        "| forward s (summed over actors) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for positions, c in caches.items():
        lines.append(
            f"| positions: {positions} | {c['sequences']:,} | {c['tokens']:,} | {c['stored_positions']:,} "
            f"| {c['bytes'] / 1e6:.3f} | {c['bytes_per_token']:.1f} | {c['bytes_per_stored_position']:.1f} "
            f"| {c['seconds']:.1f} | {c['forward_seconds']:.1f} |"
        )
    lines += [
        "",
        "| input (read_windows, 1 thread) | tokens | positions with a target | s | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rendering:
        lines.append(
            f"| {r['input']} | {r['tokens']:,} | {r['targets']:,} | {r['seconds']:.3f} "
            f"| {r['tokens'] / r['seconds']:,.0f} |"
        )
    lines += [
        "",
        "| student (params) | targets | valid CE (assistant tokens) | KL(teacher‖student) | ECE (%) | train s |",
        "|---|---|---:|---:|---:|---:|",
        f"| teacher (reference, {teacher['params']:,}) | — | {teacher['ce']:.3f} | 0 "
        f"| {100 * teacher['ece']:.2f} | — |",
    ]
    for r in rows:
        lines.append(
            f"| {r['student']} ({r['params']:,}) | {r['row']} | {_agg(r['ce'])} | {_agg(r['kl'])} "
            f"| {_agg(r['ece'], 100, 2)} | {sum(r['train_seconds']) / len(r['train_seconds']):.1f} |"
        )
    return "\n".join(lines)


def run(settings: dict[str, Any], out: Path, *, assets_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Everything: assets, caches, students; returns the JSON-able results (also written to ``out``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kdcache.demo.assets import prepare_demo

    started = time.perf_counter()
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        out.mkdir(parents=True, exist_ok=True)
        assets = prepare_demo(assets_dir, progress=False, **(settings["demo"] or {}))
        train = write_train(assets.chat_train_dir, out / "data" / "train.jsonl", settings["conversations"])
        print(f"[bench] {train['conversations']} train conversations, {train['bytes']:,} B")
        rendering = bench_rendering(assets.teacher_dir, Path(train["path"]), out / "data", settings["max_length"])
        teacher_dir, instruct = instruct_teacher(
            assets.teacher_dir, Path(train["path"]), out / "teacher-instruct", settings["instruct_steps"]
        )
        if instruct:
            print(f"[bench] instruct teacher: loss {instruct['first_loss']:.2f} -> {instruct['last_loss']:.2f}")
        caches = build_caches(teacher_dir, Path(train["path"]), out / "caches", settings)

        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        torch.set_num_threads(1)
        valid = ev.make_chat_validation(
            teacher,
            tokenizer,
            ev.read_conversations(assets.chat_valid_dir),
            length=settings["max_length"],
            windows=settings["valid_windows"],
            curve_windows=settings["curve_windows"],
        )
        print(f"[bench] validation: {valid.input_ids.shape[0]} held-out windows, {valid.tokens:,} assistant tokens")
        train_settings = tr.TrainSettings(
            steps=settings["steps"], batch_size=settings["batch"], eval_every=settings["eval_every"], data_seed=seed
        )
        spec = settings["student"]
        runs = [
            st.StudentRun(f"{spec.name} | {label}", spec, targets, caches[positions]["uri"], seed=seed + s)
            for s in range(settings["seeds"])
            for label, targets, positions in ROWS
        ]
        results = st.train_runs(
            runs,
            teacher=teacher,
            valid=valid,
            settings=train_settings,
            tokenizer=tokenizer,
            log=lambda line: print(f"[bench] {line}"),
        )
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        label = r.label.split(" | ")[1]
        row = rows.setdefault(label, {"student": spec.name, "row": label, "params": r.params, "runs": []})
        row["runs"].append(r)
    for row in rows.values():
        runs_ = row.pop("runs")
        for key in ("ce", "kl", "ece", "accuracy"):
            row[key] = [r.final[key] for r in runs_]
        row["train_seconds"] = [r.train_seconds for r in runs_]
        row["tokens"] = [r.tokens for r in runs_]
    table = format_tables(caches, list(rows.values()), valid.teacher, rendering)
    report = {
        "settings": {k: v for k, v in settings.items() if k != "student"} | {"student": vars(spec)},
        "train": train,
        "instruct_teacher": instruct,
        "caches": caches,
        "rendering": rendering,
        "valid_windows": int(valid.input_ids.shape[0]),
        "valid_tokens": valid.tokens,
        "teacher": valid.teacher,
        "rows": list(rows.values()),
        "runs": [r.to_dict() for r in results],
        "table": table,
        "seconds": time.perf_counter() - started,
        "cpus": os.cpu_count(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "table.md").write_text(table + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat caches (all vs assistant positions) and their students.")
    parser.add_argument("--quick", action="store_true", help="tiny teacher, 60 conversations, a few steps")
    parser.add_argument("--out", type=Path, help="output folder (default .kdcache/bench-chat[-quick])")
    parser.add_argument(
        "--assets", type=Path, help="demo assets folder (default .kdcache/demo/assets; quick: in --out)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per student")
    parser.add_argument("--seeds", type=int, help="seeds per row")
    parser.add_argument("--instruct-steps", type=int, help="steps training the teacher on the conversations (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (student init and batch order)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("steps", "seeds", "instruct_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out = args.out or REPO / ".kdcache" / ("bench-chat-quick" if args.quick else "bench-chat")
    assets_dir = args.assets or (out / "assets" if args.quick else REPO / ".kdcache" / "demo" / "assets")
    report = run(settings, out, assets_dir=assets_dir, seed=args.seed)
    print()
    print(report["table"])
    print(
        f"\nvalid: {report['valid_tokens']:,} assistant tokens in {report['valid_windows']} held-out windows. "
        f"Total {report['seconds']:.0f} s on {report['cpus']} CPUs, load average {' '.join(report['loadavg'] or [])}."
    )
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
