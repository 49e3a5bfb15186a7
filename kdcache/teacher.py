"""Load a Hugging Face causal LM as a teacher and turn token batches into top-k soft targets, chunk by chunk.

The only module of kdcache that imports ``transformers`` (imported lazily, so importing this module is cheap).

The teacher runs the base model once per batch, gathers the hidden states of the valid (unpadded) positions and
applies the output head to a few positions at a time, with every final-logit transform the architecture's own
``forward`` applies (Gemma 2/3 soft-capping, Cohere ``logit_scale``, Granite ``logits_scaling``, ...). The full
``[tokens, vocab]`` float32 logits tensor is never built. An architecture whose output transform kdcache does not
know is refused with a clear error, and every model is checked once at load time against its own ``forward``.

Usage::

    teacher = Teacher("Qwen/Qwen2.5-0.5B", dtype="bfloat16")
    targets = teacher.compute_targets(input_ids, attention_mask, k=64, temperatures=[1.0, 2.0])
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kdcache.errors import ConfigError
from kdcache.head_transforms import HEAD_TRANSFORMS, HeadTransform, identity
from kdcache.targets import SampledTargets, TokenTargets, sample_targets, select_topk

__all__ = [
    "HEAD_TRANSFORMS",
    "Teacher",
    "default_chunk_bytes",
    "load_tokenizer",
    "read_model_info",
    "resolve_dtype",
    "tokenizer_fingerprint",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_PROBE_TOKENS = 16  # length of the one-row probe used to check the chunked head against the model's forward
# Allowed max |chunked - forward| logit difference, relative to 1 + max |logit|, per compute dtype.
_PROBE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
# Default bytes of float32 logits per lm_head chunk, by device type. On CPU, 64 MiB (524 positions at V = 32k, 130 at
# 128k) keeps the head's matmul efficient and the peak memory small; select_topk then works through the chunk in
# cache-sized blocks. On an accelerator, 64 MiB would leave select_topk's kernels launch-bound (130 rows at V 128k), so
# chunks are 1 GiB there (8k rows at 128k; about 2 GiB of extra device memory at the peak).
CHUNK_BYTES_BY_DEVICE = {"cpu": 64 * 2**20}
ACCELERATOR_CHUNK_BYTES = 2**30

# Config keys that suggest a final-logit transform (attention and router soft-capping excluded).
_TRANSFORM_KEY = re.compile(r"(logit|lm_head).*(scal|cap|mult)|output_multiplier|mup")
_NOT_TRANSFORM_KEY = re.compile(r"attn|attention|router|rope")


def _to_torch_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        return getattr(torch, value.removeprefix("torch."), None)
    return None


def _config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a checkpoint's config declares (top level, else its text config), or None."""
    found = _to_torch_dtype(getattr(config, "dtype", None))
    if found is None:
        found = _to_torch_dtype(getattr(config.get_text_config(decoder=True), "dtype", None))
    return found


def resolve_dtype(dtype: str, device: torch.device, *, config_dtype: torch.dtype | str | None = None) -> torch.dtype:
    """Turn the ``teacher.dtype`` setting into the torch dtype the teacher computes in.

    Args:
        dtype: "auto", "float32", "bfloat16" or "float16". "auto" is the checkpoint's own dtype on an accelerator
            and float32 on CPU (half-precision matmuls on CPU are slow and gain nothing).
        device: Device the teacher runs on.
        config_dtype: The dtype the checkpoint's config declares, used by "auto" off CPU; float32 when None or not
            one of the three supported dtypes.

    Returns:
        torch.float32, torch.bfloat16 or torch.float16.

    Raises:
        ConfigError: (a ValueError) ``dtype`` is not one of the four names.
    """
    if dtype == "auto":
        if torch.device(device).type == "cpu":
            return torch.float32
        resolved = _to_torch_dtype(config_dtype)
        return resolved if resolved in _DTYPES.values() else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"teacher.dtype must be one of 'auto', {', '.join(map(repr, _DTYPES))}; got {dtype!r}")
    return _DTYPES[dtype]


@contextmanager
def _remote_code_refusal(name_or_path: str) -> Iterator[None]:
    """transformers refuses a checkpoint that ships its own code unless told to trust it: name the key that does."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(
            f"teacher.trust_remote_code: {name_or_path} ships its own Python code (auto_map in its config), which "
            "kdcache runs only with teacher.trust_remote_code: true; set it if you trust that code"
        ) from None


def default_chunk_bytes(device: str | torch.device) -> int:
    """Bytes of float32 logits per lm_head chunk when ``chunk_bytes`` is not set: 64 MiB on CPU, 1 GiB elsewhere."""
    return CHUNK_BYTES_BY_DEVICE.get(torch.device(device).type, ACCELERATOR_CHUNK_BYTES)


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """Load the teacher's tokenizer with ``AutoTokenizer`` (hub id or local directory)."""
    from transformers import AutoTokenizer

    with _remote_code_refusal(name_or_path):
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Identify a tokenizer by content, so a cache can refuse a student whose tokenizer differs.

    Args:
        tokenizer: A transformers tokenizer. A fast one is hashed by its ``tokenizer.json`` content (minus the
            truncation/padding state, which transformers changes on each call), a slow one by its sorted vocab.

    Returns:
        ``{"hash": sha256 hex, "vocab_size": len(tokenizer), "eos_token_id": int | None, "bos_token_id": ...}``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        content = json.loads(backend.to_str())
        content.pop("truncation", None)
        content.pop("padding", None)
    else:
        content = tokenizer.get_vocab()
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return {
        "hash": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def _weights_fingerprint(name_or_path: str, config: Any) -> str | None:
    """sha256 of config.json plus sorted (weight file, size) for a local directory; else the resolved hub commit."""
    local = Path(name_or_path)
    if local.is_dir():
        digest = hashlib.sha256((local / "config.json").read_bytes())
        for path in sorted(p for p in local.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
            digest.update(f"\n{path.name}\t{path.stat().st_size}".encode())
        return digest.hexdigest()
    return getattr(config, "_commit_hash", None)  # None: the hub commit could not be resolved


def read_model_info(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Describe a checkpoint cheaply from its config alone (no weights are loaded).

    Returns:
        JSON-serialisable dict: ``model_type``, ``architectures``, ``padded_vocab_size`` (rows of the output head,
        from the text config for multimodal models), ``final_logit_softcapping``, ``logit_scale``,
        ``logits_scaling`` (None when absent), ``config_dtype`` (str or None) and ``weights_fingerprint`` (sha256 hex
        of config.json plus weight file names and sizes for a local directory, the resolved commit for a hub id, None
        when that is unknown).
    """
    from transformers import AutoConfig

    with _remote_code_refusal(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    text = config.get_text_config(decoder=True)
    dtype = _config_dtype(config)
    return {
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or []),
        "padded_vocab_size": int(text.vocab_size),
        "final_logit_softcapping": getattr(text, "final_logit_softcapping", None),
        "logit_scale": getattr(text, "logit_scale", None),
        "logits_scaling": getattr(text, "logits_scaling", None),
        "config_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "weights_fingerprint": _weights_fingerprint(name_or_path, config),
    }


def _head_transform(model: torch.nn.Module) -> HeadTransform:
    """The final-logit transform of ``model``'s class; ConfigError for an unknown class whose config names one."""
    name = type(model).__name__
    if name in HEAD_TRANSFORMS:
        return HEAD_TRANSFORMS[name]
    suspicious = {}
    for config in {id(c): c for c in (model.config, model.config.get_text_config(decoder=True))}.values():
        for key, value in config.to_dict().items():
            if value is not None and _TRANSFORM_KEY.search(key) and not _NOT_TRANSFORM_KEY.search(key):
                suspicious[key] = value
    if suspicious:
        raise ConfigError(
            f"{name} (model_type {model.config.model_type!r}) sets {suspicious}, which may transform the final "
            "logits, and kdcache does not know how this class applies it; add the class to "
            "kdcache.head_transforms.HEAD_TRANSFORMS after reading its forward()"
        )
    return identity


class Teacher:
    """A causal LM in inference mode that maps token batches to top-k soft targets without full-vocab logits.

    Attributes:
        model: The loaded ``transformers`` model (eval mode, no gradients).
        device: Device the model runs on.
        dtype: Dtype the model computes in.
        padded_vocab_size: Rows of the output head (the logits dimension; may exceed the tokenizer's size).
        chunk_bytes: Upper bound in bytes on the float32 logits of one head chunk.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        chunk_bytes: int | None = None,
        device_map: str | None = None,
    ) -> None:
        """Load the model and check its chunked head against its own forward on a short probe.

        Args:
            name_or_path: Hub id or local directory of a causal LM checkpoint.
            revision: Hub revision (branch, tag or commit); ignored for a local directory.
            dtype: "auto", "float32", "bfloat16" or "float16"; see :func:`resolve_dtype`.
            device: Device to run on; default cuda when available, else cpu.
            trust_remote_code: Allow the checkpoint's own modelling code (needed by some architectures).
            chunk_bytes: Bytes of float32 logits one head chunk may hold: ``positions * V * 4 <= chunk_bytes`` (at
                least one position per chunk). Peak extra memory is a small multiple of this. None: by device,
                see :func:`default_chunk_bytes` (64 MiB on CPU, 1 GiB on CUDA).
            device_map: None: the whole model on ``device``. "auto" (or another ``transformers`` device-map
                strategy): one replica's layers spread over every visible accelerator by ``accelerate`` (for teachers
                larger than one GPU); inputs then go to the embedding's device and each chunk's hidden states to the
                head's. Exclusive with ``device``.

        Raises:
            ConfigError: bad ``dtype`` or ``chunk_bytes``, or an architecture whose final-logit transform is unknown
                or whose forward disagrees with the chunked head.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
            raise ConfigError(f"chunk_bytes must be a positive int (bytes of float32 logits); got {chunk_bytes!r}")
        if device_map is not None and device is not None:
            raise ConfigError("Teacher: give device or device_map, not both")
        self.device = torch.device(device) if device is not None else _default_device()
        with _remote_code_refusal(name_or_path):
            config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        self.dtype = resolve_dtype(dtype, self.device, config_dtype=_config_dtype(config))
        self.model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            config=config,
            revision=revision,
            dtype=self.dtype,
            trust_remote_code=trust_remote_code,
            **({"device_map": device_map} if device_map is not None else {}),
        )
        if device_map is None:
            self.model.to(self.device)
        else:  # sharded by accelerate: batches enter at the embedding's device
            self.device = self.model.get_input_embeddings().weight.device
        # where accelerate put each module ({"": device} when one device holds everything), or None when not mapped
        self.device_map = None
        if device_map is not None:
            self.device_map = getattr(self.model, "hf_device_map", None) or {"": str(self.device)}
        self.model.eval()
        self.model.requires_grad_(False)
        self.chunk_bytes = default_chunk_bytes(self.device) if chunk_bytes is None else chunk_bytes

        self._body = self.model.base_model
        self._head = self.model.get_output_embeddings()
        name = type(self.model).__name__
        if self._body is self.model or self._head is None:
            raise ConfigError(f"{name} has no separate base model and output head; kdcache cannot chunk its lm_head")
        self._transform = _head_transform(self.model)
        self.padded_vocab_size = int(self._head.weight.shape[0])
        # A plain Linear head without hooks (torch's or accelerate's) can write each chunk's logits into one reused
        # buffer (see _logits).
        self._plain_head = (
            type(self._head) is torch.nn.Linear
            and not self._head._forward_hooks
            and not self._head._forward_pre_hooks
            and not hasattr(self._head, "_hf_hook")
        )
        self._head_device = self._head.weight.device if self._head.weight.device.type != "meta" else self.device
        self._check_head_matches_forward()

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[B, L, H]`` (model dtype) from one pass of the base model."""
        out = self._body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final logits ``[n, V]`` (model dtype) of hidden states ``[n, H]``, as the model's forward computes them.

        With ``out`` (``[>= n, V]``, model dtype) and a plain ``nn.Linear`` head, the head's product is written into
        ``out[:n]``: the same ``mm``/``addmm`` that ``nn.Linear`` calls (bitwise the same logits), without a fresh
        ``[n, V]`` tensor per chunk, which on CPU is mapped and page-faulted anew each time (~8% of the head's time
        for 64 MiB chunks). The result may then be a view of ``out``, valid until the next call.
        """
        head = self._head
        if out is None or not self._plain_head or hidden.dtype != head.weight.dtype:
            return self._transform(self.model, head(hidden))
        logits = out[: hidden.shape[0]]
        if head.bias is None:
            torch.mm(hidden, head.weight.t(), out=logits)
        else:
            torch.addmm(head.bias, hidden, head.weight.t(), out=logits)
        return self._transform(self.model, logits)

    def _check_head_matches_forward(self) -> None:
        """Refuse the model when head + transform on hidden states disagrees with its forward's logits."""
        vocab_in = self.model.get_input_embeddings().weight.shape[0]
        ids = ((torch.arange(_PROBE_TOKENS) * 7919 + 100) % vocab_in).unsqueeze(0).to(self.device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            ours = self._logits(self._hidden_states(ids, mask)[0]).float()
            ref = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()
        error = (ours - ref).abs().max().item()
        allowed = _PROBE_RTOL.get(self.dtype, 3e-2) * (1.0 + ref.abs().max().item())
        if not error <= allowed:
            raise ConfigError(
                f"{type(self.model).__name__}: the chunked lm_head differs from the model's forward by {error:.3g} "
                f"logits (allowed {allowed:.3g}); its forward applies a final-logit transform kdcache does not know. "
                "Add the class to kdcache.head_transforms.HEAD_TRANSFORMS after reading its forward()"
            )

    def _check_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(self.device)
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1")
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError("batches must be right-padded: attention_mask has a 1 after a 0 in some row")
        return input_ids.to(self.device, torch.long), mask.long()

    @torch.inference_mode()
    def compute_targets(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, k: int, temperatures: Sequence[float]
    ) -> TokenTargets:
        """Top-k soft targets of every valid position of a right-padded batch.

        Args:
            input_ids: ``[B, L]`` integer token ids, right-padded.
            attention_mask: ``[B, L]`` 0/1, 1 on valid tokens, all 1s before all 0s in each row.
            k: Ids kept per position, ``1 <= k <= padded_vocab_size``.
            temperatures: Temperatures for normalizers and tail masses; ``temperatures[0]`` must be 1.0.

        Returns:
            TokenTargets for the ``N = attention_mask.sum()`` valid positions in row-major order (row 0's valid
            tokens, then row 1's, ...), on ``self.device``. Targets at position t describe the next token after t.

        Raises:
            ValueError: malformed batch (shapes, non-binary or left-padded mask), bad k or temperatures.
        """
        if self.padded_vocab_size == 0 or input_ids.numel() == 0 or int(attention_mask.sum()) == 0:
            empty = torch.empty(0, self.padded_vocab_size, device=self.device)
            return select_topk(empty, k, temperatures)
        # select_topk ranks bfloat16/float16 logits as they are and converts them per cache-sized block: no float32
        # copy of the chunk.
        parts = self.map_logit_chunks(
            input_ids, attention_mask, lambda z: select_topk(z, k, temperatures), as_float32=False, reuse_buffer=True
        )
        return TokenTargets.concat(parts)

    @torch.inference_mode()
    def compute_sampled_targets(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        num_samples: int,
        head: int,
        temperatures: Sequence[float],
        generator: torch.Generator | None = None,
    ) -> tuple[TokenTargets, SampledTargets]:
        """Sampled (head = 0) or hybrid (head > 0) targets of every valid position; see `targets.sample_targets`.

        Returns:
            (TokenTargets with ids ``[N, head]``, SampledTargets ``[N, m]``), positions as in :meth:`compute_targets`.
        """
        parts = self.map_logit_chunks(
            input_ids,
            attention_mask,
            lambda z: sample_targets(
                z, num_samples=num_samples, head=head, temperatures=temperatures, generator=generator
            ),
            reuse_buffer=True,
        )
        return TokenTargets.concat([p[0] for p in parts]), SampledTargets.concat([p[1] for p in parts])

    def map_logit_chunks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        fn: Callable[[torch.Tensor], Any],
        *,
        as_float32: bool = True,
        reuse_buffer: bool = False,
    ) -> list:
        """Run the body once, then `fn(logits [n, V])` on chunks of valid positions in row-major order.

        Chunks hold at most ``chunk_bytes`` of float32 logits, so [tokens, vocab] is never materialized whole.
        ``fn`` gets float32 logits, or with ``as_float32=False`` logits in the model's dtype. With
        ``reuse_buffer=True`` every chunk's logits may be written into one buffer allocated per call, so ``fn`` must
        not keep a reference to its argument (its results must be new tensors).
        """
        input_ids, mask = self._check_batch(input_ids, attention_mask)
        hidden = self._hidden_states(input_ids, mask)
        # [N, H], row-major, on the head's device (a sharded model's last layer may sit elsewhere)
        hidden = hidden[mask.to(hidden.device).bool()].to(self._head_device)
        rows = max(1, self.chunk_bytes // (self.padded_vocab_size * 4))
        out = None
        if reuse_buffer and self._plain_head and hidden.shape[0] > rows:  # one chunk: nothing to reuse
            out = torch.empty((rows, self.padded_vocab_size), dtype=hidden.dtype, device=hidden.device)
        chunks = (self._logits(hidden[start : start + rows], out) for start in range(0, hidden.shape[0], rows))
        return [fn(z.float() if as_float32 else z) for z in chunks]

    @torch.inference_mode()
    def full_log_softmax(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reference: ``log_softmax(model(...).logits.float())`` at the valid positions, for tests and benchmarks.

        Builds the full ``[B, L, V]`` logits; use only on small batches.

        Returns:
            ``[N, V]`` float32 log-probabilities, positions in the same order as :meth:`compute_targets`.
        """
        input_ids, mask = self._check_batch(input_ids, attention_mask)
        logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        return torch.log_softmax(logits.float(), dim=-1)[mask.bool()]


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
