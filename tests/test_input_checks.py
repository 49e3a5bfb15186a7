"""Bad input fails before work, or at the record, with a message naming the file and line or the config key
(issue 12, items 9 and 10): ids past the teacher's vocabulary or beyond 2**32, windows longer than the teacher's
positions, out-of-range temperatures, a lone surrogate in a jsonl record; an empty input file gives a cache that
`kdcache cache`, `info` and `report` summarise."""

from __future__ import annotations

import json

import pytest
from conftest import stdlib_texts, tiny_job_config, write_jsonl, write_text_corpus

from kdcache.capture.job import run_cache_job
from kdcache.capture.plan import plan_units
from kdcache.capture.sources import iter_documents, tokenize_documents
from kdcache.cli import main
from kdcache.config import load_config
from kdcache.errors import ConfigError, SourceError
from kdcache.manifest import FINGERPRINT_KEY

BASE = ["teacher.model=t", "data.source=d", "output.uri=o"]


@pytest.mark.parametrize("value", ["[1.0, .nan]", "[.inf]", "[-.inf]", "[1e-300]", "[1.0e-300]", "[2, 1.0e+300]"])
def test_temperatures_must_be_finite_and_in_range(value):
    with pytest.raises(ConfigError, match=r"targets\.temperatures.*(finite numbers in \[0\.001, 1000\]|got \.nan)"):
        load_config(None, [*BASE, f"targets.temperatures={value}"])


def test_exponent_floats_without_a_dot_are_numbers():
    """PyYAML reads 1e-3 as a string (YAML 1.1); JSON and YAML 1.2 read a number, and so does the config."""
    cfg = load_config(None, [*BASE, "targets.temperatures=[1e-3, 2E+0]", "cluster.backup_after_s=6e1"])
    assert cfg.targets.temperatures == [1.0, 0.001, 2.0] and cfg.cluster.backup_after_s == 60.0


@pytest.mark.parametrize("override", ["cluster.gpus_per_actor=.inf", "cluster.cpus_per_actor=.nan"])
def test_float_keys_refuse_nan_and_infinite_resources(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [*BASE, override])


def test_cli_prints_a_config_error_not_a_traceback(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {model: t}\ndata: {source: d}\noutput: {uri: o}\ntargets: {temperatures: [.nan]}\n")
    assert main(["cache", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache: error: targets.temperatures[0]") and "Traceback" not in err


def test_a_lone_surrogate_names_the_file_and_line(tiny_teacher, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 text"}\n')  # valid JSON, not valid Unicode
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    (unit,) = plan_units(str(path), "jsonl", unit_bytes=2**20)
    docs = iter_documents(unit.to_dict(), fmt="jsonl", text_field="text", ids_field=None)
    with pytest.raises(SourceError, match=rf"{path}: line 2: .*'\\ud800' at character 4, a lone UTF-16 surrogate"):
        list(tokenize_documents(docs, lambda texts: tok(texts)["input_ids"]))


@pytest.fixture(scope="module")
def worker(tiny_teacher, tmp_path_factory):
    """A UnitWorker (no Ray) of a pre-tokenized job on the tiny teacher (320 embedding rows)."""
    from kdcache.capture.worker import UnitWorker, WorkerSettings

    root = tmp_path_factory.mktemp("ids")
    cfg = tiny_job_config(tiny_teacher, root, root / "out", "data.ids_field=ids", f"data.source={root}/x.jsonl")
    return UnitWorker(WorkerSettings.from_config(cfg, "f" * 64), device="cpu"), root


@pytest.mark.parametrize("bad", [320, 2**32 + 9, 2**70])
def test_pretokenized_ids_past_the_vocabulary_name_file_and_line(worker, bad):
    unit_worker, root = worker
    path = write_jsonl(root / "x.jsonl", [{"ids": [5, 6, 7]}, {"ids": [1, 2, bad, 3]}])
    (unit,) = plan_units(str(path), "jsonl", unit_bytes=2**20)
    with pytest.raises(SourceError, match=rf"{path}: line 2: token id {bad} in field 'ids' .*320 embedding rows"):
        unit_worker.read_windows(unit.to_dict())
    write_jsonl(path, [{"ids": [5, 6, 7]}, {"ids": [1, 2, 319, 3]}])
    (unit,) = plan_units(str(path), "jsonl", unit_bytes=2**20)
    windows, _ = unit_worker.read_windows(unit.to_dict())
    assert [w.input_ids.tolist() for w in windows] == [[5, 6, 7], [1, 2, 319, 3]]  # the largest valid id is kept


def test_windows_longer_than_the_teachers_positions_are_refused_before_work(tiny_teacher, tmp_path, capsys):
    corpus = write_text_corpus(tmp_path / "data", [stdlib_texts(1, max_chars=200)])
    out = tmp_path / "out"
    cfg = tiny_job_config(tiny_teacher, corpus, out, "data.max_length=129", "cluster.batch_tokens=1024")
    with pytest.raises(ConfigError, match=r"data\.max_length: 129 tokens .* max_position_embeddings \(128\)"):
        run_cache_job(cfg)
    assert not (out / FINGERPRINT_KEY).exists()  # nothing claimed, no Ray started


def test_a_tokenizer_larger_than_the_teacher_is_refused_before_work(tiny_teacher, tmp_path):
    from tiny_models import build_tiny_model

    small = build_tiny_model("llama", tmp_path / "small", vocab_size=200)  # the tokenizer has 256 tokens
    corpus = write_text_corpus(tmp_path / "data", [stdlib_texts(1, max_chars=200)])
    cfg = tiny_job_config(small, corpus, tmp_path / "out", f"data.tokenizer={tiny_teacher}")
    with pytest.raises(ConfigError, match=r"data\.tokenizer: the tokenizer has 256 tokens, more than .* \(200"):
        run_cache_job(cfg)


def test_an_empty_input_file_gives_a_cache_cache_and_info_summarise(ray_session, tiny_teacher, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.jsonl").write_bytes(b"")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"teacher: {{model: {tiny_teacher}}}\ndata: {{source: '{tmp_path}/data/*.jsonl', max_length: 96}}\n"
        f"targets: {{k: 8}}\noutput: {{uri: {tmp_path / 'out'}}}\n"
        "cluster: {num_actors: 1, batch_tokens: 512, progress: false}\n"
    )
    assert main(["cache", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "0 sequences, 0 tokens in 1 units" in printed and "no tokens: an empty input" in printed
    assert main(["info", str(tmp_path / "out")]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["info", "--json", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["num_tokens"] == 0
    assert main(["verify", "--deep", str(tmp_path / "out")]) == 0
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 0
    assert "no tokens: an empty input" in (tmp_path / "report" / "index.html").read_text()


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_read_time_temperature_is_checked_when_the_dataset_is_made(tmp_path, temperature):
    from fake_cache import write_fake_cache

    from kdcache.read.dataset import KDCacheDataset

    write_fake_cache(str(tmp_path / "c"), num_units=1)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        KDCacheDataset(str(tmp_path / "c"), batch_size=2, temperature=temperature)
