"""How many units per second the driver's scheduling loop sustains, and what passes through the driver per unit.

Runs the real loop (`kdcache.capture.scheduler.schedule_units`, the one `run_cache_job` uses) on a local Ray with
fake teacher actors that compute nothing: `process()` returns a realistic commit record (same keys and sizes as a real
one, telemetry histograms included) immediately or after `--latency-ms`. To give the loop 1,000 actors on a laptop, the
fake actors are *virtual*: each is a handle onto one of `--backends` async Ray actors, so the driver sees 1,000
actors and 2,000 refs in flight (what it tracks and waits on is real) while the machine runs a few processes.
What this does not reproduce: 1,000 separate gRPC connections and nodes, and object-store latency between nodes.

Also measured: bytes per unit through the driver (the pickled unit sent, the pickled record returned, the manifest
entry), the manifest's size and build time at `--manifest-units`, `ray.wait` cost against the number of refs in
flight, and listing a commits/ folder of `--manifest-units` records on local disk.

Run::

    python bench/driver.py                                   # 1,000 virtual actors, 10,000 units, no latency
    python bench/driver.py --actors 64 --units 2000 --latency-ms 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdcache.capture.plan import WorkUnit  # noqa: E402
from kdcache.capture.scheduler import schedule_units  # noqa: E402
from kdcache.manifest import build_manifest, commit_key, dumps  # noqa: E402
from kdcache.store import Store  # noqa: E402
from kdcache.telemetry import summarize_tokens  # noqa: E402

TOKENS_PER_UNIT = 1 << 20  # ~1M tokens: 10B tokens -> ~10k units


def realistic_record(index: int, unit_id: str, rng: np.random.Generator) -> dict[str, Any]:
    """A commit record shaped like a real one for a ~1M-token unit (what the worker and actor return)."""
    n = 4096  # telemetry is a fixed-size histogram: its size does not depend on the unit's token count
    return {
        "unit_id": unit_id,
        "index": index,
        "path": f"shards/{unit_id}-{uuid.uuid4().hex[:12]}.parquet",
        "bytes": 165 * TOKENS_PER_UNIT,
        "sha256": hashlib.sha256(unit_id.encode()).hexdigest(),
        "num_sequences": 256,
        "num_tokens": TOKENS_PER_UNIT,
        "padded_tokens": int(TOKENS_PER_UNIT * 1.04),
        "documents": 1900,
        "empty_documents": 3,
        "short_windows_dropped": 11,
        "telemetry": summarize_tokens(rng.gamma(2.0, 1.0, n), rng.beta(8.0, 1.0, n)),
        "timing_s": {"read": 1.2, "forward": 290.0, "encode": 6.1, "write": 2.3, "total": 300.1},
        "finished_at": time.time(),
        "pid": 12345,
        "node": "f" * 56,
        "actor_s": 300.2,
        "store_retries": 0,
    }


@ray.remote(num_cpus=0)
class FakeTeacherBackend:
    """Hosts virtual actors: `process()` waits `latency_s` (asyncio, so calls overlap) and returns a record."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s
        self.rng = np.random.default_rng(0)

    async def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": "fake", "device": "none"}

    async def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        return realistic_record(unit["index"], unit["unit_id"], self.rng)

    async def hold(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class VirtualActor:
    """What the scheduling loop sees as one actor: `ready` and `process` of a shared backend."""

    def __init__(self, backend: Any):
        self.ready = backend.ready
        self.process = backend.process


class FakeActorFactory:
    """`ActorFactory` of virtual actors over `num_backends` async backends (round robin)."""

    def __init__(self, num_backends: int, latency_s: float):
        self.backends = [
            FakeTeacherBackend.options(max_concurrency=100_000).remote(latency_s) for _ in range(num_backends)
        ]
        self.started = 0

    def describe(self) -> str:
        return f"VirtualActor over {len(self.backends)} backends"

    def start(self) -> VirtualActor:
        self.started += 1
        return VirtualActor(self.backends[self.started % len(self.backends)])

    def stop(self, handle: Any) -> None:
        pass  # virtual: the backends are killed by close()

    def close(self) -> None:
        for backend in self.backends:
            ray.kill(backend)


def synthetic_units(n: int) -> list[WorkUnit]:
    return [
        WorkUnit(
            unit_id=hashlib.blake2b(str(i).encode(), digest_size=10).hexdigest(),
            index=i,
            url=f"s3://my-bucket/corpus/part-{i // 16:05d}.jsonl",
            kind="bytes",
            start=(i % 16) * 64 * 2**20,
            stop=(i % 16 + 1) * 64 * 2**20,
            size_bytes=64 * 2**20,
        )
        for i in range(n)
    ]


def manifest_entry(record: dict[str, Any], unit: WorkUnit) -> dict[str, Any]:
    """The per-unit entry run_cache_job writes (same keys)."""
    keys = ("unit_id", "path", "bytes", "sha256", "num_sequences", "num_tokens")
    return (
        {key: record[key] for key in keys}
        | {"source": unit.url, "range": [unit.start, unit.stop], "padded_tokens": record["padded_tokens"]}
        | {k: record[k] for k in ("documents", "empty_documents", "short_windows_dropped")}
        | {k: record[k] for k in ("telemetry", "timing_s", "finished_at")}
    )


def bench_loop(units: list[WorkUnit], actors: int, backends: int, latency_s: float) -> dict[str, Any]:
    factory = FakeActorFactory(backends, latency_s)
    try:
        ray.get([b.ready.remote() for b in factory.backends])
        cpu0, t0 = time.process_time(), time.perf_counter()
        stats = schedule_units(units, factory, num_actors=actors, max_retries=3, backup_after_s=float("inf"))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        factory.close()
    assert len({r["unit_id"] for r in stats.records}) == len(units)
    return {
        "actors": actors,
        "units": len(units),
        "latency_ms": latency_s * 1e3,
        "wall_s": wall,
        "units_per_s": len(units) / wall,
        "driver_cpu_s": cpu,
        "driver_cpu_ms_per_unit": cpu / len(units) * 1e3,
        "records": stats.records,
    }


def bench_wait(sizes: list[int]) -> dict[int, float]:
    """Median seconds of one `ray.wait(refs, num_returns=1, timeout=0)` with `size` refs pending."""
    backend = FakeTeacherBackend.options(max_concurrency=100_000).remote(0.0)
    out = {}
    try:
        for size in sizes:
            refs = [backend.hold.remote(60.0) for _ in range(size)]
            ray.wait(refs, num_returns=1, timeout=0)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                ray.wait(refs, num_returns=1, timeout=0)
                times.append(time.perf_counter() - t)
            out[size] = statistics.median(times)
            for ref in refs:
                ray.cancel(ref)
    finally:
        ray.kill(backend)
    return out


def bench_manifest(records: list[dict[str, Any]], units: list[WorkUnit], n: int) -> dict[str, Any]:
    entries = [manifest_entry(records[i % len(records)], units[i % len(units)]) for i in range(n)]
    for i, e in enumerate(entries):
        e["unit_id"] = f"{i:020x}"
    t = time.perf_counter()
    manifest = build_manifest(
        fingerprint="0" * 64, fingerprint_inputs={}, units=entries, shard_format="parquet", shard_suffix=".parquet"
    )
    data = dumps(manifest)
    seconds = time.perf_counter() - t
    return {"units": n, "bytes": len(data), "bytes_per_unit": len(data) / n, "build_and_dump_s": seconds}


def bench_listing(n: int, record: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        body = dumps(record)
        os.makedirs(os.path.join(tmp, "commits"))
        for i in range(n):
            with open(os.path.join(tmp, commit_key(f"{i:020x}")), "wb") as f:
                f.write(body)
        t = time.perf_counter()
        names = store.list_names("commits")
        listed = time.perf_counter() - t
        t = time.perf_counter()
        store.read_many([f"commits/{name}" for name in names])
        read = time.perf_counter() - t
    return {"commits": n, "list_s": listed, "read_all_s": read, "record_bytes": len(body)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", type=int, default=1000, help="virtual actors the loop schedules on")
    parser.add_argument("--units", type=int, default=10_000, help="work units to run")
    parser.add_argument("--backends", type=int, default=4, help="async Ray actor processes hosting the actors")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="time a fake process() takes")
    parser.add_argument("--manifest-units", type=int, default=10_000, help="units in the manifest/listing checks")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    units = synthetic_units(args.units)
    loop = bench_loop(units, args.actors, args.backends, args.latency_ms / 1e3)
    records = loop.pop("records")
    waits = bench_wait([100, 1000, 2 * args.actors, 10_000])
    ray.shutdown()
    sent = len(ray.cloudpickle.dumps(units[0].to_dict()))
    returned = statistics.median(len(ray.cloudpickle.dumps(r)) for r in records[:200])
    manifest = bench_manifest(records, units, args.manifest_units)
    listing = bench_listing(args.manifest_units, records[0])
    result = {
        "loop": loop,
        "bytes_per_unit": {
            "unit_sent": sent,
            "record_returned": returned,
            "manifest_entry": manifest["bytes_per_unit"],
        },
        "ray_wait_s_by_refs": waits,
        "manifest": manifest,
        "listing_local_disk": listing,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"driver loop: {loop['units']} units on {loop['actors']} actors ({args.backends} backend processes), "
        f"latency {args.latency_ms:g} ms: {loop['wall_s']:.2f}s = {loop['units_per_s']:,.0f} units/s, "
        f"driver CPU {loop['driver_cpu_ms_per_unit']:.2f} ms/unit"
    )
    print(
        f"bytes per unit through the driver: unit sent {sent} B, record returned {returned:.0f} B; "
        f"manifest entry {manifest['bytes_per_unit']:.0f} B"
    )
    print("ray.wait(num_returns=1) over N refs: " + ", ".join(f"N={n}: {s * 1e3:.2f} ms" for n, s in waits.items()))
    print(
        f"manifest of {manifest['units']} units: {manifest['bytes'] / 2**20:.1f} MiB, "
        f"built and serialized in {manifest['build_and_dump_s']:.2f}s"
    )
    print(
        f"commits/ with {listing['commits']} records on local disk: list {listing['list_s']:.3f}s, "
        f"read all {listing['read_all_s']:.2f}s ({listing['record_bytes']} B each)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
