"""The parts of `bench/xtok.py` (the cross-tokenizer benchmark) that its figures rest on, fast: the student's
SentencePiece-style tokenizer round-trips text and is readable as bytes (so `cross_tokenizer=True` accepts it), the
cache's bytes are split by part with nothing lost, held-out pieces are cut as asked, and the table compares each row
with the hard-label row of the same tokenizer. The end-to-end run is `python bench/xtok.py --quick` (~1.5 min on 2
busy cores, too slow for CI).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_format_spec import build_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
xtok = pytest.importorskip("xtok")

TEXTS = [
    "def parse(line):\n    return line.split(',')\n",
    "class Reader:\n    def __init__(self, path):\n        self.path = path\n",
    "for i in range(10):\n    print(i * i)  # squares\n",
] * 4


def test_student_tokenizer_round_trips_and_reads_as_bytes(tmp_path):
    from kdcache.pieces import token_pieces

    tok = xtok.train_student_tokenizer(TEXTS, tmp_path / "student", vocab_size=120)
    text = "def parse(x):\n    return é"  # é is not in the training text: byte fallback
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<0xC3>") in ids  # é's first byte, as a byte-fallback token
    pieces = token_pieces(tok)
    spelled = b"".join(pieces.pieces[i] for i in ids[1:])
    assert spelled == b" " + text.encode()  # every id read as its bytes (Metaspace's first "▁" included)
    assert len(tok) == len(pieces.pieces)


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_cache_bytes_split_by_part(tmp_path, fmt):
    manifest = build_cache(tmp_path / "text", fmt=fmt, mode="hybrid", token_text=True)
    parts = xtok.cache_bytes(str(tmp_path / "text"))
    assert parts["token_text"] > 0 and parts["tokens"] > 0 and parts["targets"] > parts["token_text"]
    assert sum(parts.values()) == sum(u["bytes"] for u in manifest["units"])  # every byte counted once
    build_cache(tmp_path / "plain", fmt=fmt, mode="hybrid")
    plain = xtok.cache_bytes(str(tmp_path / "plain"))
    assert plain["token_text"] == 0 and plain["targets"] == parts["targets"]  # the same targets, without the text


def test_held_out_texts_and_table():
    pieces = xtok.held_out_texts(["x" * 1000, "héllo " * 100], count=5, size=100)
    assert len(pieces) == 5 and all(0 < len(p.encode()) <= 100 for p in pieces)
    rows = [
        {"tokenizer": "student (300)", "targets": "hard labels", "bpb": [2.0, 2.2], "seconds": 1.0},
        {"tokenizer": "student (300)", "targets": "cache", "bpb": [1.8], "seconds": 1.0},
        {"tokenizer": "teacher (500)", "targets": "hard labels", "bpb": [1.5], "seconds": 1.0},
        {"tokenizer": "teacher (500)", "targets": "cache", "bpb": [1.6], "seconds": 1.0},
    ]
    table = xtok.format_table(rows, teacher_bpb=1.0)
    assert "| student (300) | hard labels | 2.100 ± 0.100 | — |" in table
    assert "| student (300) | cache | 1.800 | -0.300 |" in table  # against its own tokenizer's hard labels
    assert "| teacher (500) | cache | 1.600 | +0.100 |" in table
