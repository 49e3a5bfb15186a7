"""Capture overhead: kdcache's caching throughput against the bare teacher forward, plus a ``select_topk`` benchmark.

Two sections, each printed as a markdown table; every timing is the median over ``--reps`` rounds, and within a round
the compared paths run back to back (interleaved), so load from other processes hits them alike.

1. ``select_topk``: the current implementation against the previous one (kept below as ``select_topk_before``: a
   top-k mask with a cumsum over ties, full-width logsumexp passes per temperature, dense entropy) on random
   logits ``[rows, V]`` at each ``--topk-vocabs``.
2. Capture: a randomly initialised Llama (``--hidden``, ``--layers``, ``--vocab``; saved with ``save_pretrained`` and
   loaded through ``kdcache.capture.teacher.Teacher``) with a BPE tokenizer trained here with ``tokenizers`` on Python
   standard-library sources, which also form the corpus (one jsonl work unit of ~7k-token documents). On the
   exact padded batches the worker forms (``kdcache.capture.worker.make_batches`` over the unit's windows) it times

   - ``bare forward``: ``model(input_ids, attention_mask).logits`` (full logits: what a user pays anyway);
   - ``Teacher.compute_targets``: body + chunked lm_head + ``select_topk``, no encoding or I/O;
   - ``UnitWorker.process``: the whole unit (read, tokenize, forward, encode, write to a local directory, commit),
     with its own ``timing_s`` breakdown (its encoder thread encodes batch b while the teacher computes b + 1:
     ``encode_overlapped`` is the hidden encoding time, ``encode`` what is left after the last forward).

   The ratio is bare-forward time over end-to-end caching time (= caching throughput / bare throughput).

Run::

    python bench/capture.py                   # CPU: Llama hidden 512, 4 layers, V 32000; select_topk at V 32k, 128k
    python bench/capture.py --quick           # tiny model and small logits: ~10 s
    python bench/capture.py --device cuda --hidden 2048 --layers 8 --vocab 128256 --tokens 65536
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdcache.capture.targets import TokenTargets, select_topk  # noqa: E402

TOKENIZER_VOCAB = 8192  # BPE vocabulary trained here; the model's lm_head may have more rows (padded vocab)
HEAD_LOGIT_STD = 4.0  # nats; the lm_head is re-drawn so distributions are peaked like a trained teacher's
CHARS_PER_TOKEN = 2  # of the stdlib corpus under the BPE trained here (measured ~2.1): sizes the corpus
SWEEP_MAX_TOKENS = 2**18  # largest unit of the real-token-fraction sweep (tokenization only, ~seconds)
DOC_CHARS = 24000  # characters per corpus document (stdlib files joined): ~7k tokens, ~14 windows of 512


# --------------------------------------------------------------------------------------------------- select_topk


def select_topk_before(logits: torch.Tensor, k: int, temperatures: Sequence[float]) -> TokenTargets:
    """The previous ``select_topk`` (validation trimmed), kept as the baseline of the micro-benchmark."""
    z = logits.float()
    if bool(torch.isnan(z).any()) or bool(torch.isposinf(z).any()):
        raise ValueError("logits hold NaN or +inf")
    kth = torch.topk(z, k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values
    above, at_kth = z > kth, z == kth
    n_needed = k - above.sum(dim=-1, keepdim=True, dtype=torch.int32)
    keep = above | (at_kth & (at_kth.cumsum(dim=-1, dtype=torch.int32) <= n_needed))
    ids = keep.nonzero()[:, 1].reshape(z.shape[0], k)
    z_rest = z.masked_fill(keep, float("-inf"))
    log_norms, tails = [], []
    for t in temperatures:
        scaled, scaled_rest = (z, z_rest) if t == 1.0 else (z / t, z_rest / t)
        log_norm = torch.logsumexp(scaled, dim=-1)
        log_norms.append(log_norm)
        tails.append(torch.logsumexp(scaled_rest, dim=-1) - log_norm)
    logp = z - log_norms[0].unsqueeze(-1)
    plogp = torch.where(torch.isneginf(logp), 0.0, logp.exp() * logp)
    return TokenTargets(
        ids=ids,
        logprobs=logp.gather(-1, ids),
        log_normalizers=torch.stack(log_norms, dim=-1),
        tail_logprobs=torch.stack(tails, dim=-1),
        entropy=(-plogp.sum(dim=-1)).clamp_min(0.0),
    )


def bench_select_topk(
    vocabs: Sequence[int], rows: int, k: int, temperatures: Sequence[float], reps: int, device: str
) -> list[dict[str, Any]]:
    """Median seconds of ``select_topk_before`` and ``select_topk`` on the same ``[rows, V]`` logits, interleaved."""
    results = []
    for vocab in vocabs:
        gen = torch.Generator().manual_seed(vocab)
        logits = (torch.randn(rows, vocab, generator=gen) * HEAD_LOGIT_STD).to(device)
        times: dict[str, list[float]] = {"before": [], "after": []}
        outputs: dict[str, TokenTargets] = {}
        for _ in range(reps):
            for name, fn in (("before", select_topk_before), ("after", select_topk)):
                _sync(device)
                start = time.perf_counter()
                outputs[name] = fn(logits, k, temperatures)
                _sync(device)
                times[name].append(time.perf_counter() - start)
        if not torch.equal(outputs["before"].ids, outputs["after"].ids):
            raise RuntimeError(f"V={vocab}: select_topk and the baseline keep different ids")
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        results.append(
            {"vocab": vocab, "rows": rows, "k": k, "temperatures": list(temperatures)}
            | {"before_s": before, "after_s": after, "speedup": before / after}
        )
    return results


# ------------------------------------------------------------------------------------------------------ capture


def corpus_texts(target_chars: int) -> list[str]:
    """Deterministic text every Python install has: stdlib sources joined into documents of ~``DOC_CHARS`` each.

    Documents longer than a window make most windows full-length, as in a corpus of code or books; then padding
    saves the cached path almost nothing, so the measured ratio is the conservative one.
    """
    docs, current, total = [], "", 0
    for path in _stdlib_sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        take = text[: DOC_CHARS - len(current)]
        current += take
        total += len(take)
        if len(current) >= DOC_CHARS or total >= target_chars:
            docs.append(current)
            current = ""
        if total >= target_chars:
            break
    return docs + ([current] if current else [])


@functools.cache
def _stdlib_sources() -> tuple[Path, ...]:
    """The standard library's ``.py`` files in a fixed order (site-packages excluded)."""
    root = Path(os.__file__).parent
    return tuple(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts))


def build_teacher_dir(
    out_dir: Path, *, hidden: int, layers: int, vocab: int, max_length: int, device: str = "cpu", train_chars: int
) -> Path:
    """Save a random-weight Llama (initialised on ``device``) and a BPE tokenizer trained on stdlib sources."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    heads = max(1, hidden // 64)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3 + 63) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(max_length, 128),
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):  # a GPU initialises a 1B model in a second, a CPU in tens of seconds
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, HEAD_LOGIT_STD / hidden**0.5)
    model.save_pretrained(out_dir)
    del model

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, TOKENIZER_VOCAB), special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False
    )
    backend.train_from_iterator(corpus_texts(train_chars), trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_worker(model_dir: Path, out_uri: str, args: argparse.Namespace):
    """A ``UnitWorker`` with settings built by hand (no job config), writing Parquet shards to ``out_uri``."""
    from kdcache.capture.worker import UnitWorker, WorkerSettings
    from kdcache.config import load_config

    cfg = load_config(
        None,
        [
            f"teacher.model={model_dir}",
            f"teacher.dtype={args.dtype}",
            f"teacher.chunk_bytes={'null' if args.chunk_bytes is None else args.chunk_bytes}",
            "data.source=unused",
            f"data.max_length={args.max_length}",
            f"targets.k={args.k}",
            f"targets.temperatures={list(args.temperatures)}",
            f"output.uri={out_uri}",
            f"cluster.batch_tokens={args.batch_tokens}",
        ],
    )
    return UnitWorker(WorkerSettings.from_config(cfg, fingerprint="bench-capture"), device=args.device)


def padded_batches(worker, unit: dict[str, Any]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int]:
    """The padded (ids, mask) batches ``UnitWorker.process`` forms for ``unit``, with real and padded token counts."""
    from kdcache.capture.worker import make_batches, pad_batch

    windows, _ = worker.read_windows(unit)
    lengths = [len(w.input_ids) for w in windows]
    batches = [
        pad_batch([windows[i].input_ids for i in b]) for b in make_batches(lengths, worker.settings.batch_tokens)
    ]
    return batches, sum(lengths), sum(int(ids.numel()) for ids, _ in batches)


def bench_capture(args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of each capture path over ``args.reps`` interleaved rounds, and the derived ratios."""
    with tempfile.TemporaryDirectory(prefix="kdcache-capture-") as tmp:
        root = Path(tmp)
        model_dir = build_teacher_dir(
            root / "teacher",
            hidden=args.hidden,
            layers=args.layers,
            vocab=args.vocab,
            max_length=args.max_length,
            device=args.device,
            train_chars=50_000 if args.quick else 400_000,
        )
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(args.tokens * CHARS_PER_TOKEN)))
        worker = make_worker(model_dir, str(root / "cache"), args)
        size = data.stat().st_size
        unit = {"unit_id": "u", "index": 0, "url": str(data), "kind": "bytes", "start": 0, "stop": size}
        unit["size_bytes"] = size
        batches, real, padded = padded_batches(worker, unit)
        teacher = worker.teacher
        model = teacher.model

        def bare() -> None:
            with torch.inference_mode():
                for ids, mask in batches:
                    ids, mask = ids.to(teacher.device), mask.to(teacher.device)
                    model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # noqa: B018

        def targets() -> None:
            for ids, mask in batches:
                teacher.compute_targets(ids, mask, k=args.k, temperatures=args.temperatures)

        records: dict[str, list[dict[str, Any]]] = {"process": []}
        paths: dict[str, Callable[[int], None]] = {
            "bare forward": lambda r: bare(),
            "Teacher.compute_targets": lambda r: targets(),
            "UnitWorker.process": lambda r: records["process"].append(worker.process({**unit, "unit_id": f"u{r}"})),
        }
        for run in paths.values():  # warm-up: first-call costs (imports, thread pools, lazy init) are not counted
            run(-1)
        records = {name: [] for name in records}
        times: dict[str, list[float]] = {name: [] for name in paths}
        cpu_times: dict[str, list[float]] = {name: [] for name in paths}
        for rep in range(args.reps):
            for name, run in paths.items():
                _sync(args.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                run(rep)
                _sync(args.device)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
        first = records["process"][0]
        if (first["num_tokens"], first["padded_tokens"]) != (real, padded):
            raise RuntimeError(f"the worker formed other batches than the benchmark: {first} vs {real}/{padded}")
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        minima = {name: min(ts) for name, ts in times.items()}
        cpu = {name: statistics.median(ts) for name, ts in cpu_times.items()}
        sweep_sizes = [args.tokens * f for f in (1, 4, 16, 64) if f == 1 or args.tokens * f <= SWEEP_MAX_TOKENS]
        sweep = real_fraction_by_unit_size(worker, root, sweep_sizes)
        breakdown = {
            key: statistics.median(r["timing_s"][key] for r in records["process"])
            for key in ("read", "forward", "encode", "write", "total")
        }
        overlapped = statistics.median(r["timing_s"]["encode_overlapped"] for r in records["process"])
    return {
        "device": str(teacher.device),
        "dtype": str(teacher.dtype).removeprefix("torch."),
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "k": args.k,
        "temperatures": list(args.temperatures),
        "num_batches": len(batches),
        "real_tokens": real,
        "padded_tokens": padded,
        "real_token_fraction": real / padded,
        "seconds": medians,
        "seconds_min": minima,
        "cpu_seconds": cpu,
        "real_token_fraction_by_unit_tokens": sweep,
        "process_timing_s": breakdown,
        "process_encode_overlapped_s": overlapped,
        "ratio": medians["bare forward"] / medians["UnitWorker.process"],
        "ratio_compute_targets": medians["bare forward"] / medians["Teacher.compute_targets"],
        "ratio_min": minima["bare forward"] / minima["UnitWorker.process"],
        "ratio_cpu": cpu["bare forward"] / cpu["UnitWorker.process"],
        "ratio_compute_targets_cpu": cpu["bare forward"] / cpu["Teacher.compute_targets"],
        "reps": args.reps,
        "threads": torch.get_num_threads(),
    }


def real_fraction_by_unit_size(worker, root: Path, unit_tokens: Sequence[int]) -> list[dict[str, Any]]:
    """Real-token fraction of ``make_batches`` on larger units of the same corpus (tokenization only, no forward)."""
    from kdcache.capture.worker import make_batches

    out = []
    for tokens in unit_tokens:
        path = root / f"sweep-{tokens}.jsonl"
        texts = corpus_texts(tokens * CHARS_PER_TOKEN)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        size = path.stat().st_size
        unit = {"unit_id": f"s{tokens}", "index": 0, "url": str(path), "kind": "bytes", "start": 0, "stop": size}
        windows, _ = worker.read_windows(unit | {"size_bytes": size})
        lengths = [len(w.input_ids) for w in windows]
        padded = sum(len(b) * lengths[b[0]] for b in make_batches(lengths, worker.settings.batch_tokens))
        out.append(
            {"unit_tokens": sum(lengths), "windows": len(lengths), "real_token_fraction": sum(lengths) / padded}
        )
    return out


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------- main


def print_topk_table(rows: list[dict[str, Any]]) -> None:
    print("| V | rows | k | temperatures | before (s) | after (s) | speedup |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        temps = ", ".join(f"{t:g}" for t in r["temperatures"])
        print(
            f"| {r['vocab']:,} | {r['rows']} | {r['k']} | {temps} | {r['before_s']:.3f} | {r['after_s']:.3f} "
            f"| {r['speedup']:.1f}x |"
        )


def print_capture_table(c: dict[str, Any]) -> None:
    real = c["real_tokens"]
    print("| path | wall s (median) | wall s (min) | CPU s (median) | tokens/s | vs bare (wall) | vs bare (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    bare, bare_cpu = c["seconds"]["bare forward"], c["cpu_seconds"]["bare forward"]
    for name, seconds in c["seconds"].items():
        low, cpu = c["seconds_min"][name], c["cpu_seconds"][name]
        print(
            f"| {name} | {seconds:.3f} | {low:.3f} | {cpu:.3f} | {real / seconds:,.0f} | {bare / seconds:.3f} "
            f"| {bare_cpu / cpu:.3f} |"
        )
    timing = ", ".join(f"{key} {value:.3f}" for key, value in c["process_timing_s"].items())
    print(f"\nUnitWorker.process timing_s (median): {timing}")
    print(f"encoding overlapped with the forwards (encoder thread, median): {c['process_encode_overlapped_s']:.3f} s")
    print(
        f"real tokens {real:,} of {c['padded_tokens']:,} padded in {c['num_batches']} batches: "
        f"real-token fraction {c['real_token_fraction']:.3f} (goal >= 0.95)"
    )
    sweep = ", ".join(
        f"{r['unit_tokens']:,} tokens ({r['windows']} windows): {r['real_token_fraction']:.3f}"
        for r in c["real_token_fraction_by_unit_tokens"]
    )
    print(f"real-token fraction of make_batches at larger units of this corpus: {sweep}")
    verdict = "met" if c["ratio"] >= 0.9 else "NOT met"
    print(
        f"caching / bare-forward throughput ratio = {c['ratio']:.3f} (wall, median; goal >= 0.9: {verdict}); "
        f"{c['ratio_min']:.3f} (wall, min); {c['ratio_cpu']:.3f} (CPU time, median); "
        f"{c['reps']} interleaved rounds, {c['threads']} threads"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and small logits (seconds; for tests)")
    parser.add_argument("--device", default="cpu", help="torch device of the teacher and of the logits")
    parser.add_argument("--dtype", default=None, help="teacher dtype (default: float32 on cpu, bfloat16 otherwise)")
    parser.add_argument("--hidden", type=int, default=None, help="Llama hidden size (default 512; quick 64)")
    parser.add_argument("--layers", type=int, default=None, help="Llama layers (default 4; quick 2)")
    parser.add_argument("--vocab", type=int, default=None, help="lm_head rows (default 32000; quick 512)")
    parser.add_argument("--tokens", type=int, default=None, help="approximate corpus tokens (default 6144)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per window (data.max_length)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per batch (default 2048)")
    parser.add_argument(
        "--chunk-bytes", type=int, default=None, help="Teacher chunk_bytes (bytes; default by device: 64 MiB on CPU)"
    )
    parser.add_argument("--k", type=int, default=64, help="top-k ids kept")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0], help="stored temperatures")
    parser.add_argument("--reps", type=int, default=None, help="interleaved rounds (median reported; default 5)")
    parser.add_argument(
        "--topk-vocabs", type=int, nargs="*", default=None, help="select_topk V (default 32000 128256)"
    )
    parser.add_argument("--topk-rows", type=int, default=None, help="select_topk rows per call (default 523)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "hidden": 64 if quick else 512,
        "layers": 2 if quick else 4,
        "vocab": 512 if quick else 32000,
        "tokens": 1024 if quick else 6144,
        "batch_tokens": 1024 if quick else 2048,
        "reps": 3 if quick else 5,
        "topk_vocabs": [4096] if quick else [32000, 128256],
        "topk_rows": 64 if quick else 523,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick and args.max_length == 512:
        args.max_length = 128
    if args.dtype is None:
        args.dtype = "float32" if torch.device(args.device).type == "cpu" else "bfloat16"
    if args.temperatures[0] != 1.0 or any(not math.isfinite(t) or t <= 0 for t in args.temperatures):
        parser.error("--temperatures must start with 1.0 and be finite and > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(
        f"# capture benchmark ({'quick' if args.quick else 'full'}; {args.device}, {torch.get_num_threads()} threads)"
    )
    out: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if args.topk_vocabs:
        print("\n## select_topk: before vs after (median seconds per call)\n")
        out["select_topk"] = bench_select_topk(
            args.topk_vocabs, args.topk_rows, args.k, args.temperatures, max(args.reps, 3), args.device
        )
        print_topk_table(out["select_topk"])
    print(
        f"\n## capture overhead: Llama hidden {args.hidden}, {args.layers} layers, V {args.vocab:,}, "
        f"{args.dtype}, k {args.k}, batch_tokens {args.batch_tokens}, max_length {args.max_length}\n"
    )
    out["capture"] = bench_capture(args)
    print_capture_table(out["capture"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
