"""What identifying a teacher by content costs: `kdcache.identity.file_sha256` on a weight file, cold and cached.

Writes a file of `--mb` MiB of random bytes (a stand-in for a safetensors shard; sha256 speed does not depend on the
bytes), then measures in the same run:

- baseline: reading the file whole into nothing (the page cache is warm after the write, so this is memory
  bandwidth, the floor of any hash of it);
- cold: `file_sha256` with an empty hash cache (reads and hashes the whole file, then records it);
- cached: `file_sha256` again (one `stat` and a read of the small cache file).

A cold read from disk is bounded by the disk instead (drop the page cache first to measure that). The driver pays
the cold cost once per weight file version; every later run of a job on the same teacher pays the cached one.

Run::

    python bench/identity.py                 # 1024 MiB
    python bench/identity.py --mb 256 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdcache.identity import HASH_CACHE_ENV, file_sha256  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of the weight file, MiB")
    parser.add_argument("--repeats", type=int, default=3, help="cold hashes measured (best of)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(2**20))
        size = path.stat().st_size

        def read_all() -> None:
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(8 * 2**20)
                while f.readinto(buf):
                    pass

        def best(fn, repeats: int) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        read_s = best(read_all, args.repeats)
        cold = []
        for i in range(args.repeats):
            os.environ[HASH_CACHE_ENV] = str(Path(tmp) / f"cache-{i}.json")  # empty cache each time
            cold.append(best(lambda: file_sha256(path), 1))
        cold_s = min(cold)
        cached_s = best(lambda: file_sha256(path), 20)

    mb = size / 2**20
    result = {
        "file_mib": mb,
        "read_mib_per_s": mb / read_s,
        "sha256_cold_mib_per_s": mb / cold_s,
        "sha256_cold_s": cold_s,
        "sha256_cached_ms": cached_s * 1e3,
        "cpu": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"file {mb:.0f} MiB (page cache warm)")
    print(f"  read only (baseline)  {result['read_mib_per_s']:8.0f} MiB/s")
    print(f"  file_sha256 cold      {result['sha256_cold_mib_per_s']:8.0f} MiB/s ({cold_s:.2f} s)")
    print(f"  file_sha256 cached    {result['sha256_cached_ms']:8.3f} ms")


if __name__ == "__main__":
    main()
