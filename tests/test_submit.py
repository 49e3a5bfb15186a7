"""`kdcache submit`: the request it builds (entrypoint, runtime_env), the CLI against a fake job client, a real
submission to a local Ray head's job server that runs a tiny caching job, and the docker/ files (Docker itself does
not run here: the YAML files are parsed and their structure checked, the Dockerfile read)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_helpers import LocalRayCluster, read_back
from conftest import stdlib_texts, write_jsonl

import kdcache.capture.submit as submit_module
from kdcache.capture.submit import DEFAULT_EXCLUDES, build_submission
from kdcache.cli import main
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
    assert request.entrypoint == (
        "python jobs/cache_logits.py configs/job.yaml targets.k=8 'targets.temperatures=[1.0, 2.0]' "
        "cluster.address=auto"  # the job's driver joins the cluster it runs on
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
    assert request.entrypoint == "python -m kdcache.cli cache configs/job.yaml cluster.address=auto"


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
    assert request["entrypoint"] == "python jobs/cache_logits.py configs/job.yaml targets.k=4 cluster.address=auto"
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


@pytest.mark.slow
def test_submit_to_a_real_job_server_runs_the_cache_job(tiny_teacher, tmp_path):
    """A local Ray head with its dashboard and job server; `kdcache submit --wait` in a subprocess."""
    corpus = tmp_path / "corpus"
    texts = stdlib_texts(6, max_chars=800)
    write_jsonl(corpus / "a.jsonl", [{"text": t} for t in texts])
    wd = tmp_path / "wd"
    (wd / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "cache_logits.py", wd / "jobs" / "cache_logits.py")
    out = tmp_path / "cache"
    config = {
        "teacher": {"model": str(tiny_teacher)},
        "data": {"source": f"{corpus}/*.jsonl", "max_length": 96, "unit_bytes": 1500},
        "targets": {"k": 8},
        "output": {"uri": str(out)},
        "cluster": {"num_actors": 2, "batch_tokens": 512, "progress": False},
    }
    (wd / "job.yaml").write_text(yaml.safe_dump(config))
    venv_bin = str(Path(sys.executable).parent)  # the job's `python` must be this environment's
    with LocalRayCluster(num_cpus=2, dashboard=True, env={"PATH": f"{venv_bin}:{_path()}"}) as cluster:
        cmd = [sys.executable, "-m", "kdcache.cli", "submit", str(wd / "job.yaml"), "--address", cluster.dashboard_url]
        cmd += ["--working-dir", str(wd), "--submission-id", "kdcache-test-1", "--wait"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=cluster.client_env(), timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Submitted kdcache job kdcache-test-1" in done.stdout and "ray job logs -f kdcache-test-1" in done.stdout
    assert "job kdcache-test-1: SUCCEEDED" in done.stdout
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["complete"] and manifest["config"]["cluster"]["address"] == "auto"
    assert len(read_back(str(out))) == manifest["stats"]["num_sequences"] > 0


def _path() -> str:
    import os

    return os.environ.get("PATH", "")


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
