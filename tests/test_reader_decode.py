"""The reader's decode path: id decoding (dtypes, `out=`, extremes), compact unit rows against the plain decoder, and
collation from compact rows (id steps, log-prob codes) against collation from decoded rows."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.capture.targets import TokenTargets
from kdcache.codec import (
    CodecParams,
    decode_planar_gaps,
    dequantize_logprobs,
    encode_ids,
    gap_planes,
    planar_to_values,
    values_to_planar,
)
from kdcache.formats import get_format
from kdcache.formats.memory import pooled_empty
from kdcache.formats.rows import logprob_table
from kdcache.read.collate import collate_sequences, cumsum_rows


def random_ids(rng: np.random.Generator, rows: int, k: int, vocab: int) -> np.ndarray:
    return np.sort(np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(rows)]), axis=1)


@pytest.mark.parametrize("vocab", [300, 70_000, 2**24])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_decode_planar_gaps_dtypes_and_out(vocab, k):
    rng = np.random.default_rng(vocab + k)
    ids = random_ids(rng, 300, k, vocab)
    gaps = encode_ids(ids)
    raw = values_to_planar(gaps, gap_planes(gaps))
    np.testing.assert_array_equal(decode_planar_gaps(raw, k), ids)
    assert decode_planar_gaps(raw, k).dtype == np.int64
    out = np.empty((300, k), np.uint32)
    assert decode_planar_gaps(raw, k, np.uint32, out=out) is out
    np.testing.assert_array_equal(out, ids)
    if vocab <= 2**16:
        np.testing.assert_array_equal(decode_planar_gaps(raw, k, np.uint16), ids)
    else:
        with pytest.raises(ValueError, match="does not fit uint16"):
            decode_planar_gaps(raw, k, np.uint16)


def test_decode_planar_gaps_extremes_and_blocks(monkeypatch):
    import kdcache.codec as codec

    top = np.array([[2**32 - 1]], dtype=np.int64)  # the largest id the format holds, as the first gap (k = 1)
    np.testing.assert_array_equal(decode_planar_gaps(values_to_planar(encode_ids(top), 4), 1), top)
    wide = np.array([[0, 2**31, 2**32 - 1]], dtype=np.int64)
    np.testing.assert_array_equal(decode_planar_gaps(values_to_planar(encode_ids(wide), 4), 3), wide)
    monkeypatch.setattr(codec, "_DECODE_BLOCK_VALUES", 16)  # many blocks, a short last one
    ids = random_ids(np.random.default_rng(0), 37, 5, 1000)
    gaps = encode_ids(ids)
    np.testing.assert_array_equal(decode_planar_gaps(values_to_planar(gaps, 2), 5), ids)
    assert decode_planar_gaps(np.zeros((0, 10), np.uint8), 5).shape == (0, 5)
    with pytest.raises(ValueError, match="out must be"):
        decode_planar_gaps(values_to_planar(gaps, 2), 5, out=np.empty((37, 5), np.uint32))


def test_planar_to_values_out_and_overflow():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2**24, size=(20, 6)).astype(np.uint32)
    raw = values_to_planar(values, 3)
    out = pooled_empty((20, 6), np.uint32)
    assert planar_to_values(raw, 6, np.uint32, out=out) is out
    np.testing.assert_array_equal(out, values)
    np.testing.assert_array_equal(planar_to_values(raw, 6, np.int32), values.astype(np.int32))
    with pytest.raises(ValueError, match="3 byte planes do not fit uint16"):
        planar_to_values(raw, 6, np.uint16)


def test_cumsum_rows_matches_numpy_across_blocks():
    rng = np.random.default_rng(2)
    for dtype, k, rows in [(np.uint16, 64, 1000), (np.int32, 3, 9000), (np.uint16, 64, 0)]:
        steps = rng.integers(0, 1000, size=(rows, k)).astype(dtype)
        out = np.empty((rows, k), np.int64)
        np.testing.assert_array_equal(cumsum_rows(steps, out), np.cumsum(steps, axis=1, dtype=np.int64))


def write_shard(
    rng, *, k: int, vocab: int, codec: CodecParams, lengths: list[int], temps: int = 2, fmt: str = "parquet"
) -> bytes:
    writer = get_format(fmt).ShardWriter(k=k, num_temperatures=temps, codec=codec, row_group_tokens=16)
    for s, n in enumerate(lengths):
        ids = random_ids(rng, n, k, vocab)
        lps = np.sort(-rng.exponential(3.0, size=(n, k)).astype(np.float32), axis=1)
        head = TokenTargets(
            ids=ids,
            logprobs=lps,
            log_normalizers=rng.normal(10, 1, size=(n, temps)).astype(np.float32),
            tail_logprobs=-rng.uniform(0.1, 3, size=(n, temps)).astype(np.float32),
            entropy=rng.uniform(0, 4, size=n).astype(np.float32),
        )
        writer.add(100 + s, rng.integers(0, vocab, size=n).astype(np.int32), head)
    return writer.finish()


@pytest.mark.parametrize(
    ("vocab", "codec"),
    [(64, "u8"), (32_000, "u8"), (70_000, "u8"), (200_000, "u16"), (1000, "f32")],
)
@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_unit_rows_and_collation_match_the_plain_decoder(vocab, codec, fmt):
    """Compact rows (id steps, codes) collate to exactly what the decoded rows collate to, over several row groups
    (Parquet) or chunks (Zarr): every format serves the reader's fast path."""
    rng = np.random.default_rng(vocab)
    params = CodecParams.for_logprobs(codec)
    k, lengths = 8, [5, 17, 1, 30, 9]
    data = write_shard(rng, k=k, vocab=vocab, codec=params, lengths=lengths, fmt=fmt)
    plain = get_format(fmt).read_shard(data, k=k, num_temperatures=2, codec=params)
    rows = get_format(fmt).read_rows(data, k=k, num_temperatures=2, codec=params, vocab_size=vocab)
    assert rows.lengths.tolist() == lengths and rows.seq_ids.tolist() == [100, 101, 102, 103, 104]
    assert rows.target_ids.dtype == (np.uint16 if vocab <= 2**16 else np.int32)
    assert rows.values_are_codes == (codec != "f32")
    table_of_codes = logprob_table(params)
    if table_of_codes is not None:  # the table is the codec's own decoding of every code
        codes = np.arange(params.levels, dtype=params.code_dtype)
        np.testing.assert_array_equal(table_of_codes, dequantize_logprobs(codes, params))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    decoded = [
        {
            "seq_id": np.int64(100 + s),
            "input_ids": plain.input_ids[a : a + n],
            "target_ids": plain.target_ids[a : a + n],
            "target_logprobs": plain.target_logprobs[a : a + n],
            "log_normalizers": plain.log_normalizers[a : a + n],
            "tail_logprobs": plain.tail_logprobs[a : a + n],
            "entropy": plain.entropy[a : a + n],
        }
        for s, (a, n) in enumerate(zip(starts, lengths))
    ]
    for order, pad_to in [([3, 0, 2, None], None), ([1, 4, None, 0, 3, 2], 32)]:
        compact = [None if i is None else rows.sequence(i) for i in order]
        reference = [None if i is None else decoded[i] for i in order]
        got = collate_sequences(compact, k=k, num_temperatures=2, pad_to=pad_to, logprob_table=table_of_codes)
        want = collate_sequences(reference, k=k, num_temperatures=2, pad_to=pad_to)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert np.isneginf(got["target_logprobs"][~got["attention_mask"].astype(bool)]).all()
        assert (got["target_ids"][~got["attention_mask"].astype(bool)] == 0).all()


def test_codes_need_their_table():
    rows = [{"seq_id": 1, "input_ids": np.zeros(2, np.int32), "target_steps": np.zeros((2, 3), np.uint16)}]
    rows[0] |= {"target_codes": np.zeros((2, 3), np.uint8), "log_normalizers": np.zeros((2, 1), np.float32)}
    rows[0] |= {"tail_logprobs": np.zeros((2, 1), np.float32), "entropy": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="logprob_table"):
        collate_sequences(rows, k=3, num_temperatures=1)
