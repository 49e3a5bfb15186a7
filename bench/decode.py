"""Decode speed of one shard, in CPU time: the same-run baseline for a change of the shard layout.

    python bench/decode.py                                   # this tree
    PYTHONPATH=/tmp/v2 python bench/decode.py --label v2     # another kdcache (e.g. `git archive fc05e8a | tar -x`)

Writes one Parquet and one Zarr shard of synthetic LLM-like targets (bench/storage.py's generator: V = 128,256,
k = 64, one temperature, `--tokens` 65,536 tokens: one default row group, so fixed costs per file and column weigh
as in a real shard; generated once, ~3 minutes, and kept in `--targets-dir`) in sequences of 1,024 with the kdcache
found on the path, then times the writer (`add` + `finish`: encode), `read_shard` (every column decoded: int64 ids,
float32 log-probs) and `read_rows` (compact rows for batching: id steps and codes; `planar`: the gap bytes for
compact batches) from bytes, best of `--repeats`, in process CPU time (one thread), so a busy machine skews it
little. Run two trees alternately, several rounds, to compare them. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=65536, help="tokens in the shard")
    parser.add_argument("--targets-dir", type=Path, default=Path("/tmp"), help="where the generated targets are kept")
    args = parser.parse_args()
    import pyarrow as pa

    pa.set_cpu_count(1)
    from kdcache.capture.targets import TokenTargets
    from kdcache.codec import CodecParams
    from kdcache.formats import get_format

    targets = args.targets_dir / f"kdcache-decode-targets-{args.tokens}.npz"
    if not targets.exists():  # the generator of bench/storage.py (this tree's), once
        sys.path.insert(0, str(REPO / "bench"))
        import storage

        t = storage.synthetic_teacher(128256, args.tokens)
        ids, lps, tails = storage._sorted_head(t, 64)
        np.savez(targets, ids=ids, lps=lps, tails=tails[:, :1], norms=t.log_normalizers[:, :1], ent=t.entropy,
                 inp=t.input_ids)  # fmt: skip
    d = dict(np.load(targets))  # NpzFile reads an array anew at every access
    n, k = d["ids"].shape
    out = {"label": args.label}
    for name in ("parquet", "zarr"):
        fmt = get_format(name)

        def encode(fmt=fmt) -> bytes:
            try:
                writer = fmt.ShardWriter(k=k, num_temperatures=1, vocab_size=128256)
            except TypeError:  # a kdcache before format v3
                writer = fmt.ShardWriter(k=k, num_temperatures=1)
            for s in range(0, n, 1024):
                r = slice(s, s + 1024)
                writer.add(
                    s, d["inp"][r], TokenTargets(d["ids"][r], d["lps"][r], d["norms"][r], d["tails"][r], d["ent"][r])
                )
            return writer.finish()

        data = encode()
        codec = CodecParams()
        out[f"{name} encode ns/token"] = min(_cpu(encode) for _ in range(max(1, args.repeats // 3))) / n * 1e9

        out[f"{name} bytes/token"] = len(data) / n
        layout = {"k": k, "num_temperatures": 1, "codec": codec}
        out[f"{name} read_shard ns/token"] = _best(fmt.read_shard, data, layout, args.repeats) / n * 1e9
        for planar in (False, True):
            rows = layout | {"vocab_size": 128256, "planar": planar}
            out[f"{name} read_rows{' planar' if planar else ''} ns/token"] = (
                _best(fmt.read_rows, data, rows, args.repeats) / n * 1e9
            )
    print(json.dumps({key: round(v, 1) if isinstance(v, float) else v for key, v in out.items()}))


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _best(fn, data: bytes, kwargs: dict, repeats: int) -> float:
    """The least process CPU time of `repeats` calls of fn(data, **kwargs), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn(data, **kwargs)
        times.append(time.process_time() - start)
    return min(times)


if __name__ == "__main__":
    main()
