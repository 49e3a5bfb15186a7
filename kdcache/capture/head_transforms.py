"""What each causal-LM class's forward applies to ``lm_head(last_hidden_state)`` before returning ``.logits``.

Pure torch functions of (model, logits) keyed by class name; `kdcache.capture.teacher.Teacher` applies the one of its
model's class to every head chunk, and refuses a class it does not know whose config names a logit transform.
No ``transformers`` import: the functions read only attributes of the loaded model and its config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["HEAD_TRANSFORMS", "HeadTransform", "identity"]

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
