"""Job configuration: one dataclass per component, loaded from YAML with `key=value` overrides.

The YAML has five sections, `teacher`, `data`, `targets`, `output` and `cluster`, and an optional sixth, `generate`
(present: the teacher first answers the prompts, see docs/GENERATE.md); every key is documented by the `help` metadata
of its field (with its unit). Loading validates everything before any work starts: an unknown key, a
wrong type or an impossible value raises `ConfigError` naming the key, e.g. ``targets.k: must be >= 1, got 0``.

    cfg = load_config("configs/quickstart.yaml", overrides=["targets.k=16", "cluster.num_actors=2"])
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcache.errors import ConfigError

__all__ = [
    "ClusterConfig",
    "DataConfig",
    "GenerateConfig",
    "KDCacheConfig",
    "OutputConfig",
    "TargetsConfig",
    "TeacherConfig",
    "load_config",
    "parse_overrides",
]


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TeacherConfig:
    """The teacher model."""

    model: str = _f("", "local path or hub id of a Hugging Face causal LM (required)")
    revision: str | None = _f(None, "hub revision (branch, tag or commit); recorded in the cache fingerprint")
    dtype: str = _f(
        "auto", "auto | float32 | bfloat16 | float16 (auto: the checkpoint's dtype on GPU, float32 on CPU)"
    )
    trust_remote_code: bool = _f(False, "allow the checkpoint's own Python code to run (off unless you trust it)")
    device_map: str | None = _f(
        None,
        "null: each replica on one device; auto: a replica's layers spread over all GPUs of its actor by accelerate "
        "(for teachers larger than one GPU; null becomes auto when cluster.gpus_per_actor > 1)",
    )
    chunk_bytes: int | None = _f(
        None,
        "bytes of float32 logits per lm_head chunk (peak extra memory a small multiple of this); "
        "null: 64 MiB on CPU, 1 GiB on a GPU",
    )
    license: str | None = _f(
        None,
        "the teacher's license as recorded in the manifest (provenance, not identity); null: what the model card "
        "(README.md front matter) or config declares, if anything",
    )


@dataclass
class DataConfig:
    """The input corpus and how it becomes sequences."""

    source: str | list[str] = _f("", "fsspec URL or glob (or a list of them) of the input files (required)")
    format: str = _f(
        "jsonl",
        "jsonl | parquet | text (text: one document per file) | chat (records with a list of messages) | "
        "prompt_completion (records with a prompt and a completion); chat and prompt_completion records are read "
        "from Parquet files (names ending in .parquet) or jsonl (any other name); see docs/CHAT.md",
    )
    text_field: str = _f("text", "record field holding the document text (jsonl/parquet)")
    ids_field: str | None = _f(None, "record field holding pre-tokenized ids instead of text")
    messages_field: str = _f(
        "messages", "chat: record field holding the conversation, a list of {role, content} messages"
    )
    prompt_field: str = _f(
        "prompt", "prompt_completion: record field holding the prompt (a string, or a list of messages)"
    )
    completion_field: str = _f("completion", "prompt_completion: record field holding the completion (a string)")
    chat_template: str | None = _f(
        None,
        "chat / prompt_completion: Jinja chat template overriding the tokenizer's, given inline (text holding "
        "'{%' or '{{') or as a path or fsspec URL of a file; null: the tokenizer's own template",
    )
    tokenizer: str | None = _f(None, "tokenizer path or hub id (default: the teacher's)")
    max_length: int = _f(2048, "tokens per sequence window; longer documents are split into windows")
    add_eos: bool = _f(
        True,
        "append the tokenizer's EOS token to every document before windowing (prompt_completion with a string "
        "prompt: after the completion; chat templates end their turns themselves)",
    )
    min_length: int = _f(2, "windows shorter than this many tokens are dropped (and counted)")
    unit_bytes: int = _f(64 * 2**20, "target input bytes per work unit for jsonl/text (parquet: one row group each)")


@dataclass
class TargetsConfig:
    """Which soft targets are stored per token."""

    mode: str = _f("topk", "topk | sample | hybrid (see docs/TARGETS.md)")
    k: int = _f(64, "topk: number of top token ids stored per position")
    samples: int = _f(50, "sample/hybrid: draws with replacement per position (1..255); unique ids are stored")
    head: int = _f(8, "hybrid: exact top ids stored per position; the draws come from the rest")
    seed: int = _f(0, "sample/hybrid: seed of the draws (with the unit id, reruns draw the same ids)")
    temperatures: list[float] = _f([1.0], "temperatures whose log-normalizer and tail mass are stored (1.0 always)")
    positions: str | None = _f(
        None,
        "all | assistant: the positions that get a target. assistant: only where the next token belongs to an "
        "assistant turn (chat) or the completion (prompt_completion); prompt positions cost no head compute and no "
        "bytes. null: assistant for chat and prompt_completion, all otherwise",
    )
    cross_tokenizer: bool = _f(
        True,
        "store the bytes of text behind every teacher token, so a student with another tokenizer can train from the "
        "cache (docs/TARGETS.md, 'Students with another tokenizer'); 1.4 bytes per token on the demo, 3% of top-32",
    )
    logprob_codec: str = _f(
        "u8",
        "stored log-probs: u8 (1 byte, companded: error 0.012 nats at p~1, 0.044 at log p=-8) | "
        "u16 (2 bytes, <= 2.4e-4 nats) | f32 (4 bytes, exact)",
    )

    @property
    def stored_k(self) -> int:
        """Head entries stored per position: k (topk), head (hybrid) or 0 (sample)."""
        return {"topk": self.k, "hybrid": self.head, "sample": 0}[self.mode]

    @property
    def num_samples(self) -> int:
        """Draws per position: 0 in topk mode."""
        return 0 if self.mode == "topk" else self.samples


@dataclass
class GenerateConfig:
    """Distillation through generation: the teacher answers each prompt, then its targets are cached on its answers.

    The section is optional; without it there is no generation (see docs/GENERATE.md).
    """

    engine: str = _f("hf", "hf (Hugging Face generate, static batches, KV cache) | vllm (GPU; extra kdcache[vllm])")
    n: int = _f(1, "responses generated per prompt (each becomes one sequence)")
    max_new_tokens: int = _f(256, "tokens generated per response at most (fewer when data.max_length is reached)")
    temperature: float = _f(1.0, "sampling temperature; 0: greedy (then n must be 1)")
    top_p: float = _f(1.0, "nucleus sampling: keep the most probable tokens holding this much mass (1.0: off)")
    top_k: int = _f(0, "keep the k most probable tokens before sampling (0: off)")
    stop: list[str] = _f([], "stop strings: a response ends with the token that completes one (besides EOS)")
    seed: int = _f(0, "seed of the draws (with the prompt's file and position and the sample index)")
    batch_size: int = _f(32, "hf: responses generated together (prompts of similar length are batched)")
    engine_options: dict = _f(
        {}, "vllm: keyword arguments of vllm.LLM, e.g. gpu_memory_utilization (default 0.5: the teacher shares a GPU)"
    )


@dataclass
class OutputConfig:
    """Where the cache goes."""

    uri: str = _f("", "fsspec URL of the cache folder: a local path, s3://, gs://, memory:// (required)")
    format: str = _f("parquet", "parquet | zarr (one immutable Parquet file / zipped Zarr v3 group per work unit)")
    compression_level: int = _f(3, "zstd level of shard files")
    row_group_tokens: int = _f(65536, "tokens per Parquet row group / Zarr chunk (row groups hold whole sequences)")
    storage_options: dict = _f({}, "fsspec storage options (use env vars or profiles for credentials)")
    store_retries: int = _f(
        4,
        "times a storage operation that failed on a transient error (timeout, reset, throttling, 5xx) is retried "
        "before its unit fails: store_retries + 1 attempts in all (on s3:// the client's own retries are off "
        "unless storage_options.config_kwargs.retries sets them)",
    )
    store_backoff_s: float = _f(0.2, "seconds before the first storage retry; the wait doubles after each retry")


@dataclass
class ClusterConfig:
    """How the job runs on Ray."""

    address: str | None = _f(None, "null: start an embedded local Ray; 'auto' or 'ray://host:port': join a cluster")
    num_actors: int = _f(1, "teacher actors (model replicas)")
    gpus_per_actor: float = _f(0, "GPUs per teacher actor (0: run on CPU)")
    cpus_per_actor: float = _f(1, "CPUs reserved per teacher actor")
    batch_tokens: int = _f(16384, "token budget of one teacher batch (padded tokens, batch_size * longest)")
    max_retries: int = _f(3, "times a failed unit is retried before the job fails")
    backup_after_s: float | None = _f(
        None,
        "seconds before a still-running unit gets a backup copy once the queue is empty (null: 3x the median "
        "unit time, at least 30 s; .inf: never)",
    )
    actor_start_timeout_s: float | None = _f(
        None,
        "seconds the job waits while no teacher actor is ready (placed on a node, teacher loaded) before it fails "
        "naming what the actors ask for; null: 600 on the embedded local Ray, 1800 when joining a cluster (an "
        "autoscaler may be adding nodes); .inf: wait forever",
    )
    runtime_env: dict = _f({}, "Ray runtime_env for `kdcache submit` (working_dir, pip, env_vars); flags override it")
    progress: bool = _f(True, "show a progress bar on the driver")


SECTIONS: dict[str, type] = {
    "teacher": TeacherConfig,
    "data": DataConfig,
    "targets": TargetsConfig,
    "output": OutputConfig,
    "cluster": ClusterConfig,
}
# Sections that exist only when the config has them (None otherwise).
OPTIONAL_SECTIONS: dict[str, type] = {"generate": GenerateConfig}
GENERATE_ENGINES = ("hf", "vllm")

TARGET_MODES = ("topk", "sample", "hybrid")
DATA_FORMATS = ("jsonl", "parquet", "text", "chat", "prompt_completion")
CHAT_FORMATS = ("chat", "prompt_completion")  # formats whose records have assistant (trained) tokens
TARGET_POSITIONS = ("all", "assistant")
OUTPUT_FORMATS = ("parquet", "zarr")
LOGPROB_CODECS = ("u8", "u16", "f32")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Keys whose values are never shown (errors) nor written (manifest): they hold credentials by design.
SECRET_HOLDERS = ("storage_options", "runtime_env", "env_vars")
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "credentials", "auth", "session")
_URL_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
# Temperatures a cache may store: 1/T and z/T stay finite in float32 for any logit |z| < 1e35, and beyond either
# end the distribution is one-hot (1e-3) or uniform (1e3) to many digits anyway.
TEMPERATURE_RANGE = (1e-3, 1e3)


@dataclass
class KDCacheConfig:
    """The whole job configuration."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    generate: GenerateConfig | None = None  # the `generate` section: the teacher answers the prompts first

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> KDCacheConfig:
        """Build and validate a config from nested plain data (as parsed from YAML)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected a mapping with sections {sorted(SECTIONS)}, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SECTIONS) - set(OPTIONAL_SECTIONS))
        if unknown:
            known = ", ".join([*SECTIONS, *OPTIONAL_SECTIONS])
            raise ConfigError(f"{unknown[0]}: unknown config section (known: {known})")
        sections = {}
        for name, klass in {**SECTIONS, **OPTIONAL_SECTIONS}.items():
            if name in OPTIONAL_SECTIONS and raw.get(name) is None:
                continue  # absent (or null): off
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{name}: expected a mapping, got {type(values).__name__}")
            sections[name] = _build_section(name, klass, values)
        cfg = cls(**sections)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data, safe to dump as YAML/JSON (with every secret: see `to_record` for what to write)."""
        return dataclasses.asdict(self)

    def to_record(self) -> dict[str, Any]:
        """The config as kdcache writes it (manifest) or shows it: `to_dict` with no secret in it.

        `output.storage_options` and `cluster.runtime_env.env_vars` keep their keys only; in the rest of the
        runtime_env a credential-named key's value is replaced and so is the user:password part of every URL.
        """
        raw = self.to_dict()
        raw["output"]["storage_options"] = sorted(raw["output"]["storage_options"])  # keys only
        env = raw["cluster"]["runtime_env"]
        if isinstance(env.get("env_vars"), dict):
            env["env_vars"] = sorted(env["env_vars"])  # keys only
        raw["cluster"]["runtime_env"] = redact_secrets(env)
        if raw.get("generate") is not None:
            raw["generate"]["engine_options"] = redact_secrets(raw["generate"]["engine_options"])
        return redact_urls(raw)

    def validate(self) -> None:
        """Check values that types alone cannot; raise ConfigError naming the key."""
        _require(self.teacher.model, "teacher.model", "is required (a local path or hub id)")
        _one_of(self.teacher.dtype, DTYPES, "teacher.dtype")
        if self.teacher.chunk_bytes is not None:
            _positive(self.teacher.chunk_bytes, "teacher.chunk_bytes")
        if self.teacher.device_map not in (None, *DEVICE_MAPS):
            raise ConfigError(
                f"teacher.device_map: must be null or one of {', '.join(DEVICE_MAPS)}, got {self.teacher.device_map!r}"
            )
        gpus = self.cluster.gpus_per_actor
        for key, value in (("gpus_per_actor", gpus), ("cpus_per_actor", self.cluster.cpus_per_actor)):
            if not math.isfinite(value):
                raise ConfigError(f"cluster.{key}: must be a finite number, got {value}")
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError(f"cluster.gpus_per_actor: above 1 it must be a whole number of GPUs, got {gpus}")
        _require(self.data.source, "data.source", "is required (an fsspec URL or glob)")
        _one_of(self.data.format, DATA_FORMATS, "data.format")
        if self.data.format == "text" and self.data.ids_field:
            raise ConfigError("data.ids_field: not supported with data.format=text (text files have no fields)")
        self._validate_chat()
        _positive(self.data.max_length, "data.max_length", minimum=2)
        _positive(self.data.min_length, "data.min_length")
        if self.data.min_length > self.data.max_length:
            raise ConfigError(f"data.min_length: must be <= data.max_length ({self.data.max_length})")
        _positive(self.data.unit_bytes, "data.unit_bytes")
        _one_of(self.targets.mode, TARGET_MODES, "targets.mode")
        _positive(self.targets.k, "targets.k")
        if not 1 <= self.targets.samples <= 255:
            raise ConfigError(
                f"targets.samples: must be in 1..255 (counts are stored as uint8), got {self.targets.samples}"
            )
        _positive(self.targets.head, "targets.head")
        temps = self.targets.temperatures
        low, high = TEMPERATURE_RANGE
        if not temps or any(
            (not isinstance(t, (int, float))) or isinstance(t, bool) or not low <= t <= high for t in temps
        ):  # NaN fails the range test too
            raise ConfigError(
                f"targets.temperatures: must be a non-empty list of finite numbers in [{low:g}, {high:g}] (outside "
                f"it the stored float32 normalizers overflow or the targets are one-hot/uniform), got {temps!r}"
            )
        self.targets.temperatures = normalize_temperatures(temps)
        _one_of(self.targets.logprob_codec, LOGPROB_CODECS, "targets.logprob_codec")
        _require(self.output.uri, "output.uri", "is required (an fsspec URL)")
        _one_of(self.output.format, OUTPUT_FORMATS, "output.format")
        if not 1 <= self.output.compression_level <= 22:
            raise ConfigError(f"output.compression_level: must be in 1..22, got {self.output.compression_level}")
        _positive(self.output.row_group_tokens, "output.row_group_tokens")
        if self.output.store_retries < 0:
            raise ConfigError(f"output.store_retries: must be >= 0, got {self.output.store_retries}")
        if self.output.store_backoff_s < 0:
            raise ConfigError(f"output.store_backoff_s: must be >= 0 seconds, got {self.output.store_backoff_s}")
        _positive(self.cluster.num_actors, "cluster.num_actors")
        if self.cluster.gpus_per_actor < 0:
            raise ConfigError(f"cluster.gpus_per_actor: must be >= 0, got {self.cluster.gpus_per_actor}")
        if self.cluster.cpus_per_actor < 0:
            raise ConfigError(f"cluster.cpus_per_actor: must be >= 0, got {self.cluster.cpus_per_actor}")
        _positive(self.cluster.batch_tokens, "cluster.batch_tokens")
        if self.cluster.batch_tokens < self.data.max_length:
            raise ConfigError(
                f"cluster.batch_tokens: must be >= data.max_length ({self.data.max_length}) so one window fits a batch"
            )
        if self.cluster.backup_after_s is not None and self.cluster.backup_after_s <= 0:
            raise ConfigError(f"cluster.backup_after_s: must be > 0 or null, got {self.cluster.backup_after_s}")
        timeout = self.cluster.actor_start_timeout_s
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"cluster.actor_start_timeout_s: must be > 0 seconds or null, got {timeout}")
        if self.cluster.max_retries < 0:
            raise ConfigError(f"cluster.max_retries: must be >= 0, got {self.cluster.max_retries}")
        if self.teacher.license is not None:
            _require(self.teacher.license.strip(), "teacher.license", "must be a license name (or null)")
        self._validate_generate()

    def _validate_generate(self) -> None:
        """The `generate` section, when there is one."""
        g = self.generate
        if g is None:
            return
        _one_of(g.engine, GENERATE_ENGINES, "generate.engine")
        if self.data.format not in CHAT_FORMATS:
            raise ConfigError(
                f"generate: prompts come from data.format chat or prompt_completion, not {self.data.format!r}"
            )
        _positive(g.n, "generate.n")
        _positive(g.max_new_tokens, "generate.max_new_tokens")
        _positive(g.batch_size, "generate.batch_size")
        if not (math.isfinite(g.temperature) and g.temperature >= 0):
            raise ConfigError(f"generate.temperature: must be a finite number >= 0 (0: greedy), got {g.temperature}")
        if g.temperature == 0 and g.n > 1:
            raise ConfigError(
                f"generate.n: greedy generation (generate.temperature 0) gives the same response every time; "
                f"n must be 1, got {g.n}"
            )
        if not 0 < g.top_p <= 1:
            raise ConfigError(f"generate.top_p: must be in (0, 1] (1: off), got {g.top_p}")
        if g.top_k < 0:
            raise ConfigError(f"generate.top_k: must be >= 0 (0: off), got {g.top_k}")
        for i, stop in enumerate(g.stop):
            if not stop:
                raise ConfigError(f"generate.stop[{i}]: must be a non-empty string")
        if not 0 <= g.seed < 2**63:
            raise ConfigError(f"generate.seed: must be in [0, 2**63), got {g.seed}")

    def _validate_chat(self) -> None:
        """The chat / prompt_completion keys, and `targets.positions` (null becomes the format's default)."""
        data, chat = self.data, self.data.format in CHAT_FORMATS
        if chat and data.ids_field:
            raise ConfigError(
                f"data.ids_field: not supported with data.format={data.format} (records are rendered with the chat "
                "template and tokenized); leave it null"
            )
        for key in ("messages_field", "prompt_field", "completion_field"):
            _require(getattr(data, key), f"data.{key}", "must be a record field name")
        if chat and data.format == "prompt_completion" and data.prompt_field == data.completion_field:
            raise ConfigError(f"data.completion_field: must differ from data.prompt_field ({data.prompt_field!r})")
        if data.chat_template is not None:
            if not chat:
                raise ConfigError(
                    f"data.chat_template: only used with data.format chat or prompt_completion, not {data.format!r}"
                )
            _require(data.chat_template.strip(), "data.chat_template", "must be a Jinja template or a file path")
        if self.targets.positions is None:
            self.targets.positions = "assistant" if chat else "all"
        _one_of(self.targets.positions, TARGET_POSITIONS, "targets.positions")
        if self.targets.positions == "assistant" and not chat:
            raise ConfigError(
                f"targets.positions: assistant needs data.format chat or prompt_completion (a {data.format!r} "
                "corpus has no assistant tokens); use all"
            )

    def validate_against_vocab(self, padded_vocab_size: int) -> None:
        """Checks that need the teacher's vocabulary size (read from its config, before any work)."""
        key = {"topk": "targets.k", "hybrid": "targets.head", "sample": "targets.k"}[self.targets.mode]
        if self.targets.stored_k > padded_vocab_size or (
            self.targets.mode == "hybrid" and self.targets.head >= padded_vocab_size
        ):
            raise ConfigError(
                f"{key}: must be <= the teacher's vocab size ({padded_vocab_size}), got {self.targets.stored_k}"
            )


def redact_urls(value: Any) -> Any:
    """`value` (nested dicts, lists, strings) with the user:password of every URL replaced by ``***``."""
    if isinstance(value, dict):
        return {k: redact_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_urls(v) for v in value]
    return _URL_USERINFO.sub(r"\1***@", value) if isinstance(value, str) else value


def redact_secrets(value: Any) -> Any:
    """`redact_urls(value)`, and every value of a credential-named dict key (token, secret, password, ...) hidden."""
    if isinstance(value, dict):
        return {k: "(hidden)" if _is_secret_key(k) else redact_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return redact_urls(value)


def _is_secret_key(key: Any) -> bool:
    words = re.split(r"[^a-z0-9]+", str(key).lower())
    return any(w in SECRET_WORDS for w in words) or str(key).lower().endswith(SECRET_WORDS)


def normalize_temperatures(temps: list[float]) -> list[float]:
    """1.0 first (the stored log-probs are at T=1), then the others in ascending order, without duplicates."""
    rest = sorted({float(t) for t in temps} - {1.0})
    return [1.0, *rest]


def _require(value: Any, key: str, what: str) -> None:
    if value in ("", None, []):
        raise ConfigError(f"{key}: {what}")


def _one_of(value: Any, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")


def _positive(value: int, key: str, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value}")


def _build_section(section: str, klass: type, values: dict[str, Any]):
    hints = typing.get_type_hints(klass)
    known = {f.name for f in dataclasses.fields(klass)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {key: _coerce(f"{section}.{key}", hints[key], value) for key, value in values.items()}
    return klass(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check `value` against the type hint; allow int where float is expected; raise ConfigError otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(key, option, value)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {_shown(key, value)} ({type(value).__name__})")
    if hint is type(None):
        if value is None:
            return None
    elif origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif hint is Any:
        return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                raise ConfigError(f"{key}: expected a number, got .nan")
            return float(value)
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)  # "1e-3": a float in YAML 1.2 and JSON, a string to PyYAML's YAML 1.1 resolver
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {_shown(key, value)} ({type(value).__name__})")


def _shown(key: str, value: Any) -> str:
    """A value as an error message may show it: never one of a key that holds secrets."""
    return "(hidden)" if key.split(".")[-1] in SECRET_HOLDERS else repr(value)


_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ["targets.k=16", "cluster.address=auto"] into nested data; values are parsed as YAML scalars."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. targets.k=16")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: the key must be section.key, e.g. targets.k")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{dotted}: cannot parse value {raw!r}: {exc}") from None
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def merge(base: dict[str, Any], extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Overlay section-wise overrides on a raw config mapping (returns a new mapping)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        current = out.get(section) or {}
        if not isinstance(current, dict):
            raise ConfigError(f"{section}: expected a mapping, got {type(current).__name__}")
        out[section] = {**current, **values}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> KDCacheConfig:
    """Read a YAML config file (or none), apply `key=value` overrides, validate, and return the config."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
    raw = merge(raw, parse_overrides(overrides or []))
    return KDCacheConfig.from_dict(raw)
