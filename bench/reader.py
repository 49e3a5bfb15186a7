"""Reader throughput: KDCacheDataset batches vs a raw pyarrow scan of the same shards, one process, local disk.

    .venv/bin/python bench/reader.py                       # ~205k tokens, vocab 32k, k = 64, 8 units
    .venv/bin/python bench/reader.py --tokens 1024000 --units 16 --json

Builds a synthetic cache (random sorted ids and log-probs, no model) with the real shard writer and manifest, then
times `--repeats` interleaved rounds (every measurement once per round, so background load on a shared machine hits
all of them alike) and reports the best and the median round:

- raw scan (the baseline): `pyarrow.parquet.read_table` of every shard file, pyarrow's defaults (its thread pool):
  decompression only, no checksum, no decoding;
- decoded: `CacheReader.read_unit` of every unit (fetch + crc32 + decompression + decoding to numpy);
- dataset: iterating `KDCacheDataset` (shuffled, batch_size sequences, background prefetch threads) to collated
  torch batches (int64 ids, float32 log-probs), with no read-time choice; without prefetch (everything in the
  calling thread); prefetching 4 units (a whole shuffle window) instead of 2; with top_k = k / 2 and a cached
  temperature; from a memory:// copy of the cache through a warm local disk cache (`local_cache_dir`); and through
  a DataLoader with 2 worker processes (each worker reads every unit: tokens/s counts the batches the loader
  yields, not the work done).

Tokens/s counts real (unpadded) token positions. "tok/cpu-s" divides by the process CPU time of the measurement
(all its threads; worker processes are not counted): tokens per second per core, comparable however busy the
machine is. `--breakdown` also times each step of the reader alone, one thread, in CPU ns per token.

Reading at cluster scale (`--cluster`, instead of the table above):

    .venv/bin/python bench/reader.py --cluster --tokens 2000000 --units 512 --seq-len 256 --world-sizes 1,8,64 \
        --before 859eb54

serves the cache over HTTP from a byte-counting server on 127.0.0.1 (`bench/counting_server.py`, read by fsspec's
http filesystem) and simulates the ranks of each world size W one after the other in this process, each a
`KDCacheDataset(rank=r, world_size=W)` read to the end of the epoch. For each W it reports the shard bytes all
ranks fetched / the cache's shard bytes, and tokens/s of one rank (median over ranks: the tokens the rank trains on
/ its wall time; ranks of a real cluster run at once on their own cores) for: partitioned (`num_partitions=W`, the
default); one partition shared by all ranks (`num_partitions=1`); and, with `--before COMMIT`, the reader of that
commit (imported from a renamed copy of its package). The baselines run `--baseline-ranks` ranks only and scale
their bytes by W / ranks (their ranks are symmetric: each reads from every window). It also states the shuffle's
quality from the order alone (index arithmetic): how far apart two consecutive sequences of a unit land in the
epoch (mean distance / epoch length; a uniform shuffle gives 1/3), the share of them in the same global batch, and
how many distinct units a global batch draws from.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from kdcache.capture.targets import TokenTargets
from kdcache.codec import CodecParams
from kdcache.formats.memory import read_pooled
from kdcache.formats.parquet import SUFFIX, ShardWriter, read_table, rows_from_table
from kdcache.formats.rows import logprob_table
from kdcache.losses.compact import expand_targets
from kdcache.manifest import FORMAT_VERSION, INDEX_KEY, build_manifest, dumps, shard_key
from kdcache.read.collate import collate_sequences, cumsum_rows
from kdcache.read.dataset import KDCacheDataset
from kdcache.read.reader import open_cache
from kdcache.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from counting_server import CountingServer  # noqa: E402

TEMPERATURES = (1.0, 2.0)


def build_cache(uri: str, *, tokens: int, vocab: int, k: int, seq_len: int, units: int, seed: int = 0) -> dict:
    """A complete cache of random targets: `tokens` positions in sequences of `seq_len`, spread over `units`."""
    rng = np.random.default_rng(seed)
    store = Store(uri)
    num_seqs = max(tokens // seq_len, 1)
    per_unit = np.diff(np.linspace(0, num_seqs, units + 1).astype(int))
    inputs = {
        "format_version": FORMAT_VERSION,
        "teacher": {"model": "bench", "revision": None, "dtype": "bfloat16", "padded_vocab_size": vocab},
        "tokenizer": {"name": "bench", "hash": "bench", "vocab_size": vocab},
        "targets": {"mode": "topk", "k": k, "temperatures": list(TEMPERATURES)},
        "codec": CodecParams().to_dict(),
        "windowing": {"max_length": seq_len, "min_length": 1, "add_eos": True},
        "data": {"source": "bench"},
        "shard_format": "parquet",
    }
    entries, seq_id = [], 0
    for u, n in enumerate(per_unit):
        writer = ShardWriter(k=k, num_temperatures=len(TEMPERATURES), vocab_size=vocab)  # as the worker writes
        for _ in range(n):
            ids = np.cumsum(rng.integers(1, vocab // k, size=(seq_len, k)), axis=1) - 1  # ascending, < vocab
            lps = -0.5 - rng.exponential(3.0, size=(seq_len, k)).astype(np.float32)
            norms = rng.normal(10.0, 1.0, size=(seq_len, len(TEMPERATURES))).astype(np.float32)
            tails = -rng.uniform(0.2, 4.0, size=(seq_len, len(TEMPERATURES))).astype(np.float32)
            entropy = rng.uniform(0.0, 5.0, size=seq_len).astype(np.float32)
            input_ids = rng.integers(0, vocab, size=seq_len).astype(np.int32)
            writer.add(seq_id, input_ids, TokenTargets(ids, lps, norms, tails, entropy))
            seq_id += 1
        data = writer.finish()
        path = shard_key(f"unit{u:04d}", "a0", SUFFIX)
        store.write_bytes(path, data)
        entries.append(
            {
                "unit_id": f"unit{u:04d}",
                "path": path,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "crc32": zlib.crc32(data),  # as the worker records it: the reader checks it on every read
                "num_sequences": writer.num_sequences,
                "num_tokens": writer.num_tokens,
            }
        )
    fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    manifest = build_manifest(
        fingerprint=fingerprint,
        fingerprint_inputs=inputs,
        units=entries,
        shard_format="parquet",
        shard_suffix=".parquet",
    )
    store.write_bytes(INDEX_KEY, dumps(manifest))
    return manifest


def interleaved(repeats: int, runs: dict[str, Callable[[], int]]) -> dict[str, dict[str, list[float] | int]]:
    """{name: {"wall": [seconds per round], "cpu": [process CPU seconds per round], "tokens": n}}; the runs are
    interleaved round by round, so background load on a shared machine hits every measurement alike."""
    out: dict[str, dict] = {name: {"wall": [], "cpu": []} for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            cpu, start = time.process_time(), time.perf_counter()
            out[name]["tokens"] = fn()
            out[name]["wall"].append(time.perf_counter() - start)
            out[name]["cpu"].append(time.process_time() - cpu)
    return out


def breakdown(uri: str, *, batch_size: int, repeats: int) -> dict[str, float]:
    """CPU nanoseconds per token of each step of the reader, one thread, best of `repeats` (no prefetch, no
    overlap): where a batch's time goes. The raw scan's own cost is measured alike."""
    cache = open_cache(uri)
    units, tokens = cache.units, cache.num_tokens
    paths = [os.path.join(uri, u["path"]) for u in units]
    table = logprob_table(cache.codec)

    def read() -> list:
        out = []
        for path, u in zip(paths, units):
            with open(path, "rb") as f:
                out.append(read_pooled(f, u["bytes"]))
        return out

    blobs = read()
    tables = [read_table(b) for b in blobs]
    decode = dict(k=cache.k, num_temperatures=len(cache.temperatures), codec=cache.codec, vocab_size=cache.vocab)
    rows = [rows_from_table(t, **decode) for t in tables]
    seqs = [r.sequence(i) for r in rows for i in range(r.num_sequences)]
    batches = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]

    def ids() -> None:
        for batch in batches:
            out = np.empty((len(batch), max(len(s["input_ids"]) for s in batch), cache.k), np.int64)
            for i, s in enumerate(batch):
                cumsum_rows(s["target_steps"], out[i, : len(s["target_steps"])])

    def logprobs() -> None:
        for batch in batches:
            out = np.empty((len(batch), max(len(s["input_ids"]) for s in batch), cache.k), np.float32)
            for i, s in enumerate(batch):
                np.take(table, s["target_codes"], out=out[i, : len(s["target_codes"])], mode="wrap")

    def collate() -> None:
        for batch in batches:
            collate_sequences(batch, k=cache.k, num_temperatures=len(cache.temperatures), logprob_table=table)

    steps = {
        "raw: pyarrow.parquet.read_table": lambda: [pq.read_table(p) for p in paths],
        "shard bytes into memory": read,
        "sha256 (verify --deep)": lambda: [hashlib.sha256(b).hexdigest() for b in blobs],
        "crc32 (every read)": lambda: [zlib.crc32(b) for b in blobs],
        "Arrow decompression (ParquetFile.read)": lambda: [read_table(b) for b in blobs],
        "unit decode (id steps, side columns)": lambda: [rows_from_table(t, **decode) for t in tables],
        "collate_sequences, all of it": collate,
        "  of which ids (cumsum into int64)": ids,
        "  of which log-probs (table look-up)": logprobs,
    }
    out = {}
    for name, fn in steps.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        out[name] = round(best / tokens * 1e9, 1)
    return out


def order_quality(ds: KDCacheDataset, world_size: int, num_partitions: int) -> dict[str, float]:
    """Shuffle quality of epoch 0's order, from index arithmetic alone: where consecutive sequences of a unit land
    (mean |distance| / epoch length: 1/3 for a uniform shuffle; the share that land in the same global batch) and the
    distinct units per global batch (mean), for `world_size` ranks and `num_partitions` partitions."""
    units, order = ds.epoch_order(0, world_size=world_size, num_partitions=num_partitions)
    n = order.num_sequences
    pieces, rows, _ = order.lookup(np.arange(n))
    unit = units.unit[order.piece_unit[pieces]]  # the source's manifest unit (one source here)
    key = np.lexsort((rows, unit))  # positions sorted by (unit, row)
    pos = np.arange(n)[key]
    same_unit = (unit[key][1:] == unit[key][:-1]) & (rows[key][1:] == rows[key][:-1] + 1)
    distance = np.abs(pos[1:] - pos[:-1])[same_unit]
    g = ds.batch_size * world_size
    per_batch = [len(np.unique(unit[b : b + g])) for b in range(0, n, g)]
    return {
        "neighbour_distance": round(float(distance.mean() / n), 4),
        "neighbours_in_same_global_batch": round(float((pos[1:] // g == pos[:-1] // g)[same_unit].mean()), 4),
        "units_per_global_batch": round(float(np.mean(per_batch)), 1),
    }


def import_before(commit: str, into: str) -> type:
    """`KDCacheDataset` of the package at `commit` (the reader before partitioned reading), imported from a renamed
    copy (`kdcache_before`) so that both run in this process on the same cache."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "kdcache"], capture_output=True, check=True)
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(into, filter="data")
    os.rename(os.path.join(into, "kdcache"), os.path.join(into, "kdcache_before"))
    for path in Path(into, "kdcache_before").rglob("*.py"):
        path.write_text(re.sub(r"\bkdcache(?=\.|\s+import)", "kdcache_before", path.read_text()))
    sys.path.insert(0, into)
    return importlib.import_module("kdcache_before.dataset").KDCacheDataset


def cluster(
    uri: str, root: str, *, world_sizes: list[int], batch_size: int, baseline_ranks: int, before: type | None
) -> dict:
    """Fetched bytes / cache bytes and per-rank tokens/s at each world size: partitioned (num_partitions = W), one
    partition shared by all ranks, and the reader before partitioned reading (`before`, if given), over a
    byte-counting HTTP server (see the module docstring)."""
    cache = open_cache(uri)
    cache_bytes = sum(int(u["bytes"]) for u in cache.units)
    prefix = os.path.relpath(uri, root) + "/shards/"
    out: dict[str, dict] = {}
    with CountingServer(root) as server:
        url = f"{server.url}/{os.path.relpath(uri, root)}"
        for world in world_sizes:
            variants = {"partitioned": world, "one_partition": 1, "before": None}
            for name, partitions in variants.items():
                if (name != "partitioned" and world == 1) or (name == "before" and before is None):
                    continue  # at one rank all read the same; no baseline package
                ranks = list(range(world)) if name == "partitioned" else list(range(min(world, baseline_ranks)))
                server.reset()
                rates = []
                for rank in ranks:
                    start = time.perf_counter()
                    kw = {"batch_size": batch_size, "rank": rank, "world_size": world, "seed": 0}
                    ds = (
                        before(url, **kw)
                        if partitions is None
                        else KDCacheDataset(url, num_partitions=partitions, **kw)
                    )
                    n = sum(int(b["attention_mask"].sum()) for b in ds)
                    rates.append(n / (time.perf_counter() - start))
                fetched = server.sent_bytes(prefix) * world / len(ranks)  # ranks not run fetch alike (symmetric)
                row = {"world_size": world, "num_partitions": partitions, "ranks_run": len(ranks)}
                row |= {"fetched_over_cache": round(fetched / cache_bytes, 3)}
                row |= {"rank_tokens_per_s_median": round(statistics.median(rates))}
                row |= {"cluster_tokens_per_s": round(statistics.median(rates) * world)}
                if partitions is not None:
                    row |= order_quality(KDCacheDataset(uri, batch_size=batch_size, seed=0), world, partitions)
                out[f"W={world} {name}"] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=204_800, help="token positions in the cache")
    p.add_argument("--vocab", type=int, default=32_000, help="teacher vocabulary")
    p.add_argument("-k", type=int, default=64, help="top-k entries per token")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--units", type=int, default=8, help="work units (shards)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (best and median are reported)")
    p.add_argument("--dir", default=None, help="where to build the cache (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--breakdown", action="store_true", help="also time each step of the reader alone (ns/token)")
    p.add_argument("--cluster", action="store_true", help="measure fetched bytes at --world-sizes instead")
    p.add_argument("--world-sizes", default="1,8,64", help="simulated world sizes for --cluster (comma-separated)")
    p.add_argument("--baseline-ranks", type=int, default=8, help="ranks run for the baselines (symmetric ranks)")
    p.add_argument("--before", default=None, help="git commit of the reader to compare with (--cluster)")
    args = p.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        uri = os.path.join(tmp, "cache")
        start = time.perf_counter()
        manifest = build_cache(
            uri, tokens=args.tokens, vocab=args.vocab, k=args.k, seq_len=args.seq_len, units=args.units
        )
        build_s = time.perf_counter() - start
        if args.cluster:
            sizes = [int(w) for w in args.world_sizes.split(",")]
            before = import_before(args.before, os.path.join(tmp, "before")) if args.before else None
            results = cluster(
                uri,
                tmp,
                world_sizes=sizes,
                batch_size=args.batch_size,
                baseline_ranks=args.baseline_ranks,
                before=before,
            )
            stats = manifest["stats"]
            info = {"tokens": stats["num_tokens"], "sequences": stats["num_sequences"], "units": stats["num_units"]}
            info |= {"shard_bytes": sum(u["bytes"] for u in manifest["units"]), "build_s": round(build_s, 1)}
            info |= {"cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before]}
            info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
            if args.json:
                print(json.dumps({"cache": info, "cluster": results}, indent=1))
                return
            print("cache:", ", ".join(f"{k}={v}" for k, v in info.items()))
            keys = list(next(iter(results.values())))
            print(f"{'run':<22}" + "".join(f"{k[:24]:>26}" for k in keys))
            for name, r in results.items():
                print(f"{name:<22}" + "".join(f"{str(r.get(k, '-')):>26}" for k in keys))
            return
        cache = open_cache(uri)
        paths = [os.path.join(uri, u["path"]) for u in cache.units]

        def raw_scan() -> int:
            return sum(pq.read_table(path).num_rows for path in paths)

        def decoded() -> int:
            return sum(len(cache.read_unit(u).seq_ids) for u in cache.units)

        def dataset(num_workers: int = 0, source: str = uri, expand: bool = False, **kwargs) -> Callable[[], int]:
            def run() -> int:
                ds = KDCacheDataset(source, batch_size=args.batch_size, seed=0, **kwargs)
                loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
                batches = (expand_targets(b) for b in loader) if expand else loader
                return sum(int(b["attention_mask"].sum()) for b in batches)

            return run

        remote = f"memory://kdcache-bench-{os.getpid()}/cache"  # a "remote" copy, read through a local disk cache
        for key in [INDEX_KEY, *(u["path"] for u in cache.units)]:
            Store(remote).write_bytes(key, Store(uri).read_bytes(key))
        local = {"local_cache_dir": os.path.join(tmp, "local"), "local_cache_bytes": 2**40}
        dataset(source=remote, **local)()  # warm it

        runs = {
            "raw_read_table": raw_scan,
            "decoded_read_unit": decoded,
            "dataset": dataset(),
            "dataset_no_prefetch": dataset(prefetch_units=0),
            "dataset_prefetch_4": dataset(prefetch_units=4),
            "dataset_compact": dataset(compact_targets=True),
            "dataset_compact_prefetch_4": dataset(compact_targets=True, prefetch_units=4),
            "dataset_compact_expanded_on_cpu": dataset(compact_targets=True, expand=True),
            f"dataset_top{args.k // 2}_T2": dataset(top_k=args.k // 2, temperature=2.0),
            "dataset_memory_local_cache": dataset(source=remote, **local),
            "dataset_2_workers": dataset(num_workers=2),
        }
        measured = interleaved(args.repeats, runs)
        raw_best, raw_median = (
            min(measured["raw_read_table"]["wall"]),
            statistics.median(measured["raw_read_table"]["wall"]),
        )
        results = {}
        for name, m in measured.items():
            best, median, cpu = min(m["wall"]), statistics.median(m["wall"]), statistics.median(m["cpu"])
            results[name] = {
                "tokens": m["tokens"],
                "best_s": round(best, 4),
                "median_s": round(median, 4),
                "tokens_per_s_best": round(m["tokens"] / best),
                "tokens_per_s_median": round(m["tokens"] / median),
                "vs_raw_best": round(raw_best / best, 2),
                "vs_raw_median": round(raw_median / median, 2),
                "tokens_per_cpu_s": round(m["tokens"] / cpu) if cpu > 0 else None,
            }
        parts = breakdown(uri, batch_size=args.batch_size, repeats=args.repeats) if args.breakdown else {}
        stats = manifest["stats"]
        info = {
            "tokens": stats["num_tokens"],
            "sequences": stats["num_sequences"],
            "units": stats["num_units"],
            "bytes_per_token": round(stats["bytes_per_token"], 1),
            "vocab": args.vocab,
            "k": args.k,
            "build_s": round(build_s, 1),
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        }
        if args.json:
            print(json.dumps({"cache": info, "results": results, "breakdown_ns_per_token": parts}, indent=1))
            return
        print("cache:", ", ".join(f"{k}={v}" for k, v in info.items()))
        head = (
            "measurement",
            "best s",
            "median s",
            "tok/s best",
            "tok/s median",
            "/raw best",
            "/raw med",
            "tok/cpu-s",
        )
        print(f"{head[0]:<28}" + "".join(f"{h:>13}" for h in head[1:]))
        for name, r in results.items():
            cells = (r["best_s"], r["median_s"], r["tokens_per_s_best"], r["tokens_per_s_median"])
            cells += (r["vs_raw_best"], r["vs_raw_median"], r["tokens_per_cpu_s"])
            print(f"{name:<28}" + "".join(f"{c:>13,}" if isinstance(c, int) else f"{c:>13}" for c in cells))
        if parts:
            print("CPU per token of each step alone, one thread (ns):")
            for name, ns in parts.items():
                print(f"  {name:<44} {ns:>8}")


if __name__ == "__main__":
    main()
