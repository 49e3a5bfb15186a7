"""Submit a caching job to a running Ray cluster's job server (`kdcache submit`), through Ray's `JobSubmissionClient`.

    kdcache submit configs/llama8b-gpu.yaml targets.k=32 --address http://HEAD:8265 --working-dir .
    # -> Submitted kdcache job raysubmit_XXXX ...  follow it: ray job logs -f raysubmit_XXXX --address ...

The config and overrides are validated here first, so a wrong key fails before anything is sent. The cluster then
runs `python jobs/cache_logits.py CONFIG [key=value ...]` from the uploaded working_dir (or `python -m kdcache.cli
cache CONFIG ...` when there is no working_dir: kdcache installed in the cluster's image, the config path valid
there). Inside the job, `cluster.address: null` joins the cluster the job runs on (job.py). The runtime_env comes from
the config (`cluster.runtime_env`) merged with the flags (--working-dir, --pip, --env, --runtime-env-json); flags win.

Local paths in the config (teacher.model, data.tokenizer, data.source, output.uri) are resolved here, against the
current directory as `kdcache cache` would, and checked against what Ray will upload (its own walk of the
working_dir: runtime_env excludes, .gitignore, .rayignore): an input inside the upload is passed to the job relative
to the working_dir; one the cluster would not see (outside the working_dir, or excluded from the upload, like the
demo's `.kdcache/`) fails here naming the key, the path and what excludes it. A relative output.uri becomes absolute
(the job's working directory is a temporary copy on the cluster), with a warning that the nodes must share that
filesystem; absolute local paths get the same warning. `check_local_inputs` is the job-side half, for jobs started
with `ray job submit`: a missing input fails naming its key instead of a library's traceback.

Credentials do not belong in the config: a config inside working_dir is uploaded to the cluster with it. Give the
cluster's nodes credentials through their environment, an instance role or `--env` (which the job server keeps).
On a cluster with token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as for
`ray job submit`; without them the job server's refusal is reported as one error line saying so.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdcache.config import SECRET_HOLDERS, KDCacheConfig, load_config, redact_secrets, redact_urls
from kdcache.errors import ConfigError, SubmitError

__all__ = [
    "JOB_SCRIPT",
    "Submission",
    "build_submission",
    "check_local_inputs",
    "follow_commands",
    "submit",
    "wait_for_job",
]

log = logging.getLogger("kdcache.capture.submit")

JOB_SCRIPT = "jobs/cache_logits.py"  # the thin Ray job entrypoint, relative to the working_dir
DEFAULT_EXCLUDES = [".git", ".venv", ".kdcache", "**/__pycache__", "*.egg-info"]  # .gitignore'd paths are skipped too
CREDENTIAL_KEYS = ("key", "secret", "token", "password", "credentials", "access_key", "secret_key", "session_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_CLIENT: Any = None  # the client class; None: ray.job_submission.JobSubmissionClient (tests put a fake here)
INPUT_KEYS = ("teacher.model", "data.tokenizer", "data.source")  # config keys that may name local inputs
ELSEWHERE = "a location every node reads (s3://..., a hub id, or an absolute path on storage all nodes mount)"
AUTH_HELP = (
    "the cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (or "
    "RAY_AUTH_TOKEN_PATH=<a file holding it>) in this shell, as for `ray job submit`; `ray get-auth-token` on the "
    "head node prints the token"
)


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
    overrides += _resolve_local_paths(cfg, env)
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


def _config_value(cfg: KDCacheConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _names_local_path(key: str, value: str) -> bool:
    """Whether a config value names a local path (not a URL, not a hub id such as `org/model`)."""
    if not value or ("://" in value and not value.startswith("file://")):
        return False
    if key in ("data.source", "output.uri"):
        return True
    value = value.removeprefix("file://")
    return os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") >= 2 or os.path.exists(value)


def _local_inputs(cfg: KDCacheConfig) -> list[tuple[str, list[str]]]:
    """(key, local path patterns) of each config key that names local inputs."""
    found = []
    for key in INPUT_KEYS:
        value = _config_value(cfg, key)
        values = [value] if isinstance(value, str) else list(value or [])
        local = [os.path.expanduser(v.removeprefix("file://")) for v in values if _names_local_path(key, v)]
        if local:
            found.append((key, local))
    return found


def _matches(pattern: Path) -> list[Path]:
    """The files and folders a local path or glob names (folders of files for data.source are walked later)."""
    return [Path(p) for p in sorted(glob.glob(str(pattern), recursive=True))]


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _resolve_local_paths(cfg: KDCacheConfig, env: dict[str, Any]) -> list[str]:
    """Check every local path of the config against what the cluster will see; return overrides that pass each
    input to the job relative to the working_dir (and a relative output.uri as an absolute path).

    Raises ConfigError naming the key and the path when the cluster would not see an input."""
    cwd = Path.cwd()
    working_dir = env.get("working_dir")
    root = Path(working_dir).resolve() if working_dir and "://" not in str(working_dir) else None
    uploaded = _uploaded_paths(root, list(env.get("excludes") or [])) if root is not None else None
    overrides: list[str] = []
    shared: list[str] = []  # local paths the nodes must see through a shared filesystem
    for key, patterns in _local_inputs(cfg):
        job_values = []
        for pattern in patterns:
            absolute = (cwd / pattern).resolve() if not os.path.isabs(pattern) else Path(pattern)
            if root is None or not absolute.is_relative_to(root):
                if not os.path.isabs(pattern):
                    where = f"outside --working-dir {root}" if root is not None else "relative, with no --working-dir"
                    raise ConfigError(
                        f"{key}: {pattern} ({absolute}) is {where}: the cluster will not see it. Put it inside the "
                        f"working dir (uploaded with the job), or give {ELSEWHERE}"
                    )
                shared.append(f"{key}={pattern}")
                job_values.append(pattern)
                continue
            matched = _matches(absolute)
            if not matched:
                raise ConfigError(f"{key}: {pattern} matches nothing here ({absolute}); the cluster would not see it")
            missing = next(
                (f for m in matched for f in _files_under(m) if uploaded is not None and f not in uploaded), None
            )
            if missing is not None:
                raise ConfigError(
                    f"{key}: {pattern} is inside --working-dir {root} but Ray does not upload "
                    f"{missing.relative_to(root)}: {_why_excluded(root, missing, list(env.get('excludes') or []))}; "
                    f"the cluster will not see it. Move it to a folder that is uploaded, or give {ELSEWHERE}"
                )
            job_values.append(absolute.relative_to(root).as_posix())
        value = _config_value(cfg, key)
        job_value = job_values[0] if isinstance(value, str) else job_values
        if job_value != value and len(job_values) == len(value if isinstance(value, list) else [value]):
            overrides.append(f"{key}={json.dumps(job_value)}")
    uri = cfg.output.uri
    if _names_local_path("output.uri", uri):
        local = os.path.expanduser(uri.removeprefix("file://"))
        absolute = (cwd / local).resolve() if not os.path.isabs(local) else Path(local)
        if str(absolute) != uri:
            overrides.append(f"output.uri={json.dumps(str(absolute))}")  # not into the job's temporary copy
        shared.append(f"output.uri={absolute}")
        if root is not None and absolute.is_relative_to(root) and absolute != root:
            env["excludes"] = [*env.get("excludes", []), "/" + absolute.relative_to(root).as_posix()]
    if shared:
        log.warning(
            "%s: local path(s) the job reads or writes as they are: every node of the cluster must see them (the "
            "same machine, or a filesystem all nodes mount); otherwise use %s",
            ", ".join(shared),
            ELSEWHERE,
        )
    return overrides


def _uploaded_paths(root: Path, excludes: list[str]) -> set[Path] | None:
    """Every file and folder Ray's working_dir upload of `root` takes, by Ray's own walk (its default excludes,
    `excludes`, .gitignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, .rayignore). None: this Ray has no such walk."""
    try:
        from ray._private import ray_constants
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    except ImportError:
        return None
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    patterns = [*ray_constants.get_runtime_env_default_excludes(), *excludes]
    found: set[Path] = set()
    try:
        _dir_travel(
            root, [_get_excludes(root, patterns)], found.add, include_gitignore=include_gitignore, logger=log
        )  # its notes about ignore files go to kdcache's log (shown with -v), not to the terminal
    except TypeError:  # another Ray version's signature
        log.warning("cannot check which files this Ray version uploads with --working-dir; not checked")
        return None
    return {p.resolve() for p in found}


def _why_excluded(root: Path, path: Path, excludes: list[str]) -> str:
    """Which rule leaves `path` out of the upload: the first of its folders (from the top) that a pattern matches."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _get_excludes, _get_ignore_file

    patterns = [*ray_constants.get_runtime_env_default_excludes(), *excludes]
    parts = path.relative_to(root).parts
    for depth in range(1, len(parts) + 1):
        target = root.joinpath(*parts[:depth])
        for pattern in patterns:
            if _get_excludes(root, [pattern])(target):
                return f"{target.relative_to(root)} matches {pattern!r} of the runtime_env excludes"
        for folder in [root, *(root.joinpath(*parts[:i]) for i in range(1, depth))]:
            for name in (".gitignore", ".rayignore"):
                matcher: Callable[[Path], bool] | None = _get_ignore_file(folder, name)
                if matcher is not None and matcher(target):
                    return f"{target.relative_to(root)} is ignored by {folder / name}"
    return "excluded from the upload"


def check_local_inputs(cfg: KDCacheConfig, *, in_ray_job: bool) -> None:
    """Fail naming the key when a local input of the config does not exist (the job-side check: a job started with
    `ray job submit` runs in the uploaded copy of its working_dir, which lacks what the upload left out)."""
    hint = (
        " This runs as a Ray job in the uploaded copy of its working_dir, which leaves out .gitignore'd files, "
        ".rayignore'd files and runtime_env excludes; `kdcache submit` checks this before submitting."
        if in_ray_job
        else ""
    )
    for key, patterns in _local_inputs(cfg):
        for pattern in patterns:
            if not _matches(Path(pattern)):
                raise ConfigError(
                    f"{key}: {pattern} does not exist (in {Path.cwd()}); give an existing local path, or "
                    f"{ELSEWHERE}.{hint}"
                )
    uri = cfg.output.uri
    if in_ray_job and _names_local_path("output.uri", uri) and not os.path.isabs(uri.removeprefix("file://")):
        raise ConfigError(
            f"output.uri: {uri} is relative: in a Ray job it would land in the job's temporary copy of the "
            f"working_dir and be lost; give an absolute path every node sees, or s3://... (`kdcache submit` "
            "makes it absolute for you)"
        )


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
        except Exception as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                log.info("job server %s: no job agent yet; retrying", address)
                time.sleep(2.0)
                continue
            raise _job_server_error(address, "submission failed", exc) from None


def _job_server_error(address: str, what: str, exc: BaseException) -> SubmitError:
    """One clear error for what the job server or the way to it refused (never a traceback)."""
    if type(exc).__name__ == "AuthenticationError":  # ray.exceptions.AuthenticationError (Ray >= 2.5x)
        return SubmitError(f"job server {address}: {what}: authentication failed: {AUTH_HELP}")
    if isinstance(exc, (OSError, ConnectionError)) or type(exc).__module__.startswith(("requests", "urllib3")):
        return SubmitError(
            f"job server {address}: {what}: cannot reach it ({type(exc).__name__}: {str(exc)[:300]}); check --address "
            "(the head's dashboard URL, port 8265 by default) and that the cluster runs"
        )
    return SubmitError(f"job server {address}: {what}: {type(exc).__name__}: {exc}")


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
    try:
        runtime_env = json.loads(args.runtime_env_json) if args.runtime_env_json else None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--runtime-env-json: not valid JSON ({exc})") from None
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
    try:
        status = wait_for_job(client, job_id)
        logs = client.get_job_logs(job_id)
    except SubmitError:
        raise
    except Exception as exc:
        raise _job_server_error(address, f"following job {job_id}", exc) from None
    print(logs[-20000:], file=out)
    print(f"job {job_id}: {status}", file=out)
    return 0 if status == "SUCCEEDED" else 1


def _key_value(item: str, flag: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
    key, value = item.split("=", 1)
    return key, value
