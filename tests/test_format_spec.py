"""docs/FORMAT.md is complete: a reader written from it alone (json, hashlib, pyarrow / zarr, numpy; no kdcache
decode function) returns exactly what kdcache's reader returns, for Parquet and Zarr shards, in topk, sample and
hybrid modes, with u8, u16 and f32 log-probs, with and without positions that carry no target. Also: Parquet row
groups never split a sequence; DuckDB and polars read every column of every kind of Parquet shard, and join targets
to tokens; a half-masked cache stores about half the target bytes.

`build_cache` (real shards from kdcache's writers, random targets, no model) is shared with test_verify.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fake_cache import write_fake_cache

from kdcache.capture.targets import sample_targets, select_topk
from kdcache.codec import CodecParams
from kdcache.formats import get_format
from kdcache.manifest import FORMAT_VERSION, INDEX_KEY, build_manifest, dumps, shard_key
from kdcache.read.reader import open_cache
from kdcache.store import Store

# ---- a cache builder (kdcache's writers; the reader below must not use kdcache) -----------------------------------


def build_cache(
    root: Path | str,
    *,
    fmt: str = "parquet",
    logprobs: str = "u8",
    mode: str = "topk",
    k: int = 6,
    num_samples: int = 12,
    vocab: int = 300,
    num_units: int = 2,
    seqs_per_unit: int = 3,
    temperatures: tuple[float, ...] = (1.0, 2.0),
    row_group_tokens: int = 65536,
    seed: int = 0,
    masked: float = 0.0,
    min_len: int = 2,
    max_len: int = 20,
    token_text: bool = False,
) -> dict[str, Any]:
    """A complete cache of random sequences written with kdcache's shard writers; returns the manifest.

    `masked`: the probability that a position carries no target (0: no sequence gets a target mask); `token_text`:
    store the text behind every token (`token_text_of` each input id; the last sequence of a unit: unknown)."""
    store = Store(str(root))
    codec = CodecParams.for_logprobs(logprobs)
    stored_k = 0 if mode == "sample" else k
    targets: dict[str, Any] = {
        "mode": mode,
        "k": stored_k,
        "temperatures": list(temperatures),
        "logprob_codec": logprobs,
    }
    if mode != "topk":
        targets.update(samples=num_samples, seed=seed)
    if token_text:
        targets["cross_tokenizer"] = True
    inputs = {
        "format_version": FORMAT_VERSION,
        "teacher": {"model": "fake", "revision": None, "dtype": "float32", "padded_vocab_size": vocab},
        "tokenizer": {"name": "fake", "hash": "fake", "vocab_size": vocab},
        "targets": targets,
        "codec": codec.to_dict(),
        "windowing": {"max_length": 20, "min_length": 2, "add_eos": True},
        "data": {"source": "fake"},
        "shard_format": fmt,
    }
    writer_cls = get_format(fmt)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    units = []
    for u in range(num_units):
        writer = writer_cls.ShardWriter(
            k=stored_k,
            num_temperatures=len(temperatures),
            num_samples=num_samples if mode != "topk" else 0,
            codec=codec,
            row_group_tokens=row_group_tokens,
            metadata={"unit_id": f"unit{u:04d}", "format_version": FORMAT_VERSION},
            vocab_size=vocab,
            token_text=token_text,
        )
        for s in range(seqs_per_unit):
            length = int(rng.integers(min_len, max_len))
            mask = rng.random(length) >= masked if masked else None
            rows = length if mask is None else int(mask.sum())
            logits = torch.randn(rows, vocab, generator=gen) * 3.0
            if mode == "topk":
                head, samples = select_topk(logits, k, list(temperatures)), None
            else:
                head, samples = sample_targets(
                    logits, num_samples=num_samples, head=stored_k, temperatures=list(temperatures), generator=gen
                )
            ids = rng.integers(0, vocab, size=length)
            text = None
            if token_text and s < seqs_per_unit - 1:
                pieces = [token_text_of(int(i)) for i in ids]
                text = (b"".join(pieces), np.cumsum([len(p) for p in pieces]))
            writer.add(seed * 10_000 + u * 100 + s, ids, head, samples, target_mask=mask, token_text=text)
        data = writer.finish()
        path = shard_key(f"unit{u:04d}", "a0", writer_cls.SUFFIX)
        store.write_bytes(path, data)
        units.append(
            {
                "unit_id": f"unit{u:04d}",
                "path": path,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "crc32": zlib.crc32(data),  # as the worker records it (readers check it on every read)
                "num_sequences": writer.num_sequences,
                "num_tokens": writer.num_tokens,
                "num_target_tokens": writer.num_target_tokens,
            }
        )
    fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    manifest = build_manifest(
        fingerprint=fingerprint,
        fingerprint_inputs=inputs,
        units=units,
        shard_format=fmt,
        shard_suffix=writer_cls.SUFFIX,
    )
    store.write_bytes(INDEX_KEY, dumps(manifest))
    return manifest


def token_text_of(token_id: int) -> bytes:
    """The text `build_cache` stores behind a token: empty, ASCII or two-byte UTF-8, by id."""
    return ("é" if token_id % 2 else "a").encode() * (token_id % 3)


# ---- the independent reader, from docs/FORMAT.md only -------------------------------------------------------------


def _planar(raw: np.ndarray, k: int, acc: type) -> np.ndarray:
    """[n, P*k] plane-major bytes -> [n, k] integers (FORMAT.md section 5)."""
    planes = raw.shape[1] // k
    out = np.zeros((raw.shape[0], k), dtype=acc)
    for p in range(planes):
        out |= raw[:, p * k : (p + 1) * k].astype(acc) << acc(8 * p)
    return out


def _logprobs(codes: np.ndarray, codec: dict[str, Any]) -> np.ndarray:
    """Codes of the manifest's codec -> float32 log-probs."""
    if codec["logprobs"] == "f32":
        return codes.astype("<u4").view("<f4") if codes.dtype.kind == "u" else codes.astype(np.float32)
    lo, levels, compand = codec["logprob_min"], codec["levels"], codec["compand"]
    code = np.arange(levels, dtype=np.float64)
    if compand > 0:  # levels uniform in exp(lp / compand)
        table = compand * np.log(1.0 - code * (1.0 - np.exp(lo / compand)) / (levels - 1))
    else:
        table = code * lo / (levels - 1)
    table[0], table[-1] = 0.0, lo
    return table.astype(np.float32)[codes.astype(np.int64)]


def _ids_from_gaps(gaps: np.ndarray) -> np.ndarray:
    k = gaps.shape[1]
    return np.cumsum(gaps.astype(np.int64), axis=1) + np.arange(k)


def _ragged(lengths: np.ndarray, flat_gaps: np.ndarray, counts: np.ndarray, lps: np.ndarray):
    width = int(lengths.max(initial=0))
    ids = np.zeros((len(lengths), width), np.int64)
    cnt = np.zeros((len(lengths), width), np.int32)
    lp = np.full((len(lengths), width), -np.inf, np.float32)
    start = 0
    for t, m in enumerate(lengths.tolist()):
        ids[t, :m] = np.cumsum(flat_gaps[start : start + m].astype(np.int64)) + np.arange(m)
        cnt[t, :m] = counts[start : start + m]
        lp[t, :m] = lps[start : start + m]
        start += m
    return ids, cnt, lp


def _parquet_tokens(raw: bytes, k: int, n_temps: int, codec: dict[str, Any]) -> dict[str, np.ndarray]:
    t = pq.read_table(io.BytesIO(raw))
    n = t.num_rows
    mask = t.column("log_normalizer_0").is_valid().to_numpy(zero_copy_only=False)  # positions with targets

    def floats(name: str) -> np.ndarray:
        col = t.column(name)
        assert col.type in (pa.float32(), pa.float16()), name
        return np.where(mask, col.to_numpy(zero_copy_only=False), np.nan).astype(np.float32)

    out: dict[str, np.ndarray] = {
        "seq_id": t.column("seq_id").to_numpy(),
        "input_ids": t.column("input_id").to_numpy(),
        "loss_mask": mask,
        "log_normalizers": np.stack([floats(f"log_normalizer_{j}") for j in range(n_temps)], 1),
        "tail_logprobs": np.stack([floats(f"tail_logprob_{j}") for j in range(n_temps)], 1),
        "entropy": floats("entropy"),
    }
    assert t.column("tail_logprob_0").type == t.column("entropy").type == pa.float16()  # FLOAT16, read as float32

    def fixed(name: str) -> np.ndarray:
        a = t.column(name).combine_chunks()
        w = a.type.byte_width
        assert a.null_count == n - mask.sum()
        return np.frombuffer(a.buffers()[1], np.uint8)[a.offset * w : (a.offset + n) * w].reshape(n, w)

    if k > 0:
        planes = sum(1 for name in t.column_names if name.startswith("target_gaps_p") and name.endswith("_0"))
        gaps = np.zeros((n, k), np.uint32)
        for p in range(planes):
            plane = np.concatenate([fixed(f"target_gaps_p{p}_{j}") for j in range(0, k, 16)], axis=1)
            gaps |= plane.astype(np.uint32) << np.uint32(8 * p)
        code_planes = sum(1 for name in t.column_names if name.startswith("target_codes_p"))
        codes = np.zeros((n, k), np.uint32)
        for p in range(code_planes):
            codes |= fixed(f"target_codes_p{p}").astype(np.uint32) << np.uint32(8 * p)
        out["target_ids"] = _ids_from_gaps(gaps)
        out["target_logprobs"] = _logprobs(codes, codec)
    else:
        out["target_ids"], out["target_logprobs"] = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    if "sample_gaps" in t.column_names:
        lists = [x or [] for x in t.column("sample_gaps").to_pylist()]
        lengths = np.array([len(x) for x in lists])
        flat = np.array([g for x in lists for g in x], dtype=np.int64).astype(np.uint32)
        counts = np.frombuffer(b"".join(x or b"" for x in t.column("sample_counts").to_pylist()), np.uint8)
        width = {"u8": "u1", "u16": "<u2", "f32": "<f4"}[codec["logprobs"]]
        codes = np.frombuffer(b"".join(x or b"" for x in t.column("sample_codes").to_pylist()), width)
        out["sample_ids"], out["sample_counts"], out["sample_logprobs"] = _ragged(
            lengths, flat, counts, _logprobs(codes, codec)
        )
    return out


def _zarr_tokens(path: Path, k: int, n_temps: int, codec: dict[str, Any]) -> dict[str, np.ndarray]:
    import zarr

    store = zarr.storage.ZipStore(path, mode="r")
    g = zarr.open_group(store, mode="r")
    offsets = g["seq_offsets"][:]
    n = int(offsets[-1])
    mask = g["target_mask"][:]
    r = int(mask.sum())

    def per_token(values: np.ndarray) -> np.ndarray:  # target-position rows -> token rows (NaN elsewhere)
        assert len(values) == r
        out = np.full((n, *values.shape[1:]), np.nan, np.float32)
        out[mask] = values
        return out

    out = {
        "seq_id": np.repeat(g["seq_id"][:], np.diff(offsets)),
        "input_ids": g["input_id"][:],
        "loss_mask": mask,
        "log_normalizers": per_token(g["log_normalizers"][:]),
        "tail_logprobs": per_token(g["tail_logprobs"][:].astype(np.float32)),
        "entropy": per_token(g["entropy"][:].astype(np.float32)),
    }
    if k > 0:
        ids = np.zeros((n, k), np.int64)
        ids[mask] = _ids_from_gaps(g["target_gaps"][:])
        lps = np.zeros((n, k), np.float32)
        lps[mask] = _logprobs(g["target_codes"][:], codec)
        out["target_ids"], out["target_logprobs"] = ids, lps
    else:
        out["target_ids"], out["target_logprobs"] = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    if "sample_lengths" in g:
        lengths = np.zeros(n, np.int64)
        lengths[mask] = g["sample_lengths"][:]
        out["sample_ids"], out["sample_counts"], out["sample_logprobs"] = _ragged(
            lengths, g["sample_gaps"][:], g["sample_counts"][:], _logprobs(g["sample_codes"][:], codec)
        )
    store.close()
    assert out["input_ids"].shape == (n,)
    return out


def spec_read(root: Path) -> list[dict[str, Any]]:
    """Every sequence of a local cache, read as docs/FORMAT.md says."""
    manifest = json.loads((root / "index.json").read_text())
    assert manifest["format"] == "kdcache" and manifest["format_version"] == 3 and manifest["complete"] is True
    inputs = manifest["fingerprint_inputs"]
    codec = inputs["codec"]
    assert codec["name"] == "topk-gap" and codec["version"] == 2
    k, n_temps = inputs["targets"]["k"], len(inputs["targets"]["temperatures"])
    sequences = []
    for unit in manifest["units"]:
        assert not unit["path"].startswith("/") and ".." not in unit["path"]
        raw = (root / unit["path"]).read_bytes()
        assert len(raw) == unit["bytes"] and hashlib.sha256(raw).hexdigest() == unit["sha256"]
        if manifest["shard_format"] == "parquet":
            tokens = _parquet_tokens(raw, k, n_temps, codec)
        else:
            tokens = _zarr_tokens(root / unit["path"], k, n_temps, codec)
        seq = tokens.pop("seq_id")
        starts = np.concatenate([[0], np.flatnonzero(np.diff(seq)) + 1, [len(seq)]])
        for a, b in zip(starts[:-1], starts[1:]):
            s = {"seq_id": int(seq[a])} | {name: v[a:b] for name, v in tokens.items()}
            if "sample_ids" in s:  # padded to the sequence's widest token, as the reader pads
                width = int((s["sample_counts"] > 0).sum(1).max(initial=0))
                for name in ("sample_ids", "sample_counts", "sample_logprobs"):
                    s[name] = s[name][:, :width]
            sequences.append(s)
        assert len(starts) - 1 == unit["num_sequences"] and len(seq) == unit["num_tokens"]
        assert int(tokens["loss_mask"].sum()) == unit["num_target_tokens"]
    return sequences


def assert_same_as_reader(root: Path) -> int:
    spec = spec_read(root)
    ours = list(open_cache(str(root)).iter_sequences())
    assert len(spec) == len(ours) > 0
    for a, b in zip(spec, ours):
        assert a["seq_id"] == int(b["seq_id"])
        mask = a["loss_mask"]
        for name, value in a.items():
            if name == "seq_id":
                continue
            got = b[name]
            if name.startswith(("target_", "log_normalizers", "tail_logprobs", "entropy")):
                # the spec leaves positions without a target undefined; kdcache fills them (FORMAT.md section 8)
                fill = {"target_ids": -1, "target_logprobs": -np.inf, "tail_logprobs": -np.inf}.get(name, 0.0)
                assert got.shape == value.shape, name
                assert (got[~mask] == fill).all(), name
                got, value = got[mask], value[mask]
            if name.startswith("sample_"):  # kdcache pads to the shard's widest token; compare the valid part
                got = got[:, : value.shape[1]]
                assert not (b["sample_counts"][:, value.shape[1] :] > 0).any()
            assert got.shape == value.shape, name
            np.testing.assert_array_equal(got, value, err_msg=name)
        np.testing.assert_array_equal(b["tail_logprob"][mask], a["tail_logprobs"][mask, 0])
    return len(spec)


# ---- tests ----------------------------------------------------------------------------------------------------------


def test_spec_reader_matches_on_fake_topk_cache(tmp_path):
    write_fake_cache(str(tmp_path), num_units=3, seqs_per_unit=4, k=8, vocab=64)
    assert assert_same_as_reader(tmp_path) == 12


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
@pytest.mark.parametrize(
    "mode, logprobs",
    [("topk", "u8"), ("topk", "u16"), ("topk", "f32"), ("sample", "u8"), ("hybrid", "u16"), ("hybrid", "f32")],
)
def test_spec_reader_matches(tmp_path, fmt, mode, logprobs):
    manifest = build_cache(tmp_path, fmt=fmt, mode=mode, logprobs=logprobs, vocab=70_000 if mode == "topk" else 300)
    assert manifest["fingerprint_inputs"]["codec"]["logprobs"] == logprobs
    assert assert_same_as_reader(tmp_path) == 6


def test_parquet_gap_planes_follow_the_vocabulary(tmp_path):
    build_cache(tmp_path, vocab=70_000, k=20)  # ids < 70,000 need three byte planes, whatever the largest gap
    table = pq.read_table(tmp_path / "shards" / "unit0000-a0.parquet")
    gaps = [name for name in table.column_names if name.startswith("target_gaps")]
    assert gaps == [f"target_gaps_p{p}_{j}" for p in range(3) for j in (0, 16)]
    assert [table.schema.field(name).type.byte_width for name in gaps[:2]] == [16, 4]
    meta = json.loads(table.schema.metadata[b"kdcache"])
    assert meta["gap_planes"] == 3 and meta["codec"]["logprobs"] == "u8" and meta["unit_id"] == "unit0000"


def test_row_groups_never_split_a_sequence(tmp_path):
    build_cache(tmp_path, num_units=1, seqs_per_unit=12, row_group_tokens=15)
    pf = pq.ParquetFile(tmp_path / "shards" / "unit0000-a0.parquet")
    assert pf.num_row_groups > 2
    seen: set[int] = set()
    for g in range(pf.num_row_groups):
        ids = set(pf.read_row_group(g, columns=["seq_id"]).column("seq_id").to_pylist())
        assert not ids & seen  # a sequence lives in exactly one row group
        seen |= ids
        if g < pf.num_row_groups - 1:
            assert pf.metadata.row_group(g).num_rows >= 15


def test_zarr_shard_is_a_plain_zip_of_a_zarr_v3_group(tmp_path):
    build_cache(tmp_path, fmt="zarr", num_units=1, mode="hybrid")
    path = tmp_path / "shards" / "unit0000-a0.zarr.zip"
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert names == sorted(names) and all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        root = json.loads(zf.read("zarr.json"))
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    assert root["attributes"]["kdcache"]["num_samples"] == 12
    codecs = {
        c["name"]
        for n in names
        if n.endswith("/zarr.json")
        for c in json.loads(zipfile.ZipFile(path).read(n))["codecs"]
    }
    assert codecs <= {"bytes", "transpose", "blosc", "zstd"}  # Zarr v3 core codecs only


def test_same_input_same_bytes_in_both_formats(tmp_path):
    for fmt in ("parquet", "zarr"):
        a = build_cache(tmp_path / f"{fmt}1", fmt=fmt, mode="hybrid")
        b = build_cache(tmp_path / f"{fmt}2", fmt=fmt, mode="hybrid")
        assert [u["sha256"] for u in a["units"]] == [u["sha256"] for u in b["units"]]


def test_codec_options_round_trip_within_their_bounds():
    rng = np.random.default_rng(0)
    lp = np.concatenate([-rng.exponential(3.0, 5000), [0.0, -1e-9, -15.99, -31.9]]).astype(np.float32)
    # FORMAT.md's error bounds: u8 half its local step (0.012 nats at 0, 0.044 at -8), u16 2.44e-4, f32 exact
    u8_bound = np.interp(lp, [-24.0, -16.0, -8.0, 0.0], [0.60, 0.172, 0.044, 0.0116])
    for name, bound in (("u8", u8_bound), ("u16", 2.45e-4), ("f32", 0.0)):
        codec = CodecParams.for_logprobs(name)
        back = _logprobs(_encode_for_test(lp, codec), codec.to_dict())
        inside = lp >= (codec.logprob_min if name != "f32" else -np.inf)
        assert (np.abs(back - lp) <= bound + 1e-6)[inside].all(), name
        assert CodecParams.from_dict(codec.to_dict()) == codec
    with pytest.raises(ValueError, match="log-prob coding"):
        CodecParams.for_logprobs("u4")


def _encode_for_test(lp: np.ndarray, codec: CodecParams) -> np.ndarray:
    from kdcache.codec import quantize_logprobs

    codes = quantize_logprobs(lp, codec)
    return codes.view("<u4") if codec.logprobs == "f32" else codes


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
@pytest.mark.parametrize("mode, logprobs", [("topk", "u8"), ("hybrid", "u16"), ("sample", "f32")])
def test_spec_reader_matches_with_positions_without_targets(tmp_path, fmt, mode, logprobs):
    manifest = build_cache(tmp_path, fmt=fmt, mode=mode, logprobs=logprobs, masked=0.4, seqs_per_unit=4)
    units = manifest["units"]
    assert 0 < sum(u["num_target_tokens"] for u in units) < sum(u["num_tokens"] for u in units)
    assert manifest["stats"]["num_target_tokens"] == sum(u["num_target_tokens"] for u in units)
    assert assert_same_as_reader(tmp_path) == 8


def _duckdb_and_polars(path: Path) -> tuple[Any, Any]:
    import duckdb
    import polars as pl

    relation = duckdb.sql(f"SELECT * FROM read_parquet('{path}')")
    table = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
    return table, pl.read_parquet(path)


@pytest.mark.parametrize(
    "mode, logprobs, masked, text",
    [("topk", "u8", 0.0, False), ("topk", "u16", 0.3, True), ("topk", "f32", 0.0, False), ("hybrid", "u8", 0.3, True)],
)
def test_duckdb_and_polars_read_every_column(tmp_path, mode, logprobs, masked, text):
    build_cache(
        tmp_path, mode=mode, logprobs=logprobs, masked=masked, num_units=1, vocab=70_000, k=20, token_text=text
    )
    path = tmp_path / "shards" / "unit0000-a0.parquet"
    ours = pq.read_table(path)
    duck, polars_frame = _duckdb_and_polars(path)
    assert duck.column_names == polars_frame.columns == ours.column_names
    assert ("token_text" in ours.column_names) == text  # the optional column: its values and nulls checked below
    for name in ours.column_names:  # the same values, nulls included (DuckDB/polars widen FLOAT16 to FLOAT)
        expected = ours.column(name).to_pylist()
        got_duck, got_polars = duck.column(name).to_pylist(), polars_frame[name].to_list()
        if ours.schema.field(name).type == pa.float16():
            expected = [None if v is None else float(v) for v in expected]
        assert got_duck == expected, name
        assert got_polars == expected, name


def test_duckdb_and_polars_join_targets_to_tokens(tmp_path):
    import duckdb
    import polars as pl

    build_cache(tmp_path, mode="topk", masked=0.5, num_units=2, seqs_per_unit=3)
    ours = [s for s in open_cache(str(tmp_path)).iter_sequences()]
    want = [
        (int(s["seq_id"]), int(tok), float(tail))
        for s in ours
        for tok, tail, m in zip(s["input_ids"], s["tail_logprob"], s["loss_mask"])
        if m
    ]
    glob = f"{tmp_path}/shards/*.parquet"
    sql = (
        "SELECT seq_id, input_id, tail_logprob_0 FROM read_parquet(?, file_row_number = true, filename = true) "
        "WHERE log_normalizer_0 IS NOT NULL ORDER BY filename, file_row_number"
    )
    got = [(a, b, float(c)) for a, b, c in duckdb.execute(sql, [glob]).fetchall()]
    assert got == want and len(want) == sum(int(s["loss_mask"].sum()) for s in ours)
    frame = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "shards").glob("*.parquet"))])
    trained = frame.filter(pl.col("log_normalizer_0").is_not_null()).select("seq_id", "input_id", "tail_logprob_0")
    assert [(a, b, float(c)) for a, b, c in trained.iter_rows()] == want


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_positions_without_targets_cost_no_target_bytes(tmp_path, fmt):
    fmt_module = get_format(fmt)

    def target_bytes(root: Path, manifest: dict[str, Any]) -> tuple[float, int]:
        total, kept = 0, 0
        for unit in manifest["units"]:
            sizes = fmt_module.column_bytes((root / unit["path"]).read_bytes())
            total += sum(v for name, v in sizes.items() if name not in ("seq_id", "seq_offsets", "input_id"))
            kept += unit["num_target_tokens"]
        return total, kept

    common = {"fmt": fmt, "num_units": 1, "seqs_per_unit": 30, "min_len": 60, "max_len": 100, "k": 16}
    full = build_cache(tmp_path / "full", **common)
    half = build_cache(tmp_path / "half", masked=0.5, **common)
    full_bytes, full_targets = target_bytes(tmp_path / "full", full)
    half_bytes, half_targets = target_bytes(tmp_path / "half", half)
    assert 0.4 < half_targets / full["units"][0]["num_tokens"] < 0.6
    # bytes per target position stay the same: the half-masked cache stores about half the target bytes
    assert half_bytes / half_targets == pytest.approx(full_bytes / full_targets, rel=0.15)


def test_all_zero_top_planes_are_skipped_on_read(tmp_path):
    """A shard stores the vocabulary's gap planes; rows for batching carry only the planes in use (compact batches
    ship fewer bytes), decoded to the same ids."""
    from kdcache.capture.targets import TokenTargets

    writer = get_format("parquet").ShardWriter(k=4, num_temperatures=1, vocab_size=70_000)
    ids = np.array([[1, 5, 9, 200], [0, 2, 3, 4]])
    lps = np.full((2, 4), -1.5, np.float32)
    writer.add(7, np.array([3, 4]), TokenTargets(ids, lps, np.zeros((2, 1)), np.full((2, 1), -2.0), np.ones(2)))
    data = writer.finish()
    names = pq.read_schema(io.BytesIO(data)).names
    assert [n for n in names if n.startswith("target_gaps")] == [
        "target_gaps_p0_0",
        "target_gaps_p1_0",
        "target_gaps_p2_0",
    ]
    codec = CodecParams()
    rows = get_format("parquet").read_rows(data, k=4, num_temperatures=1, codec=codec, vocab_size=70_000, planar=True)
    assert rows.target_ids.shape == (2, 4)  # one plane of 4 gaps per row
    steps = get_format("parquet").read_rows(data, k=4, num_temperatures=1, codec=codec, vocab_size=70_000)
    np.testing.assert_array_equal(np.cumsum(steps.target_ids, axis=1), ids)
    np.testing.assert_array_equal(get_format("parquet").read_shard(data, k=4, num_temperatures=1).target_ids, ids)


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_token_text_is_read_as_format_md_says(tmp_path, fmt):
    """The optional token text (FORMAT.md): per token the bytes behind it, null / -1 where unknown; kdcache's reader
    returns the same, and refuses to read it from shards that lack it."""
    import zarr

    from kdcache.errors import CorruptShardError
    from kdcache.read.reader import CacheReader

    manifest = build_cache(tmp_path, fmt=fmt, num_units=2, seqs_per_unit=3, token_text=True)
    reader = CacheReader(str(tmp_path))
    for unit in manifest["units"]:
        path = tmp_path / unit["path"]
        if fmt == "parquet":
            t = pq.read_table(path)
            assert t.schema.field("token_text").type == pa.binary()
            seq_ids, ids, texts = (
                t.column("seq_id").to_numpy(),
                t.column("input_id").to_numpy(),
                t.column("token_text"),
            )
            texts = texts.to_pylist()
        else:
            g = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
            offsets = g["seq_offsets"][:]
            seq_ids, ids = np.repeat(g["seq_id"][:], np.diff(offsets)), g["input_id"][:]
            lengths, data = g["token_text_lengths"][:], g["token_text"][:].tobytes()
            assert lengths.dtype == np.int32 and len(data) == int(np.maximum(lengths, 0).sum())
            ends = np.cumsum(np.maximum(lengths, 0))
            texts = [None if n < 0 else data[e - n : e] for n, e in zip(lengths.tolist(), ends.tolist())]
        last = seq_ids == seq_ids[-1]  # build_cache's last sequence of a unit has no text
        assert all(texts[i] is None for i in np.flatnonzero(last))
        assert [texts[i] for i in np.flatnonzero(~last)] == [token_text_of(int(i)) for i in ids[~last]]
        rows = reader.read_unit_rows(reader.units[manifest["units"].index(unit)], token_text=True)
        for s in range(rows.num_sequences):
            seq = rows.sequence(s)
            if int(seq["seq_id"]) == seq_ids[-1]:
                assert "token_text" not in seq  # unknown text: the sequence has none
                continue
            pieces = [token_text_of(int(i)) for i in seq["input_ids"]]
            assert bytes(seq["token_text"]) == b"".join(pieces)
            np.testing.assert_array_equal(seq["token_text_ends"], np.cumsum([len(p) for p in pieces]))
        assert "token_text" not in reader.read_unit_rows(reader.units[0]).sequence(0)  # read only when asked
    build_cache(tmp_path / "plain", fmt=fmt, num_units=1)
    plain = CacheReader(str(tmp_path / "plain"))
    with pytest.raises(CorruptShardError, match="token_text"):
        plain.read_unit_rows(plain.units[0], token_text=True)
