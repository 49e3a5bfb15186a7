"""No secret reaches a manifest, commit record, claim, log or printed request (issue 12, item 6).

A canary string is put where users put credentials (`cluster.runtime_env.env_vars`, the documented place;
`output.storage_options`; a token in a pip index URL), a real job runs, and every file it wrote, its captured logs,
`kdcache info --json` and the `kdcache submit --dry-run` request are searched for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import stdlib_texts, write_text_corpus

from kdcache.capture.job import run_cache_job
from kdcache.capture.submit import build_submission, run_submit
from kdcache.cli import main
from kdcache.config import load_config
from kdcache.errors import ConfigError

CANARY = "kdCANARY-9f3e1b7c"


def _config_file(tmp_path: Path, teacher: Path, corpus: Path, out: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        f"teacher: {{model: {teacher}}}\n"
        f"data: {{source: '{corpus}/*.jsonl', max_length: 96, unit_bytes: 1500}}\n"
        "targets: {k: 8}\n"
        f"output: {{uri: {out}, storage_options: {{secret: {CANARY}, auto_mkdir: true}}}}\n"
        "cluster:\n"
        "  num_actors: 1\n  batch_tokens: 512\n  progress: false\n"
        "  runtime_env:\n"
        f"    env_vars: {{HF_TOKEN: {CANARY}, AWS_SECRET_ACCESS_KEY: {CANARY}, PLAIN: visible}}\n"
        f"    pip: ['--index-url https://user:{CANARY}@pypi.example.org/simple', numpy]\n"
        f"    config: {{api_token: {CANARY}}}\n"
    )
    return path


def test_no_secret_in_anything_a_job_writes_or_logs(ray_session, tiny_teacher, tmp_path, caplog, capsys):
    corpus = write_text_corpus(tmp_path / "data", [stdlib_texts(2, max_chars=600)])
    out = tmp_path / "out"
    config = _config_file(tmp_path, tiny_teacher, corpus, out)
    cfg = load_config(config)
    assert cfg.cluster.runtime_env["env_vars"]["HF_TOKEN"] == CANARY  # the job itself still has it

    caplog.set_level(logging.DEBUG)
    manifest = run_cache_job(cfg, actor_options={"runtime_env": {"env_vars": {"KD_CANARY": CANARY}}})
    assert main(["info", "--json", str(out)]) == 0
    assert main(["info", str(out)]) == 0

    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.parent.name for p in written} >= {"out", "commits", "shards"}
    for path in written:
        assert CANARY.encode() not in path.read_bytes(), path
    assert CANARY not in caplog.text and CANARY not in json.dumps(capsys.readouterr())
    recorded = manifest["config"]
    assert recorded["cluster"]["runtime_env"]["env_vars"] == ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "PLAIN"]
    assert recorded["output"]["storage_options"] == ["auto_mkdir", "secret"]
    assert recorded["cluster"]["runtime_env"]["pip"][0] == "--index-url https://***@pypi.example.org/simple"
    assert recorded["cluster"]["runtime_env"]["config"] == {"api_token": "(hidden)"}

    try:  # the actors' own log files, when this Ray exposes where they are
        logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    except AttributeError:
        logs = None
    if logs is not None and logs.is_dir():
        # Ray's runtime_env agent logs every runtime_env it sets up, env var values included: Ray's doing, and why
        # docs/SCALING.md advises node environments or instance roles over runtime_env env_vars for secrets.
        checked = [p for p in logs.rglob("*") if p.is_file() and not p.name.startswith("runtime_env")]
        assert any(p.name.startswith("worker-") for p in checked)  # the actors' stdout/stderr are among them
        for path in checked:
            if path.stat().st_size < 50 * 2**20:
                assert CANARY.encode() not in path.read_bytes(), path


def test_submit_sends_the_env_but_never_prints_or_tags_it(tiny_teacher, tmp_path, capsys):
    config = _config_file(tmp_path, tiny_teacher, tmp_path / "data", tmp_path / "out")
    submission = build_submission(config, [f"output.storage_options={{key: {CANARY}}}"], env_vars={"TOK": CANARY})
    assert submission.runtime_env["env_vars"]["TOK"] == CANARY  # what Ray receives: the job needs it
    assert CANARY not in json.dumps(submission.metadata)
    args = SimpleNamespace(
        address="http://127.0.0.1:8265",
        env=[f"TOK={CANARY}"],
        runtime_env_json=None,
        config=str(config),
        overrides=[f"output.storage_options={{key: {CANARY}}}"],
        working_dir=None,
        pip=[],
        submission_id=None,
        dry_run=True,
        wait=False,
    )
    assert run_submit(args) == 0
    printed = capsys.readouterr().out
    assert CANARY not in printed
    request = json.loads(printed)
    assert request["runtime_env"]["env_vars"] == {"HF_TOKEN": "(hidden)", "AWS_SECRET_ACCESS_KEY": "(hidden)",
                                                  "PLAIN": "(hidden)", "TOK": "(hidden)"}  # fmt: skip
    assert "output.storage_options=(hidden)" in request["entrypoint"]


def test_config_errors_never_show_a_secret_holders_value():
    with pytest.raises(ConfigError, match=r"output\.storage_options: expected dict, got \(hidden\)") as info:
        load_config(None, ["teacher.model=t", "data.source=d", "output.uri=o", f"output.storage_options={CANARY}"])
    assert CANARY not in str(info.value)
