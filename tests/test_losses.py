"""Tests for kdcache.losses: each loss against a dense float64 reference built from full random teacher logits.

Run with ``python -m pytest tests/test_losses.py -q``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.losses import (
    LOSSES,
    TemperatureFallbackWarning,
    cross_entropy,
    distillation_loss,
    forward_kl_tail,
    jsd,
    renormalized_topk_kl,
    reverse_kl,
    sampled_kl,
    tvd,
)

B, T, V = 2, 5, 50
NEG_INF = float("-inf")
F64 = torch.float64


# ------------------------------------------------------------------------------------------------------------------
# Dense references (float64, probabilities on the last axis)


def dense_fkl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)


def dense_rkl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return dense_fkl(q, p)


def dense_jsd(p: torch.Tensor, q: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    m = beta * p + (1 - beta) * q
    return beta * dense_fkl(p, m) + (1 - beta) * dense_fkl(q, m)


def dense_tvd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (p - q).abs().sum(-1)


PAIRS: dict[str, tuple[Callable, Callable]] = {
    "forward_kl": (forward_kl_tail, dense_fkl),
    "reverse_kl": (reverse_kl, dense_rkl),
    "jsd": (jsd, dense_jsd),
    "tvd": (tvd, dense_tvd),
}


def to_buckets(probs: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[..., V']`` dense probs -> ``[..., k + 1]``: valid head entries (0 elsewhere) and all remaining mass."""
    member = torch.zeros(*probs.shape[:-1], probs.shape[-1] + 1, dtype=torch.bool)
    member = member.scatter(-1, ids.masked_fill(~valid, probs.shape[-1]), True)[..., :-1]
    head = probs.gather(-1, ids).masked_fill(~valid, 0.0)
    return torch.cat([head, (probs * ~member).sum(-1, keepdim=True)], -1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


# ------------------------------------------------------------------------------------------------------------------
# Fake cache batches


def teacher_logits(seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def student_logits(seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randn(B, T, vocab, generator=torch.Generator().manual_seed(seed), dtype=F64).requires_grad_(True)


def make_batch(z: torch.Tensor, k: int, temperatures: list[float] | None = None, dtype: torch.dtype = F64) -> dict:
    """What the cache reader would give for teacher logits ``z`` [B, T, V]: top-k head sorted by id, tails, labels.

    Float tensors are float64 by default so references can be compared to 1e-10; the cache itself stores float32.
    """
    logprobs = z.log_softmax(-1)
    ids = logprobs.topk(k, -1).indices.sort(-1).values
    valid = torch.ones_like(ids, dtype=torch.bool)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    labels[0, -1] = labels[1, 0] = -100
    batch = {"target_ids": ids, "target_logprobs": logprobs.gather(-1, ids).to(dtype), "labels": labels}
    batch["tail_logprob"] = to_buckets(logprobs.exp(), ids, valid)[..., -1].log().to(dtype)
    if temperatures is not None:
        batch["temperatures"] = list(temperatures)
        batch["log_normalizers"] = torch.stack([torch.logsumexp(z / t, -1) for t in temperatures], -1).to(dtype)
        tails = [to_buckets((z / t).softmax(-1), ids, valid)[..., -1].log() for t in temperatures]
        batch["tail_logprobs"] = torch.stack(tails, -1).to(dtype)
    return batch


def sample_targets(
    logprobs: torch.Tensor, num_samples: int, generator: torch.Generator, head_k: int = 0
) -> dict[str, torch.Tensor]:
    """Draw ``num_samples`` ids with replacement from each row of ``logprobs`` [N, V] and aggregate them.

    With ``head_k`` > 0 (hybrid) the top ``head_k`` ids are kept exactly and the draws come from the rest of the
    distribution, renormalised; weights are then ``tail_mass * count / N``. Rows are padded to the largest number of
    unique ids with weight-0 entries.
    """
    probs = logprobs.exp()
    out = {}
    if head_k:
        head_ids = logprobs.topk(head_k, -1).indices.sort(-1).values
        out = {"target_ids": head_ids, "target_logprobs": logprobs.gather(-1, head_ids)}
        probs = probs.scatter(-1, head_ids, 0.0)
    mass = probs.sum(-1, keepdim=True)
    draws = torch.multinomial(probs / mass, num_samples, replacement=True, generator=generator)
    counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
    width = int((counts > 0).sum(-1).max())
    top_counts, ids = counts.topk(width, -1)
    weights = top_counts / num_samples * (mass if head_k else 1.0)
    out.update(sample_ids=ids, sample_weights=weights, sample_logprobs=logprobs.gather(-1, ids))
    return out


def sampled_batch(logprobs: torch.Tensor, generator: torch.Generator, head_k: int = 0, extra: dict | None = None):
    flat = sample_targets(logprobs.reshape(-1, V), 50, generator, head_k)
    batch = {key: value.reshape(B, T, -1) for key, value in flat.items()}
    return {**batch, **(extra or {})}


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, x)[0]


# ------------------------------------------------------------------------------------------------------------------
# Exactness against dense references


@pytest.mark.parametrize("name", list(PAIRS))
def test_full_head_equals_dense_loss_and_grad(name: str) -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=V)
    assert torch.all(batch["tail_logprob"] == NEG_INF)
    loss_fn, dense = PAIRS[name]
    mask = batch["labels"] != -100
    got = loss_fn(s, batch)
    want = masked_mean(dense(z.softmax(-1), s.softmax(-1)), mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("k", [1, 7, V - 1])
def test_topk_equals_dense_loss_on_merged_tail(name: str, k: int) -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=k)
    ids, valid = batch["target_ids"], torch.ones_like(batch["target_ids"], dtype=torch.bool)
    loss_fn, dense = PAIRS[name]
    got = loss_fn(s, batch)
    p, q = to_buckets(z.softmax(-1), ids, valid), to_buckets(s.softmax(-1), ids, valid)
    want = masked_mean(dense(p, q), batch["labels"] != -100)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), rtol=1e-9, atol=1e-12)


def test_jsd_beta_endpoints_and_midpoint() -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=7)
    torch.testing.assert_close(jsd(s, batch, beta=0.0), forward_kl_tail(s, batch))
    torch.testing.assert_close(jsd(s, batch, beta=1.0), reverse_kl(s, batch))
    ids, valid = batch["target_ids"], torch.ones_like(batch["target_ids"], dtype=torch.bool)
    p, q = to_buckets(z.softmax(-1), ids, valid), to_buckets(s.softmax(-1), ids, valid)
    want = masked_mean(dense_jsd(p, q, beta=0.2), batch["labels"] != -100)
    torch.testing.assert_close(jsd(s, batch, beta=0.2), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="beta"):
        jsd(s, batch, beta=1.5)


def test_padding_entries_in_head_are_absent() -> None:
    """Rows with k' < k valid entries are padded with id 0 / -inf; a real id 0 in the same row still counts."""
    z, s = teacher_logits(), student_logits()
    z[0, 0, 0] = 10.0  # make id 0 a real head id in position (0, 0)
    batch = make_batch(z, k=8)
    ids, logprobs = batch["target_ids"].clone(), batch["target_logprobs"].clone()
    lengths = torch.randint(1, 9, (B, T), generator=torch.Generator().manual_seed(3))
    lengths[0, 0] = 5
    valid = torch.arange(8) < lengths.unsqueeze(-1)
    ids, logprobs = ids.masked_fill(~valid, 0), logprobs.masked_fill(~valid, NEG_INF)
    assert ids[0, 0, 0] == 0 and valid[0, 0, 0] and not valid[0, 0, -1]
    dense_p = z.softmax(-1)
    tail = to_buckets(dense_p, ids, valid)[..., -1].log()
    batch.update(target_ids=ids, target_logprobs=logprobs, tail_logprob=tail)
    mask = batch["labels"] != -100
    for name, (loss_fn, dense) in PAIRS.items():
        got = loss_fn(s, batch)
        want = masked_mean(dense(to_buckets(dense_p, ids, valid), to_buckets(s.softmax(-1), ids, valid)), mask)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(grad_of(got, s), grad_of(want, s), rtol=1e-9, atol=1e-12, msg=name)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, V), scale=st.floats(0.1, 8.0))
def test_bucketed_divergences_never_exceed_dense(seed: int, k: int, scale: float) -> None:
    """Merging outcomes cannot increase an f-divergence, and every bucketed loss is finite and non-negative."""
    z, s = teacher_logits(seed, scale), student_logits(seed + 1).detach()
    batch = make_batch(z, k=k)
    mask = batch["labels"] != -100
    for name, (loss_fn, dense) in PAIRS.items():
        got = float(loss_fn(s, batch).detach())
        assert 0.0 <= got <= float(masked_mean(dense(z.softmax(-1), s.softmax(-1)), mask)) + 1e-12, name


# ------------------------------------------------------------------------------------------------------------------
# Temperatures


@pytest.mark.parametrize("k", [V, 7])
@pytest.mark.parametrize("name", list(PAIRS))
def test_stored_temperature_is_exact(name: str, k: int) -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=k, temperatures=[1.0, 2.0, 4.0])
    ids, valid = batch["target_ids"], torch.ones_like(batch["target_ids"], dtype=torch.bool)
    loss_fn, dense = PAIRS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = loss_fn(s, batch, temperature=2.0)
    p, q = (z / 2).softmax(-1), (s / 2).softmax(-1)
    if k < V:
        p, q = to_buckets(p, ids, valid), to_buckets(q, ids, valid)
    want = masked_mean(dense(p, q), batch["labels"] != -100)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), rtol=1e-8, atol=1e-12)


def test_stored_temperature_from_float32_cache_matches_dense_kl() -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=V, temperatures=[1.0, 2.0], dtype=torch.float32)  # as the cache stores it
    want = masked_mean(dense_fkl((z / 2).softmax(-1), (s / 2).softmax(-1)), batch["labels"] != -100)
    torch.testing.assert_close(forward_kl_tail(s, batch, temperature=2.0), want, rtol=1e-5, atol=1e-6)


def test_stored_temperature_without_tail_key_derives_the_tail() -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=7, temperatures=[1.0, 2.0])
    exact = forward_kl_tail(s, batch, temperature=2.0)
    batch.pop("tail_logprobs")
    torch.testing.assert_close(forward_kl_tail(s, batch, temperature=2.0), exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(PAIRS))
def test_unstored_temperature_warns_and_renormalizes(name: str) -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=7, temperatures=[1.0, 2.0])
    loss_fn, dense = PAIRS[name]
    with pytest.warns(TemperatureFallbackWarning, match=r"temperature 3\.0 is not in the cache") as record:
        loss = loss_fn(s, batch, temperature=3.0)
    assert record[0].filename == __file__  # the warning points at the caller, not at kdcache internals
    ids = batch["target_ids"]  # fallback: teacher head and student head ids, each renormalised, no tail bucket
    p, q = (z / 3).gather(-1, ids).softmax(-1), (s / 3).gather(-1, ids).softmax(-1)
    torch.testing.assert_close(loss, masked_mean(dense(p, q), batch["labels"] != -100), rtol=1e-10, atol=1e-12)
    batch_without = {key: v for key, v in batch.items() if key not in ("temperatures", "log_normalizers")}
    with pytest.warns(TemperatureFallbackWarning, match="no 'temperatures'"):
        PAIRS[name][0](s, batch_without, temperature=2.0)


def test_renormalized_topk_needs_no_stored_temperature() -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = renormalized_topk_kl(s, batch, temperature=3.0)
    ids = batch["target_ids"]
    p, q = (z / 3).gather(-1, ids).softmax(-1), (s / 3).gather(-1, ids).softmax(-1)
    torch.testing.assert_close(got, masked_mean(dense_fkl(p, q), batch["labels"] != -100), rtol=1e-10, atol=1e-12)


def test_bad_temperature_raises() -> None:
    batch = make_batch(teacher_logits(), k=7)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl_tail(student_logits(), batch, temperature=0.0)


# ------------------------------------------------------------------------------------------------------------------
# Masks, vocab sizes, chunking, dtypes


def test_masked_positions_change_nothing() -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=7)
    loss_mask = torch.rand(B, T, generator=torch.Generator().manual_seed(5)) > 0.4
    batch["loss_mask"] = loss_mask
    for name in ["forward_kl", "reverse_kl", "jsd", "tvd", "renormalized_topk_kl"]:
        loss = LOSSES[name](s, batch)
        grad = grad_of(loss, s)
        assert torch.all(grad[~loss_mask] == 0), name
        moved = (s.detach() + 5.0 * torch.randn(B, T, V, dtype=F64) * (~loss_mask).unsqueeze(-1)).requires_grad_()
        torch.testing.assert_close(LOSSES[name](moved, batch), loss, rtol=0, atol=0, msg=name)
    # Default mask: labels != -100; the mean is over those positions only.
    batch.pop("loss_mask")
    head_valid = torch.ones(B, T, 7, dtype=torch.bool)
    per_position = dense_fkl(*(to_buckets(x.softmax(-1), batch["target_ids"], head_valid) for x in (z, s)))
    keep = batch["labels"] != -100
    torch.testing.assert_close(forward_kl_tail(s, batch), per_position[keep].mean(), rtol=1e-10, atol=1e-12)
    # Without labels the attention mask is used.
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, 3:] = 0
    batch_attn = {**{key: v for key, v in batch.items() if key != "labels"}, "attention_mask": attention}
    torch.testing.assert_close(forward_kl_tail(s, batch_attn), per_position[attention.bool()].mean())


def test_all_positions_masked_gives_zero_and_zero_grad() -> None:
    s = student_logits()
    batch = {**make_batch(teacher_logits(), k=7), "loss_mask": torch.zeros(B, T, dtype=torch.bool)}
    loss = forward_kl_tail(s, batch)
    assert float(loss.detach()) == 0.0 and torch.all(grad_of(loss, s) == 0)


@pytest.mark.parametrize("k", [V, 7])
def test_student_vocab_larger_than_teacher(k: int) -> None:
    extra = 6
    z, s = teacher_logits(), student_logits(vocab=V + extra)
    batch = {**make_batch(z, k=k), "teacher_vocab_size": V}
    padded_p = torch.cat([z.softmax(-1), torch.zeros(B, T, extra, dtype=F64)], -1)
    ids, valid = batch["target_ids"], torch.ones_like(batch["target_ids"], dtype=torch.bool)
    got = forward_kl_tail(s, batch)
    p, q = to_buckets(padded_p, ids, valid), to_buckets(s.softmax(-1), ids, valid)
    want = masked_mean(dense_fkl(p, q), batch["labels"] != -100)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), rtol=1e-9, atol=1e-12)
    if k == V:  # the dense KL itself: extra student columns only add to the student's tail
        dense = masked_mean(dense_fkl(padded_p, s.softmax(-1)), batch["labels"] != -100)
        torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-12)


def test_student_vocab_smaller_than_teacher_raises() -> None:
    batch = {**make_batch(teacher_logits(), k=7), "teacher_vocab_size": V}
    small = student_logits(vocab=V - 3)
    for name, loss_fn in LOSSES.items():
        if name == "sampled_kl":
            continue
        with pytest.raises(ValueError, match=rf"student vocab size {V - 3}.*teacher vocab size {V}"):
            loss_fn(small, batch)
    # Without the vocab size the largest cached id is checked.
    batch = make_batch(teacher_logits(), k=V)
    batch.pop("labels")
    with pytest.raises(ValueError, match=rf"student vocab size {V - 3}.*teacher vocab size \(at least {V}"):
        forward_kl_tail(small, batch)


def test_shape_mismatch_and_missing_key_raise() -> None:
    batch = make_batch(teacher_logits(), k=7)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        forward_kl_tail(student_logits()[:, :3], batch)
    with pytest.raises(ValueError, match="'sample_ids'"):
        sampled_kl(student_logits(), batch)
    with pytest.raises(ValueError, match="chunk_tokens"):
        forward_kl_tail(student_logits(), batch, chunk_tokens=0)


def _all_losses(s: torch.Tensor, batch: dict, sampled: dict, chunk_tokens: int) -> list[torch.Tensor]:
    out = [fn(s, batch, chunk_tokens=chunk_tokens) for name, fn in LOSSES.items() if name != "sampled_kl"]
    out.append(sampled_kl(s, sampled, chunk_tokens=chunk_tokens))
    out.append(cross_entropy(s, batch["labels"], chunk_tokens=chunk_tokens))
    out.append(forward_kl_tail(s, batch, temperature=2.0, chunk_tokens=chunk_tokens))
    return out


def test_chunking_does_not_change_loss_or_grad() -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=7, temperatures=[1.0, 2.0])
    sampled = sampled_batch(
        z.log_softmax(-1), torch.Generator().manual_seed(0), head_k=4, extra={"labels": batch["labels"]}
    )
    reference = [(loss.detach(), grad_of(loss, s)) for loss in _all_losses(s, batch, sampled, chunk_tokens=1024)]
    for chunk_tokens in (1, 3):
        for got, (want, want_grad) in zip(_all_losses(s, batch, sampled, chunk_tokens), reference, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(grad_of(got, s), want_grad, rtol=0, atol=0)


def test_low_precision_student_logits() -> None:
    z = teacher_logits()
    s32 = student_logits().detach().float()
    s16 = s32.bfloat16().requires_grad_(True)
    batch = make_batch(z, k=7, dtype=torch.float32)
    loss = forward_kl_tail(s16, batch, chunk_tokens=4)
    assert loss.dtype == torch.float32
    grad = grad_of(loss, s16)
    assert grad.dtype == torch.bfloat16
    want = forward_kl_tail(s16.detach().float().requires_grad_(True), batch)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_no_grad_evaluation() -> None:
    batch = make_batch(teacher_logits(), k=7)
    s = student_logits()
    with torch.no_grad():
        loss = forward_kl_tail(s, batch)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, forward_kl_tail(s, batch).detach())


# ------------------------------------------------------------------------------------------------------------------
# Sampled targets


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5], ids=["T1", "stored-T2", "unstored-T1.5"])
@pytest.mark.parametrize("head_k", [0, 6], ids=["sample", "hybrid"])
def test_sampled_with_exact_weights_equals_dense_kl(head_k: int, temperature: float) -> None:
    """With every id 'sampled' at weight p (a draw-free limit), the estimator is the dense KL itself.

    At a stored T the importance reweighting is exact; at an unstored T the self-normalised weights are exact too
    here, because the draws cover the whole vocabulary (but it still warns).
    """
    z, s = teacher_logits(), student_logits()
    logprobs = z.log_softmax(-1)
    ids = torch.arange(V).expand(B, T, V)
    batch = {"sample_ids": ids, "sample_weights": logprobs.exp(), "sample_logprobs": logprobs}
    if head_k:
        head = logprobs.topk(head_k, -1).indices.sort(-1).values
        batch = {
            "target_ids": head,
            "target_logprobs": logprobs.gather(-1, head),
            "sample_ids": ids,
            "sample_weights": logprobs.exp().scatter(-1, head, 0.0),  # tail samples only; head weights 0 = padding
            "sample_logprobs": logprobs,
        }
    stored = make_batch(z, k=1, temperatures=[1.0, 2.0])
    batch.update({key: stored[key] for key in ("labels", "temperatures", "log_normalizers")})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = sampled_kl(s, batch, temperature=temperature)
    assert [w.category for w in record] == ([TemperatureFallbackWarning] if temperature == 1.5 else [])
    p, q = (z / temperature).softmax(-1), (s / temperature).softmax(-1)
    want = masked_mean(dense_fkl(p, q), batch["labels"] != -100)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), rtol=1e-9, atol=1e-12)


def _sampled_angles(head_k: int, temperature: float = 1.0, checkpoints=(1, 4, 16, 64, 256)) -> list[float]:
    z, s = teacher_logits(), student_logits()
    extra = make_batch(z, k=1, temperatures=[1.0, 2.0])
    extra = {key: extra[key] for key in ("labels", "temperatures", "log_normalizers")}
    full = masked_mean(
        dense_fkl((z / temperature).softmax(-1), (s / temperature).softmax(-1)), extra["labels"] != -100
    )
    full_grad = grad_of(full, s)
    generator, logprobs = torch.Generator().manual_seed(0), z.log_softmax(-1)
    total, angles = torch.zeros_like(s), []
    for draw in range(1, max(checkpoints) + 1):
        batch = sampled_batch(logprobs, generator, head_k, extra)
        total += grad_of(sampled_kl(s, batch, temperature=temperature), s)
        if draw in checkpoints:
            angles.append(angle_degrees(total / draw, full_grad))
    return angles


@pytest.mark.parametrize("head_k", [0, 5], ids=["sample", "hybrid"])
def test_sampled_gradient_converges_to_full_kd_gradient(head_k: int) -> None:
    angles = _sampled_angles(head_k)
    assert all(a > b for a, b in zip(angles, angles[1:])), angles
    assert angles[-1] < 3.0, angles


def test_sampled_gradient_converges_at_stored_temperature() -> None:
    # Draws come from p at T = 1 and are importance-reweighted to p_T: more variance, so average more draws.
    angles = _sampled_angles(head_k=0, temperature=2.0, checkpoints=(1, 4, 16, 64, 256, 1024))
    assert all(a > b for a, b in zip(angles, angles[1:])), angles
    assert angles[-1] < 3.0, angles


def test_sampled_loss_is_unbiased() -> None:
    z, s = teacher_logits(), student_logits().detach()
    labels = make_batch(z, k=1)["labels"]
    full = float(masked_mean(dense_fkl(z.softmax(-1), s.softmax(-1)), labels != -100))
    generator, logprobs = torch.Generator().manual_seed(1), z.log_softmax(-1)
    draws = [float(sampled_kl(s, sampled_batch(logprobs, generator, 0, {"labels": labels}))) for _ in range(200)]
    assert abs(sum(draws) / len(draws) - full) < 0.02 * full


def test_renormalized_topk_gradient_is_biased() -> None:
    """Top-5 renormalised targets point further from the full-KD gradient than even one sampled draw."""
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=5)
    full = masked_mean(dense_fkl(z.softmax(-1), s.softmax(-1)), batch["labels"] != -100)
    topk_angle = angle_degrees(grad_of(renormalized_topk_kl(s, batch), s), grad_of(full, s))
    sampled_angle = _sampled_angles(head_k=0, checkpoints=(1,))[0]
    assert topk_angle > sampled_angle, (topk_angle, sampled_angle)
    assert topk_angle > 20.0


def test_sampled_unstored_temperature_warns() -> None:
    z, s = teacher_logits(), student_logits()
    batch = sampled_batch(z.log_softmax(-1), torch.Generator().manual_seed(0), head_k=3)
    with pytest.warns(TemperatureFallbackWarning) as record:
        loss = sampled_kl(s, batch, temperature=1.5)
    assert record[0].filename == __file__
    assert torch.isfinite(loss) and torch.isfinite(grad_of(loss, s)).all()


# ------------------------------------------------------------------------------------------------------------------
# Cross-entropy and the mixed objective


def test_cross_entropy_matches_torch() -> None:
    s, labels = student_logits(), make_batch(teacher_logits(), k=1)["labels"]
    got = cross_entropy(s, labels, chunk_tokens=3)
    want = torch.nn.functional.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_mixes_kd_and_ce(alpha: float) -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=7, temperatures=[1.0, 2.0])
    got = distillation_loss(s, batch, kind="forward_kl", alpha=alpha, temperature=2.0)
    want = alpha * 4.0 * forward_kl_tail(s, batch, temperature=2.0) + (1 - alpha) * cross_entropy(s, batch["labels"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), rtol=1e-12, atol=1e-12)


def test_distillation_loss_options() -> None:
    z, s = teacher_logits(), student_logits()
    batch = make_batch(z, k=7)
    torch.testing.assert_close(distillation_loss(s, batch, kind="jsd", alpha=1.0, beta=0.0), forward_kl_tail(s, batch))
    kd_only = {key: v for key, v in batch.items() if key != "labels"}
    kd_only["loss_mask"] = torch.ones(B, T, dtype=torch.bool)
    assert torch.isfinite(distillation_loss(s, kd_only, kind="tvd", alpha=1.0))
    with pytest.raises(ValueError, match="'labels'"):
        distillation_loss(s, kd_only, alpha=0.5)
    with pytest.raises(ValueError, match="unknown kind"):
        distillation_loss(s, batch, kind="nope")
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, batch, alpha=2.0)


def test_losses_registry() -> None:
    assert LOSSES["forward_kl"] is forward_kl_tail
    assert {"reverse_kl", "jsd", "tvd", "renormalized_topk_kl", "sampled_kl"} <= set(LOSSES)


# ------------------------------------------------------------------------------------------------------------------
# The default estimator (issue 12, item 18)


def test_default_kind_is_the_estimator_that_fits_the_batch(monkeypatch) -> None:
    import kdcache.losses as losses

    monkeypatch.setattr(losses, "_warned_ignored", set(), raising=False)
    z, s = teacher_logits(), student_logits()
    topk = make_batch(z, k=8)
    hybrid = sampled_batch(
        z.log_softmax(-1), torch.Generator().manual_seed(3), head_k=6, extra={"labels": topk["labels"]}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults never warn
        assert losses.default_kind(topk) == "forward_kl" and losses.default_kind(hybrid) == "sampled_kl"
        torch.testing.assert_close(distillation_loss(s, topk, alpha=1.0), forward_kl_tail(s, topk))
        torch.testing.assert_close(distillation_loss(s, hybrid, alpha=1.0), sampled_kl(s, hybrid))
        distillation_loss(s, hybrid, kind="sampled_kl", alpha=1.0)


def test_an_explicit_head_only_loss_on_sampled_targets_warns_once(monkeypatch) -> None:
    import kdcache.losses as losses

    monkeypatch.setattr(losses, "_warned_ignored", set(), raising=False)
    z, s = teacher_logits(), student_logits()
    hybrid = sampled_batch(z.log_softmax(-1), torch.Generator().manual_seed(3), head_k=6)
    hybrid["tail_logprob"] = (1 - hybrid["target_logprobs"].exp().sum(-1)).log()
    with pytest.warns(losses.IgnoredSamplesWarning, match="kind='forward_kl' .* ignores its sampled targets"):
        distillation_loss(s, hybrid, kind="forward_kl", alpha=1.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        distillation_loss(s, hybrid, kind="forward_kl", alpha=1.0)  # once per kind
        assert not [w for w in record if w.category is losses.IgnoredSamplesWarning]
    with pytest.warns(losses.IgnoredSamplesWarning, match="kind='reverse_kl'"):
        distillation_loss(s, hybrid, kind="reverse_kl", alpha=1.0)
