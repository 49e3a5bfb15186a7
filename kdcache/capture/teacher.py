"""Load a Hugging Face causal LM as a teacher and turn token batches into top-k soft targets, chunk by chunk.

The capture stage's only module that imports ``transformers`` (lazily, inside functions); elsewhere only the Hugging
Face Trainer adapter and the demo do (tests/test_layout.py checks).

The teacher runs the model's body once per batch, gathers the hidden states of the valid (unpadded) positions and
turns a few positions at a time into logits exactly as the architecture's own ``forward`` does (see
`kdcache.capture.head_transforms`: a known linear head plus its final-logit transform, or the model's own forward from
the body on, for BERT-style heads, soft-capping, scaling, ... of any class). The full ``[tokens, vocab]`` float32
logits tensor is never built.

At load time a probe compares a right-padded batch of rows of different lengths with each row's own forward, alone.
A model whose logits change with padding (one that ignores ``attention_mask``, or sparse attention whose top-k key
selection breaks ties differently at another padded length) is then run on equal-length groups of rows (or one row
per forward), never padded; ``Teacher.batching`` says which, and the load logs it.

Usage::

    teacher = Teacher("Qwen/Qwen2.5-0.5B", dtype="bfloat16")
    targets = teacher.compute_targets(input_ids, attention_mask, k=64, temperatures=[1.0, 2.0])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from kdcache.capture.head_transforms import HEAD_TRANSFORMS, BodyCall, ForwardHead, find_body
from kdcache.capture.targets import SampledTargets, TokenTargets, sample_targets, select_topk
from kdcache.errors import ConfigError
from kdcache.identity import weights_fingerprint

__all__ = [
    "BATCHING_MODES",
    "Teacher",
    "default_chunk_bytes",
    "load_tokenizer",
    "read_model_info",
    "resolve_dtype",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("kdcache.capture.teacher")

# Rows of the load-time probe (tokens): one right-padded batch of these lengths is compared with each row alone.
# Several lengths and contents, since a padding effect may show on some rows only (top-k ties in sparse attention).
_PROBE_LENGTHS = (24, 21, 17, 12, 7, 3)
# Allowed max |ours - forward| logit difference, relative to 1 + max |logit|, per compute dtype.
_PROBE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
# How the teacher batches rows: "padded" (one forward per right-padded batch), "equal_length" (one forward per group
# of rows of the same length, no padding) or "one_row" (one forward per row).
BATCHING_MODES = ("padded", "equal_length", "one_row")
# Default bytes of float32 logits per lm_head chunk, by device type. On CPU, 64 MiB (524 positions at V = 32k, 130 at
# 128k) keeps the head's matmul efficient and the peak memory small; select_topk then works through the chunk in
# cache-sized blocks. On an accelerator, 64 MiB would leave select_topk's kernels launch-bound (130 rows at V 128k), so
# chunks are 1 GiB there (8k rows at 128k; about 2 GiB of extra device memory at the peak).
CHUNK_BYTES_BY_DEVICE = {"cpu": 64 * 2**20}
ACCELERATOR_CHUNK_BYTES = 2**30


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


def read_model_info(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Describe a checkpoint cheaply from its config alone (no weights are loaded).

    Returns:
        JSON-serialisable dict: ``model_type``, ``architectures``, ``padded_vocab_size`` (rows of the output head,
        from the text config for multimodal models), ``final_logit_softcapping``, ``logit_scale``,
        ``logits_scaling`` (None when absent), ``config_dtype`` (str or None), ``max_position_embeddings`` (None when
        the config has none) and ``weights_fingerprint`` (`kdcache.identity.weights_fingerprint`: a hash of the
        weight files' bytes for a local directory, the resolved commit for a hub id, None when that is unknown).
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
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "weights_fingerprint": weights_fingerprint(name_or_path, config),
    }


class _BodyDone(Exception):
    """Raised from a hook once the body has returned: the rest of the forward (the head) is not wanted there."""


def _selects_keys(model: torch.nn.Module) -> bool:
    """Whether the model has a sparse-attention indexer that keeps the top-k keys per query (DeepSeek V3.2-style).

    Its score ties are broken differently at another padded length, which a short probe may not reach (real indexers
    keep 512-2048 keys), so such a model is never run padded.
    """
    return any(isinstance(getattr(module, "index_topk", None), int) for module in model.modules())


class Teacher:
    """A causal LM in inference mode that maps token batches to top-k soft targets without full-vocab logits.

    Attributes:
        model: The loaded ``transformers`` model (eval mode, no gradients).
        device: Device the model runs on.
        dtype: Dtype the model computes in.
        padded_vocab_size: Logits per position (the head's rows, or fewer where the forward drops padding rows; may
            exceed the tokenizer's size).
        chunk_bytes: Upper bound in bytes on the float32 logits of one head chunk.
        head_kind: "linear": the class's known linear head and final-logit transform (`HEAD_TRANSFORMS`), with the
            head's product written into one reused buffer; "forward": the model's own forward from the body on
            (`kdcache.capture.head_transforms.ForwardHead`), for every other class; "whole": a model whose head cannot
            run on its body's hidden states alone (ProphetNet reads its n-gram streams): its whole forward, one row at
            a time, so the logits of one row ``[L, V]`` exist at once.
        batching: One of `BATCHING_MODES`, decided by the load-time probe: "padded" (one forward per right-padded
            batch), "equal_length" (the model's logits change with padding: one forward per group of equal-length
            rows, so a batch of B rows of k distinct lengths costs k forwards) or "one_row" (even an unpadded batch
            of several rows differs from each row alone: one forward per row).
        batching_reason: Why the probe chose ``batching`` (its measured differences), for logs and reports.
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

        name = type(self.model).__name__
        vocab_in = self.model.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(0)
        low = 4 if vocab_in > 8 else 0  # avoid the special ids (pad, bos, eos, unk) where the vocabulary allows
        self._probe_rows = [torch.randint(low, vocab_in, (n,), generator=generator) for n in _PROBE_LENGTHS]
        first = self._probe_rows[0][None].to(self.device)
        with torch.inference_mode():
            body = find_body(self.model, first, lambda: self.model(input_ids=first, use_cache=False))
        unseparable = None  # why the head cannot run on the body's hidden states, if it cannot
        if body is None:
            unseparable = "no module its forward calls on the tokens returns hidden states [batch, length, width]"
        elif body.calls != 1:
            unseparable = f"its forward calls its body {body.name!r} {body.calls} times"
        self._body: BodyCall | None = body
        self._transform = HEAD_TRANSFORMS.get(name)
        self._head = self.model.get_output_embeddings()
        linear = (
            unseparable is None
            and self._transform is not None
            and isinstance(getattr(self._head, "weight", None), torch.Tensor)
        )
        self.head_kind = "linear" if linear else "forward" if unseparable is None else "whole"
        # A plain Linear head without hooks (torch's or accelerate's) can write each chunk's logits into one reused
        # buffer (see _logits).
        self._plain_head = (
            linear
            and type(self._head) is torch.nn.Linear
            and not self._head._forward_hooks
            and not self._head._forward_pre_hooks
            and not hasattr(self._head, "_hf_hook")
        )
        self._head_device = None  # forward head: the hidden states stay where the body returns them
        if linear:
            weight = self._head.weight
            self._head_device = weight.device if weight.device.type != "meta" else self.device
        self._forward_head = None if body is None else ForwardHead(self.model, body, self.device)
        self.padded_vocab_size = int(self._head.weight.shape[0]) if linear else 0  # else: measured by the probe
        self.batching, self.batching_reason = self._probe(unseparable)
        if self.head_kind == "whole":
            log.warning(
                "teacher %s: %s; kdcache runs its whole forward one sequence at a time (the full logits of one "
                "sequence at once)",
                name,
                self.batching_reason,
            )
        else:
            log.info(
                "teacher %s: body %r, head %s (%s), batching %s: %s",
                name,
                body.name,
                self.head_kind,
                ", ".join(body.after) or "-",
                self.batching,
                self.batching_reason,
            )

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Last hidden states ``[B, L, H]`` (model dtype): the model's own forward, stopped once its body returns.

        The body gets exactly the arguments the model's forward gives it (position ids, masks, ...).
        """
        captured: list[torch.Tensor] = []

        def stop(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured.append(self._body.hidden(output))
            raise _BodyDone

        handle = self._body.module.register_forward_hook(stop)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _BodyDone:
            pass
        finally:
            handle.remove()
        return captured[0]

    def _logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final logits ``[n, V]`` (model dtype) of hidden states ``[n, H]``, as the model's forward computes them.

        With ``out`` (``[>= n, V]``, model dtype) and a plain ``nn.Linear`` head, the head's product is written into
        ``out[:n]``: the same ``mm``/``addmm`` that ``nn.Linear`` calls (bitwise the same logits), without a fresh
        ``[n, V]`` tensor per chunk, which on CPU is mapped and page-faulted anew each time (~8% of the head's time
        for 64 MiB chunks). The result may then be a view of ``out``, valid until the next call.
        """
        if self.head_kind == "forward":
            return self._forward_head(hidden)
        head = self._head
        if out is None or not self._plain_head or hidden.dtype != head.weight.dtype:
            return self._transform(self.model, head(hidden))
        logits = out[: hidden.shape[0]]
        if head.bias is None:
            torch.mm(hidden, head.weight.t(), out=logits)
        else:
            torch.addmm(head.bias, hidden, head.weight.t(), out=logits)
        return self._transform(self.model, logits)

    @staticmethod
    def _groups(lengths: list[int], batching: str) -> list[list[int]]:
        """Rows that go through one forward together, in order: all (padded), by length (equal_length) or each row
        alone (one_row); rows of length 0 in none (they have no valid position)."""
        if batching == "padded":
            return [[row for row, length in enumerate(lengths) if length]]
        groups: dict[int, list[int]] = {}
        for row, length in enumerate(lengths):
            if length:
                groups.setdefault(length if batching == "equal_length" else -1 - row, []).append(row)
        return list(groups.values())

    def _valid_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor, batching: str) -> torch.Tensor:
        """Hidden states ``[N, H]`` of the valid positions of a checked batch, row-major, batched as ``batching``."""
        lengths = mask.sum(dim=1).tolist()
        per_row: dict[int, torch.Tensor] = {}
        for rows in self._groups(lengths, batching):
            width = max(lengths[row] for row in rows)
            # grouped rows have no padding: no mask, as the forward of one sequence alone gets none
            hidden = self._hidden_states(input_ids[rows, :width], mask[rows, :width] if batching == "padded" else None)
            per_row.update((row, h[: lengths[row]]) for row, h in zip(rows, hidden))
        if not per_row:  # no valid position: no chunk
            return torch.empty((0, 0), device=input_ids.device)
        return torch.cat([per_row[row] for row in sorted(per_row)])

    def _probe(self, unseparable: str | None) -> tuple[str, str]:
        """How to batch this model: the teacher's logits against the model's forward of each probe row alone.

        Args:
            unseparable: Why the body cannot be told from the head, or None.

        Returns:
            (batching, reason): "padded" when a right-padded batch of the probe rows matches every row alone, else
            "equal_length" when an unpadded batch of two rows matches, else "one_row". A forward head that fails or
            differs on one row alone, and an unseparable model, become ``head_kind`` "whole" (always "one_row").

        Raises:
            ConfigError: the forward's logits are not one row per position, or a linear head listed in
                ``HEAD_TRANSFORMS`` differs from the forward on one row alone (that entry is wrong).
        """
        name = type(self.model).__name__
        rows = [row.to(self.device) for row in self._probe_rows]
        twin = torch.roll(rows[0], 1)  # another row of the first row's length, for the equal-length check
        width = len(rows[0])
        ids = torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in rows])
        mask = (torch.arange(width)[None, :] < torch.tensor(_PROBE_LENGTHS)[:, None]).long().to(self.device)
        pair = torch.stack([rows[0], twin])
        with torch.inference_mode():
            reference = [self.model(input_ids=row[None], use_cache=False).logits for row in [*rows, twin]]
        if any(ref.dim() != 3 or tuple(ref.shape[:2]) != (1, len(row)) for ref, row in zip(reference, rows)):
            raise ConfigError(
                f"{name}: its forward returns logits of shape {tuple(reference[0].shape)} for one sequence of "
                f"{len(rows[0])} tokens, not one row of logits per position, so it cannot be a teacher"
            )
        reference = [ref[0].float().cpu() for ref in reference]
        twin_reference = reference.pop()
        if self.head_kind != "linear":
            self.padded_vocab_size = int(reference[0].shape[-1])
        if unseparable is not None:
            return "one_row", unseparable
        failures: list[str] = []

        def error(input_ids: torch.Tensor, attention_mask: torch.Tensor, batching: str, refs: list) -> float:
            try:
                with torch.inference_mode():
                    parts = self.map_logit_chunks(input_ids, attention_mask, lambda z: z.cpu(), batching=batching)
            except Exception as exc:  # e.g. a forward that reads more of its body's output than the hidden states
                failures.append(f"{type(exc).__name__}: {exc}")
                return float("inf")
            ours, theirs = torch.cat(parts), torch.cat(refs)
            return (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")

        allowed = _PROBE_RTOL.get(self.dtype, 3e-2) * (1.0 + max(r.abs().max().item() for r in reference))
        alone = error(ids[:1], mask[:1], "one_row", reference[:1])
        if not alone <= allowed:
            if self.head_kind == "linear":
                raise ConfigError(
                    f"{name}: the chunked lm_head differs from the model's forward by {alone:.3g} logits (allowed "
                    f"{allowed:.3g}) on one row alone; its forward applies a final-logit transform other than the "
                    "one kdcache.capture.head_transforms.HEAD_TRANSFORMS lists for this class; fix that entry after "
                    "reading its forward()"
                )
            self.head_kind = "whole"
            what = failures[0] if failures else f"differs from the forward by {alone:.3g} (allowed {allowed:.3g})"
            return "one_row", (
                f"its forward from the body {self._body.name!r} on ({', '.join(self._body.after) or 'nothing'}) "
                f"does not run on the hidden states of a few positions: {what}"
            )
        padded = error(ids, mask, "padded", reference)
        equal = error(pair, torch.ones_like(pair), "equal_length", [reference[0], twin_reference])
        reason = f"padded batch vs rows alone {padded:.2g}, equal-length batch {equal:.2g}, allowed {allowed:.2g}"
        if padded <= allowed and not _selects_keys(self.model):
            return "padded", reason
        if padded <= allowed:
            reason += "; a sparse-attention indexer keeps top-k keys per query, whose ties differ with padding"
        return ("equal_length" if equal <= allowed else "one_row"), reason

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
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        k: int,
        temperatures: Sequence[float],
        target_mask: torch.Tensor | None = None,
    ) -> TokenTargets:
        """Top-k soft targets of every valid position of a right-padded batch.

        Args:
            input_ids: ``[B, L]`` integer token ids, right-padded.
            attention_mask: ``[B, L]`` 0/1, 1 on valid tokens, all 1s before all 0s in each row.
            k: Ids kept per position, ``1 <= k <= padded_vocab_size``.
            temperatures: Temperatures for normalizers and tail masses; ``temperatures[0]`` must be 1.0.
            target_mask: ``[B, L]`` bool, a subset of ``attention_mask``: only these positions get targets (the head
                runs on them alone); None: every valid position.

        Returns:
            TokenTargets for the ``N = attention_mask.sum()`` valid positions (``target_mask.sum()`` with a target
            mask) in row-major order (row 0's, then row 1's, ...), on ``self.device``. Targets at position t describe
            the next token after t.

        Raises:
            ValueError: malformed batch (shapes, non-binary or left-padded mask, a target mask outside it), bad k or
                temperatures.
        """
        selected = attention_mask if target_mask is None else target_mask
        if self.padded_vocab_size == 0 or input_ids.numel() == 0 or int(selected.sum()) == 0:
            empty = torch.empty(0, self.padded_vocab_size, device=self.device)
            return select_topk(empty, k, temperatures)
        # select_topk ranks bfloat16/float16 logits as they are and converts them per cache-sized block: no float32
        # copy of the chunk.
        parts = self.map_logit_chunks(
            input_ids,
            attention_mask,
            lambda z: select_topk(z, k, temperatures),
            as_float32=False,
            reuse_buffer=True,
            target_mask=target_mask,
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
        target_mask: torch.Tensor | None = None,
    ) -> tuple[TokenTargets, SampledTargets]:
        """Sampled (head = 0) or hybrid (head > 0) targets of every valid position (or of ``target_mask``'s, as in
        :meth:`compute_targets`); see `targets.sample_targets`.

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
            target_mask=target_mask,
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
        batching: str | None = None,
        target_mask: torch.Tensor | None = None,
    ) -> list:
        """Run the body (once per batch, or per group of rows as ``batching`` says), then `fn(logits [n, V])` on
        chunks of valid positions in row-major order.

        Chunks hold at most ``chunk_bytes`` of float32 logits, so [tokens, vocab] is never materialized whole (with
        ``head_kind`` "whole", the logits of one row at a time are).
        ``fn`` gets float32 logits, or with ``as_float32=False`` logits in the model's dtype. With
        ``reuse_buffer=True`` every chunk's logits may be written into one buffer allocated per call, so ``fn`` must
        not keep a reference to its argument (its results must be new tensors). ``batching``: one of
        `BATCHING_MODES`; default ``self.batching``, which the load-time probe chose. With ``target_mask`` (``[B, L]``
        bool, a subset of the valid positions) only its positions reach the head: the body still sees every token.
        """
        input_ids, mask = self._check_batch(input_ids, attention_mask)
        selected = None  # [N] bool over the valid positions, row-major: which of them reach the head
        if target_mask is not None:
            target_mask = target_mask.to(mask.device).bool()
            if target_mask.shape != mask.shape or bool((target_mask & ~mask.bool()).any()):
                raise ValueError(f"target_mask must be [B, L] = {tuple(mask.shape)} and inside attention_mask")
            selected = target_mask[mask.bool()]
        rows = max(1, self.chunk_bytes // (self.padded_vocab_size * 4))
        if self.head_kind == "whole":
            chunks = self._whole_forward_chunks(input_ids, mask, rows, target_mask)
            return [fn(z.float() if as_float32 else z) for z in chunks]
        # [N, H], row-major, on the head's device (a sharded model's last layer may sit elsewhere)
        hidden = self._valid_hidden(input_ids, mask, batching or self.batching)
        if selected is not None:
            hidden = hidden[selected.to(hidden.device)]
        hidden = hidden.to(self._head_device)
        out = None
        if reuse_buffer and self._plain_head and hidden.shape[0] > rows:  # one chunk: nothing to reuse
            out = torch.empty((rows, self.padded_vocab_size), dtype=hidden.dtype, device=hidden.device)
        chunks = (self._logits(hidden[start : start + rows], out) for start in range(0, hidden.shape[0], rows))
        return [fn(z.float() if as_float32 else z) for z in chunks]

    def _whole_forward_chunks(
        self, input_ids: torch.Tensor, mask: torch.Tensor, rows: int, target_mask: torch.Tensor | None = None
    ) -> Any:
        """Logits chunks ``[<= rows, V]`` of each row's own whole forward, one row at a time (head_kind "whole"); only
        ``target_mask``'s positions when given."""
        for row, length in enumerate(mask.sum(dim=1).tolist()):
            if length:
                logits = self.model(input_ids=input_ids[row : row + 1, :length], use_cache=False).logits[0]
                if target_mask is not None:
                    logits = logits[target_mask[row, :length].to(logits.device)]
                yield from (logits[start : start + rows] for start in range(0, logits.shape[0], rows))

    @torch.inference_mode()
    def full_log_softmax(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reference: ``log_softmax(model(...).logits.float())`` at the valid positions, for tests and benchmarks.

        Builds the full ``[B, L, V]`` logits; use only on small batches. Rows are batched as ``self.batching`` says,
        so a padding-sensitive model's reference is its forward on unpadded rows.

        Returns:
            ``[N, V]`` float32 log-probabilities, positions in the same order as :meth:`compute_targets`.
        """
        input_ids, mask = self._check_batch(input_ids, attention_mask)
        lengths = mask.sum(dim=1).tolist()
        per_row = {}
        for rows in self._groups(lengths, self.batching):
            width = max(lengths[row] for row in rows)
            group_mask = mask[rows, :width] if self.batching == "padded" else None
            logits = self.model(input_ids=input_ids[rows, :width], attention_mask=group_mask, use_cache=False).logits
            per_row.update((row, z[: lengths[row]]) for row, z in zip(rows, logits))
        if not per_row:
            return torch.empty(0, self.padded_vocab_size, device=self.device)
        return torch.log_softmax(torch.cat([per_row[row] for row in sorted(per_row)]).float(), dim=-1)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
