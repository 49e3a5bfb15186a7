"""`kdcache report` on a real tiny job (local Ray): four valid PNGs and an index.html that shows each of them."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from conftest import stdlib_texts, tiny_job_config, write_text_corpus

from kdcache.capture.job import run_cache_job
from kdcache.capture.targets import SampledTargets, TokenTargets
from kdcache.cli import main
from kdcache.formats import get_format
from kdcache.formats.parquet import ShardWriter
from kdcache.tools.report import CHARTS, FOOTER, shard_column_bytes, throughput_series, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_cache(ray_session, tiny_teacher, tmp_path_factory):
    corpus = write_text_corpus(tmp_path_factory.mktemp("report-corpus"), [stdlib_texts(6, max_chars=1200)])
    out = tmp_path_factory.mktemp("report-cache") / "c"
    manifest = run_cache_job(tiny_job_config(tiny_teacher, corpus, out, "targets.temperatures=[1.0, 2.0]"))
    assert manifest["stats"]["num_units"] >= 3
    return out, manifest


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", raw[16:24])


def test_report_command_writes_pngs_and_an_html_that_shows_them(report_cache, tmp_path, capsys):
    cache, manifest = report_cache
    out = tmp_path / "report"
    assert main(["report", str(cache), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    page = (out / "index.html").read_text(encoding="utf-8")
    for name in CHARTS:
        png = out / f"{name}.png"
        assert png.stat().st_size > 5000, f"{png} looks empty"
        width, height = png_size(png)
        assert width >= 400 and height >= 200
        assert f'src="{name}.png"' in page
        assert str(png) in printed
    # the summary table states the manifest's numbers
    stats = manifest["stats"]
    assert f"{stats['num_tokens']:,} tokens" in page
    assert f"{stats['bytes_per_token']:.1f} bytes/token" in page
    assert f"median {stats['telemetry']['entropy']['p50']:.3f}" in page


def test_column_bytes_account_for_the_whole_file(report_cache):
    cache, manifest = report_cache
    unit = manifest["units"][0]
    parquet = get_format("parquet")
    with open(cache / unit["path"], "rb") as handle:
        sizes = shard_column_bytes(parquet, handle, unit["bytes"])
    assert sum(sizes.values()) == unit["bytes"]
    assert {"seq_id", "input_id", "target_gaps", "target_codes", "entropy", FOOTER} <= set(sizes)
    assert sizes["target_gaps"] > sizes["entropy"] > 0
    assert shard_column_bytes(parquet, (cache / unit["path"]).read_bytes(), unit["bytes"]) == sizes


def test_column_bytes_sums_nested_sample_columns():
    t = 40
    writer = ShardWriter(k=2, num_temperatures=1, num_samples=20)
    ids = np.tile(np.arange(5), (t, 1))
    head = TokenTargets(
        ids=np.tile([3, 9], (t, 1)),
        logprobs=np.full((t, 2), -1.0, np.float32),
        log_normalizers=np.zeros((t, 1), np.float32),
        tail_logprobs=np.full((t, 1), -0.5, np.float32),
        entropy=np.ones(t, np.float32),
    )
    samples = SampledTargets(
        ids=ids + 10, counts=np.full((t, 5), 4, np.int32), logprobs=np.full((t, 5), -3.0, np.float32), num_samples=20
    )
    writer.add(7, np.arange(t), head, samples)
    data = writer.finish()
    sizes = get_format("parquet").column_bytes(data)
    assert {"sample_gaps", "sample_counts", "sample_codes"} <= set(sizes)
    assert not any("." in name for name in sizes)
    assert sum(shard_column_bytes(get_format("parquet"), data, len(data)).values()) == len(data)


def test_report_of_a_zarr_cache_writes_every_chart(tmp_path):
    from test_format_spec import build_cache

    manifest = build_cache(tmp_path / "z", fmt="zarr", num_units=2)
    written = write_report(str(tmp_path / "z"), tmp_path / "r")
    for name in CHARTS:
        assert png_size(written[name])[0] >= 400
    unit = max(manifest["units"], key=lambda u: u["num_tokens"])
    sizes = shard_column_bytes(get_format("zarr"), (tmp_path / "z" / unit["path"]).read_bytes(), unit["bytes"])
    assert sum(sizes.values()) == unit["bytes"] and sizes["target_gaps"] > 0 and sizes["entropy"] > 0


def test_throughput_series_sorts_units_and_skips_untimed_ones():
    units = [
        {"num_tokens": 30, "finished_at": 1010.0, "timing_s": {"total": 4.0}},
        {"num_tokens": 10, "finished_at": 1004.0, "timing_s": {"total": 3.0}},  # started first, at 1001
        {"num_tokens": 99},  # committed by an earlier run without timing: left out
    ]
    series = throughput_series(units)
    np.testing.assert_allclose(series["t"], [3.0, 9.0])
    np.testing.assert_allclose(series["cumulative"], [10.0, 40.0])
    # each unit's tokens spread over its own run: 10 tokens in [0, 3] s, nothing in [3, 5], 30 tokens in [5, 9]
    np.testing.assert_allclose(series["rate_edges"], [0.0, 3.0, 5.0, 9.0])
    np.testing.assert_allclose(series["rate"], [10 / 3, 0.0, 7.5])
    overlapping = [{"num_tokens": 8, "finished_at": 4.0, "timing_s": {"total": 4.0}}] * 2  # two actors at once
    np.testing.assert_allclose(throughput_series(overlapping)["rate"], [4.0])
    assert throughput_series([{"num_tokens": 5}]) is None


def test_report_of_a_cache_without_telemetry_or_timing_still_writes_every_chart(report_cache, tmp_path):
    cache, _ = report_cache
    old = tmp_path / "old"
    shutil.copytree(cache, old)
    manifest = json.loads((old / "index.json").read_text())
    manifest["stats"]["telemetry"] = None
    for unit in manifest["units"]:
        for key in ("telemetry", "timing_s", "finished_at"):
            unit.pop(key, None)
    (old / "index.json").write_text(json.dumps(manifest))
    written = write_report(str(old), tmp_path / "r")
    for name in CHARTS:
        assert png_size(written[name])[0] > 0
    assert "no telemetry" not in written["html"].read_text()  # the message is in the PNG, the table just omits rows


def test_report_of_a_folder_without_a_cache_fails_with_a_message(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no manifest" in capsys.readouterr().err
