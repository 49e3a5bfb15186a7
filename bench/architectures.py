"""Every causal LM of the installed transformers as a kdcache teacher, checked against the model's own forward.

For each model type in ``transformers``' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny randomly initialised
model (2 layers, hidden 32, MoE with 4 experts, a padded vocabulary, every final-logit knob of its config switched
on: soft-capping, logit scaling, muP multipliers; sliding windows and sparse-attention selections shorter than the
sequences), saves it with ``save_pretrained``, loads it as a ``kdcache.capture.teacher.Teacher`` and runs
``compute_targets`` on a right-padded batch of rows of different lengths. The reference is
``log_softmax(model(ids).logits / T)`` of each sequence alone, from the same saved weights loaded in float64 (with
``--dtype bfloat16`` / ``float16``: loaded in that dtype, so the reference is what the model itself computes there).

Per type it prints PASS (every field within the dtype's tolerance, the top-k ids those of the reference up to
near-ties), FAIL (a silent difference), REFUSED (kdcache's ConfigError, with its reason) or SKIP (transformers itself
cannot build the tiny model or run it text-only, with its error), then a summary.

The knowledge of how to build each family tiny lives here (`tiny_config`); tests/test_architectures.py imports it.

Run::

    python bench/architectures.py                      # all types, float32 teacher vs float64 reference
    python bench/architectures.py --dtype bfloat16     # half-precision teachers at that dtype's tolerance
    python bench/architectures.py --types llama4 cpmant --verbose
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB_SIZE = 136  # rows of the embedding and the head: "padded" above the ids the batches use
USED_VOCAB = 120  # batches draw ids from [4, USED_VOCAB)
HEAD_LOGIT_STD = 4.0  # nats; the head is re-drawn so distributions are peaked, not near uniform
ROW_LENGTHS = (24, 14, 9, 19, 4, 12)  # a right-padded batch of rows of different lengths
TEMPERATURES = (1.0, 2.0)
K = 8

# Generic sizes, applied to every key of a config (and of its nested sub-configs) that exists there.
TINY: dict[str, Any] = {
    **dict.fromkeys(
        [
            "hidden_size",
            "d_model",
            "n_embd",
            "dim",
            "embed_dim",
            "emb_dim",
            "word_embed_proj_dim",
            "hidden_size_global",
        ],
        32,
    ),
    "vocab_size_per_layer_input": VOCAB_SIZE,
    "hidden_size_per_layer_input": 8,
    **dict.fromkeys(["pronunciation_vocab_size", "shape_vocab_size"], 16),
    **dict.fromkeys(["pronunciation_embed_dim", "shape_embed_dim"], 8),
    "dff": 64,
    "o_lora_rank": 16,
    "o_groups": 2,
    **dict.fromkeys(["num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers"], 2),
    **dict.fromkeys(
        [
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "decoder_attention_heads",
            "encoder_attention_heads",
        ],
        4,
    ),
    **dict.fromkeys(["num_key_value_heads", "num_kv_heads", "multi_query_group_num"], 2),
    "head_dim": 8,
    **dict.fromkeys(
        ["intermediate_size", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_dim", "dim_ff", "n_inner", "d_inner"], 64
    ),
    **dict.fromkeys(["max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "max_target_positions"], 64),
    # MoE
    **dict.fromkeys(
        [
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "shared_intermediate_size",
            "expert_ffn_hidden_size",
            "moe_shared_expert_intermediate_size",
            "shared_experts_intermediate_size",
            "dense_intermediate_size",
        ],
        32,
    ),
    **dict.fromkeys(["num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"], 2),
    **dict.fromkeys(["n_shared_experts", "num_shared_experts", "moe_num_shared_experts"], 1),
    **dict.fromkeys(["n_group", "num_expert_group"], 1),
    "topk_group": 1,
    "first_k_dense_replace": 1,
    # multi-head latent attention and the DeepSeek sparse-attention indexer
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 8,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 4,  # tokens: shorter than the rows, so the indexer selects
    # windows shorter than the rows
    **dict.fromkeys(["sliding_window", "sliding_window_size", "attention_window_size", "window_size"], 4),
    # state-space and linear-attention layers
    **dict.fromkeys(["mamba_d_state", "state_size", "ssm_state_size"], 8),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads"], 4),
    **dict.fromkeys(["mamba_d_head", "mamba_head_dim"], 16),
    "mamba_n_groups": 1,
    **dict.fromkeys(["mamba_chunk_size", "chunk_size"], 8),
    **dict.fromkeys(["linear_num_key_heads", "linear_num_heads"], 2),
    "linear_num_value_heads": 4,
    **dict.fromkeys(["linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"], 8),
    "time_step_rank": 4,
    "rotary_dim": 4,
    "mamba_d_ssm": 64,
    "n_groups": 1,
    "router_hidden_size": 16,
    **dict.fromkeys(["adapter_in_dim", "adapter_out_dim", "adapter_input_size"], 32),
    "ffn_hidden_size": 64,
    "zero_expert_num": 2,
    "lru_width": 32,
    # vision / audio towers of multimodal configs: as small as they go
    "image_size": 16,
    "patch_size": 8,
    "num_channels": 3,
}

# Final-logit and scaling knobs: switched on (non-identity) wherever a config has them.
KNOBS: dict[str, Any] = {
    "final_logit_softcapping": 5.0,
    "logits_soft_cap": 5.0,
    "attn_logit_softcapping": 20.0,
    "logit_scale": 0.5,
    "logits_scaling": 2.0,
    "lm_head_multiplier": 0.5,
    "logits_mup_width_multiplier": 2.0,
    "embedding_multiplier": 2.0,
    "residual_multiplier": 0.5,
    "attention_multiplier": 0.25,
    "mup_enabled": True,
    "lm_head_bias": True,
    "unpadded_vocab_size": USED_VOCAB,  # the forward drops the head's padding rows
    "is_decoder": True,  # BERT-style models: causal self-attention, as BertLMHeadModel needs
}

_MOE_SWITCHES = ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "n_group", "topk_group")
_SIZES_ALSO_WHEN_NONE = ("head_dim", "num_key_value_heads")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
_TOKEN_ID_KEYS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}


def _layer_count(values: dict[str, Any]) -> int | None:
    for key in _LAYER_COUNT_KEYS:
        if isinstance(values.get(key), int):
            return values[key]
    return None


def _short_list(values: list, n: int) -> list:
    """``n`` entries of a per-layer list that keep every distinct kind of layer it has, in order of appearance."""
    kinds = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in values))
    picked = [json.loads(kinds[i % len(kinds)]) for i in range(max(n, len(kinds)))]
    return picked


def _overrides(defaults: dict[str, Any], knobs: bool) -> dict[str, Any]:
    """Tiny sizes (and knobs) for the keys of one config's ``to_dict()``, recursing into nested sub-configs."""
    out: dict[str, Any] = {}
    for key, value in defaults.items():
        if isinstance(value, dict) and key.endswith("config") and value:
            out[key] = _overrides(value, knobs)
        elif key in TINY and isinstance(value, int) and not isinstance(value, bool):
            out[key] = TINY[key]
        elif key in _SIZES_ALSO_WHEN_NONE and value is None:
            out[key] = TINY[key]
        elif key in _MOE_SWITCHES and value is None:  # None: a dense model; a tiny MoE exercises more
            out[key] = TINY[key]
        elif knobs and key in KNOBS:
            out[key] = KNOBS[key]
        elif key == "vocab_size" and isinstance(value, int):
            out[key] = VOCAB_SIZE
        elif key in _TOKEN_ID_KEYS and isinstance(value, int):
            out[key] = _TOKEN_ID_KEYS[key]
    if "qk_rope_head_dim" in out:  # multi-head latent attention: rotary width, one kv head per query head
        if "head_dim" in defaults:
            out["head_dim"] = out["qk_rope_head_dim"]
        if "num_key_value_heads" in out:
            out["num_key_value_heads"] = out["num_attention_heads"]
    old, new = _layer_count(defaults), _layer_count(out)
    if old is not None and new is not None:
        for key, value in defaults.items():
            kinds = isinstance(value, list) and all(isinstance(v, str) for v in value)  # not lists of indices
            if kinds and len(value) == old and old != new and key not in out:
                out[key] = _short_list(value, new)
                for count_key in _LAYER_COUNT_KEYS:
                    if count_key in out:
                        out[count_key] = max(out[count_key], len(out[key]))
    return out


def tiny_config(model_type: str, *, knobs: bool = True) -> Any:
    """A tiny config of ``model_type``: generic sizes from `TINY`, knobs from `KNOBS`, then the family's `QUIRKS`."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    try:
        defaults = config_class()
    except Exception:  # a default its own validator rejects: start from the family's quirks
        defaults = config_class(**QUIRKS[model_type])
    overrides = _overrides(defaults.to_dict(), knobs)
    for key, value in QUIRKS.get(model_type, {}).items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    return config_class(**overrides)


# What a family needs beyond the generic sizes to build tiny (validators, layer patterns that must keep each kind of
# layer in 2-3 layers, switches that make it a decoder).
QUIRKS: dict[str, dict[str, Any]] = {
    "dots3_note_text": {"head_dim": 16},
    "dots3_note": {"text_config": {"head_dim": 16}},
    "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    **{
        model_type: {"text_config": quirk} if model_type == "qwen4_exp" else quirk
        for model_type, quirk in dict.fromkeys(
            ["qwen4_exp_text", "qwen4_exp"],
            {
                "indexer_n_heads": 2,
                "indexer_kv_heads": 1,
                "indexer_head_dim": 8,
                "indexer_budget": 4,
                "indexer_compress_ratio": 2,
                "hc_count": 2,
                "hc_lowrank": 8,
                "ple_embed_dim": 32,
            },
        ).items()
    },
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "recurrent_gemma": {"num_hidden_layers": 3},
    "reformer": {
        "attn_layers": ["local", "lsh"],
        "axial_pos_shape": [8, 8],
        "axial_pos_embds_dim": [16, 16],
        "attention_head_size": 8,
        "feed_forward_size": 64,
        "local_attn_chunk_length": 8,
        "lsh_attn_chunk_length": 8,
        "num_buckets": 4,
        "hash_seed": 0,
    },
    "mamba2": {"head_dim": 16},
    "falcon_h1": {"mamba_d_head": 16},
    "zaya": {"num_experts_per_tok": 1},
    "zamba": {
        "num_hidden_layers": 5,  # layers 2 and 4 share one transformer block
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "layers_block_type": None,
        "attention_hidden_size": 64,
        "attention_head_dim": 16,
        "mamba_dt_rank": 4,
    },
    # its validator's rules, which its own default config breaks
    "gemma4_assistant": {
        "text_config": {
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": 0,
            "enable_moe_block": False,
            "use_double_wide_mlp": False,
            "num_kv_shared_layers": 0,  # then: all layers
        }
    },
    "deepseek_v4": {"compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 4}},
    "blt": {"encoder_hash_byte_group_vocab": 64},
    "xmod": {"default_language": "en_XX"},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "dory": {
        "num_hidden_layers": 6,
        "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
        "n_input_layers": 2,
        "n_recurrent_layers": 2,
        "n_output_layers": 2,
    },
    "gemma3n_text": {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "num_kv_shared_layers": 2,
        "intermediate_size": [64] * 4,
        "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0],
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": VOCAB_SIZE,
        "laurel_rank": 4,
    },
    # qk and v widths are rounded up to multiples of 64
    "xlstm": {"hidden_size": 64, "embedding_dim": 64, "qk_dim_factor": 1.0},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
}


# ------------------------------------------------------------------------------------------------------ the check

# Allowed max difference (nats) between kdcache's targets and the reference, per teacher dtype. float32 against a
# float64 forward: 1e-4, or twice what the model's own float32 forward of each sequence alone is off by, where its
# rounding alone is larger (a few models carry intermediates of ~1e3). Half precision against the model's own forward
# in that dtype: a padded batch or the chunked head runs matmuls of other shapes, which may round a logit one step of
# the dtype differently (0.0625 for bfloat16 logits in [8, 16)) and carry that through the layers.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}


@dataclass
class Result:
    """One model type's outcome: status PASS / FAIL / REFUSED / SKIP, and why."""

    model_type: str
    status: str
    detail: str = ""
    model_class: str = ""
    batching: str = ""  # how kdcache's teacher batches this model (Teacher.batching)
    head: str = ""  # how it computes the logits from hidden states (Teacher.head_kind)
    max_error: float | None = None  # nats, over every target field
    allowed: float | None = None  # nats: the tolerance this type was held to
    seconds: float = 0.0


def build_tiny(model_type: str, out_dir: Path, *, seed: int = 0, knobs: bool = True) -> Path:
    """Build the tiny model of ``model_type`` in float32 and save it with ``save_pretrained`` into ``out_dir``.

    The output head is re-drawn so logits have a std of about ``HEAD_LOGIT_STD`` (the default init gives nearly
    uniform distributions, which test little), and a head bias, when there is one, is drawn too.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, knobs=knobs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    head = model.get_output_embeddings()
    generator = torch.Generator().manual_seed(seed + 1)
    if head is not None and getattr(head, "weight", None) is not None:
        with torch.no_grad():
            weight = head.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * HEAD_LOGIT_STD / weight.shape[-1] ** 0.5)
            if getattr(head, "bias", None) is not None:
                head.bias.copy_(torch.randn(head.bias.shape, generator=generator))
    model.save_pretrained(out_dir)
    if model.config.model_type != config.model_type:
        # The class keeps only the text config (Emu3, Mllama), whose model type AutoModelForCausalLM does not map:
        # save the config of the type itself, as a hub checkpoint of that type has it.
        config.architectures = [type(model).__name__]
        config.save_pretrained(out_dir)
    return Path(out_dir)


def padded_batch(lengths: Sequence[int] = ROW_LENGTHS, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch ``(input_ids, attention_mask)`` of rows of the given lengths, ids in [4, USED_VOCAB)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(4, USED_VOCAB, (len(lengths), width), generator=generator)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # padding id 0


def reference_logits(
    model_dir: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: str
) -> torch.Tensor:
    """``model(ids).logits`` of each sequence alone (no padding), valid positions row-major, as float64 ``[N, V]``.

    The model is loaded in float64 for a float32 teacher, else in the teacher's dtype ("float32_own": in float32).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float64, "float32_own": torch.float32}.get(dtype) or getattr(torch, dtype)
    # float64: eager experts, as the grouped-matmul MoE kernels have no float64 version; otherwise the default
    # kernels, which the teacher runs too (in half precision eager and grouped experts round differently, and a
    # router can then pick other experts)
    extra = {"experts_implementation": "eager"} if torch_dtype == torch.float64 else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **extra).eval()
    rows = []
    with torch.inference_mode():
        for ids, mask in zip(input_ids, attention_mask):
            length = int(mask.sum())
            rows.append(model(input_ids=ids[None, :length], use_cache=False).logits[0].double())
    return torch.cat(rows)


def reference_for(model_dir: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: str) -> tuple:
    """(reference logits, allowed error in nats, note) for a teacher of ``dtype``; see `TOLERANCE`.

    float32: the float64 forward, allowing twice the own float32 forward's error where that is larger than 1e-4;
    a model whose code cannot run in float64 (XGLM, XLNet) is held to its own float32 forward instead.
    """
    from kdcache.capture.targets import select_topk

    if dtype != "float32":
        return reference_logits(model_dir, input_ids, attention_mask, dtype), TOLERANCE[dtype], ""
    own = reference_logits(model_dir, input_ids, attention_mask, "float32_own")
    try:
        reference = reference_logits(model_dir, input_ids, attention_mask, "float32")
    except Exception as exc:
        return own, TOLERANCE[dtype], f"float32 reference ({_one_line(exc, 80)} in float64)"
    own_errors = target_errors(select_topk(own.float(), K, TEMPERATURES), reference, TEMPERATURES)
    return reference, max(TOLERANCE[dtype], 2 * max(own_errors.values())), ""


def target_errors(targets: Any, logits: torch.Tensor, temperatures: Sequence[float]) -> dict[str, float]:
    """Max |difference| (nats) of each field of kdcache's TokenTargets from a dense float64 computation on
    ``logits``; "ids" is how far the kept set is from a top-k set (0 when it is one; near-ties may swap)."""
    z = logits.double()
    ids = targets.ids.long().cpu()
    logp = torch.log_softmax(z, dim=-1)
    in_head = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
    worst_kept = logp.masked_fill(~in_head, math.inf).min(dim=-1).values
    best_dropped = logp.masked_fill(in_head, -math.inf).max(dim=-1).values
    errors = {
        "ids": float((best_dropped - worst_kept).clamp(min=0).max()),
        "logprobs": float((targets.logprobs.double().cpu() - logp.gather(1, ids)).abs().max()),
    }
    entropy = -(logp.exp() * logp).sum(dim=-1)
    errors["entropy"] = float((targets.entropy.double().cpu() - entropy).abs().max())
    normalizers, tails = [], []
    for j, t in enumerate(temperatures):
        normalizers.append((targets.log_normalizers[:, j].double().cpu() - torch.logsumexp(z / t, dim=-1)).abs())
        tail = torch.softmax(z / t, dim=-1).masked_fill(in_head, 0.0).sum(dim=-1)
        ours = targets.tail_logprobs[:, j].double().cpu().exp()
        # compared as log-probabilities where the tail holds mass, as probabilities where it holds next to none
        tails.append(torch.where(tail > 1e-6, (ours.log() - tail.log()).abs(), (ours - tail).abs()))
    errors["log_normalizers"] = float(torch.stack(normalizers).max())
    errors["tail_logprobs"] = float(torch.stack(tails).max())
    return errors


def check_type(model_type: str, root: Path, *, dtype: str = "float32", verbose: bool = False) -> Result:
    """Build ``model_type`` tiny under ``root``, run kdcache's teacher on a padded batch, compare with the forward."""
    from kdcache.capture.teacher import Teacher
    from kdcache.errors import ConfigError

    start = time.perf_counter()
    result = Result(model_type, "SKIP")
    input_ids, attention_mask = padded_batch()
    try:
        model_dir = root / model_type
        if not (model_dir / "config.json").exists():  # built once per root: other dtypes' checks reuse it
            build_tiny(model_type, model_dir)
        reference, allowed, note = reference_for(model_dir, input_ids, attention_mask, dtype)
        result.allowed = allowed
        result.model_class = json.loads((model_dir / "config.json").read_text()).get("architectures", [""])[0]
    except Exception as exc:  # transformers itself cannot build or run it text-only
        result.detail = _one_line(exc)
        if verbose:
            traceback.print_exc()
        result.seconds = time.perf_counter() - start
        return result
    try:
        # 5 positions per head chunk: every batch takes several chunks
        teacher = Teacher(str(model_dir), dtype=dtype, device="cpu", chunk_bytes=5 * reference.shape[1] * 4)
        result.batching = getattr(teacher, "batching", "")
        result.head = getattr(teacher, "head_kind", "")
        targets = teacher.compute_targets(input_ids, attention_mask, k=K, temperatures=TEMPERATURES)
    except ConfigError as exc:
        result.status, result.detail = "REFUSED", _one_line(exc)
    except Exception as exc:
        result.status, result.detail = "FAIL", f"kdcache raised {_one_line(exc)}"
        if verbose:
            traceback.print_exc()
    else:
        if teacher.padded_vocab_size != reference.shape[1]:
            result.status = "FAIL"
            result.detail = f"{teacher.padded_vocab_size} logits per position, the forward gives {reference.shape[1]}"
        else:
            errors = target_errors(targets, reference, TEMPERATURES)
            result.max_error = max(errors.values())
            worst = max(errors, key=errors.get)
            result.status = "PASS" if result.max_error <= allowed else "FAIL"
            result.detail = f"max error {result.max_error:.2g} ({worst}), allowed {allowed:.2g}"
            if teacher.batching != "padded" or teacher.head_kind == "whole":
                result.detail += f"; {teacher.batching_reason}"
            if note:
                result.detail += f"; {note}"
    result.seconds = time.perf_counter() - start
    return result


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def causal_lm_types() -> list[str]:
    """Every model type of the installed transformers' causal-LM auto mapping, in its order."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def markdown_table(results: Sequence[Result]) -> str:
    lines = [
        "| model type | class | result | batching | head | detail |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        detail = r.detail.replace("|", "\\\\|")
        lines.append(f"| `{r.model_type}` | {r.model_class} | {r.status} | {r.batching} | {r.head} | {detail} |")
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> dict[str, int]:
    counts = {status: 0 for status in ("PASS", "FAIL", "REFUSED", "SKIP")}
    for r in results:
        counts[r.status] += 1
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", help="model types to check (default: every causal-LM type)")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE), help="the teacher's dtype")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    types = args.types or causal_lm_types()
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, {len(types)} model types, "
        f"teacher dtype {args.dtype}, tolerance {TOLERANCE[args.dtype]} nats",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="kdcache-arch-") as tmp:
        for model_type in types:
            result = check_type(model_type, Path(tmp), dtype=args.dtype, verbose=args.verbose)
            results.append(result)
            print(
                f"{result.status:8s} {model_type:28s} {result.batching:13s} {result.head:8s} "
                f"{result.seconds:5.1f}s  {result.detail}",
                flush=True,
            )
    print()
    print(markdown_table(results))
    counts = summary(results)
    print()
    print(", ".join(f"{n} {status}" for status, n in counts.items()) + f" of {len(results)} model types")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
