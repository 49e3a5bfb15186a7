"""Teacher-side peak extra memory at a Llama-3-sized vocabulary: chunked head (kdcache) vs naive full logits.

Builds a tiny-hidden Llama with ``vocab_size=128256`` from a config (random weights), saves it, and runs each path
in its own subprocess on the same random batch:

- ``chunked``: ``kdcache.capture.teacher.Teacher.compute_targets`` (body once, lm_head + ``select_topk`` per chunk of
  ``chunk_bytes`` float32 logits);
- ``naive``: ``model(ids).logits`` (the full ``[B, L, V]`` float32 logits) -> ``log_softmax`` -> ``topk``.

Peak extra memory is the peak resident set size (``VmHWM``) during the call minus the resident set just before it,
with the high-water mark reset (``/proc/self/clear_refs``) after the model is loaded, so loading transients do not
count. torch's CPU allocations are invisible to tracemalloc, hence RSS. Linux only.

Run::

    python bench/memory.py                    # 8 x 2048 tokens, V = 128256, k = 64, T in {1, 2}
    python bench/memory.py --batch 2 --seq 512 --quick-check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB_SIZE = 128256  # Llama 3 vocabulary (logit rows)
HIDDEN_SIZE = 64  # tiny body: the head's logits, not the body, dominate memory
MIB = 2**20


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}; this benchmark needs Linux")
    return int(match.group(1))


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def build_model(out_dir: Path, vocab_size: int) -> Path:
    """Save a 1-layer Llama with a tiny hidden size and a full-size vocabulary (random weights)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # logits of std ~4, so top-k is not decided by rounding noise
        model.lm_head.weight.normal_(0.0, 4.0 / HIDDEN_SIZE**0.5)
    model.save_pretrained(out_dir)
    return out_dir


def _child(args: argparse.Namespace) -> None:
    """Run one path in this process and print one JSON line with its memory and time."""
    import torch

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    mask = torch.ones_like(ids)
    temperatures = [1.0, 2.0]
    if args.child == "chunked":
        from kdcache.capture.teacher import Teacher

        teacher = Teacher(args.model, dtype="float32", device="cpu", chunk_bytes=args.chunk_bytes)

        def run_on(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return teacher.compute_targets(ids, mask, k=args.k, temperatures=temperatures).ids
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

        def run_on(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, L, V] float32
                logp = torch.log_softmax(logits.float(), dim=-1)
                return torch.topk(logp, args.k, dim=-1).indices

    warm = (ids[:1, :16], mask[:1, :16])  # first-call costs (lazy init, thread pools) are not the path's memory
    run_on(*warm)
    del warm
    _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = run_on(ids, mask)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {"path": args.child, "rss_before_mib": before / 1024, "peak_extra_mib": (peak - before) / 1024}
            | {"seconds": seconds, "tokens": int(mask.sum()), "out_shape": list(out.shape)}
        )
    )


def _check_room_for_naive(tokens: int, vocab: int) -> None:
    """Refuse to start the naive path when it would not fit: an OOM kill can hit other processes on the machine."""
    need_mib = 2 * tokens * vocab * 4 / MIB * 1.05 + 1024  # logits + log_softmax, 5% + 1 GiB of slack
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    available_mib = int(match.group(1)) / 1024 if match else float("inf")
    if need_mib > available_mib:
        raise SystemExit(
            f"the naive path needs ~{need_mib:,.0f} MiB but only {available_mib:,.0f} MiB are available now; "
            "use a smaller --batch/--seq or --paths chunked"
        )


def _run_child(path: str, model_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--model", str(model_dir)]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab), "--k", str(args.k)]
    cmd += ["--chunk-bytes", str(args.chunk_bytes), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"{path} path failed (exit {done.returncode}; killed for memory if -9):\n{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from kdcache.capture.teacher import default_chunk_bytes

    default_chunk = default_chunk_bytes("cpu")  # what a CPU Teacher uses when chunk_bytes is not set
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=VOCAB_SIZE, help="vocabulary size (logit rows)")
    parser.add_argument("--k", type=int, default=64, help="top-k ids kept")
    parser.add_argument("--chunk-bytes", type=int, default=default_chunk, help="Teacher chunk_bytes (bytes)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per subprocess")
    parser.add_argument("--paths", default="naive,chunked", help="comma-separated paths to run")
    parser.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    tokens = args.batch * args.seq
    print(
        f"V={args.vocab:,}, hidden {HIDDEN_SIZE}, {args.batch} x {args.seq} = {tokens:,} tokens, k={args.k}, "
        f"temperatures [1, 2], chunk_bytes={args.chunk_bytes / MIB:.0f} MiB, {args.threads} threads; "
        f"full float32 logits alone = {tokens * args.vocab * 4 / MIB:,.0f} MiB"
    )
    paths = args.paths.split(",")
    if "naive" in paths:
        _check_room_for_naive(tokens, args.vocab)
    with tempfile.TemporaryDirectory(prefix="kdcache-membench-") as tmp:
        model_dir = build_model(Path(tmp) / "model", args.vocab)
        results = {}
        for path in paths:
            if path == "naive":  # memory may have been taken since the first check
                _check_room_for_naive(tokens, args.vocab)
            results[path] = _run_child(path, model_dir, args)
    print()
    print("| path | peak extra memory (MiB) | time (s) | tokens/s |")
    print("|---|---:|---:|---:|")
    for path, r in results.items():
        print(f"| {path} | {r['peak_extra_mib']:,.0f} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} |")
    if {"naive", "chunked"} <= results.keys():
        ratio = results["chunked"]["peak_extra_mib"] / results["naive"]["peak_extra_mib"]
        verdict = "met" if ratio <= 1 / 8 else "NOT met"
        print(f"\nchunked / naive peak extra memory = {ratio:.3f} (target <= 0.125: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
