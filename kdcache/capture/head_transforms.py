"""How a causal LM turns its body's last hidden states into ``.logits``: found on the model, then run chunk-wise.

Two ways, both used by `kdcache.capture.teacher.Teacher` on a few positions at a time:

- ``HEAD_TRANSFORMS``: pure torch functions of (model, logits) keyed by class name, for classes whose forward is
  ``transform(lm_head(last_hidden_state))`` with a linear ``lm_head`` (read from their sources). The fast path: the
  head's product can go into one reused buffer.
- `ForwardHead`: every other class. The model's own ``forward`` runs with its body replaced by a stand-in that returns
  the chunk's hidden states, so whatever the forward does after the body (a BERT-style dense + activation + LayerNorm
  head, hidden states scaled before the head, soft-capping, scaling, dropping padded vocabulary rows) is applied
  exactly as the model applies it, whatever the class.

`find_body` finds the body by tracing one forward: the module the forward calls that consumes the token embeddings
and returns the hidden states, whatever attribute holds it (``Llama4ForCausalLM.base_model`` is the model itself).
No ``transformers`` import: everything here reads the loaded model object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HEAD_TRANSFORMS", "BodyCall", "ForwardHead", "HeadTransform", "find_body", "identity"]

HeadTransform = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def identity(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The logits unchanged (classes whose forward returns ``lm_head(hidden)`` as is)."""
    return logits


def _final_softcap(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    # Same op order as Gemma2ForCausalLM.forward, so half-precision rounding matches too.
    cap = model.config.get_text_config(decoder=True).final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _recurrent_gemma_softcap(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    cap = model.config.logits_soft_cap
    return torch.tanh(logits / cap) * cap


def _cohere_scale(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits * model.logit_scale


def _granite_divide(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits / model.config.logits_scaling


def _hyperclovax_multiply(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits * model.config.logits_scaling


def _falcon_h1_multiply(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits * model.model.lm_head_multiplier


# What each causal-LM class's forward does between `lm_head(last_hidden_state)` and returning `.logits`, read from
# the transformers 5.x sources. Keyed by class, not model_type: Gemma3ForConditionalGeneration skips the softcap
# that Gemma3ForCausalLM applies. Classes not listed are accepted only if their config names no logit transform and
# the load-time probe agrees with their forward.
HEAD_TRANSFORMS: dict[str, HeadTransform] = {
    **dict.fromkeys(
        [
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "MixtralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "Qwen3MoeForCausalLM",
            "GPT2LMHeadModel",
            "Phi3ForCausalLM",
            "GemmaForCausalLM",
            "Olmo2ForCausalLM",
            "Gemma3ForConditionalGeneration",
        ],
        identity,
    ),
    **dict.fromkeys(
        [
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Gemma4ForCausalLM",
            "Gemma4ForConditionalGeneration",
            "VaultGemmaForCausalLM",
            "NanoChatForCausalLM",
        ],
        _final_softcap,
    ),
    "RecurrentGemmaForCausalLM": _recurrent_gemma_softcap,
    **dict.fromkeys(["CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM"], _cohere_scale),
    **dict.fromkeys(
        [
            "GraniteForCausalLM",
            "GraniteMoeForCausalLM",
            "GraniteMoeSharedForCausalLM",
            "GraniteMoeHybridForCausalLM",
            "GraniteSWAForCausalLM",
            "GraniteMoeSWAForCausalLM",
        ],
        _granite_divide,
    ),
    "HyperCLOVAXForCausalLM": _hyperclovax_multiply,
    "FalconH1ForCausalLM": _falcon_h1_multiply,
}


@dataclass
class BodyCall:
    """Where a causal LM's body is and how its output carries the hidden states.

    Attributes:
        module: The body: the module the top-level forward calls with the tokens, whose output holds the last hidden
            states ``[B, L, H]`` that the rest of the forward turns into logits.
        name: Its dotted path in the model ("" never: the body is a submodule), for messages.
        field: Where its output holds the hidden states: a key of a ``ModelOutput``, an index of a tuple, or None
            when the output is the tensor itself.
        output_type: The class of its output, to build a stand-in of the same kind.
        output_len: Length of a tuple output (the stand-in has as many entries), else 0.
        calls: How often one forward calls it (a body called more than once cannot be replaced by a stand-in).
        after: Dotted names of the modules the top-level forward calls after the body (the head), for messages.
    """

    module: torch.nn.Module
    name: str
    field: str | int | None
    output_type: type
    output_len: int
    calls: int
    after: list[str]

    def hidden(self, output: Any) -> torch.Tensor:
        """The hidden states ``[B, L, H]`` held by an output of the body."""
        return output if self.field is None else output[self.field]

    def stand_in(self, hidden: torch.Tensor) -> Any:
        """An output of the body's kind that holds ``hidden`` and nothing else."""
        if self.field is None:
            return hidden
        if isinstance(self.field, int):
            return self.output_type(hidden if i == self.field else None for i in range(self.output_len))
        return self.output_type(**{self.field: hidden})


def _hidden_field(output: Any, batch: int, length: int) -> tuple[str | int | None, int] | None:
    """Where ``output`` holds a floating ``[batch, length, H]`` tensor (preferring ``last_hidden_state``)."""

    def fits(value: Any) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.dim() == 3
            and tuple(value.shape[:2]) == (batch, length)
        )

    if fits(output):
        return None, 0
    if isinstance(output, dict):  # ModelOutput is an OrderedDict of its non-None fields
        keys = sorted(output, key=lambda key: key != "last_hidden_state")
        return next(((key, 0) for key in keys if fits(output[key])), None)
    if isinstance(output, tuple):
        return next(((i, len(output)) for i, value in enumerate(output) if fits(value)), None)
    return None


def find_body(model: torch.nn.Module, input_ids: torch.Tensor, call_forward: Callable[[], Any]) -> BodyCall | None:
    """Trace one forward of ``model`` and return its body, or None when no module fits.

    The body is the first module the top-level forward calls directly (not from inside another submodule) that
    contains the input embedding (so it consumes the tokens) and returns floating hidden states shaped like
    ``input_ids`` plus a width; an embedding called on its own does not count. ``call_forward`` runs the forward on
    ``input_ids``.
    """
    names = {module: name for name, module in model.named_modules() if name}
    embedding = model.get_input_embeddings()
    calls: list[list[Any]] = []  # [module, output] of each call made directly by the top-level forward
    depth = 0

    def enter(module: torch.nn.Module, args: Any) -> None:
        nonlocal depth
        if depth == 0:
            calls.append([module, None])
        depth += 1

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        nonlocal depth
        depth -= 1
        if depth == 0:
            calls[-1][1] = output

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        call_forward()
    finally:
        for handle in handles:
            handle.remove()
    batch, length = input_ids.shape
    for index, (module, output) in enumerate(calls):
        if module is embedding or not any(m is embedding for m in module.modules()):
            continue
        found = _hidden_field(output, batch, length)
        if found is None:
            continue
        field, output_len = found
        return BodyCall(
            module=module,
            name=names[module],
            field=field,
            output_type=type(output),
            output_len=output_len,
            calls=sum(1 for m, _ in calls if m is module),
            after=[names[m] for m, _ in calls[index + 1 :]],
        )
    return None


class ForwardHead:
    """The model's own forward from its body's output on, applied to hidden states ``[n, H]`` (any class).

    Each call runs ``model.forward`` on ``n`` placeholder tokens with the body's ``forward`` swapped for one that
    returns the given hidden states, so the forward's own head modules and final-logit transforms compute the logits.
    Whatever the forward does before the body call (it only prepares the body's inputs) runs on the placeholders and
    is discarded. Exact for any head that maps each position's hidden state to that position's logits; the teacher's
    load-time probe checks it against the untouched forward.
    """

    def __init__(self, model: torch.nn.Module, body: BodyCall, ids_device: torch.device) -> None:
        self.model = model
        self.body = body
        self.ids_device = ids_device

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, V]`` (the forward's dtype) of hidden states ``[n, H]``."""
        stand_in = self.body.stand_in(hidden.unsqueeze(0))
        module = self.body.module
        saved = module.__dict__.get("forward")  # accelerate's hooks replace forward on the instance
        module.forward = lambda *args, **kwargs: stand_in
        try:
            ids = torch.zeros((1, hidden.shape[0]), dtype=torch.long, device=self.ids_device)
            output = self.model(input_ids=ids, use_cache=False)
        finally:
            if saved is None:
                del module.forward
            else:
                module.forward = saved
        logits = output.logits if hasattr(output, "logits") else output[0]
        return logits[0]
