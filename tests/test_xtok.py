"""Students with another tokenizer: vocabulary maps by exact bytes, the alignment of two tokenizations, the mapped
targets (checked against a plain per-position reference of the rules in docs/TARGETS.md) and the student's batches.

Teacher and student tokenizers are trained here on the same standard-library text with different vocabulary sizes
(byte-level BPE, `tests/tiny_models.build_tiny_tokenizer`), plus a SentencePiece-style one (Metaspace, byte
fallback) for a pair across tokenizer families. The teacher's distributions are synthetic and exact (float64 softmax
of random logits favouring the true next token), so every mapped probability can be checked by hand.
"""

from __future__ import annotations

import inspect
import json
import math
import string
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kdcache.errors import CacheMismatchError, KdcacheError
from kdcache.pieces import (
    TokenPieces,
    byte_level_decoder,
    pieces_from_json,
    pieces_to_json,
    token_pieces,
    token_spans,
)
from kdcache.read.xalign import (
    KIND_BOUNDARY,
    KIND_HARD,
    KIND_INSIDE,
    KIND_NONE,
    KIND_SAME_NEXT,
    align_tokens,
    map_targets,
)
from kdcache.read.xbatch import CrossTokenizer, utf8_bounds
from kdcache.read.xtok import first_token_of, vocab_map
from tests.tiny_models import build_tiny_tokenizer

TEXT = inspect.getsource(textwrap)[3000:5200]  # in the tokenizers' training text: long merged tokens occur
HELD_OUT = inspect.getsource(json.scanner)[:1500]  # not in it


def _load(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _sentencepiece_tokenizer(out_dir: Path, vocab_size: int = 300):
    """A Llama-2-style tokenizer: Metaspace pieces ("▁the"), byte-fallback pieces "<0xHH>" in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [inspect.getsource(m) for m in (json.encoder, json.decoder, string, textwrap)]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(texts, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))
    return _load(out_dir)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    return {
        "big": _load(build_tiny_tokenizer(root / "big", vocab_size=512)),
        "small": _load(build_tiny_tokenizer(root / "small", vocab_size=300)),
        "sp": _sentencepiece_tokenizer(root / "sp"),
    }


def teacher_sequence(tok, text: str, *, k: int, seed: int = 0, bos: bool = True, eos: bool = True, boost=6.0):
    """A cached teacher sequence of `text`: exact top-k of a random distribution favouring the true next token."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if bos:
        ids, offsets = [tok.bos_token_id, *ids], [(0, 0), *offsets]
    if eos:
        ids, offsets = [*ids, tok.eos_token_id], [*offsets, (len(text), len(text))]
    ends = token_spans(token_pieces(tok), ids, text.encode(), offsets)
    rng = np.random.default_rng(seed)
    n, vocab = len(ids), len(tok)
    logits = rng.normal(size=(n, vocab)) * 2.0
    logits[np.arange(n - 1), ids[1:]] += boost
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.sort(np.argsort(-logp, -1)[:, :k], -1)
    outside = np.ones_like(logp, dtype=bool)
    np.put_along_axis(outside, top, False, -1)
    tail = np.log(np.where(outside, np.exp(logp), 0.0).sum(-1)) if k < vocab else np.full(n, -np.inf)
    return {
        "seq_id": np.int64(11),
        "input_ids": np.asarray(ids, dtype=np.int32),
        "target_ids": top,
        "target_logprobs": np.take_along_axis(logp, top, -1).astype(np.float32),
        "log_normalizers": np.zeros((n, 1), np.float32),
        "tail_logprobs": tail[:, None].astype(np.float32),
        "entropy": np.ones(n, np.float32),
        "token_text": np.frombuffer(text.encode(), dtype=np.uint8),
        "token_text_ends": ends,
        "dense_logprobs": logp,  # [T, V] float64, for sampled variants (ignored by the code under test)
    }


def sampled_sequence(seq, *, draws: int, rng, head: int = 0):
    """`seq` as a "sample" (head = 0) or "hybrid" cache holds it: unique ids among `draws` draws from p (from the
    tail outside the top-`head`, renormalised, in hybrid mode), their counts and exact log-probs."""
    logp = seq["dense_logprobs"]
    n, vocab = logp.shape
    out = dict(seq)
    probs = np.exp(logp)
    if head:
        top = np.sort(np.argsort(-logp, -1)[:, :head], -1)
        out["target_ids"], out["target_logprobs"] = top, np.take_along_axis(logp, top, -1).astype(np.float32)
        outside = np.ones_like(probs, dtype=bool)
        np.put_along_axis(outside, top, False, -1)
        tail_mass = np.where(outside, probs, 0.0).sum(-1)
        out["tail_logprobs"] = np.log(tail_mass)[:, None].astype(np.float32)
        probs = np.where(outside, probs, 0.0) / tail_mass[:, None]
    counts = np.stack([rng.multinomial(draws, p / p.sum()) for p in probs])
    width = int((counts > 0).sum(-1).max())
    ids = np.zeros((n, width), np.int64)
    cnt = np.zeros((n, width), np.int32)
    lps = np.full((n, width), -np.inf, np.float32)
    for row in range(n):
        hit = np.flatnonzero(counts[row])
        ids[row, : len(hit)], cnt[row, : len(hit)], lps[row, : len(hit)] = hit, counts[row, hit], logp[row, hit]
    out.update(sample_ids=ids, sample_counts=cnt, sample_logprobs=lps)
    return out


def reference(teacher: TokenPieces, student: TokenPieces, seq, s_ids, s_ends, rule="exact", first=None):
    """The rules of docs/TARGETS.md, one student position at a time: ({student id: p}, bucket) or None (no target).
    `first`: bytes -> the student tokenizer's first token (rule "first"); positions without a teacher target but
    with a next token get that token (the hard-label fallback)."""
    out = _reference(teacher, student, seq, s_ids, s_ends, rule, first)
    return [
        ({int(s_ids[s + 1]): 1.0}, 0.0) if want is None and s + 1 < len(s_ids) else want for s, want in enumerate(out)
    ]


def _reference(teacher, student, seq, s_ids, s_ends, rule, first):
    text = seq["token_text"].tobytes()
    t_ids, t_ends = [int(i) for i in seq["input_ids"]], [int(e) for e in seq["token_text_ends"]]
    exact = {}
    for i in sorted(range(student.vocab_size), key=lambda i: (student.pieces[i] is None, i)):
        if student.pieces[i] is not None:
            exact.setdefault(student.pieces[i], i)

    class ByBytes:
        def get(self, piece):
            if rule == "exact":
                return exact.get(piece)
            starts = [p for p in exact if piece.startswith(p)]  # every student piece the bytes begin with
            longest = exact[max(starts, key=len)] if starts else None
            made = first(piece)
            if made is not None and not piece.startswith(student.pieces[made] or b"\xff"):
                made = None  # not a prefix of the bytes: the longest prefix instead
            return longest if made is None else made

    by_bytes = ByBytes()
    roles = {teacher.bos_id: student.bos_id, teacher.eos_id: student.eos_id}

    def head(t):
        return {int(u): math.exp(lp) for u, lp in zip(seq["target_ids"][t], seq["target_logprobs"][t]) if lp > -np.inf}

    t_last = max(i for i in range(len(t_ids)) if t_ends[i] > (t_ends[i - 1] if i else 0))
    s_last = max(i for i in range(len(s_ids)) if s_ends[i] > (s_ends[i - 1] if i else 0))
    out = []
    for s in range(len(s_ids)):
        if s > s_last:  # trailing tokens without text: by rank
            t = t_last + (s - s_last)
            if t >= len(t_ids):
                out.append(None)
                continue
            a_prefix = 0
        else:
            a = s_ends[s]
            body = [i for i in range(t_last + 1) if t_ends[i] <= a]
            if not body:
                out.append(None)
                continue
            t = body[-1]
            a_prefix = a - t_ends[t]
        dist, bucket, norm = {}, 0.0, 1.0
        entries = head(t)
        if a_prefix == 0:
            bucket = math.exp(float(seq["tail_logprobs"][t, 0]))
            for u, p in entries.items():
                piece = teacher.piece(u)
                sid = roles.get(u) if piece is None else by_bytes.get(piece)
                if sid is None:
                    bucket += p
                else:
                    dist[sid] = dist.get(sid, 0.0) + p
        else:
            r = text[t_ends[t] : t_ends[t] + a_prefix]
            cands = {
                u: p
                for u, p in entries.items()
                if (teacher.piece(u) or b"").startswith(r) and len(teacher.piece(u)) > len(r)
            }
            norm = sum(cands.values())
            if norm == 0:
                out.append(None)
                continue
            for u, p in cands.items():
                sid = by_bytes.get(teacher.piece(u)[len(r) :])
                if sid is None:
                    bucket += p / norm
                else:
                    dist[sid] = dist.get(sid, 0.0) + p / norm
        # chain rule for a student next token that is exactly teacher tokens t+1 .. j, j > t + 1
        if s < s_last:
            b = s_ends[s + 1]
            js = [j for j in range(t + 2, t_last + 1) if t_ends[j] == b and t_ends[j - 1] < b]
            if js:
                j = js[0]
                path = 1.0
                for i in range(t, j):
                    step = head(i).get(t_ids[i + 1])
                    path = None if (path is None or step is None) else path * step
                u1 = t_ids[t + 1]
                if path is not None and u1 in entries:
                    r_piece = (teacher.piece(u1) or b"")[a_prefix:]
                    if a_prefix == 0 or (teacher.piece(u1) or b"").startswith(text[t_ends[t] : t_ends[t] + a_prefix]):
                        moved = path / norm
                        sid1 = by_bytes.get(r_piece)
                        if sid1 is None:
                            bucket -= moved
                        else:
                            dist[sid1] -= moved
                        dist[int(s_ids[s + 1])] = dist.get(int(s_ids[s + 1]), 0.0) + moved
        out.append((dist, bucket))
    return out


def _check_against_reference(cross: CrossTokenizer, seq):
    out = cross.sequence(seq)
    s_ids, s_ends, _ = cross.student_tokens(seq["token_text"].tobytes(), doc_start=True, doc_end=True)
    np.testing.assert_array_equal(out["input_ids"], s_ids)
    first = first_token_of(cross.tokenizer)
    expected = reference(cross.teacher, cross.student, seq, s_ids, s_ends, cross.mapping, first)
    for s, want in enumerate(expected):
        assert bool(out["kd_mask"][s]) == (want is not None), s
        if want is None:
            continue
        dist, bucket = want
        got = {int(i): math.exp(lp) for i, lp in zip(out["target_ids"][s], out["target_logprobs"][s]) if lp > -np.inf}
        want_nonzero = {i: p for i, p in dist.items() if p > 1e-12}
        assert set(got) == set(want_nonzero), s
        for i, p in want_nonzero.items():
            assert got[i] == pytest.approx(p, rel=2e-5, abs=1e-9), (s, i)
        assert math.exp(float(out["tail_logprobs"][s, 0])) == pytest.approx(bucket, rel=2e-5, abs=1e-9), s
    return out


# ------------------------------------------------------------------------------------------------ vocabulary


def test_byte_level_alphabet_is_a_bijection_on_bytes():
    table = byte_level_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["a"] == ord("a")


def test_pieces_spell_the_text_in_both_families(toks):
    for name in ("big", "small", "sp"):
        tok = toks[name]
        pieces = token_pieces(tok)
        enc = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
        ends = token_spans(pieces, enc["input_ids"], TEXT.encode(), enc["offset_mapping"])
        starts = np.concatenate([[0], ends[:-1]])
        spans = [TEXT.encode()[a:b] for a, b in zip(starts, ends)]
        assert b"".join(spans) == TEXT.encode()
        if name != "sp":  # byte-level pieces are the text itself; the SentencePiece tokenizer prepends a space
            assert spans == [pieces.piece(i) for i in enc["input_ids"]]
    sp = token_pieces(toks["sp"])
    assert sp.piece(toks["sp"].convert_tokens_to_ids("<0x0A>")) == b"\n"
    assert sp.piece(toks["sp"].convert_tokens_to_ids("▁return")) == b" return"
    assert sp.piece(toks["sp"].bos_token_id) is None


def test_pieces_survive_their_json_form(toks):
    pieces = token_pieces(toks["sp"])
    again = pieces_from_json(json.loads(json.dumps(pieces_to_json(pieces))))
    assert again == pieces
    with pytest.raises(KdcacheError, match="cache/x.json: not a token piece table"):
        pieces_from_json({"pieces": ["zz"], "fingerprint": "f"}, "cache/x.json")


def test_token_spans_from_offsets_when_the_pieces_do_not_spell_the_text(toks):
    tok = toks["small"]  # "é" and "✓" are not in its alphabet: <unk> tokens, whose pieces are unknown
    text = "x = 'héllo ✓'\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = token_spans(token_pieces(tok), enc["input_ids"], text.encode(), enc["offset_mapping"])
    assert ends[-1] == len(text.encode()) and bool((np.diff(ends) >= 0).all())
    with pytest.raises(KdcacheError, match="do not spell the text"):
        token_spans(token_pieces(tok), enc["input_ids"], text.encode(), None)


def test_vocab_map_matches_exact_bytes_and_roles(toks):
    teacher, student = token_pieces(toks["big"]), token_pieces(toks["sp"])
    vmap = vocab_map(teacher, student)
    student_bytes = {p for p in student.pieces if p is not None}
    for u, piece in enumerate(teacher.pieces):
        sid = int(vmap.teacher_to_student[u])
        if piece is None:
            continue
        assert (sid >= 0) == (piece in student_bytes), u
        if sid >= 0:
            assert student.pieces[sid] == piece
        for skip in range(len(piece)):  # the suffix tables: what is left of the piece past `skip` bytes
            rest = piece[skip:]
            got = int(vmap.suffix_to_student(np.array([u]), np.array([skip]))[0])
            assert (student.pieces[got] == rest) if got >= 0 else rest not in student_bytes
            longest = int(vmap.suffix_to_student(np.array([u]), np.array([skip]), "first")[0])
            begins = [p for p in student_bytes if rest.startswith(p)]
            assert (student.pieces[longest] == max(begins, key=len)) if begins else longest == -1
    assert (vmap.to_student(np.arange(teacher.vocab_size), "first") >= 0).sum() > vmap.shared
    assert vmap.teacher_to_student[teacher.eos_id] == student.eos_id
    assert vmap.teacher_to_student[teacher.bos_id] == student.bos_id
    assert 0 < vmap.shared < teacher.vocab_size
    assert vmap.to_student(np.array([teacher.vocab_size + 5]))[0] == -1  # a padded logit row maps to nothing


@pytest.mark.parametrize(("teacher_name", "student_name"), [("big", "sp"), ("sp", "small")])
def test_first_rule_is_the_students_own_first_token(toks, teacher_name, student_name):
    teacher, student_tok = token_pieces(toks[teacher_name]), toks[student_name]
    student = token_pieces(student_tok)
    vmap = vocab_map(teacher, student, first_token=first_token_of(student_tok))
    ids = np.arange(teacher.vocab_size)
    first, exact = vmap.to_student(ids, "first"), vmap.to_student(ids, "exact")
    alphabet = {p for p in student.pieces if p is not None and len(p) == 1}  # the tiny tokenizers lack some bytes
    reachable = np.array([p is not None and p[:1] in alphabet for p in teacher.pieces])
    assert (first[reachable] >= 0).all()  # every teacher token lands on some student token
    agree = exact >= 0
    assert (first[agree] == exact[agree]).mean() > 0.97  # the student makes its own piece of the same bytes
    for u in np.flatnonzero(reachable & ~agree)[:200]:
        piece = teacher.pieces[u]
        assert piece.startswith(student.pieces[first[u]])  # the first token covers a prefix of the bytes
        text = piece.decode("utf-8", errors="strict") if piece.isascii() else None
        if text and text[:1] == " " and text[1:].isalpha():  # " word": the tokenizer's own first token
            assert first[u] == student_tok(text, add_special_tokens=False)["input_ids"][0]


def test_vocab_map_is_computed_once_per_pair(toks, tmp_path):
    teacher, student = token_pieces(toks["big"]), token_pieces(toks["small"])
    first = vocab_map(teacher, student)
    toks["big"].save_pretrained(str(tmp_path / "again"))
    again = token_pieces(_load(tmp_path / "again"))  # another object, the same content
    assert again.fingerprint == teacher.fingerprint
    assert vocab_map(again, student) is first
    assert vocab_map(student, teacher) is not first


def test_unsupported_tokenizers_are_refused():
    class Slow:
        name_or_path = "slow-one"

    with pytest.raises(KdcacheError, match="not a fast tokenizer"):
        token_pieces(Slow())


# ------------------------------------------------------------------------------------------------ alignment


def test_align_tokens_by_byte_ends():
    # text "abcdef": teacher [BOS] "abc" "def" [EOS]; student "ab" "c" "de" "f" [EOS]
    t_ends = np.array([0, 3, 6, 6])
    s_ends = np.array([2, 3, 5, 6, 6])
    al = align_tokens(t_ends, s_ends)
    np.testing.assert_array_equal(al.anchor, [0, 1, 1, 2, 3])  # "ab" reads BOS + 2 bytes; EOS by rank
    np.testing.assert_array_equal(al.prefix, [2, 0, 2, 0, 0])
    np.testing.assert_array_equal(al.path_end, [-1, -1, -1, -1, -1])
    # student "a" "bcdef": its next token spans "bc" + "def" from inside the teacher's "abc": no whole-token path
    al = align_tokens(np.array([3, 6]), np.array([1, 6]))
    np.testing.assert_array_equal(al.path_end, [-1, -1])
    # student "abcdef" after a BOS: exactly teacher tokens 1..2
    al = align_tokens(t_ends, np.array([0, 6, 6]))
    np.testing.assert_array_equal(al.anchor, [0, 2, 3])
    np.testing.assert_array_equal(al.path_end, [2, -1, -1])
    assert al.same_next.tolist() == [False, False, False]
    with pytest.raises(ValueError, match="must not decrease"):
        align_tokens(np.array([3, 2]), s_ends)


# ------------------------------------------------------------------------------------------------ mapped targets


@pytest.mark.parametrize(
    ("teacher_name", "student_name", "k", "rule"),
    [
        ("big", "small", 16, "exact"),
        ("big", "small", 16, "first"),
        ("small", "big", 16, "exact"),
        ("small", "big", 16, "first"),
        ("sp", "big", 8, "first"),
        ("big", "sp", 16, "first"),
        ("small", "big", 300, "exact"),
    ],
)
def test_mapped_targets_follow_the_rules(toks, teacher_name, student_name, k, rule):
    teacher_tok, student_tok = toks[teacher_name], toks[student_name]
    text = TEXT if k < 100 else TEXT[:500]  # the whole distribution (k = V): a shorter text keeps the reference fast
    text = text if rule == "exact" else text[:1000]  # the reference's longest-prefix search is slow
    seq = teacher_sequence(teacher_tok, text, k=min(k, len(teacher_tok)))
    cross = CrossTokenizer(token_pieces(teacher_tok), student_tok, mapping=rule)
    out = _check_against_reference(cross, seq)
    kinds = np.bincount(out["xtok_kind"], minlength=4)
    assert kinds[KIND_SAME_NEXT] > 0 and kinds[KIND_BOUNDARY] + kinds[KIND_INSIDE] > 0


def test_the_same_next_token_gets_the_teachers_probability(toks):
    teacher_tok, student_tok = toks["big"], toks["small"]
    seq = teacher_sequence(teacher_tok, TEXT, k=16, seed=3)
    cross = CrossTokenizer(token_pieces(teacher_tok), student_tok)
    out = cross.sequence(seq)
    s_ids, s_ends, _ = cross.student_tokens(TEXT.encode(), doc_start=True, doc_end=True)
    al = align_tokens(seq["token_text_ends"], s_ends)
    same = np.flatnonzero(out["xtok_kind"] == KIND_SAME_NEXT)
    assert len(same) > 100
    checked = 0
    for s in same:
        t = al.anchor[s]
        teacher_next = int(seq["input_ids"][t + 1])
        row = list(seq["target_ids"][t])
        if teacher_next not in row:
            continue
        want = float(seq["target_logprobs"][t][row.index(teacher_next)])
        col = list(out["target_ids"][s]).index(int(s_ids[s + 1]))
        assert out["target_logprobs"][s, col] == pytest.approx(want, abs=1e-6)
        checked += 1
    assert checked > 100


@pytest.mark.parametrize(("teacher_name", "student_name"), [("big", "small"), ("small", "big"), ("big", "sp")])
def test_masses_sum_to_one(toks, teacher_name, student_name):
    seq = teacher_sequence(toks[teacher_name], HELD_OUT, k=12, seed=5)
    out = CrossTokenizer(token_pieces(toks[teacher_name]), toks[student_name]).sequence(seq)
    rows = out["kd_mask"]
    assert rows.mean() > 0.8
    mass = np.exp(out["target_logprobs"][rows].astype(np.float64)).sum(-1)
    mass += np.exp(out["tail_logprobs"][rows, 0].astype(np.float64))
    np.testing.assert_allclose(mass, 1.0, atol=1e-5)
    unmapped = np.exp(out["unmapped_logprobs"][rows].astype(np.float64)).sum(-1)
    assert bool((unmapped <= np.exp(out["tail_logprobs"][rows, 0]) + 1e-6).all())  # known parts of the bucket
    assert bool((np.diff(np.exp(out["unmapped_logprobs"][rows]), axis=-1) <= 0).all())  # descending (ULD's sort)


def test_chain_rule_gives_a_spanning_token_the_path_probability(toks):
    teacher_tok, student_tok = toks["small"], toks["big"]  # the student's tokens are longer
    seq = teacher_sequence(teacher_tok, TEXT, k=32, seed=1, boost=9.0)
    cross = CrossTokenizer(token_pieces(teacher_tok), student_tok)
    out = cross.sequence(seq)
    s_ids, s_ends, _ = cross.student_tokens(TEXT.encode(), doc_start=True, doc_end=True)
    al = align_tokens(seq["token_text_ends"], s_ends)
    spanning = np.flatnonzero((al.path_end >= 0) & out["kd_mask"])
    assert len(spanning) > 10
    for s in spanning[:20]:
        t, j = int(al.anchor[s]), int(al.path_end[s])
        path = 0.0
        for i in range(t, j):
            row = list(seq["target_ids"][i])
            path += float(seq["target_logprobs"][i][row.index(int(seq["input_ids"][i + 1]))])
        col = list(out["target_ids"][s]).index(int(s_ids[s + 1]))
        # the student's next token gets at least the path's probability (plus its own if the teacher has the piece)
        assert out["target_logprobs"][s, col] >= path - 1e-5


def test_inside_a_teacher_token_the_head_is_conditioned_on_the_prefix():
    # teacher vocab: "a" "ab" "abc" "abd" "x" (+ specials); student: "a" "b" "c" "d" "bc"; text "abc"
    teacher = TokenPieces((None, None, b"a", b"ab", b"abc", b"abd", b"x"), 0, 1, "t")
    student = TokenPieces((None, None, b"a", b"b", b"c", b"d", b"bc"), 0, 1, "s")
    vmap = vocab_map(teacher, student)
    text = np.frombuffer(b"abc", dtype=np.uint8)
    t_ids, t_ends = np.array([0, 4]), np.array([0, 3])  # BOS "abc"
    s_ids, s_ends = np.array([2, 6]), np.array([1, 3])  # "a" "bc"
    lp = np.log(np.array([[0.5, 0.2, 0.1, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    head_ids = np.array([[4, 5, 3, 6], [2, 3, 4, 5]])
    tail = np.array([math.log(0.05), -np.inf])
    al = align_tokens(t_ends, s_ends)
    out = map_targets(vmap, text, al, t_ids, head_ids, lp.astype(np.float32), tail, s_ids, t_ends)
    # position 0 reads "a": candidates "abc" (0.5), "abd" (0.2), "ab" (0.1) -> "bc", (none: "bd"), "b"
    got = {int(i): math.exp(v) for i, v in zip(out.ids[0], out.logprobs[0]) if v > -np.inf}
    assert got == pytest.approx({6: 0.5 / 0.8, 3: 0.1 / 0.8})
    assert math.exp(out.tail_logprob[0]) == pytest.approx(0.2 / 0.8)
    assert out.kind.tolist() == [KIND_INSIDE, KIND_BOUNDARY]  # the last position: no next token to compare
    # no head token continues the prefix: no teacher target; by default the actual next token as a hard label
    head_ids[0] = [6, 6, 6, 6]
    args = (vmap, text, al, t_ids, head_ids, lp.astype(np.float32), tail, s_ids, t_ends)
    out = map_targets(*args, hard_fallback=False)
    assert out.has_target.tolist() == [False, True] and out.kind[0] == KIND_NONE
    out = map_targets(*args)
    assert out.has_target.tolist() == [True, True] and out.kind[0] == KIND_HARD
    assert out.ids[0, 0] == 6 and out.logprobs[0, 0] == 0.0 and out.tail_logprob[0] == -np.inf


# ------------------------------------------------------------------------------------------------ batches


def test_the_students_batch_decodes_to_the_teachers_text(toks):
    for teacher_name, student_name in (("big", "small"), ("small", "sp")):
        seq = teacher_sequence(toks[teacher_name], HELD_OUT, k=8)
        cross = CrossTokenizer(token_pieces(toks[teacher_name]), toks[student_name])
        out = cross.sequence(seq)
        decoded = toks[student_name].decode(out["input_ids"].tolist(), skip_special_tokens=True)
        assert decoded == HELD_OUT
        assert out["input_ids"][-1] == toks[student_name].eos_token_id  # the teacher's sequence ended with EOS
    no_eos = teacher_sequence(toks["big"], HELD_OUT, k=8, eos=False)
    out = CrossTokenizer(token_pieces(toks["big"]), toks["small"]).sequence(no_eos)
    assert out["input_ids"][-1] != toks["small"].eos_token_id


def test_collated_batch_masks_positions_without_a_target(toks):
    cross = CrossTokenizer(token_pieces(toks["big"]), toks["small"])
    seqs = [
        cross.sequence(teacher_sequence(toks["big"], text, k=8, seed=s)) for s, text in enumerate([TEXT, HELD_OUT])
    ]
    batch = cross.collate([seqs[0], None, seqs[1]], pad_token_id=0)
    b, length = batch["input_ids"].shape
    assert b == 3 and length == max(len(s["input_ids"]) for s in seqs)
    assert batch["target_ids"].shape == (3, length, 9) and batch["unmapped_logprobs"].shape == (3, length, 8)
    for row, seq in ((0, seqs[0]), (2, seqs[1])):
        n = len(seq["input_ids"])
        np.testing.assert_array_equal(batch["loss_mask"][row, :n], seq["kd_mask"])
        np.testing.assert_array_equal(batch["labels"][row, : n - 1], seq["input_ids"][1:])
        assert not batch["loss_mask"][row, n:].any()
    assert not batch["loss_mask"][1].any() and batch["seq_id"][1] == -1
    assert (batch["xtok_kind"][batch["loss_mask"]] != KIND_NONE).all()


def test_sequences_without_text_are_refused(toks):
    seq = teacher_sequence(toks["big"], TEXT, k=8)
    del seq["token_text"]
    with pytest.raises(KdcacheError, match="targets.cross_tokenizer"):
        CrossTokenizer(token_pieces(toks["big"]), toks["small"]).sequence(seq)


def test_temperature_must_be_stored_and_maps_the_teacher_at_it(toks):
    pieces = token_pieces(toks["big"])
    with pytest.raises(ValueError, match="stored temperature"):
        CrossTokenizer(pieces, toks["small"], temperatures=[1.0], temperature=2.0)
    seq = teacher_sequence(toks["big"], TEXT, k=len(toks["big"]))  # the full distribution: exact at any T
    at_two = seq["target_logprobs"].astype(np.float64) / 2.0
    norm2 = np.log(np.exp(at_two).sum(-1))
    seq["log_normalizers"] = np.stack([np.zeros(len(norm2)), norm2], -1).astype(np.float32)  # Z_1 = 0 here
    seq["tail_logprobs"] = np.full((len(norm2), 2), -np.inf, np.float32)
    cross = CrossTokenizer(pieces, toks["small"], temperatures=[1.0, 2.0], temperature=2.0)
    out = cross.sequence(seq)
    rows = out["xtok_kind"] == KIND_SAME_NEXT
    mass = np.exp(out["target_logprobs"][rows].astype(np.float64)).sum(-1) + np.exp(out["tail_logprobs"][rows, 0])
    np.testing.assert_allclose(mass, 1.0, atol=1e-5)
    plain = CrossTokenizer(pieces, toks["small"], temperatures=[1.0, 2.0]).sequence(seq)
    entropy = lambda lp: -(np.exp(lp.astype(np.float64)) * np.where(np.isfinite(lp), lp, 0)).sum(-1)  # noqa: E731
    assert entropy(out["target_logprobs"][rows]).mean() > entropy(plain["target_logprobs"][rows]).mean() + 0.5


def test_utf8_bounds_drop_partial_characters():
    text = "é✓a".encode()  # c3 a9 | e2 9c 93 | 61
    assert utf8_bounds(text) == (0, len(text))
    assert utf8_bounds(text[1:]) == (1, len(text) - 1)
    assert utf8_bounds(text[:4]) == (0, 2)
    assert utf8_bounds(b"") == (0, 0)


@pytest.mark.parametrize(("mode", "head"), [("sample", 0), ("hybrid", 4)])
def test_sampled_targets_map_without_bias(toks, mode, head):
    # the map is linear in the teacher's mass: averaged over draws, the mapped sampled targets are the mapped exact
    # distribution wherever the boundaries coincide (inside a teacher token the renormalisation is a ratio estimate)
    teacher_tok, student_tok = toks["big"], toks["small"]
    seq = teacher_sequence(teacher_tok, TEXT[:400], k=len(teacher_tok), boost=3.0)
    pieces = token_pieces(teacher_tok)
    exact = CrossTokenizer(pieces, student_tok).sequence(seq)
    aligned = np.isin(exact["xtok_kind"], [KIND_SAME_NEXT, KIND_BOUNDARY])
    vocab = len(student_tok)

    def dense(out):
        full = np.zeros((len(out["input_ids"]), vocab + 1))
        rows = np.arange(len(full))[:, None]
        np.add.at(full, (rows, out["target_ids"]), np.exp(out["target_logprobs"].astype(np.float64)))
        full[:, vocab] = np.exp(out["tail_logprobs"][:, 0])
        return full

    want = dense(exact)[aligned]
    cross = CrossTokenizer(pieces, student_tok, mode=mode, num_samples=40)
    rng = np.random.default_rng(0)
    total, rounds = np.zeros_like(want), 150
    for _ in range(rounds):
        out = cross.sequence(sampled_sequence(seq, draws=40, rng=rng, head=head))
        np.testing.assert_array_equal(out["input_ids"], exact["input_ids"])
        mass = np.exp(out["target_logprobs"][out["kd_mask"]].astype(np.float64)).sum(-1)
        mass += np.exp(out["tail_logprobs"][out["kd_mask"], 0])
        np.testing.assert_allclose(mass, 1.0, atol=1e-5)
        total += dense(out)[aligned]
    # a multinomial mean of 6000 draws: standard error <= 0.5 / sqrt(6000) ~ 0.0065 per entry
    assert np.abs(total / rounds - want).max() < 0.035
    with pytest.raises(ValueError, match="num_samples"):
        CrossTokenizer(pieces, student_tok, mode=mode)


def test_the_teachers_own_tokenizer_gets_the_teachers_targets(toks):
    tok = toks["big"]
    seq = teacher_sequence(tok, HELD_OUT, k=16, bos=False)  # the tiny tokenizers add no BOS of their own
    out = CrossTokenizer(token_pieces(tok), tok).sequence(seq)
    np.testing.assert_array_equal(out["input_ids"], seq["input_ids"])
    assert set(out["xtok_kind"][:-2].tolist()) == {KIND_SAME_NEXT}  # before EOS: KIND_BOUNDARY (no text next)
    no_text = {tok.pad_token_id, tok.unk_token_id}  # special tokens without a role (BOS, EOS map by role)
    for row in range(len(out["input_ids"])):
        head = dict(zip(seq["target_ids"][row].tolist(), seq["target_logprobs"][row].tolist()))
        got = {
            i: v for i, v in zip(out["target_ids"][row].tolist(), out["target_logprobs"][row].tolist()) if v > -1e30
        }
        assert got == pytest.approx({i: v for i, v in head.items() if i not in no_text}, abs=1e-6)
        dropped = [math.exp(v) for i, v in head.items() if i in no_text]  # their mass is in the tail bucket
        want_tail = math.exp(float(seq["tail_logprobs"][row, 0])) + sum(dropped)
        assert math.exp(float(out["tail_logprobs"][row, 0])) == pytest.approx(want_tail, rel=1e-5)


# ------------------------------------------------------------------------------------------------ capture


def test_windows_carry_exactly_the_text_behind_their_tokens(toks):
    from kdcache.capture.sources import cut_windows
    from kdcache.capture.tokentext import document_token_ends, window_text

    def offsets_of(tok):
        def run(text):
            enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"]

        return run

    for name, text in (("big", TEXT), ("sp", TEXT), ("small", "x = 'héllo ✓'\n" + HELD_OUT)):
        tok = toks[name]
        pieces = token_pieces(tok)
        ids = [*tok(text, add_special_tokens=True)["input_ids"], tok.eos_token_id]  # the worker appends EOS
        ends = document_token_ends(pieces, ids, text, offsets_of(tok))
        data = text.encode()
        parts = []
        start = 0
        for window in cut_windows(ids, 64, 1):
            body, window_ends = window_text(data, ends, start, start + len(window))
            assert len(window_ends) == len(window) and window_ends[-1] == len(body)
            parts.append(body)
            start += len(window)
        assert b"".join(parts) == data  # every byte once, in order
        if name != "small":  # pieces that spell the text: each token's bytes are its piece
            spans = np.diff(np.concatenate([[0], ends]))
            assert all(len(pieces.piece(i) or b"") == n for i, n in zip(ids[1:], spans[1:]))
    with pytest.raises(KdcacheError, match="other ids"):
        document_token_ends(token_pieces(toks["small"]), [5, 6], "é", lambda text: ([7], [(0, 1)]))


def test_bits_per_byte_counts_every_token_against_the_texts_bytes(toks):
    import torch

    from kdcache.demo.evaluation import bits_per_byte

    class Uniform(torch.nn.Module):  # log q = -log V for every token: bits = tokens * log2 V
        def __init__(self, vocab):
            super().__init__()
            self.vocab = vocab

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()

    tok = toks["sp"]  # it has a BOS
    texts = [TEXT[:300], HELD_OUT[:120], "x"]
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    want = tokens * math.log2(len(tok)) / sum(len(t.encode()) for t in texts)
    assert bits_per_byte(Uniform(len(tok)), tok, texts, batch_texts=2) == pytest.approx(want, rel=1e-6)
    assert bits_per_byte(Uniform(len(tok)), tok, texts, batch_texts=1) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="no BOS"):
        bits_per_byte(Uniform(len(toks["big"])), type("NoBos", (), {"bos_token_id": None})(), texts)


def test_teacher_pieces_are_read_from_the_cache_and_checked(toks, tmp_path):
    from kdcache.pieces import PIECES_KEY
    from kdcache.read.xbatch import load_teacher_pieces
    from kdcache.store import Store

    store = Store(str(tmp_path))
    pieces = token_pieces(toks["big"])
    manifest = {"fingerprint_inputs": {"tokenizer": {"hash": pieces.fingerprint}}}
    with pytest.raises(KdcacheError, match="captured without targets.cross_tokenizer"):
        load_teacher_pieces(store, manifest)
    store.write_bytes(PIECES_KEY, json.dumps(pieces_to_json(pieces)).encode())
    assert load_teacher_pieces(store, manifest) == pieces
    other = {"fingerprint_inputs": {"tokenizer": {"hash": "0" * 64}}}
    with pytest.raises(CacheMismatchError, match="the cache's tokenizer"):
        load_teacher_pieces(store, other)
    store.write_bytes(PIECES_KEY, b"[1, 2")
    with pytest.raises(KdcacheError, match="not JSON"):
        load_teacher_pieces(store, manifest)


def test_batches_are_tensors_in_the_students_vocabulary(toks):
    import torch

    cross = CrossTokenizer(token_pieces(toks["big"]), toks["small"])
    batch = cross.batch([teacher_sequence(toks["big"], HELD_OUT, k=8), None], 7, [0, -1], pad_token_id=0)
    assert batch["teacher_vocab_size"] == len(toks["small"]) and batch["temperatures"] == [1.0]
    assert int(batch["batch_index"]) == 7 and batch["source"].tolist() == [0, -1]
    assert batch["input_ids"].dtype == torch.int64 and int(batch["target_ids"].max()) < len(toks["small"])


def test_the_dataset_refuses_another_tokenizer_unless_asked_and_needs_the_text(toks, tmp_path):
    from kdcache.errors import CacheMismatchError as Mismatch
    from kdcache.read.dataset import KDCacheDataset
    from tests.fake_cache import write_fake_cache

    uri = str(tmp_path / "cache")
    pieces = token_pieces(toks["big"])
    write_fake_cache(uri, vocab=512, tokenizer_vocab=512, tokenizer_hash=pieces.fingerprint)
    with pytest.raises(Mismatch, match="student tokenizer"):
        KDCacheDataset(uri, batch_size=2, tokenizer=toks["small"])
    with pytest.raises(KdcacheError, match="captured without targets.cross_tokenizer"):
        KDCacheDataset(uri, batch_size=2, tokenizer=toks["small"], cross_tokenizer=True)
    with pytest.raises(ValueError, match="needs the student's tokenizer"):
        KDCacheDataset(uri, batch_size=2, cross_tokenizer=True)
