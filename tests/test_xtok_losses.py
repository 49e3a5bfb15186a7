"""The losses on a student with another tokenizer: forward KL with the tail bucket on the mapped ids (what
`distillation_loss` computes on a cross-tokenizer batch) against a direct computation, and the ULD loss on sorted
probability vectors (`kdcache.losses.uld_loss`) on cross-tokenizer and plain batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.losses import distillation_loss, forward_kl_tail, uld_loss
from kdcache.pieces import token_pieces
from kdcache.read.xbatch import CrossTokenizer
from tests.test_xtok import HELD_OUT, TEXT, teacher_sequence, toks  # noqa: F401  (toks is a fixture)


@pytest.fixture(scope="module")
def cross_batch(toks):  # noqa: F811
    cross = CrossTokenizer(token_pieces(toks["big"]), toks["small"])
    seqs = [
        cross.sequence(teacher_sequence(toks["big"], text, k=12, seed=i)) for i, text in enumerate([TEXT, HELD_OUT])
    ]
    arrays = cross.collate(seqs)
    batch = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}
    batch["teacher_vocab_size"] = cross.student_vocab_size
    batch["temperatures"] = [1.0]
    return batch, cross.student_vocab_size


def _student_logits(batch, vocab, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b, length = batch["input_ids"].shape
    return (torch.randn(b, length, vocab, generator=g, dtype=dtype) * 2).requires_grad_(True)


def _rows(batch):
    mask = batch["loss_mask"]
    return (
        batch["target_ids"][mask].numpy(),
        batch["target_logprobs"][mask].double().numpy(),
        batch["tail_logprob"][mask].double().numpy(),
        batch["unmapped_logprobs"][mask].double().numpy(),
        mask,
    )


def test_forward_kl_on_mapped_ids_is_the_bucketed_kl(cross_batch):
    batch, vocab = cross_batch
    logits = _student_logits(batch, vocab)
    ids, lp, tail, _, mask = _rows(batch)
    logq = torch.log_softmax(logits.detach()[mask], -1).numpy()
    want = []
    for row in range(len(ids)):
        valid = np.isfinite(lp[row])
        p, q = np.exp(lp[row][valid]), np.exp(logq[row][ids[row][valid]])
        p_tail, q_tail = np.exp(tail[row]), 1.0 - q.sum()
        kl = (p * (np.log(p) - np.log(q))).sum()
        want.append(kl + (p_tail * (np.log(p_tail) - np.log(q_tail)) if p_tail > 0 else 0.0))
    got = forward_kl_tail(logits, batch)
    assert float(got.detach()) == pytest.approx(float(np.mean(want)), rel=1e-9)
    mixed = distillation_loss(logits, batch, kind="forward_kl", alpha=0.5)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), batch["labels"].reshape(-1), ignore_index=-100)
    assert float(mixed.detach()) == pytest.approx(0.5 * float(got.detach()) + 0.5 * float(ce.detach()), rel=1e-9)
    mixed.backward()
    assert torch.isfinite(logits.grad).all()
    logits.grad = None
    distillation_loss(logits, batch, kind="forward_kl", alpha=1.0).backward()
    assert float(logits.grad[~mask].abs().max()) == 0.0  # positions without a teacher target get no KD gradient
    informative = mask & torch.isfinite(batch["target_logprobs"]).any(-1)  # an empty mapped set: KL over one outcome
    assert float(logits.grad[informative].abs().sum(-1).min()) > 0


def test_uld_on_the_unmapped_part(cross_batch):
    batch, vocab = cross_batch
    logits = _student_logits(batch, vocab, seed=1)
    ids, lp, tail, unmapped, mask = _rows(batch)
    q_all = torch.softmax(logits.detach()[mask], -1).numpy()
    want = []
    for row in range(len(ids)):
        valid = np.isfinite(lp[row])
        outside = np.ones(vocab, dtype=bool)
        outside[ids[row][valid]] = False
        q_sorted = np.sort(q_all[row][outside])[::-1][: unmapped.shape[1]]
        p_sorted = np.exp(unmapped[row])
        q_sorted = np.pad(q_sorted, (0, len(p_sorted) - len(q_sorted)))
        p_rest = max(np.exp(tail[row]) - p_sorted.sum(), 0.0)
        q_rest = max(q_all[row][outside].sum() - q_sorted.sum(), 0.0)
        want.append(np.abs(p_sorted - q_sorted).sum() + abs(p_rest - q_rest))
    got = uld_loss(logits, batch)
    assert float(got.detach()) == pytest.approx(float(np.mean(want)), rel=1e-9)
    got.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) > 0
    assert float(distillation_loss(logits, batch, kind="uld", alpha=1.0).detach()) == pytest.approx(
        float(got.detach())
    )
    with pytest.raises(ValueError, match="one temperature"):
        uld_loss(logits, batch, temperature=2.0)


def test_plain_uld_does_not_depend_on_the_vocabularys_order():
    # a plain batch holding the teacher's whole distribution: ULD compares sorted vectors, so a student that is the
    # teacher with its vocabulary permuted has ULD 0 but a large KL
    g = torch.Generator().manual_seed(0)
    vocab, length = 40, 6
    teacher = torch.randn(1, length, vocab, generator=g, dtype=torch.float64) * 2
    logp = torch.log_softmax(teacher, -1)
    batch = {
        "target_ids": torch.arange(vocab).expand(1, length, vocab).clone(),
        "target_logprobs": logp,
        "tail_logprob": torch.full((1, length), float("-inf"), dtype=torch.float64),
    }
    permuted = teacher[..., torch.randperm(vocab, generator=g)].clone().requires_grad_(True)
    assert float(uld_loss(permuted, batch).detach()) == pytest.approx(0.0, abs=1e-12)
    assert float(forward_kl_tail(permuted, batch).detach()) > 0.5
    # a student far from it: gradient descent on ULD alone brings its sorted probabilities to the teacher's
    student = torch.zeros(1, length, vocab, dtype=torch.float64, requires_grad=True)
    first = float(uld_loss(student, batch).detach())
    optimizer = torch.optim.Adam([student], lr=0.1)  # L1 on probabilities: plain SGD oscillates
    for _ in range(100):
        optimizer.zero_grad()
        uld_loss(student, batch).backward()
        optimizer.step()
    assert float(uld_loss(student, batch).detach()) < 0.05 * first
    # a top-k head: the rest of each distribution is one more outcome
    top = logp.topk(8, -1)
    head = {
        "target_ids": top.indices,
        "target_logprobs": top.values,
        "tail_logprob": torch.log1p(-top.values.exp().sum(-1)),
    }
    assert float(uld_loss(permuted, head).detach()) == pytest.approx(0.0, abs=1e-9)
