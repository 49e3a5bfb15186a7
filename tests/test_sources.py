"""Sources and planning: byte-range units own every line exactly once; errors name file and line; windows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from kdcache.capture.plan import plan_units
from kdcache.capture.sources import cut_windows, iter_documents, make_seq_id
from kdcache.errors import SourceError


def docs_of(units, fmt="jsonl", **kw):
    out = []
    for u in units:
        out += [(u.unit_id, d) for d in iter_documents(u.to_dict(), fmt=fmt, text_field="text", ids_field=None, **kw)]
    return out


@pytest.mark.parametrize("unit_bytes", [1, 7, 50, 10_000])
def test_byte_range_units_cover_every_line_once(tmp_path, unit_bytes):
    records = [{"text": f"doc {i} " + "x" * (i * 3)} for i in range(40)]
    write_jsonl(tmp_path / "a.jsonl", records)
    units = plan_units(str(tmp_path / "a.jsonl"), "jsonl", unit_bytes=unit_bytes)
    texts = [d.text for _, d in docs_of(units)]
    assert texts == [r["text"] for r in records]
    assert plan_units(str(tmp_path / "a.jsonl"), "jsonl", unit_bytes=unit_bytes) == units  # deterministic


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    (unit,) = plan_units(str(path), "jsonl", unit_bytes=1 << 20)
    with pytest.raises(SourceError, match=r"bad\.jsonl: line 2: malformed JSON"):
        docs_of([unit])


def test_missing_or_wrong_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"body": "x"}])
    (unit,) = plan_units(str(path), "jsonl", unit_bytes=1 << 20)
    with pytest.raises(SourceError, match=r"f\.jsonl: line 1: missing field 'text'"):
        docs_of([unit])
    path = write_jsonl(tmp_path / "g.jsonl", [{"ids": [1, "a"]}])
    (unit,) = plan_units(str(path), "jsonl", unit_bytes=1 << 20)
    with pytest.raises(SourceError, match="non-negative integers"):
        list(iter_documents(unit.to_dict(), fmt="jsonl", text_field="text", ids_field="ids"))


def test_parquet_units_are_row_groups_and_rows_are_named(tmp_path):
    table = pa.table({"text": [f"t{i}" for i in range(10)], "ids": [[i, i + 1] for i in range(10)]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=4)
    units = plan_units(str(tmp_path / "p.parquet"), "parquet", unit_bytes=1)
    assert [u.start for u in units] == [0, 1, 2]
    docs = docs_of(units, fmt="parquet")
    assert [d.text for _, d in docs] == [f"t{i}" for i in range(10)]
    assert docs[5][1].locator == "r5"
    ids = [
        d.ids for u in units for d in iter_documents(u.to_dict(), fmt="parquet", text_field="text", ids_field="ids")
    ]
    assert ids[3] == [3, 4]
    with pytest.raises(SourceError, match="no column 'body'"):
        list(iter_documents(units[0].to_dict(), fmt="parquet", text_field="body", ids_field=None))


def test_text_files_are_whole_documents(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (unit,) = plan_units(str(tmp_path / "*.txt"), "text", unit_bytes=1)
    (doc,) = docs_of([unit], fmt="text")
    assert doc[1].text == "hello world"


def test_windows_and_seq_ids():
    w = cut_windows(list(range(10)), max_length=4, min_length=2)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [x.tolist() for x in cut_windows(list(range(9)), 4, 2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    a, b = make_seq_id("f", "b0", 0), make_seq_id("f", "b0", 1)
    assert a != b and a == make_seq_id("f", "b0", 0) and 0 <= a < 2**63
    json.dumps(a)
