"""Distillation through generation: the teacher answers each prompt `generate.n` times; each answer, appended to its
prompt, becomes a sequence whose targets the worker then computes like any other's (docs/GENERATE.md).

    engine = make_engine(cfg.generate, teacher=teacher, tokenizer=tokenizer, stop_ids=stop_ids)
    windows, stats = generate_windows(prompts, engine, cfg.generate, max_length=2048, positions="assistant")

A response ends with the first end-of-sequence token (`stop_token_ids`: the model's generation config and the
tokenizer's EOS), with the token that completes a `generate.stop` string (`find_stop`), or after `max_new_tokens`
(fewer when the prompt and the response would pass `data.max_length`); the ending token is kept. The sequence is the
prompt's tokens followed by the response's, with a target at every position whose next token is generated (the
positions a student learns the response at) unless `targets.positions` is ``all``.

Exactly once and reproducible: every response draws its tokens from its own random stream, seeded by
(`generate.seed`, prompt, sample index), where the prompt is named by its file and position (`prompt_id`), so a
response does not depend on which other responses share its batch, on the unit plan or on retries: a rerun after a
crash and a clean run write identical shards (on the same hardware and software; a float rounding that differs
elsewhere may change a draw).

Engines:

* ``hf`` (default): Hugging Face ``generate`` with a KV cache on the teacher's own model, static batches of
  `generate.batch_size` responses of similar prompt length (left-padded; equal lengths only, or one at a time, for a
  model the teacher's load-time probe found sensitive to padding). Sampling (temperature, top-k, top-p) is the
  library's own warpers followed by `SeededDraw`, which picks each row's token by inverse CDF from that row's own
  uniforms; temperature 0 is plain greedy ``generate``. The checkpoint's ``generation_config`` sampling defaults are
  not applied: the recorded `generate` settings are all that shaped a response.
* ``vllm`` (GPUs, extra ``kdcache[vllm]``): ``vllm.LLM`` with a per-request seed; it returns token ids, and the
  teacher's chunked head computes the targets as for ``hf``. The model is loaded a second time, by vLLM
  (``generate.engine_options.gpu_memory_utilization``, default 0.5, leaves room for the teacher).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcache.capture.sources import Window
from kdcache.config import GenerateConfig
from kdcache.errors import ConfigError

__all__ = [
    "GenerationRow",
    "HFEngine",
    "Prompt",
    "SeededDraw",
    "VLLMEngine",
    "batch_rows",
    "draw_seed",
    "find_stop",
    "finish_response",
    "generate_windows",
    "make_engine",
    "prompt_id",
    "read_generation_eos",
    "response_seq_id",
    "stop_token_ids",
]

VLLM_GPU_MEMORY_UTILIZATION = 0.5  # vLLM's share of the GPU unless engine_options says otherwise: the teacher's too


@dataclass(frozen=True)
class Prompt:
    """One prompt to answer: where it comes from and its rendered tokens."""

    url: str  # the input file
    locator: str  # its position in the file ("b<byte offset>" / "r<row>")
    where: str  # file and line or row, for messages
    input_ids: list[int]  # the rendered prompt (template and generation prompt, or tokenized string)

    @property
    def prompt_id(self) -> int:
        return prompt_id(self.url, self.locator)


@dataclass(frozen=True)
class GenerationRow:
    """One response to generate: its prompt's tokens, its random stream's seed and its length limit."""

    prompt_ids: list[int]
    seed: int  # `draw_seed` of (generate.seed, prompt_id, sample index)
    max_new_tokens: int  # >= 1


def _hash63(*parts: Any) -> int:
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def prompt_id(url: str, locator: str) -> int:
    """The stable 63-bit id of a source record (its file and position): a generated sequence's ``prompt_id``."""
    return _hash63(url, locator, "prompt")


def response_seq_id(url: str, locator: str, sample_index: int) -> int:
    """The ``seq_id`` of response ``sample_index`` to the record at (url, locator)."""
    return _hash63(url, locator, "response", sample_index)


def draw_seed(seed: int, prompt: int, sample_index: int) -> int:
    """The seed of one response's random stream: a function of (generate.seed, prompt_id, sample index) only."""
    return _hash63(seed, prompt, sample_index, "draws")


def stop_token_ids(generation_eos: Any, tokenizer: Any) -> list[int]:
    """The ids that end a response: the model's generation config's ``eos_token_id`` (an id or a list: chat models
    list their end-of-turn token there) and the tokenizer's EOS, sorted."""
    ids = set()
    for value in (generation_eos, getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return sorted(ids)


def find_stop(decode: Callable[[list[int]], str], ids: Sequence[int], stops: Sequence[str]) -> int | None:
    """Index of the token that completes the first stop string in ``decode(ids)``, or None.

    The smallest i such that ``decode(ids[:i + 1])`` contains one of ``stops`` (binary search: a few decodes).
    """
    ids = list(ids)
    if not stops or not ids or not any(s in decode(ids) for s in stops):
        return None
    lo, hi = 0, len(ids) - 1  # decode(ids[:hi + 1]) contains a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(ids[: mid + 1]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def finish_response(
    tokens: Sequence[int],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    stops: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
) -> list[int]:
    """An engine's raw output cut where the response ends: at most ``max_new_tokens``, through the first EOS id or the
    token completing a stop string, whichever comes first (engines may run past it: finished rows of a batch are
    padded, a stop may be noticed late)."""
    out = [int(t) for t in tokens[:max_new_tokens]]
    eos = set(eos_ids)
    end = next((i for i, t in enumerate(out) if t in eos), None)
    if stops and decode is not None:
        stop = find_stop(decode, out if end is None else out[: end + 1], stops)
        if stop is not None:
            end = stop
    return out if end is None else out[: end + 1]


def batch_rows(lengths: Sequence[int], batch_size: int, batching: str = "padded") -> list[list[int]]:
    """Static batches of response rows by prompt length: indices into ``lengths``, sorted by (length, index) and
    cut every ``batch_size`` rows; with ``batching`` "equal_length" also where the length changes, with "one_row" one
    row per batch (the teacher's padding-sensitivity probe, `kdcache.capture.teacher.BATCHING_MODES`)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    size = 1 if batching == "one_row" else batch_size
    batches: list[list[int]] = []
    for i in order:
        if (
            not batches
            or len(batches[-1]) >= size
            or (batching == "equal_length" and lengths[batches[-1][0]] != lengths[i])
        ):
            batches.append([])
        batches[-1].append(i)
    return batches


class SeededDraw:
    """A logits processor that samples each row's next token from its own uniforms, whatever the batch.

    Row r's token at step s is the inverse-CDF draw of ``uniforms[r, s]`` from softmax(scores[r]) (the scores after
    temperature, top-k and top-p): the returned scores are 0 at that token and -inf elsewhere, so greedy selection
    picks it. ``uniforms`` come from each row's own generator (`draw_seed`), so a response depends only on its own
    stream and its logits.

    Args:
        uniforms: ``[B, max_new_tokens]`` float64 in [0, 1).
        prompt_width: columns of the batch's (left-padded) prompt: step = ``input_ids.shape[1] - prompt_width``.
    """

    def __init__(self, uniforms: torch.Tensor, prompt_width: int) -> None:
        self.uniforms = uniforms
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        probs = torch.softmax(scores.double(), dim=-1)  # -inf (filtered) -> 0
        cdf = torch.cumsum(probs, dim=-1)
        u = self.uniforms[:, step].to(cdf.device) * cdf[:, -1]
        picked = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=scores.shape[-1] - 1)
        # rounding at the top end may land on a filtered id: take the last id that has mass instead
        positive = probs > 0
        last = (positive * torch.arange(1, scores.shape[-1] + 1, device=probs.device)).argmax(dim=-1, keepdim=True)
        picked = torch.where(positive.gather(-1, picked), picked, last)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, picked, 0.0)


class ResponseEnd:
    """A stopping criterion: a row is done once it has its own ``max_new_tokens`` or its text contains a stop string.

    Only the last tokens are decoded each step (enough for the longest stop string); `finish_response` then cuts each
    row exactly, so noticing a stop late only costs a few steps.
    """

    def __init__(
        self, caps: Sequence[int], prompt_width: int, stops: Sequence[str], decode: Callable[[list[int]], str]
    ) -> None:
        self.caps = torch.tensor(list(caps))
        self.prompt_width = prompt_width
        self.stops = list(stops)
        self.decode = decode
        self.tail = 4 * max((len(s) for s in self.stops), default=0) + 8  # tokens: >= 1 byte each, <= 4 per char

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_width
        done = (self.caps <= generated).to(input_ids.device)
        if self.stops:
            rows = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.tail) :].tolist()
            hits = [any(s in self.decode(row) for s in self.stops) for row in rows]
            done = done | torch.tensor(hits, device=input_ids.device)
        return done


class HFEngine:
    """Hugging Face ``generate`` on the teacher's model: static batches by prompt length, KV cache, seeded draws.

    Args:
        model: the loaded causal LM (`kdcache.capture.teacher.Teacher.model`).
        tokenizer: its tokenizer (decodes text for stop strings).
        settings: the `generate` section.
        stop_ids: `stop_token_ids`.
        batching: the teacher's batching mode (`Teacher.batching`): how padded a batch may be.
        device: where the model takes its inputs.
    """

    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: GenerateConfig,
        *,
        stop_ids: Sequence[int],
        batching: str = "padded",
        device: Any = "cpu",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.stop_ids = list(stop_ids)
        self.batching = batching
        self.device = torch.device(device)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _processors(self, uniforms: torch.Tensor, width: int) -> list[Any]:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        s = self.settings
        warpers: list[Any] = []
        if s.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k > 0:
            warpers.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            warpers.append(TopPLogitsWarper(s.top_p))
        return [*warpers, SeededDraw(uniforms, width)]

    @torch.inference_mode()
    def generate(self, rows: Sequence[GenerationRow]) -> list[list[int]]:
        """Each row's generated tokens (raw: `finish_response` cuts them), in row order."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        out: list[list[int]] = [[] for _ in rows]
        greedy = self.settings.temperature == 0
        clean = GenerationConfig(eos_token_id=self.stop_ids or None, pad_token_id=self.pad_id)
        for batch in batch_rows([len(r.prompt_ids) for r in rows], self.settings.batch_size, self.batching):
            width = max(len(rows[i].prompt_ids) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends at the last column
                prompt = rows[i].prompt_ids
                ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
                mask[row, width - len(prompt) :] = 1
            caps = [rows[i].max_new_tokens for i in batch]
            config = GenerationConfig(
                max_new_tokens=max(caps),
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=self.stop_ids or None,
                pad_token_id=self.pad_id,
            )
            processors = []
            if not greedy:  # every row's stream has the same length, whatever the batch: max_new_tokens uniforms
                draws = self.settings.max_new_tokens
                generators = [torch.Generator().manual_seed(rows[i].seed) for i in batch]
                uniforms = torch.stack([torch.rand(draws, generator=g, dtype=torch.float64) for g in generators])
                processors = self._processors(uniforms, width)
            criteria = [ResponseEnd(caps, width, self.settings.stop, self.decode)]
            saved = self.model.generation_config
            self.model.generation_config = clean  # the checkpoint's sampling defaults must not shape the responses
            try:
                result = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList(processors),
                    stopping_criteria=StoppingCriteriaList(criteria),
                )
            finally:
                self.model.generation_config = saved
            for row, i in enumerate(batch):
                out[i] = result[row, width:].tolist()
        return out


class VLLMEngine:
    """vLLM on GPUs: one ``vllm.LLM`` per actor, every response a request with its own seed.

    Args:
        settings: the `generate` section (``engine_options`` go to ``vllm.LLM``).
        model, revision, tokenizer, dtype, trust_remote_code: the teacher's (as the `teacher` section names them).
        stop_ids: `stop_token_ids`. max_model_len: ``data.max_length``.

    Raises:
        ConfigError: vLLM is not installed (names ``generate.engine``).
    """

    name = "vllm"

    def __init__(
        self,
        settings: GenerateConfig,
        *,
        model: str,
        revision: str | None,
        tokenizer: str,
        dtype: str,
        trust_remote_code: bool,
        stop_ids: Sequence[int],
        max_model_len: int,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ConfigError(
                f"generate.engine: vllm is not installed here ({exc}); install it on the GPU workers with "
                "pip install 'kdcache[vllm]', or use generate.engine: hf"
            ) from None
        self.vllm = vllm
        self.settings = settings
        self.stop_ids = list(stop_ids)
        options = {"gpu_memory_utilization": VLLM_GPU_MEMORY_UTILIZATION, **settings.engine_options}
        self.llm = vllm.LLM(
            model=model,
            tokenizer=tokenizer,
            revision=revision,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            seed=settings.seed,
            max_model_len=max_model_len,
            **options,
        )

    def generate(self, rows: Sequence[GenerationRow]) -> list[list[int]]:
        """Each row's generated token ids, in row order (vLLM schedules them itself)."""
        s = self.settings
        params = [
            self.vllm.SamplingParams(
                n=1,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k if s.top_k > 0 else -1,
                max_tokens=row.max_new_tokens,
                seed=row.seed,
                stop=list(s.stop) or None,
                stop_token_ids=self.stop_ids or None,
                skip_special_tokens=False,
            )
            for row in rows
        ]
        prompts = [{"prompt_token_ids": list(row.prompt_ids)} for row in rows]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(result.outputs[0].token_ids) for result in results]


def read_generation_eos(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The ``eos_token_id`` of a checkpoint's generation config (its generation_config.json, else the one transformers
    derives from its config), as loading the model would set it: what `stop_token_ids` starts from."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(name_or_path, revision=revision)
    except OSError:  # no generation_config.json: derived from the model's config, as from_pretrained does
        model_config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        config = GenerationConfig.from_model_config(model_config)
    return config.eos_token_id


def make_engine(
    settings: GenerateConfig,
    *,
    teacher: Any,
    tokenizer: Any,
    stop_ids: Sequence[int],
    teacher_config: Any = None,
    tokenizer_name: str | None = None,
    max_model_len: int = 2048,
) -> HFEngine | VLLMEngine:
    """The engine `generate.engine` names: ``hf`` on the teacher's model, or ``vllm`` (loads the model itself from
    ``teacher_config``, the `teacher` section)."""
    if settings.engine == "vllm":
        t = teacher_config
        return VLLMEngine(
            settings,
            model=t.model,
            revision=t.revision,
            tokenizer=tokenizer_name or t.model,
            dtype=t.dtype,
            trust_remote_code=t.trust_remote_code,
            stop_ids=stop_ids,
            max_model_len=max_model_len,
        )
    return HFEngine(
        teacher.model, tokenizer, settings, stop_ids=stop_ids, batching=teacher.batching, device=teacher.device
    )


def generate_windows(
    prompts: Sequence[Prompt],
    engine: HFEngine | VLLMEngine | Any,
    settings: GenerateConfig,
    *,
    max_length: int,
    positions: str,
    stop_ids: Sequence[int],
    decode: Callable[[list[int]], str] | None = None,
) -> tuple[list[Window], dict[str, Any]]:
    """Answer every prompt ``settings.n`` times and turn each answer into a sequence.

    Args:
        prompts: the unit's prompts, each shorter than ``max_length`` tokens (checked by the caller).
        engine: anything with ``generate(rows) -> list of token lists``.
        settings: the `generate` section.
        max_length: ``data.max_length``: prompt + response never exceed it.
        positions: ``targets.positions``: ``assistant`` (targets where the next token is generated) or ``all``.
        stop_ids: `stop_token_ids`. decode: ids -> text (for stop strings).

    Returns:
        (windows in prompt then sample order, each with ``fields`` ``{"prompt_id", "sample_index"}``; stats
        ``{"generated_sequences", "generated_tokens", "generate_s"}``).
    """
    rows, origin = [], []
    for p in prompts:
        cap = min(settings.max_new_tokens, max_length - len(p.input_ids))
        if cap < 1:
            raise ValueError(f"{p.where}: prompt of {len(p.input_ids)} tokens leaves no room in {max_length}")
        pid = p.prompt_id
        for sample in range(settings.n):
            rows.append(GenerationRow(list(p.input_ids), draw_seed(settings.seed, pid, sample), cap))
            origin.append((p, sample))
    started = time.perf_counter()
    outputs = engine.generate(rows) if rows else []
    elapsed = time.perf_counter() - started
    windows, generated = [], 0
    for row, (p, sample), raw in zip(rows, origin, outputs):
        response = finish_response(
            raw, max_new_tokens=row.max_new_tokens, eos_ids=stop_ids, stops=settings.stop, decode=decode
        )
        if not response:
            raise RuntimeError(f"{p.where}: the {engine.name} engine returned no token for sample {sample}")
        generated += len(response)
        ids = np.asarray([*p.input_ids, *response], dtype=np.int32)
        mask = None
        if positions == "assistant":  # target at t iff token t + 1 is generated
            mask = np.zeros(len(ids), dtype=bool)
            mask[len(p.input_ids) - 1 : len(ids) - 1] = True
        fields = {"prompt_id": p.prompt_id, "sample_index": sample}
        windows.append(Window(response_seq_id(p.url, p.locator, sample), ids, mask, fields))
    stats = {"generated_sequences": len(windows), "generated_tokens": generated, "generate_s": elapsed}
    return windows, stats
