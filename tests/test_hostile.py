"""Hostile and damaged caches (issue 12, items 7, 12, 13, 14): every reader path refuses them with a clear
`KdcacheError` (the CLI prints one `kdcache: error:` line, no traceback) before it sizes anything by them, and memory
stays bounded: the bounded-memory cases run in a subprocess under `RLIMIT_AS` (its address space after imports plus
`MARGIN`), where an allocation the cache dictates would be a MemoryError, not a clean error.

- manifest (`index.json`): wrong types, impossible counts, huge counts and sizes, paths outside the root or with a
  NUL, deep nesting, a directory, `complete: false`, another format version;
- decompression bombs: unknown Parquet columns, unknown zip members and Zarr arrays are never decompressed; a declared
  column or chunk that claims more than the declared counts allow is refused before it is decompressed (also by
  `verify --deep`);
- `verify` (fast and deep) reports columns of the wrong physical type;
- `iter_sequences` starts no Arrow thread pool (the interpreter-exit abort), a read-only local cache directory does not
  stop reading.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_format_spec import build_cache

from kdcache.cli import main
from kdcache.errors import CacheMismatchError, CorruptShardError, KdcacheError
from kdcache.read.dataset import KDCacheDataset
from kdcache.read.reader import open_cache
from kdcache.tools.info import cache_summary
from kdcache.tools.verify import verify_cache

TESTS = Path(__file__).resolve().parent
MARGIN = 384 * 2**20  # address space a subprocess may add after its imports: a tiny cache needs far less
BOMB = 2**30  # what the bombs below expand to: well above the margin


def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "index.json").read_text())
    edit(manifest)
    (root / "index.json").write_text(json.dumps(manifest))


def _replace_shard(root: Path, unit_index: int, data: bytes) -> None:
    """Put `data` in place of a unit's shard and record it in the manifest (size and checksums match)."""
    manifest = json.loads((root / "index.json").read_text())
    unit = manifest["units"][unit_index]
    (root / unit["path"]).write_bytes(data)
    unit.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), crc32=zlib.crc32(data))
    manifest["stats"]["total_bytes"] = sum(u["bytes"] for u in manifest["units"])
    (root / "index.json").write_text(json.dumps(manifest))


def _every_reader(root: Path) -> list[Exception]:
    """What each reader path raises on the cache at `root` (a KdcacheError each, or the test fails)."""
    raised = []
    for read in (
        lambda: list(open_cache(str(root)).iter_sequences()),
        lambda: list(KDCacheDataset(str(root), batch_size=2, prefetch_units=0)),
        lambda: cache_summary(str(root)),
        lambda: verify_cache(str(root), deep=True, workers=1),
    ):
        with pytest.raises(KdcacheError) as info:
            read()
        raised.append(info.value)
    return raised


# ---- the manifest --------------------------------------------------------------------------------------------------


def _unit(index: int, **values: Any):
    def edit(m: dict[str, Any]) -> None:
        m["units"][index].update(values)

    return edit


def _set(path: str, value: Any):
    def edit(m: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


def _drop(path: str):
    def edit(m: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[int(key) if isinstance(node, list) else key]
        del node[last]

    return edit


HOSTILE = {
    "units null": (_set("units", None), "units must be a list"),
    "units a string": (_set("units", "shards"), "units must be a list"),
    "a unit a number": (_set("units", [7]), "units[0] must be a JSON object"),
    "count a string": (_unit(0, num_tokens="12"), "num_tokens must be an integer"),
    "count a boolean": (_unit(1, num_sequences=True), "num_sequences must be an integer"),
    "count negative": (_unit(0, num_target_tokens=-1), "num_target_tokens must be an integer"),
    "num_sequences 10^8": (_unit(0, num_sequences=10**8), "num_sequences must be an integer in [1"),
    "num_sequences 10^9, tokens too": (_unit(0, num_sequences=10**9, num_tokens=10**9), "num_tokens must be"),
    "bytes 10^15": (_unit(0, bytes=10**15), "bytes must be an integer in [0, 1,099,511,627,776]"),
    "targets above tokens": (_unit(1, num_target_tokens=10**6), "num_target_tokens must be an integer"),
    "unit lacks num_target_tokens": (_drop("units.0.num_target_tokens"), "lacks ['num_target_tokens']"),
    "NUL in a path": (_unit(0, path="shards/unit0000-a0\x00.parquet"), "printable"),
    "path outside the root": (_unit(0, path="../elsewhere.parquet"), "outside the cache root"),
    "absolute path": (_unit(0, path="/etc/passwd"), "must be relative"),
    "sha256 not hex": (_unit(0, sha256="x" * 64), "sha256 must be 64 lowercase hex digits"),
    "no targets section": (_drop("fingerprint_inputs.targets"), "fingerprint_inputs.targets must be a JSON object"),
    "no padded vocab": (_drop("fingerprint_inputs.teacher.padded_vocab_size"), "padded_vocab_size must be"),
    "k a string": (_set("fingerprint_inputs.targets.k", "8"), "targets.k must be an integer"),
    "k above the vocab": (_set("fingerprint_inputs.targets.k", 10**6), "targets.k must be an integer"),
    "no temperatures": (_set("fingerprint_inputs.targets.temperatures", []), "temperatures must be a list"),
    "temperature a string": (_set("fingerprint_inputs.targets.temperatures", ["1"]), "temperatures must be"),
    "unknown mode": (_set("fingerprint_inputs.targets.mode", "all"), "targets.mode must be one of"),
    "codec garbage": (_set("fingerprint_inputs.codec", {"name": "topk-gap", "version": 99}), "unsupported codec"),
    "stats null": (_set("stats", None), "stats must be a JSON object"),
    "fingerprint a list": (_set("fingerprint", [1]), "fingerprint must be"),
    "complete false": (_set("complete", False), "marks the cache incomplete"),
    "complete a string": (_set("complete", "yes"), "marks the cache incomplete"),
    "format version 2": (_set("format_version", 2), "format version 2 is not supported"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_is_refused_by_every_reader(tmp_path, case):
    edit, message = HOSTILE[case]
    build_cache(tmp_path, num_units=2, seqs_per_unit=2)
    _edit_manifest(tmp_path, edit)
    for exc in _every_reader(tmp_path):
        assert message in str(exc) and str(tmp_path / "index.json") in str(exc), (case, str(exc))
    if case == "format version 2":
        assert isinstance(exc, CacheMismatchError) and "re-create the cache" in str(exc)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests too deep"),
        (b'{"format": "kdcache", "units": [', "invalid JSON"),
        (b"\xff\xfe not utf-8", "invalid JSON"),
        (b"[1, 2]", "not a kdcache manifest"),
    ],
)
def test_unreadable_manifest_is_refused(tmp_path, raw, message):
    build_cache(tmp_path, num_units=1)
    (tmp_path / "index.json").write_bytes(raw)
    for exc in _every_reader(tmp_path):
        assert message in str(exc) and "index.json" in str(exc)


def test_manifest_that_is_a_directory_is_refused(tmp_path):
    build_cache(tmp_path, num_units=1)
    (tmp_path / "index.json").unlink()
    (tmp_path / "index.json").mkdir()
    for exc in _every_reader(tmp_path):
        assert "cannot read the manifest" in str(exc) and "index.json" in str(exc)


@pytest.mark.parametrize("command", ["info", "verify"])
def test_cli_prints_one_error_line_and_no_traceback(tmp_path, capsys, command):
    build_cache(tmp_path, num_units=1)
    _edit_manifest(tmp_path, _unit(0, num_tokens="many"))
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache: error: ") and "units[0]" in err and "num_tokens" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---- bounded memory (subprocess under RLIMIT_AS) -------------------------------------------------------------------


def run_limited(body: str) -> str:
    """Run `body` (Python, may use `root`) in a subprocess whose address space is capped at its size after the
    imports plus MARGIN; returns what it printed. A KdcacheError prints "KDCACHE ERROR: ..." and exits 0; anything
    else (MemoryError, an abort) fails the test."""
    code = "\n".join(
        [
            "import re, resource, sys",
            f"sys.path.insert(0, {str(TESTS)!r})",
            "from kdcache.errors import KdcacheError",
            *(["from kdcache.read.dataset import KDCacheDataset"] if "KDCacheDataset" in body else []),  # torch: ~3 s
            "from kdcache.read.reader import open_cache",
            "from kdcache.tools.verify import verify_cache",
            "import kdcache.formats.parquet, kdcache.formats.zarr, zarr, numcodecs",
            "size = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024",
            f"resource.setrlimit(resource.RLIMIT_AS, (size + {MARGIN}, size + {MARGIN}))",
            "try:",
            *[f"    {line}" for line in body.strip().splitlines()],
            "    print('NO ERROR')",
            "except KdcacheError as exc:",
            "    print('KDCACHE ERROR:', exc)",
        ]
    )
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def test_limited_subprocess_reads_a_sound_cache_and_fails_on_a_real_allocation(tmp_path):
    """The harness is not vacuous: a sound cache reads under the limit, and an allocation of BOMB bytes fails."""
    build_cache(tmp_path, num_units=2)
    out = run_limited(f"n = sum(1 for _ in open_cache({str(tmp_path)!r}).iter_sequences())\nprint('read', n)")
    assert "read 6" in out and "NO ERROR" in out
    code = f"import numpy as np\nprint(np.empty({BOMB}, np.uint8).nbytes)"  # address space, never touched
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert plain.stdout.strip() == str(BOMB)  # without the cap it runs ...
    with pytest.raises(AssertionError, match="MemoryError"):  # ... with it, it fails as such an allocation would
        run_limited(code)


@pytest.mark.parametrize(
    "claims",
    [
        {"num_sequences": 10**8},  # the 4 GB of order arrays
        {"num_sequences": 10**8, "num_tokens": 10**8, "num_target_tokens": 10**8, "bytes": 10**8 // 16},
        {"num_sequences": 10**9, "num_tokens": 10**9, "num_target_tokens": 10**9, "bytes": 10**9 // 16},
    ],
)
def test_huge_counts_allocate_nothing(tmp_path, claims):
    build_cache(tmp_path, num_units=2)
    _edit_manifest(tmp_path, _unit(1, **claims))
    out = run_limited(f"for _ in KDCacheDataset({str(tmp_path)!r}, batch_size=2, prefetch_units=0): pass")
    assert "KDCACHE ERROR" in out and "unit0001" in out
    assert ("num_sequences must be" in out) if len(claims) == 1 else (f"the manifest records {claims['bytes']}" in out)


@pytest.mark.parametrize("reader", ["iter_sequences", "dataset"])
def test_huge_byte_size_allocates_nothing(tmp_path, reader):
    build_cache(tmp_path, num_units=1)
    _edit_manifest(tmp_path, _unit(0, bytes=2**40))  # the largest a unit may record: the file is checked first
    body = {
        "iter_sequences": f"list(open_cache({str(tmp_path)!r}).iter_sequences())",
        "dataset": f"for _ in KDCacheDataset({str(tmp_path)!r}, batch_size=2): pass",
    }[reader]
    out = run_limited(body)
    assert "KDCACHE ERROR" in out and f"the manifest records {2**40}" in out


# ---- decompression bombs -------------------------------------------------------------------------------------------


def _parquet_with_extra_column(path: Path, name: str, rows_bytes: int) -> bytes:
    """The shard at `path` plus a column `name` whose rows all hold the same `rows_bytes` zeros: dictionary-encoded,
    so a few KB on disk, and N * rows_bytes decoded (what kdcache's reader before format v3 did: it read every
    column)."""
    table = pq.read_table(path)
    value = pa.array([bytes(rows_bytes)], pa.binary())
    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(table.num_rows, np.int32)), value)
    table = table.append_column(name, column)
    sink = io.BytesIO()
    pq.write_table(
        table, sink, compression="zstd", use_dictionary=[name], dictionary_pagesize_limit=2 * rows_bytes,
        store_schema=False,  # else pyarrow reads the column back as a (small) DictionaryArray, not decoded
    )  # fmt: skip
    return sink.getvalue()


def test_parquet_unknown_column_bomb_is_never_decompressed(tmp_path):
    manifest = build_cache(tmp_path, num_units=1, seqs_per_unit=8)
    rows = manifest["units"][0]["num_tokens"]
    data = _parquet_with_extra_column(tmp_path / manifest["units"][0]["path"], "extra", BOMB // rows + 1)
    assert len(data) < 2**20  # a small file that decodes to more than BOMB
    _replace_shard(tmp_path, 0, data)
    out = run_limited(
        f"n = sum(len(s['input_ids']) for s in open_cache({str(tmp_path)!r}).iter_sequences())\n"
        f"b = sum(1 for _ in KDCacheDataset({str(tmp_path)!r}, batch_size=2, prefetch_units=0))\n"
        "r = verify_cache(" + repr(str(tmp_path)) + ", deep=True, workers=1)\n"
        "print('read', n, b, r.ok)"
    )
    assert f"read {rows} 4 True" in out and "NO ERROR" in out  # unknown columns are ignored (FORMAT.md)


def test_parquet_declared_column_bomb_is_refused_before_decompression(tmp_path):
    manifest = build_cache(tmp_path, mode="hybrid", num_units=1, seqs_per_unit=8)
    path = tmp_path / manifest["units"][0]["path"]
    rows = manifest["units"][0]["num_tokens"]
    table = pq.read_table(path)
    # every row's sample_codes the same BOMB / rows zero bytes: one dictionary entry, stored as plain binary
    value = pa.array([bytes(BOMB // rows + 1)], pa.binary())
    codes = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), value)
    table = table.set_column(table.column_names.index("sample_codes"), "sample_codes", codes)
    sink = io.BytesIO()
    pq.write_table(
        table, sink, compression="zstd", use_dictionary=["sample_codes"], dictionary_pagesize_limit=2**30,
        store_schema=False,  # read back as binary, the declared type: only the page sizes give it away
    )  # fmt: skip
    assert len(sink.getvalue()) < 2**20
    _replace_shard(tmp_path, 0, sink.getvalue())
    out = run_limited(
        f"r = verify_cache({str(tmp_path)!r}, deep=True, workers=1)\n"
        "print('verify', r.ok, r.problems)\n"
        f"list(open_cache({str(tmp_path)!r}).iter_sequences())"
    )
    assert "verify False" in out and "column 'sample_codes', row group 0: its pages claim more than" in out
    assert "KDCACHE ERROR" in out and "sample_codes" in out


@pytest.mark.parametrize("bomb", ["parquet column", "zarr lengths", "zarr chunk"])
def test_token_text_bombs_are_refused_before_decompression(tmp_path, bomb):
    """The optional token text (students with another tokenizer) is bounded like every column: sizes from the file
    are checked before anything is allocated; a reader that does not ask for the text never decompresses it."""
    fmt = "parquet" if bomb.startswith("parquet") else "zarr"
    manifest = build_cache(tmp_path, fmt=fmt, num_units=1, seqs_per_unit=8, token_text=True)
    path = tmp_path / manifest["units"][0]["path"]
    rows = manifest["units"][0]["num_tokens"]
    if bomb == "parquet column":  # every row the same BOMB / rows bytes: one dictionary entry
        table = pq.read_table(path)
        value = pa.array([bytes(BOMB // rows + 1)], pa.binary())
        text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), value)
        table = table.set_column(table.column_names.index("token_text"), "token_text", text)
        sink = io.BytesIO()
        pq.write_table(
            table, sink, compression="zstd", use_dictionary=["token_text"], dictionary_pagesize_limit=2**30,
            store_schema=False,
        )  # fmt: skip
        data, message = sink.getvalue(), "column 'token_text', row group 0: its pages claim more than"
    elif bomb == "zarr lengths":  # per-token lengths that add up to BOMB bytes of text
        lengths = np.full(rows, BOMB // rows + 1, "<i4")
        data = _zip_with(path, {"token_text_lengths/c/0": _zstd_frame_of(lengths.tobytes())})
        message = "the token text claims"
    else:  # the text's chunk a zstd frame of BOMB zeros
        data, message = _zip_with(path, {"token_text/c/0": _zstd_frame(BOMB)}), "token_text"
    assert len(data) < 2**20
    _replace_shard(tmp_path, 0, data)
    out = run_limited(
        f"r = verify_cache({str(tmp_path)!r}, deep=True, workers=1)\n"
        "print('verify', r.ok, r.problems)\n"
        f"n = sum(len(s['input_ids']) for s in open_cache({str(tmp_path)!r}).iter_sequences())\n"
        "print('read', n)\n"
        "from kdcache.read.reader import CacheReader\n"
        f"reader = CacheReader({str(tmp_path)!r})\n"
        "reader.read_unit_rows(reader.units[0], token_text=True)"
    )
    assert "verify False" in out and "cannot decode the text behind its tokens" in out, out  # verify --deep sees it
    assert f"read {rows}" in out, out  # without the text: the shard reads
    assert "KDCACHE ERROR" in out and message in out, out


def _zstd_frame_of(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=1).compress(data)


def _deflated_zeros(size: int):
    def write(f) -> None:
        block = bytes(2**22)
        for _ in range(size // len(block) + 1):
            f.write(block)

    return write


def _zstd_frame(size: int, *, content_size: bool = True) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(bytes(size))


def test_zarr_unknown_member_and_array_bombs_are_never_decompressed(tmp_path):
    manifest = build_cache(tmp_path, fmt="zarr", num_units=1, seqs_per_unit=8)
    path = tmp_path / manifest["units"][0]["path"]
    # an unknown zip member (deflated: 512 MiB of zeros in ~0.5 MB, more than the margin) and an unknown array whose
    # one chunk is a zstd frame of 1 GiB
    meta = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [BOMB],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [BOMB]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 1, "checksum": False}}],
    }
    data = _zip_with(
        path,
        {"extra/zarr.json": json.dumps(meta).encode(), "extra/c/0": _zstd_frame(BOMB)},
        deflated={"notes.bin": BOMB // 2},
    )
    assert len(data) < 4 * 2**20
    _replace_shard(tmp_path, 0, data)
    out = run_limited(
        f"n = sum(len(s['input_ids']) for s in open_cache({str(tmp_path)!r}).iter_sequences())\n"
        f"r = verify_cache({str(tmp_path)!r}, deep=True, workers=1)\n"
        "print('read', n, r.ok)"
    )
    assert f"read {manifest['units'][0]['num_tokens']} True" in out and "NO ERROR" in out


def _zip_with(path: Path, extra: dict[str, bytes], *, deflated: dict[str, int] | None = None, drop=()) -> bytes:
    """The zipped shard at `path` with `extra` entries stored (replacing same-named ones), `deflated` entries of that
    many zero bytes deflated, and `drop` entries left out."""
    sink = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(sink, "w", compresslevel=1) as dst:
        for info in src.infolist():
            if info.filename not in extra and info.filename not in drop:
                dst.writestr(info, src.read(info))
        for name, data in extra.items():
            dst.writestr(zipfile.ZipInfo(name), data)
        for name, size in (deflated or {}).items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(info, "w", force_zip64=True) as f:
                _deflated_zeros(size)(f)
    return sink.getvalue()


@pytest.mark.parametrize(
    "bomb, message",
    [
        ("frame", "holds 32,"),  # a zstd frame of BOMB zeros: ~32 KB, more than a 14-value chunk can take
        ("claim", "claims 67,108,864 bytes uncompressed"),  # a frame small enough, announcing 64 MiB
        ("blosc claim", "claims 1,073,741,824 bytes uncompressed"),
        ("no content size", "does not record its content size"),
        ("deflated", "is compressed (shard entries are stored)"),
        ("big shape", "expected [14] (from the manifest)"),
    ],
)
def test_zarr_declared_array_bomb_is_refused_before_decompression(tmp_path, bomb, message):
    manifest = build_cache(tmp_path, fmt="zarr", num_units=1, seqs_per_unit=1, min_len=14, max_len=15)
    path = tmp_path / manifest["units"][0]["path"]
    assert manifest["units"][0]["num_tokens"] == 14
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("entropy/zarr.json"))
    # target_mask's chunk is zstd-coded, entropy's blosc-coded (docs/FORMAT.md section 7)
    if bomb == "frame":
        data = _zip_with(path, {"target_mask/c/0": _zstd_frame(BOMB)})
    elif bomb == "claim":
        data = _zip_with(path, {"target_mask/c/0": _zstd_frame(2**26)})
    elif bomb == "blosc claim":
        with zipfile.ZipFile(path) as zf:
            chunk = bytearray(zf.read("entropy/c/0"))
        chunk[4:8] = BOMB.to_bytes(4, "little")  # the header's uncompressed size
        data = _zip_with(path, {"entropy/c/0": bytes(chunk)})
    elif bomb == "no content size":
        data = _zip_with(path, {"target_mask/c/0": _zstd_frame(2**26, content_size=False)})
    elif bomb == "deflated":
        data = _zip_with(path, {}, deflated={"entropy/c/0": 2**26}, drop=("entropy/c/0",))
    else:  # a declared array much larger than the manifest's counts, its chunk a legitimate frame of that size
        meta["shape"] = meta["chunk_grid"]["configuration"]["chunk_shape"] = [BOMB // 2]
        meta["codecs"] = [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
        ]
        data = _zip_with(path, {"entropy/zarr.json": json.dumps(meta).encode(), "entropy/c/0": _zstd_frame(BOMB)})
    _replace_shard(tmp_path, 0, data)
    out = run_limited(
        f"r = verify_cache({str(tmp_path)!r}, deep=True, workers=1)\n"
        "print('verify', r.ok, r.problems)\n"
        f"list(open_cache({str(tmp_path)!r}).iter_sequences())"
    )
    assert "verify False" in out and "KDCACHE ERROR" in out and message in out, out


# ---- item 14: wrong physical types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "column, cast, message",
    [
        ("input_id", pa.int64(), "column 'input_id' is int64 (INT64, length 0), expected int32 (INT32)"),
        ("tail_logprob_0", pa.float32(), "column 'tail_logprob_0' is float (FLOAT, length 0), expected halffloat"),
        ("target_codes_p0", pa.binary(), "column 'target_codes_p0' is binary (BYTE_ARRAY"),
    ],
)
def test_verify_reports_columns_of_the_wrong_type(tmp_path, column, cast, message):
    manifest = build_cache(tmp_path, num_units=1)
    path = tmp_path / manifest["units"][0]["path"]
    table = pq.read_table(path)
    index = table.column_names.index(column)
    table = table.set_column(index, pa.field(column, cast), table.column(column).cast(cast))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    _replace_shard(tmp_path, 0, sink.getvalue())
    for deep in (False, True):
        report = verify_cache(str(tmp_path), deep=deep)
        assert not report.ok and message in str(report.problems[0]), (deep, report.problems)
    with pytest.raises(CorruptShardError, match="expected"):
        list(open_cache(str(tmp_path)).iter_sequences())


# ---- item 7: reading without thread pools, and a read-only local cache ---------------------------------------------


def test_iter_sequences_starts_no_thread_and_exits_cleanly(tmp_path):
    """The interpreter-exit abort ("terminate called without an active exception") came from Arrow's thread pools,
    which `pq.read_table` starts: reading a cache starts no thread at all, so the process exits with status 0."""
    build_cache(tmp_path, num_units=3)
    code = (
        "import os, sys\n"
        "from kdcache.read.reader import open_cache\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        f"n = sum(1 for _ in open_cache({str(tmp_path)!r}).iter_sequences())\n"
        "after = len(os.listdir('/proc/self/task'))\n"
        "print(n, before, after)\n"
    )
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
        )
        assert result.returncode == 0, result.stderr
        n, before, after = map(int, result.stdout.split())
        assert n == 9 and after == before


def _batch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "kdcache-batches" and t.is_alive()]


def test_a_dataset_iterator_left_open_is_stopped_before_the_interpreter_finalizes(tmp_path):
    """A script that ends with a dataset iterator still open (`it = iter(ds); next(it)`) must not leave the batch
    thread running into finalization, where a daemon thread inside Arrow or torch aborts the process ("terminate
    called without an active exception", 1 run in 6 before the fix). An atexit hook registered before kdcache's
    runs after it (last in, first out) and sees whether the thread is still alive."""
    build_cache(tmp_path, num_units=3)
    code = (
        "import atexit, threading\n"
        "atexit.register(lambda: print('alive at exit:', "
        "[t.name for t in threading.enumerate() if t.name == 'kdcache-batches' and t.is_alive()]))\n"
        "from kdcache.read.dataset import KDCacheDataset\n"
        f"it = iter(KDCacheDataset({str(tmp_path)!r}, batch_size=1, prefetch_units=2))\n"
        "next(it)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )
    assert result.returncode == 0, result.stderr
    assert "alive at exit: []" in result.stdout, result.stdout + result.stderr


def test_closing_a_dataset_iterator_joins_its_batch_thread(tmp_path):
    build_cache(tmp_path, num_units=3)
    it = iter(KDCacheDataset(str(tmp_path), batch_size=1, prefetch_units=2))
    next(it)
    assert _batch_threads()  # the queue is full: the thread waits to hand over the next batches
    it.close()
    assert not _batch_threads()


def test_read_only_local_cache_does_not_stop_reading(tmp_path, monkeypatch):
    """Every write, delete, touch and lock in the local cache directory fails with EROFS: reading goes on."""
    from fsspec.implementations.memory import MemoryFileSystem

    import kdcache.read.localcache as localcache

    build_cache(tmp_path / "src", num_units=3)
    fs = MemoryFileSystem()
    for p in (tmp_path / "src").rglob("*"):
        if p.is_file():
            fs.pipe(f"/ro-test/{p.relative_to(tmp_path / 'src')}", p.read_bytes())
    local = tmp_path / "local"
    local.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    real_open = open

    def ro_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(localcache, "open", ro_open, raising=False)
    for name in ("unlink", "utime", "replace"):
        monkeypatch.setattr(localcache.os, name, read_only)
    try:
        want = [int(s["seq_id"]) for s in open_cache(str(tmp_path / "src")).iter_sequences()]
        for _ in range(2):  # the second pass meets the same read-only directory
            cache = open_cache("memory://ro-test", local_cache_dir=str(local), local_cache_bytes=2**30)
            assert [int(s["seq_id"]) for s in cache.iter_sequences()] == want
            batches = list(
                KDCacheDataset("memory://ro-test", batch_size=2, local_cache_dir=str(local), local_cache_bytes=2**30)
            )
            assert sum(int((b["seq_id"] >= 0).sum()) for b in batches) == len(want)
        # a directory that cannot even be created disables the local cache
        monkeypatch.setattr(localcache.os, "makedirs", read_only)
        cache = open_cache("memory://ro-test", local_cache_dir=str(tmp_path / "nowhere"), local_cache_bytes=2**30)
        assert cache.local_cache.disabled and len(list(cache.iter_sequences())) == len(want)
    finally:
        fs.rm("/ro-test", recursive=True)


def test_report_refuses_malformed_telemetry_with_a_message(tmp_path, capsys):
    build_cache(tmp_path / "c", num_units=1)
    _edit_manifest(
        tmp_path / "c", _set("stats.telemetry", {"entropy": {"count": 3, "bin_edges": "wide", "counts": 1}})
    )
    assert main(["report", str(tmp_path / "c"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache: error: ") and "malformed statistics or telemetry" in err and "Traceback" not in err


def test_ids_beyond_the_declared_vocabulary_are_refused(tmp_path):
    """Gaps that need more byte planes than the manifest's padded vocabulary allows: a clear error, not wrapped ids."""
    build_cache(tmp_path, vocab=70_000, k=1, num_units=1, seqs_per_unit=10)  # top-1 ids above 65,535 (seeded)
    _edit_manifest(tmp_path, _set("fingerprint_inputs.teacher.padded_vocab_size", 300))
    with pytest.raises(CorruptShardError, match="do not fit uint16"):
        list(KDCacheDataset(str(tmp_path), batch_size=2, prefetch_units=0))


@pytest.mark.parametrize("damage", ["nulls disagree", "samples disagree"])
def test_parquet_columns_that_disagree_are_refused(tmp_path, damage):
    manifest = build_cache(tmp_path, mode="hybrid", masked=0.3, num_units=1)
    path = tmp_path / manifest["units"][0]["path"]
    table = pq.read_table(path)
    if damage == "nulls disagree":  # a target column with a value where the others are null
        name, column = "entropy", table.column("entropy").fill_null(0.0)
        message = "column 'entropy' has 0 nulls"
    else:  # one draw count too many in the first token with samples
        name = "sample_counts"
        values = table.column(name).to_pylist()
        first = next(i for i, v in enumerate(values) if v)
        values[first] += b"\x01"
        column, message = pa.array(values, pa.binary()), "do not hold one entry per sampled id"
    table = table.set_column(table.column_names.index(name), name, column)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    _replace_shard(tmp_path, 0, sink.getvalue())
    with pytest.raises(CorruptShardError, match=message):
        list(open_cache(str(tmp_path)).iter_sequences())
    report = verify_cache(str(tmp_path), deep=True)
    assert not report.ok and message in str(report.problems)
