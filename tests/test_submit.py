"""`kdcache submit`: the request it builds (entrypoint, runtime_env), the CLI against a fake job client, local paths
of the config checked against what Ray uploads (passed on relative to the working_dir, or a clear error naming the
key and the path, e.g. the shipped quickstart's .kdcache/), the job-side check under `ray job submit`, a real
submission (token authentication, relative paths, `--wait`) to a `ray start --head` cluster's job server that runs a
tiny caching job, and the docker/ files (Docker itself does not run here: the YAML files are parsed and their
structure checked, the Dockerfile read)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_helpers import LocalRayCluster, read_back
from conftest import stdlib_texts, write_jsonl

import kdcache.capture.submit as submit_module
from kdcache.capture.submit import DEFAULT_EXCLUDES, build_submission, check_local_inputs
from kdcache.cli import main
from kdcache.config import load_config
from kdcache.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


def make_workdir(root: Path, *, with_job_script: bool = True) -> Path:
    """A folder shaped like the repository: jobs/cache_logits.py and configs/job.yaml."""
    (root / "configs").mkdir(parents=True)
    if with_job_script:
        (root / "jobs").mkdir()
        shutil.copy(REPO / "jobs" / "cache_logits.py", root / "jobs" / "cache_logits.py")
    config = {
        "teacher": {"model": "org/teacher"},
        "data": {"source": "s3://bucket/corpus/*.jsonl", "max_length": 128},
        "targets": {"k": 16},
        "output": {"uri": "s3://bucket/cache"},
        "cluster": {"num_actors": 4, "gpus_per_actor": 1, "batch_tokens": 4096},
    }
    (root / "configs" / "job.yaml").write_text(yaml.safe_dump(config))
    return root


def test_request_runs_the_job_script_from_the_working_dir(tmp_path):
    wd = make_workdir(tmp_path / "repo")
    request = build_submission(
        wd / "configs" / "job.yaml",
        ["targets.k=8", "targets.temperatures=[1.0, 2.0]"],
        working_dir=wd,
        pip=["s3fs>=2024.6"],
        env_vars={"HF_HOME": "/cache/hf"},
        runtime_env={"pip": ["kdcache"], "env_vars": {"A": "1"}},
        submission_id="kdcache-42",
    )
    assert request.entrypoint == (  # cluster.address stays null: inside a Ray job that joins the job's cluster
        "python jobs/cache_logits.py configs/job.yaml targets.k=8 'targets.temperatures=[1.0, 2.0]'"
    )
    assert request.runtime_env == {
        "working_dir": str(wd),
        "pip": ["kdcache", "s3fs>=2024.6"],
        "env_vars": {"A": "1", "HF_HOME": "/cache/hf"},
        "excludes": DEFAULT_EXCLUDES,
    }
    assert request.submission_id == "kdcache-42"
    assert request.metadata == {
        "kdcache_config": "job.yaml",
        "output_uri": "s3://bucket/cache",
        "teacher": "org/teacher",
    }


def test_request_without_working_dir_uses_the_installed_cli(tmp_path):
    wd = make_workdir(tmp_path / "repo")
    request = build_submission(wd / "configs" / "job.yaml", ["cluster.address=auto"])
    assert request.entrypoint == f"python -m kdcache.cli cache {wd / 'configs' / 'job.yaml'} cluster.address=auto"
    assert request.runtime_env == {}
    bare = make_workdir(tmp_path / "bare", with_job_script=False)  # an uploaded folder without jobs/
    request = build_submission(bare / "configs" / "job.yaml", working_dir=bare)
    assert request.entrypoint == "python -m kdcache.cli cache configs/job.yaml"


def test_bad_requests_fail_before_anything_is_sent(tmp_path, monkeypatch):
    wd = make_workdir(tmp_path / "repo")
    monkeypatch.setattr(submit_module, "JOB_CLIENT", None)  # a real client would need a server: none is reached
    with pytest.raises(ConfigError, match=r"targets\.kk: unknown key"):
        build_submission(wd / "configs" / "job.yaml", ["targets.kk=3"], working_dir=wd)
    outside = tmp_path / "elsewhere.yaml"
    shutil.copy(wd / "configs" / "job.yaml", outside)
    with pytest.raises(ConfigError, match="outside the working_dir"):
        build_submission(outside, working_dir=wd)
    assert main(["submit", str(wd / "configs" / "job.yaml"), "--address", "ray://head:10001"]) == 2
    bad_json = ["submit", str(wd / "configs" / "job.yaml"), "--address", "http://h:8265", "--runtime-env-json", "{x"]
    assert main(bad_json) == 2


class FakeJobClient:
    """Stands in for ray.job_submission.JobSubmissionClient: records requests, plays back statuses."""

    instances: list[FakeJobClient] = []
    statuses = ["PENDING", "RUNNING", "SUCCEEDED"]

    def __init__(self, address, headers=None):
        self.address, self.headers, self.requests = address, headers, []
        self.polled = iter(type(self).statuses)
        FakeJobClient.instances.append(self)

    def submit_job(self, **request):
        self.requests.append(request)
        return request.get("submission_id") or "raysubmit_fake0001"

    def get_job_status(self, job_id):
        return next(self.polled)

    def get_job_logs(self, job_id):
        return "kdcache cache at s3://bucket/cache: complete\n"


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_cli_submit_prints_the_job_id_and_how_to_follow_it(tmp_path, monkeypatch, capsys, final, code):
    wd = make_workdir(tmp_path / "repo")
    monkeypatch.setattr(FakeJobClient, "statuses", ["RUNNING", final])
    monkeypatch.setattr(FakeJobClient, "instances", [])
    monkeypatch.setattr(submit_module, "JOB_CLIENT", FakeJobClient)
    monkeypatch.setattr(submit_module.time, "sleep", lambda s: None)
    argv = ["submit", str(wd / "configs" / "job.yaml"), "targets.k=4", "--address", "http://head:8265"]
    argv += ["--working-dir", str(wd), "--pip", "gcsfs", "--env", "HF_HOME=/hf", "--wait"]
    assert main(argv) == code
    out = capsys.readouterr().out
    assert "Submitted kdcache job raysubmit_fake0001 to http://head:8265" in out
    assert "ray job logs -f raysubmit_fake0001 --address http://head:8265" in out
    assert f"job raysubmit_fake0001: {final}" in out
    (client,) = FakeJobClient.instances
    (request,) = client.requests
    assert client.address == "http://head:8265"
    assert request["entrypoint"] == "python jobs/cache_logits.py configs/job.yaml targets.k=4"
    assert request["runtime_env"]["pip"] == ["gcsfs"] and request["runtime_env"]["env_vars"] == {"HF_HOME": "/hf"}


def test_submit_waits_for_the_job_agent_of_a_fresh_head(tmp_path, monkeypatch):
    class AgentNotUpYet(FakeJobClient):
        refusals = 2

        def submit_job(self, **request):
            if AgentNotUpYet.refusals:
                AgentNotUpYet.refusals -= 1
                raise RuntimeError("Request failed with status code 500: No available agent to submit job")
            return super().submit_job(**request)

    wd = make_workdir(tmp_path / "repo")
    monkeypatch.setattr(submit_module, "JOB_CLIENT", AgentNotUpYet)
    monkeypatch.setattr(submit_module.time, "sleep", lambda s: None)
    request = build_submission(wd / "configs" / "job.yaml", working_dir=wd)
    client, job_id = submit_module.submit(request, "http://head:8265")
    assert job_id == "raysubmit_fake0001" and AgentNotUpYet.refusals == 0
    AgentNotUpYet.refusals = 1
    with pytest.raises(submit_module.SubmitError, match="No available agent"):
        submit_module.submit(request, "http://head:8265", agent_wait_s=0)


def test_cli_submit_dry_run_prints_the_request(tmp_path, capsys, monkeypatch):
    wd = make_workdir(tmp_path / "repo")
    monkeypatch.setattr(submit_module, "JOB_CLIENT", None)
    assert main(["submit", str(wd / "configs" / "job.yaml"), "--address", "http://h:8265", "--dry-run"]) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["address"] == "http://h:8265" and request["entrypoint"].startswith("python -m kdcache.cli cache")


# ---- local paths in the config: shipped with the working_dir, or a clear error before anything is sent ---------


def make_local_workdir(root: Path, teacher: Path, corpus_texts: list[str]) -> Path:
    """A repository-shaped folder whose config names everything by relative paths: models/teacher, data/*.jsonl,
    out/cache (git-ignored, like the demo's .kdcache/)."""
    (root / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "cache_logits.py", root / "jobs" / "cache_logits.py")
    shutil.copytree(teacher, root / "models" / "teacher")
    write_jsonl(root / "data" / "a.jsonl", [{"text": t} for t in corpus_texts])
    (root / ".gitignore").write_text("out/\n")
    config = {
        "teacher": {"model": "models/teacher"},
        "data": {"source": "data/*.jsonl", "max_length": 96, "unit_bytes": 1500},
        "targets": {"k": 8},
        "output": {"uri": "out/cache"},
        "cluster": {"address": None, "num_actors": 2, "batch_tokens": 512, "progress": False},
    }
    (root / "configs").mkdir()
    (root / "configs" / "job.yaml").write_text(yaml.safe_dump(config))
    return root


def test_inputs_inside_the_working_dir_are_passed_relative_to_it(tiny_teacher, tmp_path, monkeypatch):
    wd = make_local_workdir(tmp_path / "repo", tiny_teacher, stdlib_texts(2, max_chars=300))
    monkeypatch.chdir(wd / "configs")  # relative paths mean what they mean here, as for `kdcache cache`
    request = build_submission(
        "job.yaml", ["teacher.model=../models/teacher", "data.source=../data/*.jsonl"], working_dir=".."
    )
    assert request.entrypoint.startswith("python jobs/cache_logits.py configs/job.yaml ")
    assert shlex.split(request.entrypoint)[3:] == [
        "teacher.model=../models/teacher",  # the user's overrides, then the paths as the job sees them
        "data.source=../data/*.jsonl",
        'teacher.model="models/teacher"',
        'data.source="data/*.jsonl"',
        f'output.uri="{wd / "configs" / "out" / "cache"}"',  # absolute: not into the job's temporary copy
    ]
    assert request.runtime_env["excludes"] == [*DEFAULT_EXCLUDES, "/configs/out/cache"]  # a rerun does not upload it
    monkeypatch.chdir(wd)
    request = build_submission("configs/job.yaml", working_dir=".")
    assert shlex.split(request.entrypoint)[3:] == [f'output.uri="{wd / "out" / "cache"}"']


def test_the_shipped_quickstart_config_fails_naming_the_path_the_cluster_would_not_see(tmp_path, monkeypatch):
    """configs/quickstart.yaml names the demo's files under .kdcache/, which the upload leaves out."""
    wd = tmp_path / "clone"
    (wd / "configs").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "quickstart.yaml", wd / "configs")
    shutil.copy(REPO / ".gitignore", wd / ".gitignore")
    (wd / ".kdcache" / "demo" / "assets" / "teacher").mkdir(parents=True)  # as `make run` leaves it
    (wd / ".kdcache" / "demo" / "assets" / "teacher" / "config.json").write_text("{}")
    write_jsonl(wd / ".kdcache" / "demo" / "assets" / "train" / "part-00000.jsonl", [{"text": "x"}])
    monkeypatch.chdir(wd)
    with pytest.raises(ConfigError) as info:
        build_submission("configs/quickstart.yaml", working_dir=".")
    message = str(info.value)
    assert message.startswith("teacher.model: .kdcache/demo/assets/teacher is inside --working-dir")
    assert "Ray does not upload .kdcache/demo/assets/teacher/config.json: .kdcache matches '.kdcache'" in message
    assert "the cluster will not see it" in message and "s3://" in message
    (wd / "models").mkdir()
    (wd / ".kdcache" / "demo" / "assets" / "teacher").rename(wd / "models" / "teacher")  # shipped now ...
    with pytest.raises(ConfigError, match=r"data.source: .*Ray does not upload .*\.kdcache matches"):
        build_submission("configs/quickstart.yaml", ["teacher.model=models/teacher"], working_dir=".")
    (wd / ".gitignore").write_text("models/\n")  # ... unless git ignores it
    with pytest.raises(ConfigError, match=rf"models/teacher is ignored by {wd / '.gitignore'}"):
        build_submission("configs/quickstart.yaml", ["teacher.model=models/teacher"], working_dir=".")
    with pytest.raises(ConfigError, match=r"teacher.model: \.\./teacher .* is outside --working-dir"):
        build_submission("configs/quickstart.yaml", ["teacher.model=../teacher"], working_dir=".")


def test_the_job_side_names_a_missing_input_under_ray_job_submit(tmp_path):
    """`ray job submit --working-dir . -- python jobs/cache_logits.py configs/quickstart.yaml`: the job runs in the
    uploaded copy, without .kdcache/; Ray's job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR for it."""
    copy = tmp_path / "uploaded"
    (copy / "configs").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "quickstart.yaml", copy / "configs")
    shutil.copytree(REPO / "jobs", copy / "jobs")
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}", "PYTHONPATH": _pythonpath()}
    done = subprocess.run(
        [sys.executable, "jobs/cache_logits.py", "configs/quickstart.yaml"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("kdcache: error: teacher.model: .kdcache/demo/assets/teacher does not exist")
    assert "Ray job" in done.stderr and "Traceback" not in done.stderr


def test_relative_output_inside_a_ray_job_is_refused(tiny_teacher, tmp_path, monkeypatch):
    wd = make_local_workdir(tmp_path / "repo", tiny_teacher, stdlib_texts(2, max_chars=300))
    monkeypatch.chdir(wd)
    cfg = load_config("configs/job.yaml")
    check_local_inputs(cfg, in_ray_job=False)  # `kdcache cache` here: fine
    with pytest.raises(ConfigError, match=r"output.uri: out/cache is relative: in a Ray job it would land in"):
        check_local_inputs(cfg, in_ray_job=True)


# ---- a real Ray head with its job server, token authentication and a working_dir upload ---------------------


@pytest.mark.slow
def test_submit_with_relative_paths_to_a_real_job_server_completes(tiny_teacher, tmp_path):
    """`kdcache submit configs/job.yaml --working-dir . --wait` from a folder whose config names the teacher, the
    data and the output by relative paths, with `cluster.address: null`, against a `ray start --head` cluster with
    token authentication. First without the token (one clear error), then with it: the job joins the cluster,
    reads the uploaded teacher and data, and writes the complete cache where the config said."""
    wd = make_local_workdir(tmp_path / "repo", tiny_teacher, stdlib_texts(6, max_chars=800))
    venv_bin = str(Path(sys.executable).parent)  # the job's `python` must be this environment's
    with LocalRayCluster(
        num_cpus=2, dashboard=True, env={"PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
    ) as cluster:
        cmd = [sys.executable, "-m", "kdcache.cli", "submit", "configs/job.yaml", "--address", cluster.dashboard_url]
        cmd += ["--working-dir", ".", "--submission-id", "kdcache-test-1", "--wait"]
        no_token = {k: v for k, v in cluster.client_env().items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        refused = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, env=no_token, timeout=240)
        done = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, env=cluster.client_env(), timeout=400)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    error = refused.stderr.strip().splitlines()[-1]  # after the warning about output.uri's shared filesystem
    assert error.startswith(f"kdcache: error: job server {cluster.dashboard_url}: submission failed: ")
    assert "authentication failed" in error and "RAY_AUTH_MODE=token" in error
    assert "Traceback" not in refused.stderr
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Submitted kdcache job kdcache-test-1" in done.stdout and "ray job logs -f kdcache-test-1" in done.stdout
    assert "job kdcache-test-1: SUCCEEDED" in done.stdout
    manifest = json.loads((wd / "out" / "cache" / "index.json").read_text())
    assert manifest["complete"] and manifest["config"]["cluster"]["address"] is None
    assert manifest["config"]["teacher"]["model"] == "models/teacher"  # the uploaded copy, read in the job
    assert len(read_back(str(wd / "out" / "cache"))) == manifest["stats"]["num_sequences"] > 0


def _pythonpath() -> str:
    """This checkout first, for subprocesses that import kdcache."""
    return os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])


# ---- docker/: parsed and checked here (Docker does not run on this machine) ------------------------------------


def test_dockerfile_builds_on_a_ray_gpu_image_with_s3_and_gcs():
    text = (DOCKER / "Dockerfile").read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms == ["rayproject/ray:${RAY_VERSION}-py311-gpu"]
    assert "ARG RAY_VERSION=" in text and '"/app[s3,gcs]"' in text
    for path in ("jobs", "configs", "kdcache", "pyproject.toml"):
        assert f"COPY --chown=ray:users {path}" in text or f" {path} " in text
    assert "AWS_SECRET" not in text  # no credential baked into the image


def test_compose_runs_a_ray_head_a_worker_and_minio_with_a_bucket():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"minio", "minio-init", "ray-head", "ray-worker"}
    head, worker = services["ray-head"], services["ray-worker"]
    assert "ray start --head" in head["command"] and "--dashboard-port=8265" in head["command"]
    assert "8265:8265" in head["ports"]
    assert "--address=ray-head:6379" in worker["command"] and "ray-head" in worker["depends_on"]
    assert head["build"]["dockerfile"] == "docker/Dockerfile" and head["image"] == worker["image"]
    assert head["environment"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert head["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in " ".join(init["command"]) and "local/kdcache" in " ".join(init["command"])
    assert "minio-data" in compose["volumes"]


def test_kuberay_rayjob_runs_the_job_script_on_gpu_workers():
    job = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["python", "jobs/cache_logits.py", "configs/llama70b-gpu.yaml"]
    assert (REPO / entry[1]).is_file() and (REPO / entry[2]).is_file()
    assert "cluster.address=auto" in entry and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "kdcache:latest" and {"containerPort": 8265, "name": "dashboard"} in head["ports"]
    (workers,) = cluster["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8" and workers["replicas"] >= 1
    assert container["envFrom"] == [{"secretRef": {"name": "kdcache-s3"}}]  # credentials from a secret
    yaml.safe_load(spec["runtimeEnvYAML"])
