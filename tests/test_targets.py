"""Tests for kdcache.capture.targets: select_topk against a dense float64 reference, edge cases, and the tail helper.

Run: ``python -m pytest tests/test_targets.py -q``
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import kdcache.capture.targets as targets_module
from kdcache.capture.targets import TokenTargets, select_topk, tail_logprob_from_head

TEMPS = (1.0, 0.5, 2.0, 4.0)
ATOL = 1e-5  # float32 math on logits of magnitude ~10


def dense_reference(logits: torch.Tensor, k: int, temperatures: tuple[float, ...]) -> dict[str, torch.Tensor]:
    """Everything select_topk returns, computed densely in float64 from the full distribution."""
    z = logits.double()
    # Stable descending sort keeps the lowest id first among equal logits: the documented tie rule.
    ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values
    in_head = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    tails, norms = [], []
    for t in temperatures:
        p_t = torch.softmax(z / t, dim=-1)
        tails.append(torch.log(p_t.masked_fill(in_head, 0.0).sum(dim=-1)))  # log of complement mass
        norms.append(torch.logsumexp(z / t, dim=-1))
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)
    return {
        "ids": ids,
        "logprobs": logp.gather(1, ids),
        "log_normalizers": torch.stack(norms, dim=-1),
        "tail_logprobs": torch.stack(tails, dim=-1),
        "entropy": entropy,
    }


def assert_no_nan(targets: TokenTargets) -> None:
    for name in ("logprobs", "log_normalizers", "tail_logprobs", "entropy"):
        assert not torch.isnan(getattr(targets, name)).any(), name


def assert_matches_reference(targets: TokenTargets, ref: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert targets.ids.dtype == torch.int64
    for name in ("logprobs", "log_normalizers", "tail_logprobs", "entropy"):
        assert getattr(targets, name).dtype == torch.float32, name
    assert torch.equal(targets.ids, ref["ids"])
    for name in ("logprobs", "log_normalizers", "tail_logprobs", "entropy"):
        torch.testing.assert_close(getattr(targets, name).double(), ref[name], atol=atol, rtol=0, msg=name)
    assert_no_nan(targets)


@pytest.fixture
def logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(37, 300, generator=gen) * 4.0


@pytest.mark.parametrize("k", [1, 5, 64])
def test_select_topk_matches_dense_reference(logits: torch.Tensor, k: int) -> None:
    targets = select_topk(logits, k, TEMPS)
    assert targets.ids.shape == (37, k) and targets.log_normalizers.shape == (37, len(TEMPS))
    assert (targets.ids.diff(dim=-1) > 0).all(), "ids must be sorted ascending and distinct"
    assert_matches_reference(targets, dense_reference(logits, k, TEMPS))


def test_logprob_plus_normalizer_recovers_logits(logits: torch.Tensor) -> None:
    targets = select_topk(logits, 8, TEMPS)
    recovered = targets.logprobs + targets.log_normalizers[:, :1]
    torch.testing.assert_close(recovered, logits.gather(1, targets.ids), atol=ATOL, rtol=0)


def test_tail_is_exact_when_head_holds_almost_all_mass() -> None:
    # Head mass 1 - 1e-10: log(1 - sum p) in float32 would round to log(0) = -inf.
    logits = torch.zeros(4, 200)
    logits[:, 7] = 30.0
    targets = select_topk(logits, 1, TEMPS)
    ref = dense_reference(logits, 1, TEMPS)
    assert_matches_reference(targets, ref)
    assert targets.tail_logprobs[0, 0].item() == pytest.approx(math.log(199) - 30.0, abs=ATOL)
    naive = torch.log1p(-targets.logprobs.exp().sum(dim=-1))
    assert torch.isneginf(naive).all(), "the naive formula should fail here, or this test proves nothing"


def test_k_equal_vocab_gives_neg_inf_tail(logits: torch.Tensor) -> None:
    vocab = logits.shape[1]
    targets = select_topk(logits, vocab, TEMPS)
    assert torch.equal(targets.ids, torch.arange(vocab).expand(logits.shape[0], vocab))
    assert torch.isneginf(targets.tail_logprobs).all()
    assert_no_nan(targets)
    ref = dense_reference(logits, vocab, TEMPS)
    torch.testing.assert_close(targets.logprobs.double(), ref["logprobs"], atol=ATOL, rtol=0)
    torch.testing.assert_close(targets.entropy.double(), ref["entropy"], atol=ATOL, rtol=0)


def test_ties_keep_lowest_ids_deterministically() -> None:
    gen = torch.Generator().manual_seed(1)
    # Values on a coarse grid: many exact ties, including at the k-th place.
    logits = torch.randint(0, 4, (50, 64), generator=gen).float()
    first = select_topk(logits, 10, TEMPS)
    assert torch.equal(first.ids, select_topk(logits.clone(), 10, TEMPS).ids)
    assert_matches_reference(first, dense_reference(logits, 10, TEMPS))
    # Row by row gives the same ids as the whole batch: chunking cannot change the choice among ties.
    by_row = TokenTargets.concat([select_topk(logits[i : i + 1], 10, TEMPS) for i in range(50)])
    assert torch.equal(by_row.ids, first.ids)
    constant = select_topk(torch.zeros(3, 20), 4, [1.0])
    assert torch.equal(constant.ids, torch.arange(4).expand(3, 4))
    torch.testing.assert_close(constant.tail_logprobs[:, 0], torch.full((3,), math.log(16 / 20)))


def test_neg_inf_logits_are_masked_entries(logits: torch.Tensor) -> None:
    masked = logits.clone()
    masked[:, 100:] = float("-inf")  # e.g. padded vocab rows forced to -inf
    masked[0, :99] = float("-inf")  # row 0: one finite logit only (a one-hot distribution)
    targets = select_topk(masked, 8, TEMPS)
    assert_no_nan(targets)
    assert_matches_reference(targets, dense_reference(masked, 8, TEMPS))
    assert (targets.ids[1:] < 100).all()
    assert targets.entropy[0].item() == 0.0
    assert torch.isneginf(targets.tail_logprobs[0]).all()  # every id outside the head has probability 0
    assert targets.logprobs[0, -1].item() == 0.0 and torch.isneginf(targets.logprobs[0, :-1]).all()

    # k equal to the number of finite logits: the tail holds only -inf logits.
    exact = select_topk(masked[1:], 100, TEMPS)
    assert torch.isneginf(exact.tail_logprobs).all()
    assert torch.equal(exact.ids, torch.arange(100).expand(36, 100))
    # k larger than that: -inf ids fill the head, lowest first, with log-prob -inf and no NaN.
    over = select_topk(masked[1:], 103, TEMPS)
    assert_no_nan(over)
    assert torch.equal(over.ids[:, 100:], torch.tensor([100, 101, 102]).expand(36, 3))
    assert torch.isneginf(over.logprobs[:, 100:]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_compute_in_float32(logits: torch.Tensor, dtype: torch.dtype) -> None:
    low = logits.to(dtype)
    targets = select_topk(low, 16, TEMPS)
    assert targets.logprobs.dtype == torch.float32
    assert_matches_reference(targets, dense_reference(low, 16, TEMPS))


def test_empty_batch() -> None:
    targets = select_topk(torch.empty(0, 50, dtype=torch.bfloat16), 5, TEMPS)
    assert targets.ids.shape == (0, 5) and targets.tail_logprobs.shape == (0, len(TEMPS))
    assert targets.entropy.shape == (0,) and targets.num_tokens == 0


def test_concat_equals_one_call(logits: torch.Tensor) -> None:
    whole = select_topk(logits, 6, TEMPS)
    parts = TokenTargets.concat([select_topk(logits[:10], 6, TEMPS), select_topk(logits[10:], 6, TEMPS)])
    assert torch.equal(parts.ids, whole.ids)
    torch.testing.assert_close(parts.tail_logprobs, whole.tail_logprobs)
    assert parts.num_tokens == 37
    with pytest.raises(ValueError, match="empty"):
        TokenTargets.concat([])
    with pytest.raises(ValueError, match="k="):
        TokenTargets.concat([whole, select_topk(logits, 7, TEMPS)])


@pytest.mark.parametrize(
    ("k", "temperatures", "message"),
    [(0, [1.0], "k must be"), (301, [1.0], "k must be"), (3, [2.0, 1.0], "start with 1.0"), (3, [], "start with"),
     (3, [1.0, 0.0], "> 0"), (3, [1.0, float("inf")], "finite")],
)  # fmt: skip
def test_bad_arguments_raise(logits: torch.Tensor, k: int, temperatures: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_topk(logits, k, temperatures)


def test_bad_logits_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        select_topk(torch.tensor([[0.0, float("nan")]]), 1, [1.0])
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        select_topk(torch.tensor([[0.0, float("inf")]]), 1, [1.0])
    with pytest.raises(ValueError, match="entirely -inf"):
        select_topk(torch.full((2, 3), float("-inf")), 1, [1.0])
    with pytest.raises(ValueError, match="2-D"):
        select_topk(torch.zeros(2, 3, 4), 1, [1.0])
    with pytest.raises(ValueError, match="2-D"):
        select_topk(torch.zeros(2, 3, dtype=torch.long), 1, [1.0])


def test_tail_logprob_from_head_matches_float64(logits: torch.Tensor) -> None:
    ref = dense_reference(logits, 5, (1.0,))
    head = ref["logprobs"].float()
    tail = tail_logprob_from_head(head)
    assert tail.shape == (37,) and tail.dtype == torch.float32
    torch.testing.assert_close(tail.double(), ref["tail_logprobs"][:, 0], atol=1e-5, rtol=0)
    # Batched leading dims and half precision input.
    assert tail_logprob_from_head(head.view(1, 37, 5).bfloat16()).shape == (1, 37)


def test_tail_logprob_from_head_edge_cases() -> None:
    half = math.log(0.5)
    assert torch.isneginf(tail_logprob_from_head(torch.tensor([half, half]))).item()
    assert torch.isneginf(tail_logprob_from_head(torch.tensor([0.0, -1.0]))).item()  # sum > 1 by rounding
    assert tail_logprob_from_head(torch.tensor([float("-inf")])).item() == 0.0  # empty head: everything is tail
    assert tail_logprob_from_head(torch.tensor([-30.0])).item() == pytest.approx(-math.exp(-30.0), rel=1e-6)
    tiny_tail = tail_logprob_from_head(torch.tensor([math.log1p(-1e-6)], dtype=torch.float64))
    assert tiny_tail.item() == pytest.approx(math.log(1e-6), abs=1e-6)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


def mixed_tie_logits(n_rows: int, vocab: int, k: int, seed: int) -> torch.Tensor:
    """Rows alternating between distinct values and a tie at the k-th value that topk must break by id."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, vocab, generator=gen) * 4.0
    kth = torch.sort(logits, dim=-1, descending=True).values[:, k - 1 : k]
    for row in range(0, n_rows, 2):  # copy the k-th value onto 3 random lower ids: 4 ids share the k-th place
        lower = (logits[row] < kth[row]).nonzero()[:, 0]
        pick = lower[torch.randperm(len(lower), generator=gen)[:3]]
        logits[row, pick] = kth[row]
    return logits


@pytest.mark.parametrize("block_rows", [1, 3, 1000])
def test_row_blocks_do_not_change_results(monkeypatch, block_rows: int) -> None:
    # The CPU path sums exponentials block by block; block boundaries must not show, -inf entries included.
    logits = mixed_tie_logits(13, 300, 10, seed=2)
    logits[4, 200:] = float("-inf")
    monkeypatch.setattr(targets_module, "_cpu_block_bytes", lambda: block_rows * 300 * 4)
    assert_matches_reference(select_topk(logits, 10, TEMPS), dense_reference(logits, 10, TEMPS))


@pytest.mark.parametrize("n_tied_rows", [0, 1, 5, 12])
def test_tied_and_untied_rows_in_one_batch(n_tied_rows: int) -> None:
    # 0 tied rows: topk's pick only; few: the exact rule on those rows; most (> half): the exact rule on all rows.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 500, generator=gen) * 4.0
    tied = mixed_tie_logits(2 * n_tied_rows, 500, 7, seed=4)[::2]
    logits[:n_tied_rows] = tied
    targets = select_topk(logits, 7, TEMPS)
    assert_matches_reference(targets, dense_reference(logits, 7, TEMPS))
    by_row = TokenTargets.concat([select_topk(logits[i : i + 1], 7, TEMPS) for i in range(12)])
    assert torch.equal(by_row.ids, targets.ids)


def test_large_vocab_matches_float64() -> None:
    # Sums over 32k terms: a naive float32 accumulation (e.g. a BLAS dot) would be off by ~1e-4 in the entropy.
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 32000, generator=gen) * 4.0
    logits[0, 123] = 40.0  # a near one-hot row: tail ~1e-6, entropy ~1e-5
    assert_matches_reference(select_topk(logits, 64, TEMPS), dense_reference(logits, 64, TEMPS), atol=2e-6)


def test_nan_or_inf_anywhere_in_a_row_is_refused() -> None:
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(6))
    for value in (float("nan"), float("inf")):
        bad = logits.clone()
        bad[3, 517] = value  # far from the row's top-k
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            select_topk(bad, 4, [1.0])
        tied = torch.zeros(5, 1000)  # every row tied at the k-th place: the exact path must refuse it as well
        tied[2, 999] = value
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            select_topk(tied, 4, [1.0])


def test_logits_are_not_modified(logits: torch.Tensor) -> None:
    for tensor in (logits, logits.bfloat16()):
        before = tensor.clone()
        select_topk(tensor, 8, TEMPS)
        assert torch.equal(tensor, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_topk_on_device_bf16_and_float32(device: str, dtype: torch.dtype) -> None:
    # Same ids on every device (the tie rule does not depend on topk's internals); values match float64.
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(300, 5000, generator=gen) * 4.0).to(dtype)  # bfloat16: ties at the k-th place are common
    logits[:, 4000:] = float("-inf")  # a padded vocabulary
    logits[7, torch.arange(5000) != 10] = float("-inf")  # a one-hot row
    targets = select_topk(logits.to(device), 32, TEMPS)
    assert targets.ids.device.type == device
    cpu = TokenTargets(**{f.name: getattr(targets, f.name).cpu() for f in dataclasses.fields(targets)})
    assert_matches_reference(cpu, dense_reference(logits, 32, TEMPS), atol=1e-5)
    assert torch.equal(cpu.ids, select_topk(logits, 32, TEMPS).ids)


@pytest.mark.parametrize("vocab", [16384, 20011, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefiltered_topk_values_equal_torch_topk(vocab: int, dtype: torch.dtype) -> None:
    # Large vocabularies on CPU rank through strided group maxima; the values must be exactly topk's, the ids theirs.
    logits = mixed_tie_logits(24, vocab, 33, seed=8).to(dtype)
    logits[1, vocab // 3 :] = float("-inf")  # a padded vocabulary
    logits[2] = 0.0  # every id tied
    logits[3, :] = float("-inf")
    logits[3, vocab - 1] = 1.0  # the only finite logit in the last, partial group
    for k in (1, 34, 256):
        assert vocab // targets_module._PREFILTER_GROUP >= max(targets_module._PREFILTER_MIN_GROUPS, 4 * k)
        values, ids = targets_module._topk_values(logits, k)
        assert torch.equal(values, torch.topk(logits, k, dim=-1, sorted=True).values)
        assert torch.equal(logits.gather(1, ids), values)
        assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all(), "ids must be distinct"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab_ties_and_padding_match_reference(dtype: torch.dtype) -> None:
    logits = mixed_tie_logits(10, 20011, 16, seed=9).to(dtype)
    logits[4, 15000:] = float("-inf")
    assert_matches_reference(select_topk(logits, 16, TEMPS), dense_reference(logits, 16, TEMPS))


@pytest.mark.parametrize("temperatures", [(1.0, 0.3), (1.0, 1.0), (1.0, 3.0, 0.7), (1.0, 0.5, 0.25)])
def test_temperatures_outside_the_squaring_chain(logits: torch.Tensor, temperatures: tuple[float, ...]) -> None:
    # T = 1 overwrites its (z - max) buffer with the entropy's products only when no later T needs it.
    logits = logits.clone()
    logits[5, 100:] = float("-inf")
    assert_matches_reference(select_topk(logits, 5, temperatures), dense_reference(logits, 5, temperatures))


def test_nan_in_a_large_vocab_is_refused() -> None:
    logits = torch.randn(4, 32000, generator=torch.Generator().manual_seed(10))
    for value in (float("nan"), float("inf")):
        bad = logits.clone()
        bad[2, 31999] = value
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            select_topk(bad, 8, [1.0])
