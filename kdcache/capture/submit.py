"""Submit a caching job to a running Ray cluster's job server (`kdcache submit`), through Ray's `JobSubmissionClient`.

    kdcache submit configs/llama8b-gpu.yaml targets.k=32 --address http://HEAD:8265 --working-dir .
    # -> Submitted kdcache job raysubmit_XXXX ...  follow it: ray job logs -f raysubmit_XXXX --address ...

The config and overrides are validated here first, so a wrong key fails before anything is sent. The cluster then
runs `python jobs/cache_logits.py CONFIG [key=value ...]` from the uploaded working_dir (or `python -m kdcache.cli
cache CONFIG ...` when there is no working_dir: kdcache installed in the cluster's image, the config path valid
there). Inside the job the driver joins the cluster it runs on (`cluster.address=auto` is added when the config
leaves it null). The runtime_env comes from the config (`cluster.runtime_env`) merged with the flags
(--working-dir, --pip, --env, --runtime-env-json); flags win.

Credentials do not belong in the config: a config inside working_dir is uploaded to the cluster with it. Give the
cluster's nodes credentials through their environment, an instance role or `--env` (which the job server keeps).
On a cluster with token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN as for `ray job submit`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdcache.config import SECRET_HOLDERS, load_config, redact_secrets, redact_urls
from kdcache.errors import ConfigError, SubmitError

__all__ = ["JOB_SCRIPT", "Submission", "build_submission", "follow_commands", "submit", "wait_for_job"]

log = logging.getLogger("kdcache.capture.submit")

JOB_SCRIPT = "jobs/cache_logits.py"  # the thin Ray job entrypoint, relative to the working_dir
DEFAULT_EXCLUDES = [".git", ".venv", ".kdcache", "**/__pycache__", "*.egg-info"]  # .gitignore'd paths are skipped too
CREDENTIAL_KEYS = ("key", "secret", "token", "password", "credentials", "access_key", "secret_key", "session_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_CLIENT: Any = None  # the client class; None: ray.job_submission.JobSubmissionClient (tests put a fake here)


@dataclass
class Submission:
    """One job-server request: what `JobSubmissionClient.submit_job` receives."""

    entrypoint: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    submission_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def redacted(self) -> dict[str, Any]:
        """`to_dict` as it may be printed or logged: env var values, credential-named keys, URL passwords and
        overrides of secret-holding keys hidden (what is sent keeps them: the job needs them)."""
        out = self.to_dict()
        env = dict(out["runtime_env"])
        if isinstance(env.get("env_vars"), dict):
            env["env_vars"] = {key: "(hidden)" for key in env["env_vars"]}
        out["runtime_env"] = redact_secrets(env)
        words = shlex.split(out["entrypoint"])
        hidden = [_hide_override(w) for w in words]
        out["entrypoint"] = redact_urls(shlex.join(hidden))
        out["metadata"] = redact_urls(out["metadata"])
        return out


def build_submission(
    config: str | Path,
    overrides: list[str] | None = None,
    *,
    working_dir: str | Path | None = None,
    pip: list[str] | None = None,
    env_vars: dict[str, str] | None = None,
    runtime_env: dict[str, Any] | None = None,
    submission_id: str | None = None,
) -> Submission:
    """Validate the config locally and build the request (entrypoint string, runtime_env, metadata).

    Args:
        config: the YAML config file (inside `working_dir` when one is given).
        overrides: section.key=value overrides, passed on to the job.
        working_dir: local folder uploaded to the cluster (usually the repository root).
        pip: extra packages for the job's runtime_env; env_vars: its environment variables.
        runtime_env: a base runtime_env (below the flags, above the config's `cluster.runtime_env`).
        submission_id: a fixed job id (a second submission with the same id is refused by Ray).
    """
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)  # fail here, naming the key, not minutes later on the cluster
    if cfg.cluster.address is None:
        overrides.append("cluster.address=auto")  # the job's driver joins the cluster it runs on
    env = _merge_runtime_env(getattr(cfg.cluster, "runtime_env", None) or {}, runtime_env or {})
    if working_dir is not None:
        env["working_dir"] = str(working_dir)
    if pip:
        env["pip"] = [*_pip_list(env.get("pip")), *pip]
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **env_vars}
    if "working_dir" in env:
        env.setdefault("excludes", list(DEFAULT_EXCLUDES))
    config_arg, command = _entrypoint_parts(Path(config), env.get("working_dir"))
    _warn_about_credentials(cfg.output.storage_options, overrides)
    return Submission(
        entrypoint=shlex.join([*command, config_arg, *overrides]),
        runtime_env=env,
        metadata=redact_urls(  # the job server shows metadata to anyone who can list jobs
            {"kdcache_config": Path(config).name, "output_uri": cfg.output.uri, "teacher": cfg.teacher.model}
        ),
        submission_id=submission_id,
    )


def _hide_override(word: str) -> str:
    key, sep, _ = word.partition("=")
    if sep and key.rsplit(".", 1)[-1] in SECRET_HOLDERS:
        return f"{key}=(hidden)"
    return word


def _merge_runtime_env(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = {**base, **top}
    if "env_vars" in base and "env_vars" in top:
        out["env_vars"] = {**base["env_vars"], **top["env_vars"]}
    return out


def _pip_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):  # {"packages": [...], "pip_check": ...}
        return list(value.get("packages", []))
    return list(value)


def _entrypoint_parts(config: Path, working_dir: str | None) -> tuple[str, list[str]]:
    """(config path as the job sees it, command before it)."""
    if working_dir is None or "://" in str(working_dir):  # no upload (or a remote package): use the image's kdcache
        return str(config), ["python", "-m", "kdcache.cli", "cache"]
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: not a folder")
    try:
        relative = config.resolve().relative_to(root)
    except ValueError:
        raise ConfigError(
            f"config {config} is outside the working_dir {root}; the cluster would not find it. "
            "Put it inside the working_dir (e.g. configs/) or pass that folder's parent as --working-dir."
        ) from None
    if (root / JOB_SCRIPT).is_file():
        return relative.as_posix(), ["python", JOB_SCRIPT]
    return relative.as_posix(), ["python", "-m", "kdcache.cli", "cache"]


def _warn_about_credentials(storage_options: dict[str, Any], overrides: list[str]) -> None:
    named = [k for k in storage_options if k.lower() in CREDENTIAL_KEYS]
    named += [
        o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].rsplit(".", 1)[-1].lower() in CREDENTIAL_KEYS
    ]
    if named:
        log.warning(
            "output.storage_options holds credentials (%s): they travel to the cluster with the config and the job "
            "record; prefer credentials in the nodes' environment or an instance role",
            ", ".join(named),
        )


def _client(address: str, headers: dict[str, str] | None = None) -> Any:
    klass = JOB_CLIENT
    if klass is None:
        from ray.job_submission import JobSubmissionClient as klass
    return klass(address, headers=headers)


def submit(
    submission: Submission, address: str, *, headers: dict[str, str] | None = None, agent_wait_s: float = 120.0
) -> tuple[Any, str]:
    """Send the request to the job server at `address` (http://HEAD:8265); returns (client, job id).

    A head that has just started answers "No available agent to submit job" until its job agent is up (seconds to
    a minute); that answer is retried for up to `agent_wait_s` seconds.
    """
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            client = _client(address, headers)
            job_id = client.submit_job(
                entrypoint=submission.entrypoint,
                runtime_env=submission.runtime_env or None,
                metadata=submission.metadata,
                submission_id=submission.submission_id,
            )
            return client, job_id
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                log.info("job server %s: no job agent yet; retrying", address)
                time.sleep(2.0)
                continue
            raise SubmitError(f"job server {address}: submission failed: {exc}") from exc


def follow_commands(job_id: str, address: str) -> str:
    """How to follow, inspect and stop a submitted job (printed after submission)."""
    a = shlex.quote(address)
    return "\n".join(
        [
            f"  follow:  ray job logs -f {job_id} --address {a}",
            f"  status:  ray job status {job_id} --address {a}",
            f"  stop:    ray job stop {job_id} --address {a}",
        ]
    )


def wait_for_job(client: Any, job_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        status = str(getattr(status, "value", status))  # a JobStatus enum, or its name
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id}: still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def run_submit(args: Any, out=None) -> int:
    """`kdcache submit` (argparse namespace from cli.py); returns the exit code."""
    out = out or sys.stdout
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or "://" not in address or address.startswith("ray://"):
        raise ConfigError(
            f"--address: the job server's URL is required, e.g. http://HEAD:8265 (got {address!r}; "
            "RAY_API_SERVER_ADDRESS or RAY_ADDRESS also work)"
        )
    env_vars = dict(_key_value(item, "--env") for item in args.env)
    runtime_env = json.loads(args.runtime_env_json) if args.runtime_env_json else None
    submission = build_submission(
        args.config,
        args.overrides,
        working_dir=args.working_dir,
        pip=args.pip,
        env_vars=env_vars,
        runtime_env=runtime_env,
        submission_id=args.submission_id,
    )
    if args.dry_run:
        print(json.dumps({"address": address, **submission.redacted()}, indent=1), file=out)
        return 0
    client, job_id = submit(submission, address)
    print(f"Submitted kdcache job {job_id} to {address}\n{follow_commands(job_id, address)}", file=out, flush=True)
    if not args.wait:
        return 0
    status = wait_for_job(client, job_id)
    print(client.get_job_logs(job_id)[-20000:], file=out)
    print(f"job {job_id}: {status}", file=out)
    return 0 if status == "SUCCEEDED" else 1


def _key_value(item: str, flag: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
    key, value = item.split("=", 1)
    return key, value
