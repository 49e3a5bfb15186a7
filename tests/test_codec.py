"""Codec round trips: ids exact, log-probs within half a quantization step, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.codec import (
    CodecParams,
    decode_ids,
    dequantize_logprobs,
    encode_ids,
    error_bound,
    quantize_logprobs,
    sort_targets,
)


def random_topk(rng, n, k, vocab):
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
    lps = -rng.exponential(3.0, size=(n, k)).astype(np.float32)
    return ids, lps


@pytest.mark.parametrize("k, vocab", [(1, 10), (8, 50), (64, 128_256), (50, 50)])
def test_ids_round_trip_exactly(k, vocab):
    rng = np.random.default_rng(k)
    ids, lps = random_topk(rng, 200, k, vocab)
    sids, slps = sort_targets(ids, lps)
    assert (np.diff(sids, axis=1) > 0).all()
    np.testing.assert_array_equal(decode_ids(encode_ids(sids)), sids)
    # the log-probs travel with their ids
    for row in range(5):
        assert dict(zip(ids[row], lps[row])) == dict(zip(sids[row], slps[row]))


def test_k_equals_vocab_gaps_are_zero():
    ids = np.tile(np.arange(50), (3, 1))
    gaps = encode_ids(ids)
    assert gaps[:, 0].tolist() == [0, 0, 0] and (gaps == 0).all()


def test_unsorted_or_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        encode_ids(np.array([[3, 2]]))
    with pytest.raises(ValueError, match="ascending"):
        encode_ids(np.array([[2, 2]]))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["u8", "u16"]),
    st.lists(st.floats(min_value=-32.0, max_value=0.0, allow_nan=False), min_size=1, max_size=64),
)
def test_quantization_error_within_the_local_bound(name, values):
    params = CodecParams.for_logprobs(name)
    lp = np.maximum(np.asarray(values, dtype=np.float32), params.logprob_min)
    back = dequantize_logprobs(quantize_logprobs(lp, params), params)
    assert (np.abs(back - lp) <= error_bound(lp, params)).all()


def test_u8_levels_are_fine_where_the_mass_is():
    params = CodecParams()
    table = params.table
    assert table[0] == 0.0 and table[-1] == params.logprob_min == -24.0 and len(table) == 256
    steps = -np.diff(table)
    assert (steps > 0).all() and (np.diff(steps) > 0).all()  # strictly descending, coarser as p falls
    assert steps[0] < 0.025 and 0.04 < float(error_bound(np.float32(-8.0), params)) < 0.05
    # half the u16 grid's step bounds its error everywhere
    u16 = CodecParams.for_logprobs("u16")
    assert float(error_bound(np.float32(-31.0), u16)) <= 32 / 65535 / 2 + 5e-6  # + float32 rounding of levels


def test_quantization_edge_values():
    params = CodecParams()
    lp = np.array([0.0, -np.inf, -100.0, -24.0, -1e-9], dtype=np.float32)
    codes = quantize_logprobs(lp, params)
    assert codes.dtype == np.uint8
    back = dequantize_logprobs(codes, params)
    assert back[0] == 0.0 and back[1] == -24.0 and back[2] == -24.0 and back[3] == -24.0 and back[4] == 0.0
    assert np.isfinite(back).all()
    with pytest.raises(ValueError, match="NaN"):
        quantize_logprobs(np.array([np.nan], dtype=np.float32))


def test_quantization_kl_is_small_on_peaked_distributions():
    """KL(p || p_quantized) over the head, renormalized, stays ~1e-4 nats for LLM-like distributions."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((500, 4096)).astype(np.float64) * 3
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.sort(lp, axis=1)[:, -64:]
    q = dequantize_logprobs(quantize_logprobs(top)).astype(np.float64)
    p = np.exp(top) / np.exp(top).sum(1, keepdims=True)
    qn = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(qn))).sum(1).mean()
    assert kl < 5e-4
