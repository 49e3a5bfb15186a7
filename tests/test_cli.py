"""The command line as users meet it: `kdcache --version`, help that documents every positional and shows
examples, one `kdcache: error:` line (never a traceback) when a teacher ships its own code and
`teacher.trust_remote_code` is off, and a rerun of a complete cache (`kdcache demo`, `kdcache cache`) that says so
instead of "caching"."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import stdlib_texts, tiny_job_config, write_jsonl

import kdcache
from kdcache.capture.teacher import Teacher, load_tokenizer
from kdcache.cli import REPO_CONFIGS, build_parser, main
from kdcache.demo import assets as demo_assets
from kdcache.errors import ConfigError

REMOTE_CODE = """
from pathlib import Path
Path(__file__).with_name("REMOTE_CODE_RAN").touch()
from transformers import LlamaConfig as KdcConfig
"""


def with_remote_code(teacher: Path, out: Path, *, tokenizer: bool = False) -> Path:
    """A copy of `teacher` whose config (or tokenizer) names code of its own in `auto_map`; that code leaves a
    marker file when it runs."""
    shutil.copytree(teacher, out)
    (out / "configuration_kdc.py").write_text(REMOTE_CODE)
    name = "tokenizer_config.json" if tokenizer else "config.json"
    config = json.loads((out / name).read_text())
    if tokenizer:  # a class transformers does not have: only the checkpoint's code could provide it
        config |= {
            "tokenizer_class": "KdcTokenizer",
            "auto_map": {"AutoTokenizer": ["configuration_kdc.KdcTokenizer", None]},
        }
    else:
        config |= {"model_type": "kdc_custom", "auto_map": {"AutoConfig": "configuration_kdc.KdcConfig"}}
    (out / name).write_text(json.dumps(config))
    return out


def test_a_teacher_with_its_own_code_is_refused_naming_the_key(tiny_teacher, corpus, tmp_path, capsys):
    custom = with_remote_code(tiny_teacher, tmp_path / "custom")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job_config(custom, corpus, tmp_path / "cache").to_dict()))
    assert main(["cache", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kdcache: error: teacher.trust_remote_code: {custom} ships its own Python code")
    assert "teacher.trust_remote_code: true" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="teacher.trust_remote_code"):  # the actors' path
        Teacher(str(custom), device="cpu")
    custom_tokenizer = with_remote_code(tiny_teacher, tmp_path / "custom-tokenizer", tokenizer=True)
    with pytest.raises(ConfigError, match="teacher.trust_remote_code"):
        load_tokenizer(str(custom_tokenizer))
    assert not list(tmp_path.rglob("REMOTE_CODE_RAN"))  # and none of that code ran


def test_version_and_help_document_every_command_and_positional(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"kdcache {kdcache.__version__}"
    parser = build_parser()
    top = parser.format_help()
    assert "examples:" in top and "kdcache cache configs/quickstart.yaml" in top and "kdcache info " in top
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name, command in sub.choices.items():
        for action in command._actions:
            if not action.option_strings:  # a positional
                assert action.help, f"kdcache {name} {action.dest}: no help text"


def test_the_installed_command_prints_its_version():
    done = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == f"kdcache {kdcache.__version__}"


def test_a_rerun_of_a_complete_cache_says_so_instead_of_caching(
    ray_session, tiny_teacher, tmp_path, capsys, monkeypatch
):
    """`make run` twice: the second `kdcache demo` printed "caching ..." though nothing was computed. The demo's
    assets are faked (the tiny test teacher, a small corpus); its caching runs for real on the session's Ray."""
    train = write_jsonl(
        tmp_path / "assets" / "train" / "part-00000.jsonl", [{"text": t} for t in stdlib_texts(4, 800)]
    )
    assets = demo_assets.DemoAssets(tiny_teacher, train.parent, train.parent, {})
    monkeypatch.setattr(demo_assets, "prepare_demo", lambda *args, **kwargs: assets)
    argv = ["demo", "--workdir", str(tmp_path), "--quiet", "--student-steps", "0", "cluster.progress=false"]
    argv += ["data.max_length=96", "data.unit_bytes=1500", "cluster.batch_tokens=512"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert f"[demo] caching {train} with 2 actors" in first and "nothing to compute" not in first
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "[demo] caching" not in second
    assert f"[demo] {tmp_path / 'cache'}: the cache is complete (made by an earlier run); nothing to compute" in second
    overrides = [
        f"teacher.model={tiny_teacher}",
        f"data.source={train}",
        f"output.uri={tmp_path / 'cache'}",
        *argv[6:],
    ]
    assert main(["cache", str(REPO_CONFIGS / "quickstart.yaml"), *overrides]) == 0  # the same job by hand
    assert f"{tmp_path / 'cache'}: the cache is complete (made earlier); nothing to compute" in capsys.readouterr().out
