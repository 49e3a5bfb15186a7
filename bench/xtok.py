"""Cross-tokenizer benchmark: a student with another tokenizer trained from a kdcache cache, against the same student
on hard labels, and against a student with the teacher's tokenizer trained from the same cache; bits per byte on
held-out text (the measure that does not depend on the tokenizer).

    python bench/xtok.py                 # the demo teacher, 2 caches, 10 students: ~15 min on 2 CPU cores
    python bench/xtok.py --quick         # a tiny teacher, corpus and students: about a minute
    python bench/xtok.py --out DIR       # results.json and table.md go to DIR

Setup (full run): the teacher is the demo's 2-layer Llama trained on the Python standard library (byte-level BPE,
2,052 tokens; `kdcache.demo.assets.prepare_demo`). The student's tokenizer is of another family and size: a
SentencePiece-style BPE (Metaspace pieces "▁the", byte fallback "<0x0A>"; 1,024 merges-and-characters + 256 byte
tokens) trained here on the train split. A subset of the train split (``--train-kb``) is cached once per target mode
with `targets.cross_tokenizer: true` (the text behind every teacher token): top-32 and hybrid head 8 + N=50. Students
(Llama h64/1 layer) are trained for the same steps on the same sequences (every cache holds the same ones and
`KDCacheDataset`'s order depends on the seed and the unit sizes only):

- another tokenizer, from a cache: `KDCacheDataset(..., tokenizer=student, cross_tokenizer=True)` batches,
  `distillation_loss` (forward KL with the tail bucket on the mapped ids), alpha = 0.5 or 1; one row adds `uld_loss`,
  one maps with `cross_mapping="first"`;
- another tokenizer, hard labels: the same batches' labels, cross-entropy only;
- the teacher's tokenizer, from the same cache (its mode's loss) and on hard labels.

Reported per student: bits per byte on held-out windows of text from the valid split (each text after the
student's BOS), the student's parameters, training time, and for the cross-tokenizer rows how the positions were
aligned (`xtok_kind`). Per cache: bytes, and the bytes of the token text column.
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
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdcache import losses  # noqa: E402
from kdcache.demo import evaluation as ev  # noqa: E402
from kdcache.demo import training as tr  # noqa: E402

FULL: dict[str, Any] = {
    "demo": None,  # prepare_demo's defaults (the assets `kdcache demo` uses)
    "train_kb": 450,
    "max_length": 256,
    "unit_bytes": 65536,
    "student_vocab": 1024,  # learned pieces of the student's tokenizer (plus 256 byte-fallback tokens)
    "student": ev.StudentSpec("h64-L1", 64, 1, 2),
    "steps": 200,
    "batch": 8,
    "valid_texts": 96,  # held-out texts of `valid_bytes` bytes each
    "valid_bytes": 1000,
    "seeds": 2,
}
QUICK: dict[str, Any] = {
    "demo": {"max_files": 24, "train_steps": 40, "corpus_files": 2},
    "train_kb": 40,
    "max_length": 64,
    "unit_bytes": 8192,
    "student_vocab": 300,
    "student": ev.StudentSpec("h32-L1", 32, 1, 2),
    "steps": 12,
    "batch": 4,
    "valid_texts": 8,
    "valid_bytes": 400,
    "seeds": 1,
}
CACHES: dict[str, dict[str, Any]] = {
    "top-32": {"mode": "topk", "k": 32},
    "hybrid": {"mode": "hybrid", "head": 8, "samples": 50},
}
# (row label, student tokenizer: "student" | "teacher", cache key, targets: "kd" | "hard", alpha, mapping, uld weight)
ROWS: list[tuple[str, str, str, str, float, str, float]] = [
    ("hard labels", "student", "hybrid", "hard", 0.0, "exact", 0.0),
    ("hybrid cache, alpha 0.5", "student", "hybrid", "kd", 0.5, "exact", 0.0),
    ("hybrid cache, alpha 1", "student", "hybrid", "kd", 1.0, "exact", 0.0),
    ("top-32 cache, alpha 0.5", "student", "top-32", "kd", 0.5, "exact", 0.0),
    ("hybrid cache + 0.5 ULD, alpha 0.5", "student", "hybrid", "kd", 0.5, "exact", 0.5),
    ("hybrid cache, mapping first, alpha 0.5", "student", "hybrid", "kd", 0.5, "first", 0.0),
    ("hybrid cache, mapping first, alpha 1", "student", "hybrid", "kd", 1.0, "first", 0.0),
    ("hard labels", "teacher", "hybrid", "hard", 0.0, "exact", 0.0),
    ("hybrid cache, alpha 0.5", "teacher", "hybrid", "kd", 0.5, "exact", 0.0),
    ("hybrid cache, alpha 1", "teacher", "hybrid", "kd", 1.0, "exact", 0.0),
]
SEEDED = {0, 1, 7, 8}  # rows trained with every seed (the others with the first)


def train_student_tokenizer(texts: list[str], out_dir: Path, vocab_size: int):
    """A SentencePiece-style BPE tokenizer (Metaspace "▁", byte fallback, BOS added) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    trained.train_from_iterator(texts, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for byte in range(256):  # byte fallback: every byte has a token, as in Llama 2's tokenizer
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def held_out_texts(texts: list[str], count: int, size: int) -> list[str]:
    """`count` pieces of about `size` bytes spread over the held-out documents (cut at character boundaries)."""
    pieces = []
    for text in texts:
        data = text.encode("utf-8")
        pieces += [data[lo : lo + size].decode("utf-8", errors="ignore") for lo in range(0, len(data) - size, size)]
    step = max(1, len(pieces) // count)
    return [p for p in pieces[::step] if p.strip()][:count]


def build_caches(teacher_dir: Path, source: Path, out: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One fresh cache per `CACHES` entry, with the text behind every token (local Ray, 2 actors)."""
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
        for key, targets in CACHES.items():
            uri = out / key
            shutil.rmtree(uri, ignore_errors=True)
            overrides = [
                f"teacher.model={teacher_dir}",
                f"data.source={source}",
                f"data.max_length={settings['max_length']}",
                f"data.unit_bytes={settings['unit_bytes']}",
                f"output.uri={uri}",
                "targets.temperatures=[1.0]",
                "targets.cross_tokenizer=true",
                "cluster.num_actors=2",
                "cluster.progress=false",
                *(f"targets.{field}={value}" for field, value in targets.items()),
            ]
            cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
            t0 = time.perf_counter()
            manifest = run_cache_job(cfg)
            stats = manifest["stats"]
            caches[key] = {
                "uri": str(uri),
                "seconds": time.perf_counter() - t0,
                "bytes": stats["total_bytes"],
                "tokens": stats["num_tokens"],
                "bytes_per_token": stats["bytes_per_token"],
            }
            caches[key]["parts"] = parts = cache_bytes(str(uri))
            caches[key]["text_bytes"] = parts["token_text"]
            print(f"[bench] cached {key}: {stats['num_tokens']:,} tokens, {stats['total_bytes']:,} B")
    finally:
        if started_ray:
            ray.shutdown()
    return caches


def cache_bytes(uri: str) -> dict[str, int]:
    """Stored bytes of a cache's shards by part: `token_text` (the token text column / arrays), `tokens` (sequence
    ids, input ids, offsets, target mask), `targets` (every other column: head, normalizers, tails, entropy,
    samples) and `other` (file metadata and framing), from each shard's footer or zip directory."""
    from kdcache.read.reader import CacheReader

    reader = CacheReader(uri)
    parts = {"token_text": 0, "tokens": 0, "targets": 0, "other": 0}
    for unit in reader.units:
        columns = reader.format.column_bytes(bytes(reader.read_unit_bytes(unit)))
        for name, size in columns.items():
            if name.startswith("token_text"):
                parts["token_text"] += size
            elif name in ("seq_id", "seq_offsets", "input_id", "target_mask"):
                parts["tokens"] += size
            elif name.startswith(("target_", "log_normalizer", "tail_logprob", "entropy", "sample_")):
                parts["targets"] += size
            else:
                parts["other"] += size
        parts["other"] += unit["bytes"] - sum(columns.values())
    return parts


def batches(uri: str, *, batch_size: int, seed: int, tokenizer: Any, cross: bool, mapping: str):
    """Endless batches of a cache for a student with `tokenizer` (cross-tokenizer when `cross`)."""
    from kdcache.read.dataset import KDCacheDataset

    kwargs = {"tokenizer": tokenizer, "cross_tokenizer": True, "cross_mapping": mapping} if cross else {}
    ds = KDCacheDataset(uri, batch_size=batch_size, seed=seed, drop_last=True, pad_token_id=0, **kwargs)
    epoch = 0
    while True:
        ds.set_epoch(epoch)
        yield from ds
        epoch += 1


def make_loss(row: tuple, mode: str):
    """The row's loss: CE for hard labels; else `distillation_loss` with the forward KL on a cross-tokenizer batch
    (the mapped ids and the tail bucket) or the cache mode's loss on a same-tokenizer one, plus ULD if asked."""
    _, _, _, targets, alpha, _, uld = row
    if targets == "hard":
        return lambda logits, batch: losses.cross_entropy(logits, batch["labels"])

    def loss(logits, batch):
        kind = "forward_kl" if "unmapped_logprobs" in batch or mode == "topk" else "sampled_kl"
        total = losses.distillation_loss(logits, batch, kind=kind, alpha=alpha)
        return total + uld * losses.uld_loss(logits, batch) if uld else total

    return loss


def alignment_shares(uri: str, tokenizer: Any, mapping: str, sequences: int = 64) -> dict[str, float]:
    """Share of the student's positions by `xtok_kind` over the first batches of the cache."""
    stream = batches(uri, batch_size=8, seed=0, tokenizer=tokenizer, cross=True, mapping=mapping)
    counts = np.zeros(5)
    for _, batch in zip(range(max(1, sequences // 8)), stream):
        kinds = batch["xtok_kind"][batch["attention_mask"].bool()].numpy()
        counts += np.bincount(kinds, minlength=5)
    stream.close()
    names = ["none", "same next token", "boundary, other next token", "inside a teacher token", "hard label"]
    return {name: float(c / counts.sum()) for name, c in zip(names, counts)}


def format_table(rows: list[dict[str, Any]], teacher_bpb: float) -> str:
    lines = [
        "| student tokenizer | targets | bits per byte (held out) | Δ vs hard labels, same tokenizer | train s |",
        "|---|---|---:|---:|---:|",
        f"| teacher (reference) | — | {teacher_bpb:.3f} | — | — |",
    ]
    hard = {r["tokenizer"]: r["bpb"] for r in rows if r["targets"] == "hard labels"}
    for r in rows:
        bpb = r["bpb"]
        spread = f" ± {(max(bpb) - min(bpb)) / 2:.3f}" if len(bpb) > 1 else ""
        mean = sum(bpb) / len(bpb)
        base = hard[r["tokenizer"]]
        delta = "—" if r["targets"] == "hard labels" else f"{mean - sum(base) / len(base):+.3f}"
        lines.append(f"| {r['tokenizer']} | {r['targets']} | {mean:.3f}{spread} | {delta} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def run(settings: dict[str, Any], out: Path, *, assets_dir: Path, seed: int = 0) -> dict[str, Any]:
    from distill import write_train_subset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.demo.assets import prepare_demo

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    assets = prepare_demo(assets_dir, progress=False, **(settings["demo"] or {}))
    subset = write_train_subset(assets.train_dir, out / "data" / "train.jsonl", settings["train_kb"])
    caches = build_caches(assets.teacher_dir, Path(subset["path"]), out / "caches", settings)
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32).eval()
    tokenizers = {
        "teacher": AutoTokenizer.from_pretrained(assets.teacher_dir),
        "student": train_student_tokenizer(
            ev.read_texts(assets.train_dir), out / "student-tokenizer", settings["student_vocab"]
        ),
    }
    valid = held_out_texts(ev.read_texts(assets.valid_dir), settings["valid_texts"], settings["valid_bytes"])
    torch.set_num_threads(1)
    teacher_bpb = ev.bits_per_byte(teacher, tokenizers["teacher"], valid)
    train = tr.TrainSettings(steps=settings["steps"], batch_size=settings["batch"], eval_every=0, data_seed=seed)
    modes = {key: targets["mode"] for key, targets in CACHES.items()}
    results = []
    for index, row in enumerate(ROWS):
        label, who, cache, targets, alpha, mapping, uld = row
        tok = tokenizers[who]
        seeds = range(settings["seeds"]) if index in SEEDED else range(1)
        bpbs, seconds = [], 0.0
        for s in seeds:
            vocab = -(-len(tok) // 64) * 64
            model = ev.build_student(settings["student"], vocab_size=vocab, tokenizer=tok, seed=seed + s)
            stream = batches(
                caches[cache]["uri"],
                batch_size=train.batch_size,
                seed=seed + s,
                tokenizer=tok,
                cross=who == "student",
                mapping=mapping,
            )
            t0 = time.perf_counter()
            tr.train_student(model, stream, make_loss(row, modes[cache]), train)
            seconds += time.perf_counter() - t0
            stream.close()  # stops the dataset's background threads
            bpbs.append(ev.bits_per_byte(model, tok, valid))
        results.append(
            {
                "tokenizer": f"{who} ({len(tok):,})",
                "targets": label,
                "bpb": bpbs,
                "seconds": seconds / len(bpbs),
                "row": list(row),
            }
        )
        print(f"[bench] {who:8s} {label:40s} bpb {sum(bpbs) / len(bpbs):.4f}  ({seconds:.0f} s)", flush=True)
    shares = {m: alignment_shares(caches["hybrid"]["uri"], tokenizers["student"], m) for m in ("exact", "first")}
    table = format_table(results, teacher_bpb)
    report = {
        "settings": {k: (vars(v) if isinstance(v, ev.StudentSpec) else v) for k, v in settings.items()},
        "caches": caches,
        "teacher_bpb": teacher_bpb,
        "valid_texts": len(valid),
        "valid_bytes": sum(len(t.encode()) for t in valid),
        "alignment": shares,
        "results": results,
        "table": table,
        "seconds": time.perf_counter() - started,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "table.md").write_text(table + "\n")
    return report


def wait_for_reader_threads(timeout: float = 60.0) -> None:
    """Let the closed datasets' background threads (daemons; a batch may still be collating) end before the
    interpreter exits: one killed mid-batch at exit aborts the process."""
    import threading

    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith("kdcache-"):
            thread.join(max(0.0, deadline - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A student with another tokenizer trained from a kdcache cache.")
    parser.add_argument("--quick", action="store_true", help="tiny teacher, corpus and students (about a minute)")
    parser.add_argument("--out", type=Path, help="output folder (default .kdcache/bench-xtok[-quick])")
    parser.add_argument("--assets", type=Path, help="demo assets (default .kdcache/demo/assets; quick: in --out)")
    parser.add_argument("--steps", type=int, help="optimizer steps per student")
    parser.add_argument("--seeds", type=int, help="seeds of the main rows")
    parser.add_argument("--seed", type=int, default=0, help="first seed (student init and batch order)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("steps", "seeds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out = args.out or REPO / ".kdcache" / ("bench-xtok-quick" if args.quick else "bench-xtok")
    assets_dir = args.assets or (out / "assets" if args.quick else REPO / ".kdcache" / "demo" / "assets")
    report = run(settings, out, assets_dir=assets_dir, seed=args.seed)
    wait_for_reader_threads()
    print()
    print(report["table"])
    for key, info in report["caches"].items():
        share, per_token = info["text_bytes"] / info["bytes"], info["text_bytes"] / info["tokens"]
        print(f"cache {key}: {info['bytes']:,} B ({info['bytes_per_token']:.1f} B/token)", end="")
        print(f", token text {info['text_bytes']:,} B = {100 * share:.1f}% ({per_token:.2f} B/token)", end="")
        print(f", {100 * info['text_bytes'] / info['parts']['targets']:.1f}% of the targets' bytes")
    print(f"alignment of the student's positions: {json.dumps(report['alignment'], indent=1)}")
    print(f"held out: {report['valid_texts']} texts, {report['valid_bytes']:,} B; total {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
