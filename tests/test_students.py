"""Tests of `kdcache.demo.students` (training loop, evaluation metrics) and `bench/distill.py --quick`."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from fake_cache import write_fake_cache

from kdcache import losses
from kdcache.demo import evaluation as ev
from kdcache.demo import training as tr

REPO = Path(__file__).resolve().parent.parent
TINY = ev.StudentSpec("h16-L1", 16, 1, 2)
Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------ metrics


def test_ece_on_a_hand_made_example():
    # 15 bins of width 1/15: 0.95 -> (14/15, 1], 0.55 -> (8/15, 9/15], 0.25 -> (3/15, 4/15].
    confidence = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.25])
    correct = torch.tensor([True, False, True, True, False])
    # (2/5)|0.5 - 0.95| + (2/5)|1 - 0.55| + (1/5)|0 - 0.25| = 0.18 + 0.18 + 0.05
    assert ev.expected_calibration_error(confidence, correct) == pytest.approx(0.41)
    # Two confidences in one bin average before the gap is taken: (2/2)|0.5 - (0.03 + 0.05)/2|
    assert ev.expected_calibration_error(torch.tensor([0.03, 0.05]), torch.tensor([True, False])) == pytest.approx(
        0.46
    )
    # ... and land in different bins with 2 bins: (1/2)|1 - 0.3| + (1/2)|0 - 0.7|
    two = ev.expected_calibration_error(torch.tensor([0.3, 0.7]), torch.tensor([True, False]), bins=2)
    assert two == pytest.approx(0.7)
    assert ev.expected_calibration_error(torch.ones(4), torch.ones(4, dtype=torch.bool)) == 0.0
    assert ev.expected_calibration_error(torch.full((4,), 0.5), torch.tensor([1, 0, 1, 0]).bool()) == 0.0
    assert ev.expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == 0.0


def test_ece_matches_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    confidence = torch.rand(1000, generator=g)
    correct = torch.rand(1000, generator=g) < confidence**2  # over-confident on purpose
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = [(c, a) for c, a in zip(confidence.tolist(), correct.tolist()) if lo < c <= hi or (b == 0 and c == 0)]
        if inside:
            conf = sum(c for c, _ in inside) / len(inside)
            acc = sum(a for _, a in inside) / len(inside)
            total += len(inside) / 1000 * abs(acc - conf)
    assert ev.expected_calibration_error(confidence, correct) == pytest.approx(total, abs=1e-9)
    assert total > 0.1


def _random_valid(
    vocab: int, teacher_vocab: int, windows: int = 3, length: int = 7
) -> tuple[ev.ValidationSet, Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (windows, length), generator=g)
    labels = torch.randint(0, teacher_vocab, (windows, length), generator=g)
    teacher_logits = torch.randn(windows, length, teacher_vocab, generator=g) * 2.0
    return ev.ValidationSet(input_ids, labels, torch.log_softmax(teacher_logits, -1), curve_windows=1)


@pytest.mark.parametrize("teacher_vocab", [48, 40])  # equal vocabularies, and a teacher narrower than the student
def test_evaluate_matches_dense_references(teacher_vocab):
    vocab = 48
    valid = _random_valid(vocab, teacher_vocab)
    model = ev.build_student(TINY, vocab_size=vocab, seed=3).eval()
    got = ev.evaluate(model, valid, batch_windows=2)
    with torch.no_grad():
        logits = model(input_ids=valid.input_ids).logits.double()
    log_q = torch.log_softmax(logits, -1)
    log_p = valid.teacher_logprobs.double()
    # KL(p || q) with p zero on the student's extra columns (kl_div uses xlogy: 0 log 0 = 0)
    p_full = torch.zeros_like(log_q)
    p_full[..., :teacher_vocab] = log_p.exp()
    kl = torch.nn.functional.kl_div(log_q.reshape(-1, vocab), p_full.reshape(-1, vocab), reduction="batchmean")
    assert got["kl"] == pytest.approx(float(kl), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), valid.labels.reshape(-1))
    assert got["ce"] == pytest.approx(float(ce), rel=1e-5)
    conf, pred = log_q.exp().max(-1)
    assert got["accuracy"] == pytest.approx(float((pred == valid.labels).double().mean()))
    assert got["ece"] == pytest.approx(ev.expected_calibration_error(conf, pred == valid.labels), abs=1e-6)
    first = ev.evaluate(model, valid, windows=valid.curve_windows)
    assert first["ce"] == pytest.approx(float(-log_q[:1].gather(-1, valid.labels[:1, :, None]).mean()), rel=1e-5)


def test_dense_forward_kl_is_forward_kl_tail_with_every_id_cached():
    g = torch.Generator().manual_seed(2)
    b, t, v = 2, 5, 24
    student = torch.randn(b, t, v, generator=g, requires_grad=True)
    teacher = torch.randn(b, t, v, generator=g) * 3
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False
    batch = {
        "target_ids": torch.arange(v).expand(b, t, v),
        "target_logprobs": torch.log_softmax(teacher, -1),
        "tail_logprob": torch.full((b, t), -math.inf),
        "loss_mask": mask,
    }
    dense = ev.dense_forward_kl(student, teacher, mask)
    (g_dense,) = torch.autograd.grad(dense, student)
    bucket = losses.forward_kl_tail(student, batch)
    (g_bucket,) = torch.autograd.grad(bucket, student)
    assert float(dense.detach()) == pytest.approx(float(bucket.detach()), rel=1e-5)
    torch.testing.assert_close(g_dense, g_bucket, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ training


def test_training_from_a_cache_decreases_the_kd_loss(tmp_path):
    uri = str(tmp_path / "cache")
    write_fake_cache(uri, num_units=2, seqs_per_unit=4, k=8, vocab=64, min_len=10, max_len=12)
    model = ev.build_student(TINY, vocab_size=64, seed=0)
    settings = tr.TrainSettings(steps=60, batch_size=4, lr=1e-2, eval_every=0)
    batches = tr.cache_batches(uri, batch_size=4, seed=0, student_vocab_size=64)
    curve, stats = tr.train_student(model, batches, tr.make_loss("cache", mode="topk"), settings)
    batches.close()
    first, last = stats["losses"][:4], stats["losses"][-4:]
    assert curve == [] and len(stats["losses"]) == 60 and stats["tokens"] > 60 * 4 * 8
    assert sum(last) / 4 < 0.7 * sum(first) / 4, (first, last)
    assert all(math.isfinite(x) for x in stats["losses"])


def test_runs_share_batches_and_hard_labels_need_no_teacher(tmp_path):
    uri = str(tmp_path / "cache")
    write_fake_cache(uri, num_units=2, seqs_per_unit=4, k=8, vocab=64)
    seen: list[list[tuple[int, ...]]] = []

    def recording(logits: Tensor, batch: dict) -> Tensor:
        seen[-1].append(tuple(batch["seq_id"].tolist()))
        return losses.cross_entropy(logits, batch["labels"])

    for _ in range(2):
        seen.append([])
        model = ev.build_student(TINY, vocab_size=64)
        batches = tr.cache_batches(uri, batch_size=2, seed=5)
        tr.train_student(model, batches, recording, tr.TrainSettings(steps=6, batch_size=2, eval_every=0))
        batches.close()
    assert seen[0] == seen[1]  # the same batches in the same order
    assert len({i for ids in seen[0][:4] for i in ids}) == 8  # epoch 0: every sequence once, then epoch 1
    with pytest.raises(ValueError, match="online KD needs the teacher"):
        tr.make_loss("online")
    with pytest.raises(ValueError, match="targets must be one of"):
        tr.make_loss("soft")


# ------------------------------------------------------------------------------------------------ the benchmark


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_distill", REPO / "bench" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quick_runs_and_gives_a_sane_table(tmp_path, ray_session, capsys):
    bench = _load_bench()
    assert bench.main(["--quick", "--out", str(tmp_path), "--caches", "top-8,hybrid"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["rows"]
    labels = {(r["student"], r["row"]) for r in rows}
    for student in ("h32-L1", "h48-L2"):
        for row in (
            "top-8 cache",
            "hybrid 8 + N=50 cache",
            "top-8 renormalized",
            "online full KD",
            "hard labels (CE)",
        ):
            assert (student, row) in labels
    teacher = report["setup"]["teacher"]
    for r in rows:
        ce, kl, ece = r["ce"][0], r["kl"][0], r["ece"][0]
        assert teacher["ce"] - 0.5 < ce < 8.0 and 0.0 <= kl < 5.0 and 0.0 <= ece <= 1.0, r
        assert r["train_seconds"][0] > 0
        assert ("cache_bytes" in r) == (r["targets"] == "cache")
    caches = report["setup"]["caches"]
    assert set(caches) == {"top-8", "hybrid"}
    assert caches["hybrid"]["bytes"] > caches["top-8"]["bytes"] > 0  # 8 + ~N unique ids vs 8 per token
    assert all(Path(p).stat().st_size > 10_000 for p in report["plots"])
    assert printed.count("| h32-L1") == 5 and "| teacher (reference" in printed
    # online full KD on the same batches gets closer to the teacher than hard labels do
    by = {(r["student"], r["row"]): r for r in rows}
    assert by[("h48-L2", "online full KD")]["kl"][0] < by[("h48-L2", "hard labels (CE)")]["kl"][0]
