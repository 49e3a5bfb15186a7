"""Store: keys stay inside the root, exclusive creation has one winner, atomic writes, globbing; errors retrying
cannot fix (permission denied, a file where the cache folder goes) fail naming the location, and `kdcache cache`
prints them as one `kdcache: error:` line; a Store pickles without its client."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pytest
import yaml
from conftest import tiny_job_config

from kdcache.cli import main
from kdcache.store import Store, StoreError, expand_urls, safe_relpath


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


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder in which this process cannot create anything: a read-only folder, or under /sys for root (root
    ignores permission bits; sysfs refuses mkdir with EPERM)."""
    if os.geteuid() == 0:
        return Path("/sys/kdcache-test-no-write")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_permission_denied_and_a_file_in_the_way_name_the_location(tmp_path):
    denied = Store(str(unwritable_dir(tmp_path) / "cache"))
    with pytest.raises(StoreError, match=r"create .*/cache/fingerprint\.json: permission denied \(PermissionError"):
        denied.create_exclusive("fingerprint.json", b"{}")
    with pytest.raises(StoreError, match="permission denied"):
        denied.write_bytes("index.json", b"{}")
    (tmp_path / "a-file").write_text("not a cache")
    in_the_way = Store(str(tmp_path / "a-file"))
    with pytest.raises(StoreError, match=r"a-file is a file, and a kdcache cache is a folder"):
        in_the_way.create_exclusive("fingerprint.json", b"{}")
    with pytest.raises(StoreError, match=r"read .*a-file/index\.json: .*a-file is a file"):
        in_the_way.read_bytes("index.json")
    deeper = Store(str(tmp_path / "a-file" / "cache"))
    with pytest.raises(StoreError, match="a file is in the way"):
        deeper.write_bytes("commits/u.json", b"{}")
    with pytest.raises(FileNotFoundError):  # a missing key stays what callers expect
        Store(str(tmp_path / "empty")).read_bytes("index.json")


@pytest.mark.parametrize("where", ["unwritable", "a file"])
def test_cache_command_prints_one_error_line_for_an_unusable_output(tiny_teacher, corpus, tmp_path, capsys, where):
    out = unwritable_dir(tmp_path) / "cache" if where == "unwritable" else tmp_path / "taken"
    if where == "a file":
        out.write_text("an existing file")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job_config(tiny_teacher, corpus, out).to_dict()))
    assert main(["cache", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache: error: create ") and str(out) in err and "Traceback" not in err
    assert ("permission denied" if where == "unwritable" else "is a file, and a kdcache cache is a folder") in err


def test_a_store_pickles_without_its_client(tmp_path):
    """A spawned DataLoader worker or Ray actor gets a Store without a client and opens its own (test_s3.py checks
    a forked child on S3, where an inherited client refuses to work)."""
    store = Store(str(tmp_path / "c"), retries=2, base_delay_s=0.5)
    store.write_bytes("k", b"v")
    copy = pickle.loads(pickle.dumps(store))
    assert copy._fs is None and (copy.retries, copy.base_delay_s, copy.root) == (2, 0.5, store.root)
    assert copy.read_bytes("k") == b"v"
