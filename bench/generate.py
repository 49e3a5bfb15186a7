"""Generation benchmark: distillation through generation on the demo teacher, and the HF engine's throughput.

    python bench/generate.py               # the demo teacher and prompt set: ~10 min on 2 CPU cores
    python bench/generate.py --quick       # a tiny teacher, 40 prompts, a few steps: about a minute
    python bench/generate.py --out DIR     # results.json and table.md go to DIR

Setup (full run): the prompts are standard-library function signatures (`kdcache.demo.chat.write_prompts`: a ``def``
line and the opening of its docstring; the reference answer is the real docstring), split by function name into
train and held-out prompts. The teacher is the demo's 2-layer Llama trained on the standard library's source
(`kdcache.demo.assets.prepare_demo`), which continues a signature with a docstring. The train prompts are cached
with `run_cache_job` (local Ray, 2 actors, the HF engine) with ``generate``: 2 responses per prompt, temperature 1,
top-p 0.95, at most 128 new tokens, stop at the closing quotes; hybrid targets (exact top-8 + 50 draws) at the
generated positions. The held-out prompts are answered the same way (1 response each): the validation set.

Students (Llama h64/1 layer, the teacher's tokenizer and padded vocabulary), the same steps and batch size:

- (a) the generated responses, CE only (sequence-level KD: the teacher's samples as hard labels);
- (b) the generated responses, soft targets (`sampled_kl` on the cached hybrid targets: token-level KD);
- (b') the generated responses, both (``alpha = 0.5``: soft targets + CE on the responses);
- (c) the reference answers (the real docstrings), hard labels, no teacher.

Measured on the held-out prompts' generations at the generated positions: cross-entropy against the teacher's
generated token and KL(teacher || student) over the full vocabulary; and, for reference, the cross-entropy of the
held-out prompts' real docstrings (the task of row (c)). The responses' positions are found from each
sequence's stored ``prompt_id`` and its prompt's length, and checked against the cache's own ``loss_mask``.

Throughput: `kdcache.capture.generate.HFEngine` on the demo teacher, one torch thread (an actor with
``cpus_per_actor: 1``), 32 prompts x 64 new tokens at batch sizes 1, 8 and 32, against plain
``model.generate(do_sample=True)`` one prompt at a time in the same run (the baseline: same work as batch size 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from kdcache.demo import training as tr  # noqa: E402

FULL: dict[str, Any] = {
    "demo": None,  # prepare_demo's defaults (the assets `kdcache demo` uses)
    "prompts": None,  # every train prompt
    "valid_prompts": None,  # every held-out prompt
    "generate": {"n": 2, "max_new_tokens": 128, "temperature": 1.0, "top_p": 0.95, "batch_size": 32},
    "targets": {"mode": "hybrid", "head": 8, "samples": 50},
    "max_length": 256,
    "unit_bytes": 16384,
    "student": ev.StudentSpec("h64-L1", 64, 1, 2),
    "steps": 300,
    "batch": 8,
    "eval_every": 50,
    "curve_windows": 32,
    "seeds": 2,
    "throughput": {"prompts": 32, "max_new_tokens": 64, "batch_sizes": [1, 8, 32]},
}
QUICK: dict[str, Any] = {
    "demo": {"max_files": 24, "train_steps": 40, "corpus_files": 2},
    "prompts": 40,
    "valid_prompts": 8,
    "generate": {"n": 2, "max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95, "batch_size": 8},
    "targets": {"mode": "hybrid", "head": 4, "samples": 16},
    "max_length": 128,
    "unit_bytes": 4096,
    "student": ev.StudentSpec("h32-L1", 32, 1, 2),
    "steps": 8,
    "batch": 4,
    "eval_every": 4,
    "curve_windows": 4,
    "seeds": 1,
    "throughput": {"prompts": 8, "max_new_tokens": 16, "batch_sizes": [1, 8]},
}
# (row label, what the student trains on)
ROWS = [
    ("(a) generated responses, CE only", "ce"),
    ("(b) generated responses, soft targets", "soft"),
    ("(b') generated responses, soft targets + CE (alpha 0.5)", "mix"),
    ("(c) reference answers, hard labels", "reference"),
]


def write_subset(src: Path, out: Path, limit: int | None) -> dict[str, Any]:
    """The first ``limit`` records of a prompt split as one jsonl file."""
    lines = src.read_text(encoding="utf-8").splitlines()[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {"path": str(out), "prompts": len(lines), "bytes": out.stat().st_size}


def generate_cache(teacher_dir: Path, source: Path, uri: Path, settings: dict[str, Any], n: int) -> dict[str, Any]:
    """Cache the teacher's answers to ``source`` (fresh, `run_cache_job` on a local Ray with 2 actors)."""
    from kdcache.capture.job import run_cache_job
    from kdcache.config import load_config

    shutil.rmtree(uri, ignore_errors=True)
    overrides = [
        f"teacher.model={teacher_dir}",
        f"data.source={source}",
        f"data.max_length={settings['max_length']}",
        f"data.unit_bytes={settings['unit_bytes']}",
        f"output.uri={uri}",
        *(f"targets.{key}={value}" for key, value in settings["targets"].items()),
        *(f"generate.{key}={value}" for key, value in settings["generate"].items()),
        f"generate.n={n}",
        "cluster.num_actors=2",
        "cluster.progress=false",
    ]
    cfg = load_config(REPO / "configs" / "generate-quickstart.yaml", overrides)
    t0 = time.perf_counter()
    manifest = run_cache_job(cfg)
    return {"manifest": manifest, "seconds": time.perf_counter() - t0}


def prompt_lengths(manifest: dict[str, Any], tokenizer: Any) -> dict[int, int]:
    """{prompt_id: prompt tokens} of every record of the cache's input files (string prompts, as the worker renders
    them: tokenized with the tokenizer's special tokens)."""
    from kdcache.capture.generate import prompt_id

    out = {}
    for source in sorted({u["source"] for u in manifest["units"]}):
        offset = 0
        for line in Path(source).read_bytes().splitlines(keepends=True):
            if line.strip():
                prompt = json.loads(line)["prompt"]
                out[prompt_id(source, f"b{offset}")] = len(tokenizer(prompt)["input_ids"])
            offset += len(line)
    return out


def response_mask(batch: dict[str, Any], lengths: dict[int, int]) -> torch.Tensor:
    """``[B, L]`` bool: the generated positions of each row (targets at t iff token t + 1 was generated)."""
    mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for row, (pid, n) in enumerate(zip(batch["prompt_id"].tolist(), batch["attention_mask"].sum(1).tolist())):
        if pid >= 0:
            mask[row, lengths[pid] - 1 : n - 1] = True
    return mask


def generated_batches(uri: str, lengths: dict[int, int], *, batch_size: int, seed: int, vocab: int):
    """`cache_batches` of a generated cache, whose ``loss_mask`` is checked to be the generated positions (found
    from each row's ``prompt_id`` and its prompt's length)."""
    for batch in tr.cache_batches(uri, batch_size=batch_size, seed=seed, student_vocab_size=vocab):
        if not torch.equal(batch["loss_mask"].bool(), response_mask(batch, lengths)):
            raise AssertionError("the cache's loss_mask is not the generated positions")
        yield batch


def reference_batches(source: Path, tokenizer: Any, *, batch_size: int, seed: int, max_length: int):
    """Endless batches of prompt + reference answer (the real docstring), CE on the answer's tokens; shuffled."""
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        prompt = tokenizer(record["prompt"])["input_ids"]
        ids = (prompt + tokenizer(record["completion"], add_special_tokens=False)["input_ids"])[:max_length]
        rows.append((ids, len(prompt)))
    rng = random.Random(seed)
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [rows[i] for i in order[lo : lo + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.zeros((batch_size, width), dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            labels = torch.full_like(input_ids, -100)
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for r, (ids, p) in enumerate(chunk):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention[r, : len(ids)] = 1
                labels[r, : len(ids) - 1] = torch.tensor(ids[1:])
                mask[r, p - 1 : len(ids) - 1] = True
            yield {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "loss_mask": mask}


def validation_set(teacher, uri: str, lengths: dict[int, int], curve_windows: int) -> ev.ValidationSet:
    """The held-out prompts' generations: labels are the generated tokens, measured at the generated positions."""
    from kdcache.read.reader import open_cache

    rows = []
    for seq in open_cache(uri).iter_sequences():
        ids = seq["input_ids"].tolist()
        rows.append((ids, lengths[int(seq["prompt_id"])]))
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.zeros_like(input_ids)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for r, (ids, p) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(ids) - 1] = torch.tensor(ids[1:])
        mask[r, p - 1 : len(ids) - 1] = True
    parts = []
    with torch.no_grad():
        for lo in range(0, len(rows), 8):
            parts.append(torch.log_softmax(teacher(input_ids=input_ids[lo : lo + 8]).logits.float(), -1))
    valid = ev.ValidationSet(input_ids, labels, torch.cat(parts), curve_windows=curve_windows, mask=mask)
    own = ev.evaluate(teacher, valid)
    valid.teacher = {"ce": own["ce"], "ece": own["ece"], "accuracy": own["accuracy"]}
    return valid


def reference_validation(teacher, tokenizer, source: Path, max_length: int) -> ev.ValidationSet:
    """The held-out prompts with their reference answers (the real docstrings), measured on the answers' tokens."""
    batches = reference_batches(source, tokenizer, batch_size=1, seed=0, max_length=max_length)
    count = len(source.read_text(encoding="utf-8").splitlines())
    rows = [next(batches) for _ in range(count)]  # one epoch, one row each
    longest = max(r["input_ids"].shape[1] for r in rows)

    def pad(name: str, fill: Any) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(r[name], (0, longest - r[name].shape[1]), value=fill) for r in rows])

    input_ids, mask = pad("input_ids", 0), pad("loss_mask", False)
    labels = pad("labels", -100).clamp(min=0)  # -100 only where nothing is measured
    with torch.no_grad():
        parts = [teacher(input_ids=input_ids[lo : lo + 8]).logits.float() for lo in range(0, count, 8)]
    valid = ev.ValidationSet(input_ids, labels, torch.log_softmax(torch.cat(parts), -1), mask=mask)
    own = ev.evaluate(teacher, valid)
    valid.teacher = {"ce": own["ce"], "ece": own["ece"], "accuracy": own["accuracy"]}
    return valid


def bench_throughput(teacher_dir: Path, source: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Generated tokens/s of the HF engine at each batch size, and of plain ``model.generate`` one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.capture.generate import GenerationRow, HFEngine, draw_seed, finish_response, stop_token_ids
    from kdcache.config import GenerateConfig

    spec = settings["throughput"]
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    lines = source.read_text(encoding="utf-8").splitlines()[: spec["prompts"]]
    prompts = [tokenizer(json.loads(line)["prompt"])["input_ids"] for line in lines]
    stop = stop_token_ids(model.generation_config.eos_token_id, tokenizer)
    new = spec["max_new_tokens"]
    rows = [GenerationRow(p, draw_seed(0, i, 0), new) for i, p in enumerate(prompts)]
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        tokens = 0
        with torch.no_grad():
            for p in prompts:  # the baseline: HF's own sampling, one prompt at a time
                raw = model.generate(
                    torch.tensor([p]), do_sample=True, top_p=0.95, temperature=1.0, top_k=0, max_new_tokens=new
                )
                tokens += len(finish_response(raw[0, len(p) :].tolist(), max_new_tokens=new, eos_ids=stop))
        seconds = time.perf_counter() - t0
        out.append({"engine": "model.generate (baseline)", "batch_size": 1, "tokens": tokens, "seconds": seconds})
        for size in spec["batch_sizes"]:
            config = GenerateConfig(temperature=1.0, top_p=0.95, max_new_tokens=new, batch_size=size)
            engine = HFEngine(model, tokenizer, config, stop_ids=stop)
            t0 = time.perf_counter()
            raws = engine.generate(rows)
            seconds = time.perf_counter() - t0
            tokens = sum(len(finish_response(r, max_new_tokens=new, eos_ids=stop)) for r in raws)
            out.append({"engine": "kdcache HFEngine", "batch_size": size, "tokens": tokens, "seconds": seconds})
    finally:
        torch.set_num_threads(threads)
    for row in out:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        print(f"[bench] {row['engine']} batch {row['batch_size']}: {row['tokens_per_s']:,.0f} generated tok/s")
    return out


def train_rows(
    settings: dict[str, Any],
    caches: dict[str, Any],
    teacher,
    tokenizer,
    valid,
    reference: Path,
    seed: int,
    reference_valid: ev.ValidationSet,
) -> list[dict[str, Any]]:
    """Every row of `ROWS` for every seed: the student's final metrics on the validation set (and on the held-out
    reference answers)."""
    vocab = int(teacher.config.vocab_size)
    spec = settings["student"]
    mode = settings["targets"]["mode"]
    train_settings = tr.TrainSettings(
        steps=settings["steps"], batch_size=settings["batch"], eval_every=settings["eval_every"]
    )
    results = []
    for s in range(settings["seeds"]):
        for label, what in ROWS:
            model = ev.build_student(spec, vocab_size=vocab, tokenizer=tokenizer, seed=1000 + seed + s)
            if what == "reference":
                batches = reference_batches(
                    reference,
                    tokenizer,
                    batch_size=settings["batch"],
                    seed=seed + s,
                    max_length=settings["max_length"],
                )
                loss_fn = tr.make_loss("hard")
            else:
                batches = generated_batches(
                    caches["train"]["uri"], caches["train"]["lengths"], batch_size=settings["batch"], seed=seed + s,
                    vocab=vocab,
                )  # fmt: skip
                loss_fn = {
                    "ce": lambda: tr.make_loss("hard"),
                    "soft": lambda: tr.make_loss("cache", mode=mode),
                    "mix": lambda: tr.make_loss("cache", mode=mode, alpha=0.5),
                }[what]()
            curve, stats = tr.train_student(model, batches, loss_fn, train_settings, valid=valid, desc=label)
            final, on_reference = stats["final"], ev.evaluate(model, reference_valid)
            print(
                f"[bench] {label} (seed {s}): valid CE {final['ce']:.3f}, KL {final['kl']:.3f}; reference answers "
                f"CE {on_reference['ce']:.3f}"
            )
            results.append(
                {
                    "row": label,
                    "seed": s,
                    "final": final,
                    "reference": on_reference,
                    "curve": curve,
                    "tokens": stats["tokens"],
                    "train_seconds": stats["train_seconds"],
                    "params": ev.num_parameters(model),
                }
            )
    return results


def _agg(values: list[float], digits: int = 3) -> str:
    mean = sum(values) / len(values)
    text = f"{mean:.{digits}f}"
    if len(values) > 1:
        text += f" ± {(max(values) - min(values)) / 2:.{digits}f}"
    return text


def format_tables(caches, results, throughput, valid, spec, reference_valid) -> str:
    """The cache table, the student table and the throughput table (markdown)."""
    lines = [
        "| cache | prompts | responses | generated tokens | tokens | MB | generate s (summed) | generated tok/s per "
        "actor | job s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in caches.items():
        m, g = c["manifest"], c["manifest"]["provenance"]["generation"]
        lines.append(
            f"| {name} | {g['prompts']:,} | {g['sequences']:,} | {g['generated_tokens']:,} "
            f"| {m['stats']['num_tokens']:,} | {m['stats']['total_bytes'] / 1e6:.2f} | {g['generate_s']:.1f} "
            f"| {g['generated_tokens_per_s']:,.0f} | {c['seconds']:.1f} |"
        )
    lines += [
        "",
        "| student | trained on | valid CE (generated tokens) | KL(teacher‖student) | CE of reference answers "
        "| tokens trained | train s |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| teacher (reference) | — | {valid.teacher['ce']:.3f} | 0 | {reference_valid.teacher['ce']:.3f} | — | — |",
    ]
    for label, _ in ROWS:
        runs = [r for r in results if r["row"] == label]
        lines.append(
            f"| {spec.name} ({runs[0]['params']:,}) | {label} | {_agg([r['final']['ce'] for r in runs])} "
            f"| {_agg([r['final']['kl'] for r in runs])} | {_agg([r['reference']['ce'] for r in runs])} "
            f"| {sum(r['tokens'] for r in runs) // len(runs):,} "
            f"| {sum(r['train_seconds'] for r in runs) / len(runs):.1f} |"
        )
    lines += [
        "",
        "| generation (1 thread) | batch size | generated tokens | s | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in throughput:
        lines.append(
            f"| {row['engine']} | {row['batch_size']} | {row['tokens']:,} | {row['seconds']:.2f} "
            f"| {row['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def run(settings: dict[str, Any], out: Path, *, assets_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Everything: assets, prompts, caches, students, throughput; returns the JSON-able results (also in ``out``)."""
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kdcache.demo.assets import prepare_demo
    from kdcache.demo.chat import write_prompts

    started = time.perf_counter()
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        out.mkdir(parents=True, exist_ok=True)
        assets = prepare_demo(assets_dir, progress=False, **(settings["demo"] or {}))
        prompts = out / "prompts"
        counts = write_prompts(prompts)
        train = write_subset(prompts / "train" / "part-00000.jsonl", out / "data" / "train.jsonl", settings["prompts"])
        held = write_subset(
            prompts / "valid" / "part-00000.jsonl", out / "data" / "valid.jsonl", settings["valid_prompts"]
        )
        print(f"[bench] {counts} prompts written; {train['prompts']} train, {held['prompts']} held out")
        throughput = bench_throughput(assets.teacher_dir, Path(train["path"]), settings)
        tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
                 object_store_memory=256 * 2**20, logging_level="WARNING", log_to_driver=False)  # fmt: skip
        try:
            caches = {}
            for name, source, n in (("train", train, settings["generate"]["n"]), ("valid", held, 1)):
                uri = out / "caches" / name
                c = generate_cache(assets.teacher_dir, Path(source["path"]), uri, settings, n)
                c |= {"uri": str(uri), "lengths": prompt_lengths(c["manifest"], tokenizer)}
                caches[name] = c
                g = c["manifest"]["provenance"]["generation"]
                tokens, seconds = g["generated_tokens"], c["seconds"]
                print(f"[bench] {name}: {g['sequences']} responses, {tokens:,} tokens, {seconds:.1f} s")
        finally:
            ray.shutdown()  # frees the cores for the students
        teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32).eval()
        torch.set_num_threads(1)
        valid = validation_set(teacher, caches["valid"]["uri"], caches["valid"]["lengths"], settings["curve_windows"])
        print(
            f"[bench] validation: {valid.input_ids.shape[0]} held-out generations, {valid.tokens:,} generated tokens"
        )
        reference_valid = reference_validation(teacher, tokenizer, Path(held["path"]), settings["max_length"])
        results = train_rows(settings, caches, teacher, tokenizer, valid, Path(train["path"]), seed, reference_valid)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
    table = format_tables(caches, results, throughput, valid, settings["student"], reference_valid)
    report = {
        "settings": {k: v for k, v in settings.items() if k != "student"} | {"student": vars(settings["student"])},
        "train": train,
        "valid": held,
        "caches": {
            name: {
                "uri": c["uri"],
                "seconds": c["seconds"],
                "stats": c["manifest"]["stats"],
                "provenance": c["manifest"]["provenance"],
            }  # fmt: skip
            for name, c in caches.items()
        },
        "valid_generations": int(valid.input_ids.shape[0]),
        "valid_tokens": valid.tokens,
        "teacher": valid.teacher,
        "teacher_on_reference_answers": reference_valid.teacher,
        "reference_tokens": reference_valid.tokens,
        "results": results,
        "throughput": throughput,
        "table": table,
        "seconds": time.perf_counter() - started,
        "cpus": os.cpu_count(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "table.md").write_text(table + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Distillation through generation: caches, students, throughput.")
    parser.add_argument("--quick", action="store_true", help="tiny teacher, 40 prompts, a few steps")
    parser.add_argument("--out", type=Path, help="output folder (default .kdcache/bench-generate[-quick])")
    parser.add_argument(
        "--assets", type=Path, help="demo assets folder (default .kdcache/demo/assets; quick: in --out)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per student")
    parser.add_argument("--seeds", type=int, help="seeds per row")
    parser.add_argument("--seed", type=int, default=0, help="first seed (student init and batch order)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("steps", "seeds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out = args.out or REPO / ".kdcache" / ("bench-generate-quick" if args.quick else "bench-generate")
    assets_dir = args.assets or (out / "assets" if args.quick else REPO / ".kdcache" / "demo" / "assets")
    report = run(settings, out, assets_dir=assets_dir, seed=args.seed)
    print()
    print(report["table"])
    print(
        f"\nvalid: {report['valid_tokens']:,} generated tokens of {report['valid_generations']} held-out prompts. "
        f"Total {report['seconds']:.0f} s on {report['cpus']} CPUs, load average {' '.join(report['loadavg'] or [])}."
    )
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
