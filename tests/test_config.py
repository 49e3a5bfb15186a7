"""Config loading: every YAML in configs/ loads; unknown keys, wrong types and impossible values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcache.config import KDCacheConfig, load_config, parse_overrides
from kdcache.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
BASE = {"teacher": {"model": "m"}, "data": {"source": "x.jsonl"}, "output": {"uri": "/tmp/c"}}


def make(**sections) -> KDCacheConfig:
    raw = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return KDCacheConfig.from_dict(raw)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.targets.temperatures[0] == 1.0


def test_defaults_match_the_public_contract():
    cfg = make()
    assert (cfg.teacher.revision, cfg.teacher.dtype, cfg.teacher.trust_remote_code) == (None, "auto", False)
    assert (cfg.data.format, cfg.data.text_field, cfg.data.max_length) == ("jsonl", "text", 2048)
    assert (cfg.targets.mode, cfg.targets.k) == ("topk", 64)
    assert cfg.output.format == "parquet"
    assert (cfg.cluster.address, cfg.cluster.num_actors, cfg.cluster.gpus_per_actor) == (None, 1, 0)
    assert cfg.cluster.batch_tokens == 16384


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"targets": {"kk": 3}}, "targets.kk"),
        ({"targets": {"k": 0}}, "targets.k"),
        ({"targets": {"k": "many"}}, "targets.k"),
        ({"targets": {"k": 2.5}}, "targets.k"),
        ({"targets": {"mode": "nope"}}, "targets.mode"),
        ({"targets": {"temperatures": [1.0, -2]}}, "targets.temperatures"),
        ({"teacher": {"trust_remote_code": "yes"}}, "teacher.trust_remote_code"),
        ({"teacher": {"dtype": "float8"}}, "teacher.dtype"),
        ({"teacher": {"model": ""}}, "teacher.model"),
        ({"data": {"format": "csv"}}, "data.format"),
        ({"data": {"max_length": 1}}, "data.max_length"),
        ({"cluster": {"num_actors": 0}}, "cluster.num_actors"),
        ({"cluster": {"gpus_per_actor": -1}}, "cluster.gpus_per_actor"),
        ({"cluster": {"batch_tokens": 10}}, "cluster.batch_tokens"),
        ({"output": {"compression_level": 99}}, "output.compression_level"),
        ({"extra": {"a": 1}}, "extra"),
    ],
)
def test_bad_values_name_the_key(sections, key):
    with pytest.raises(ConfigError) as err:
        make(**sections)
    assert str(err.value).startswith(key), str(err.value)


def test_k_larger_than_vocab_names_the_key():
    cfg = make(targets={"k": 1000})
    with pytest.raises(ConfigError, match=r"targets\.k: .*vocab size \(320\)"):
        cfg.validate_against_vocab(320)


def test_overrides_are_typed_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: {model: m}\ndata: {source: s}\noutput: {uri: u}\n")
    cfg = load_config(
        path, ["targets.k=16", "cluster.address=auto", "targets.temperatures=[2, 1]", "cluster.gpus_per_actor=1"]
    )
    assert cfg.targets.k == 16 and cfg.cluster.address == "auto"
    assert cfg.targets.temperatures == [1.0, 2.0]
    assert cfg.cluster.gpus_per_actor == 1.0
    assert load_config(path, ["cluster.address=null"]).cluster.address is None
    with pytest.raises(ConfigError, match="targets.k"):
        load_config(path, ["targets.k=abc"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["targets.k"])


def test_unreadable_or_invalid_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)


def test_chunk_bytes_defaults_to_the_devices_choice_and_must_be_positive():
    assert make().teacher.chunk_bytes is None  # the Teacher picks 64 MiB on CPU, 1 GiB on a GPU
    assert make(teacher={"model": "m", "chunk_bytes": 2**30}).teacher.chunk_bytes == 2**30
    with pytest.raises(ConfigError, match="teacher.chunk_bytes"):
        make(teacher={"model": "m", "chunk_bytes": 0})


def test_a_replica_over_several_gpus_is_spread_by_a_device_map():
    from kdcache.capture.worker import WorkerSettings

    with pytest.raises(ConfigError, match="teacher.device_map"):
        make(teacher={"model": "m", "device_map": "everywhere"})
    with pytest.raises(ConfigError, match="whole number"):
        make(cluster={"gpus_per_actor": 1.5})
    assert WorkerSettings.from_config(make(cluster={"gpus_per_actor": 1}), "f").teacher.device_map is None
    assert WorkerSettings.from_config(make(cluster={"gpus_per_actor": 0.5}), "f").teacher.device_map is None
    assert WorkerSettings.from_config(make(cluster={"gpus_per_actor": 4}), "f").teacher.device_map == "auto"
    cfg = make(teacher={"model": "m", "device_map": "balanced"}, cluster={"gpus_per_actor": 2})
    assert WorkerSettings.from_config(cfg, "f").teacher.device_map == "balanced"
