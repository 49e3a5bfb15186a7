"""Store: keys stay inside the root, exclusive creation has one winner, atomic writes, globbing."""

from __future__ import annotations

import threading

import pytest

from kdcache.store import Store, expand_urls, safe_relpath


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "s3://other/x", "", ".", "C:/x"])
def test_keys_cannot_leave_the_root(bad):
    with pytest.raises(ValueError):
        safe_relpath(bad)


def test_keys_are_normalized():
    assert safe_relpath("shards/./a.parquet") == "shards/a.parquet"
    assert safe_relpath("a/b/../c") == "a/c"


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_exclusive_create_has_exactly_one_winner(tmp_path, scheme):
    uri = str(tmp_path / "root") if scheme == "local" else f"memory://excl-{tmp_path.name}"
    store = Store(uri)
    results = []
    barrier = threading.Barrier(8)

    def attempt(i):
        barrier.wait()
        results.append((store.create_exclusive("commits/u.json", f"writer {i}".encode()), i))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for ok, i in results if ok]
    assert len(winners) == 1
    assert store.read_bytes("commits/u.json") == f"writer {winners[0]}".encode()
    assert store.list_names("commits") == ["u.json"]  # no temporary files left behind


def test_write_read_delete_and_missing(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("a/b.bin", b"123")
    store.write_bytes("a/b.bin", b"4567")
    assert store.read_bytes("a/b.bin") == b"4567" and store.size("a/b.bin") == 4
    assert store.list_names("a") == ["b.bin"] and store.list_names("nope") == []
    store.delete("a/b.bin")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.bin")
    store.delete("a/b.bin")  # missing_ok


def test_expand_urls_globs_and_refuses_empty_matches(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ["b.jsonl", "a.jsonl", "c.txt"]:
        (tmp_path / "d" / name).write_text("x" * len(name))
    found = expand_urls(str(tmp_path / "d" / "*.jsonl"))
    assert [u.rsplit("/", 1)[1] for u, _ in found] == ["a.jsonl", "b.jsonl"]
    assert all(size == 7 for _, size in found)
    assert len(expand_urls(str(tmp_path / "d"))) == 3
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_urls(str(tmp_path / "d" / "*.parquet"))
