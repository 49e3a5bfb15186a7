"""`kdcache verify`: a good cache passes; a missing, truncated or corrupted shard is reported by name with exit 1;
--deep catches a flipped data byte and broken invariants; readers name the shard on a checksum mismatch."""

from __future__ import annotations

import hashlib
import json
import zlib

import pytest
from fake_cache import write_fake_cache
from test_format_spec import build_cache

from kdcache.cli import main
from kdcache.errors import CorruptShardError
from kdcache.manifest import shard_checksum_error
from kdcache.read.reader import open_cache
from kdcache.tools.verify import verify_cache


@pytest.fixture(params=["parquet", "zarr"])
def cache(request, tmp_path):
    """(root, manifest) of a good 3-unit cache in each format (hybrid targets for Zarr, topk for Parquet)."""
    root = tmp_path / "c"
    if request.param == "parquet":
        manifest = write_fake_cache(str(root), num_units=3, seqs_per_unit=4, k=8, vocab=64)
    else:
        manifest = build_cache(root, fmt="zarr", mode="hybrid", num_units=3)
    return root, manifest


def run_verify(capsys, root, *flags: str) -> tuple[int, str]:
    code = main(["verify", str(root), *flags])
    return code, capsys.readouterr().out


def test_good_cache_passes_fast_and_deep(cache, capsys):
    root, manifest = cache
    for flags in ((), ("--deep",)):
        code, out = run_verify(capsys, root, *flags)
        assert code == 0, out
        assert "OK" in out and f"{manifest['stats']['num_tokens']:,} tokens" in out


@pytest.mark.parametrize("damage", ["delete", "truncate", "footer"])
def test_damaged_shard_is_named_in_both_modes(cache, capsys, damage):
    root, manifest = cache
    unit = manifest["units"][1]
    path = root / unit["path"]
    raw = path.read_bytes()
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # same size, the last bytes (Parquet footer magic / zip end-of-central-directory) flipped
        path.write_bytes(raw[:-6] + bytes(b ^ 0xFF for b in raw[-6:]))
    for flags in ((), ("--deep",)):
        code, out = run_verify(capsys, root, *flags)
        assert code == 1, out
        assert unit["path"] in out and unit["unit_id"] in out and "FAILED: 1 problem" in out
        other = manifest["units"][0]["path"]
        assert other not in out  # only the damaged shard is named
    expected = {"delete": "missing", "truncate": "truncated", "footer": "metadata"}[damage]
    assert expected in run_verify(capsys, root)[1]


def test_flipped_data_byte_needs_deep(cache, capsys):
    root, manifest = cache
    unit = manifest["units"][2]
    path = root / unit["path"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    code, out = run_verify(capsys, root, "--deep")
    assert code == 1 and unit["path"] in out and "sha256" in out
    with pytest.raises(CorruptShardError, match=unit["path"].replace(".", r"\.") + ".*crc32"):
        list(open_cache(str(root)).iter_sequences())


def test_shard_checksum_is_crc32_when_recorded_else_sha256():
    data = b"kdcache shard bytes" * 100
    unit = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    flipped = bytes([data[0] ^ 1]) + data[1:]
    assert shard_checksum_error(unit, data) is None
    assert "sha256" in shard_checksum_error(unit, flipped)
    assert "bytes" in shard_checksum_error(unit, data[:-1])
    with_crc = unit | {"crc32": zlib.crc32(data)}
    assert shard_checksum_error(with_crc, data) is None
    assert "crc32" in shard_checksum_error(with_crc, flipped)
    assert "crc32" in shard_checksum_error(with_crc | {"sha256": "0" * 64}, flipped)


def test_deep_checks_invariants_and_manifest_sums(tmp_path):
    root = tmp_path / "c"
    manifest = build_cache(root, mode="hybrid", vocab=300)
    manifest["fingerprint_inputs"]["teacher"]["padded_vocab_size"] = 50  # ids up to 299 now fall outside
    manifest["stats"]["num_tokens"] += 1
    (root / "index.json").write_text(json.dumps(manifest))
    report = verify_cache(str(root), deep=True)
    messages = [str(p) for p in report.problems]
    assert any("stats.num_tokens" in m for m in messages)
    assert any("head ids outside [0, 50)" in m for m in messages)
    assert any("sampled ids outside [0, 50)" in m for m in messages)
    fast = verify_cache(str(root))
    assert [str(p) for p in fast.problems] == [m for m in messages if "stats." in m]


def test_no_manifest_is_an_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "no manifest" in capsys.readouterr().err
