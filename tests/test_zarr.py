"""Zarr v3 shards: the same job cached as Parquet and as Zarr reads back identically, field by field; the format
and log-prob coding are config keys; a Zarr shard with a missing chunk is refused, not read as zeros."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from test_format_spec import build_cache

from kdcache.config import load_config
from kdcache.errors import ConfigError
from kdcache.formats import get_format
from kdcache.identity import targets_identity
from kdcache.tools.verify import verify_cache


def test_config_keys():
    base = ["teacher.model=m", "data.source=s", "output.uri=u"]
    cfg = load_config(None, [*base, "output.format=zarr", "targets.logprob_codec=u16", "output.row_group_tokens=4096"])
    assert (cfg.output.format, cfg.targets.logprob_codec, cfg.output.row_group_tokens) == ("zarr", "u16", 4096)
    assert targets_identity(cfg.targets)["logprob_codec"] == "u16"
    with pytest.raises(ConfigError, match="output.format"):
        load_config(None, [*base, "output.format=hdf5"])
    with pytest.raises(ConfigError, match="targets.logprob_codec"):
        load_config(None, [*base, "targets.logprob_codec=u4"])
    with pytest.raises(ConfigError, match="output.row_group_tokens"):
        load_config(None, [*base, "output.row_group_tokens=0"])
    with pytest.raises(ValueError, match="unknown shard format"):
        get_format("hdf5")


def test_missing_chunk_is_an_error_not_zeros(tmp_path):
    manifest = build_cache(tmp_path, fmt="zarr", num_units=1)
    path = tmp_path / manifest["units"][0]["path"]
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    dropped = next(name for name in entries if name.startswith("target_gaps/c/"))
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as zf:
        for name, data in entries.items():
            if name != dropped:
                zf.writestr(name, data)
    with pytest.raises(ValueError, match="lacks chunk"):
        get_format("zarr").read_shard_info(sink.getvalue())
    unit = manifest["units"][0]
    path.write_bytes(sink.getvalue())
    unit["bytes"] = len(sink.getvalue())
    manifest["stats"]["total_bytes"] = unit["bytes"]
    (tmp_path / "index.json").write_text(json.dumps(manifest))
    report = verify_cache(str(tmp_path))
    assert not report.ok and "lacks chunk" in str(report.problems[0])


def test_same_job_as_parquet_and_zarr_reads_back_identically(ray_session, tiny_teacher, tmp_path):
    from conftest import stdlib_texts, write_jsonl

    from kdcache.capture.job import run_cache_job
    from kdcache.read.reader import open_cache

    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": t} for t in stdlib_texts(4, 700)])
    common = [
        f"teacher.model={tiny_teacher}",
        f"data.source={tmp_path}/d/*.jsonl",
        "targets.mode=hybrid",
        "targets.head=6",
        "targets.samples=16",
        "targets.logprob_codec=u16",
        "targets.temperatures=[1.0, 2.0]",
        "data.max_length=64",
        "data.unit_bytes=1200",
        "cluster.num_actors=2",
        "cluster.batch_tokens=256",
        "cluster.progress=false",
    ]
    caches = {}
    for fmt in ("parquet", "zarr"):
        manifest = run_cache_job(load_config(None, [*common, f"output.uri={tmp_path}/{fmt}", f"output.format={fmt}"]))
        assert manifest["shard_format"] == fmt and manifest["fingerprint_inputs"]["codec"]["logprobs"] == "u16"
        assert all(u["path"].endswith(get_format(fmt).SUFFIX) for u in manifest["units"])
        assert verify_cache(f"{tmp_path}/{fmt}", deep=True).ok
        caches[fmt] = list(open_cache(f"{tmp_path}/{fmt}").iter_sequences())
    parquet, zarr_ = caches["parquet"], caches["zarr"]
    assert len(parquet) == len(zarr_) > 2
    for a, b in zip(parquet, zarr_):
        assert a.keys() == b.keys()
        for name in a:
            assert np.asarray(a[name]).dtype == np.asarray(b[name]).dtype, name
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert sum(len(s["input_ids"]) for s in zarr_) == sum(len(s["input_ids"]) for s in parquet)
    # the training reader serves both formats identically too
    from kdcache.read.dataset import KDCacheDataset

    batches = {
        fmt: list(KDCacheDataset(f"{tmp_path}/{fmt}", batch_size=2, seed=3, shuffle=True))
        for fmt in ("parquet", "zarr")
    }
    assert len(batches["parquet"]) == len(batches["zarr"]) > 0
    for a, b in zip(batches["parquet"], batches["zarr"]):
        for name, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[name]), name
