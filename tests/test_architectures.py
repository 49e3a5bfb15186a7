"""kdcache's teacher on a representative subset of transformers' causal LMs, against each sequence's own forward.

The CI subset of bench/architectures.py (which checks every model type of the installed transformers): tiny models
built by its `tiny_config` / `build_tiny` (every final-logit knob on, padded vocabularies, MoE), one per mechanism
that once made kdcache refuse a model or store wrong targets: Llama 4's body (``base_model`` is the model itself),
heads that are more than a Linear (BERT-style, MiniCPM3's scaled hidden states), final-logit transforms kdcache has
no table entry for (Gemma 3n, xLSTM, Beam, Cohere Compass, Gemma 4 Unified, Inkling), a knob that is off (AFMoE),
models whose logits change with padding (CPM-Ant ignores the attention mask; DeepSeek V3.2 / GLM-DSA sparse
attention breaks top-k ties differently at another padded length), a head that cannot run on hidden states alone
(ProphetNet), plus the plain families. Then one `kdcache cache` job per model of four (Llama 4, Gemma 3n, DeepSeek
V3.2, BERT) ends in targets equal to a float64 oracle within the u8 codec's error bound.

Run: ``python -m pytest tests/test_architectures.py -q``
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_JOB_SETTINGS, stdlib_texts, write_text_corpus
from tiny_models import build_tiny_tokenizer

from kdcache.capture.teacher import Teacher


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "architectures.py"
    spec = importlib.util.spec_from_file_location("bench_architectures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


arch = _load_bench()

# model type -> (head kind, batching) the teacher must choose for it, with PASS against each sequence alone
SUBSET = {
    # known linear heads (HEAD_TRANSFORMS): plain, tied, soft-capped, scaled, multiplied with a Mamba mixer
    "llama": ("linear", "padded"),
    "qwen2": ("linear", "padded"),
    "gpt2": ("linear", "padded"),
    "gemma2": ("linear", "padded"),
    "granite": ("linear", "padded"),
    "falcon_h1": ("linear", "padded"),
    "gemma3": ("linear", "padded"),  # a multimodal wrapper, text only
    # Llama 4: base_model is the model itself; the traced body is `model`
    "llama4_text": ("forward", "padded"),
    "llama4": ("forward", "padded"),
    # final-logit transforms without a table entry, run by the model's own forward
    "gemma3n_text": ("forward", "padded"),
    "xlstm": ("forward", "padded"),
    "beam": ("forward", "padded"),
    "cohere_compass_text": ("forward", "padded"),
    "gemma4_unified_text": ("forward", "padded"),
    "inkling_text": ("forward", "padded"),  # hidden states divided by a muP multiplier, vocabulary sliced
    "inkling2_text": ("forward", "padded"),  # the forward drops the head's padding rows: 120 of 136 logits
    "afmoe": ("forward", "padded"),  # mup_enabled: a knob, on here
    # heads that are more than a Linear
    "bert": ("forward", "padded"),
    "roberta": ("forward", "padded"),
    "minicpm3": ("forward", "padded"),
    "zaya": ("forward", "padded"),  # lm_head with a bias
    # padding-sensitive: never run padded
    "cpmant": ("forward", "equal_length"),
    "deepseek_v32": ("forward", "equal_length"),
    "glm_moe_dsa": ("forward", "equal_length"),
    # the head reads more of the body's output than the hidden states: the whole forward, one row at a time
    "prophetnet": ("whole", "one_row"),
    # MoE, hybrids and decoders of encoder-decoder families
    "mixtral": ("linear", "padded"),
    "deepseek_v3": ("forward", "padded"),
    "jamba": ("forward", "padded"),
    "qwen3_next": ("forward", "padded"),
    "bart": ("forward", "padded"),
    "emu3": ("forward", "padded"),  # the class keeps only its text config
}

HALF_PRECISION = [
    ("llama4_text", "bfloat16"),
    ("bert", "bfloat16"),
    ("cpmant", "float16"),
    ("gemma3n_text", "float16"),
]
JOB_MODELS = ("llama4_text", "gemma3n_text", "deepseek_v32", "bert")


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of tiny models for the module: each type is built once, whatever dtype or test uses it."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return tmp_path_factory.mktemp("architectures")


def built(model_root: Path, model_type: str) -> Path:
    model_dir = model_root / model_type
    if not (model_dir / "config.json").exists():
        arch.build_tiny(model_type, model_dir)
    return model_dir


@pytest.mark.parametrize("model_type", list(SUBSET))
def test_teacher_equals_each_sequence_alone(model_root: Path, model_type: str) -> None:
    result = arch.check_type(model_type, model_root)
    assert result.status == "PASS", result.detail
    assert result.max_error <= result.allowed
    assert (result.head, result.batching) == SUBSET[model_type], result.detail


@pytest.mark.parametrize("model_type, dtype", HALF_PRECISION)
def test_half_precision_teacher_equals_its_own_forward(model_root: Path, model_type: str, dtype: str) -> None:
    result = arch.check_type(model_type, model_root, dtype=dtype)
    assert result.status == "PASS", result.detail
    assert result.max_error <= arch.TOLERANCE[dtype]


def test_padding_sensitive_model_runs_one_forward_per_length(model_root: Path) -> None:
    model_dir = built(model_root, "cpmant")
    teacher = Teacher(str(model_dir), dtype="float32", device="cpu")
    assert teacher.batching == "equal_length" and "padded batch vs rows alone" in teacher.batching_reason
    lengths = (9, 5, 9, 3, 5)
    input_ids, attention_mask = arch.padded_batch(lengths, seed=3)
    forwards = []  # (rows, width, masked) of each body pass
    body_pass = teacher._hidden_states

    def counted(input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        forwards.append((*input_ids.shape, mask is not None))
        return body_pass(input_ids, mask)

    teacher._hidden_states = counted
    targets = teacher.compute_targets(input_ids, attention_mask, k=arch.K, temperatures=arch.TEMPERATURES)
    assert sorted(forwards) == [(1, 3, False), (2, 5, False), (2, 9, False)]  # one pass per length, no padding
    reference = arch.reference_logits(model_dir, input_ids, attention_mask, "float32")
    errors = arch.target_errors(targets, reference, arch.TEMPERATURES)
    assert max(errors.values()) < 1e-3, errors  # CPM-Ant's own float32 rounding is ~2e-4
    # The same batch run padded (what kdcache did before the probe) is silently wrong by many logits.
    with torch.inference_mode():
        padded = torch.cat(teacher.map_logit_chunks(input_ids, attention_mask, lambda z: z, batching="padded"))
    assert (padded.double() - reference).abs().max() > 1.0


def test_whole_forward_fallback_keeps_chunks_small(model_root: Path) -> None:
    model_dir = built(model_root, "prophetnet")
    teacher = Teacher(str(model_dir), dtype="float32", device="cpu", chunk_bytes=3 * arch.VOCAB_SIZE * 4)
    assert (teacher.head_kind, teacher.batching) == ("whole", "one_row")
    assert "prophetnet.decoder" in teacher.batching_reason
    input_ids, attention_mask = arch.padded_batch((7, 4), seed=1)
    with torch.inference_mode():
        chunks = teacher.map_logit_chunks(input_ids, attention_mask, lambda z: z.clone())
    assert [len(c) for c in chunks] == [3, 3, 1, 3, 1]  # per row, at most 3 positions per chunk
    reference = arch.reference_logits(model_dir, input_ids, attention_mask, "float32")
    torch.testing.assert_close(torch.cat(chunks).double(), reference, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- the CLI job, u8 codec


@pytest.fixture(scope="module")
def job_caches(ray_session, model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`kdcache cache` once per model of JOB_MODELS on one small corpus: 32-token windows, short last windows."""
    from kdcache.cli import main

    root = tmp_path_factory.mktemp("jobs")
    corpus = write_text_corpus(root / "data", [stdlib_texts(4, max_chars=260)])
    config = root / "job.yaml"
    config.write_text("targets:\n  logprob_codec: u8\n  temperatures: [1.0, 2.0]\n")
    caches = {}
    for model_type in JOB_MODELS:
        model_dir = built(model_root, model_type)
        build_tiny_tokenizer(model_dir, vocab_size=arch.USED_VOCAB)  # 120 tokens, 136 head rows: a padded vocabulary
        out = root / f"cache-{model_type}"
        settings = [s for s in TINY_JOB_SETTINGS if not s.startswith("cluster.num_actors")]
        overrides = [f"teacher.model={model_dir}", f"data.source={corpus}/*.jsonl", f"output.uri={out}"]
        overrides += [*settings, "cluster.num_actors=1", "data.max_length=32", "teacher.dtype=float32"]
        assert main(["cache", str(config), *overrides]) == 0
        caches[model_type] = out
    return caches


@pytest.mark.parametrize("model_type", JOB_MODELS)
def test_cli_job_targets_equal_the_oracle(job_caches: dict[str, Path], model_root: Path, model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    from kdcache.codec import CodecParams, error_bound
    from kdcache.read.reader import open_cache

    cache = open_cache(str(job_caches[model_type]))
    sequences = list(cache.iter_sequences())
    assert len({len(s["input_ids"]) for s in sequences}) > 1  # full and short windows: padded batches
    codec = CodecParams.for_logprobs("u8")
    path = model_root / model_type  # eager experts: the grouped-matmul MoE kernels have no float64 version
    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    for s in sequences:
        with torch.inference_mode():
            ids = torch.tensor(s["input_ids"], dtype=torch.long)[None]
            logits = oracle(input_ids=ids, use_cache=False).logits[0]
        logp = torch.log_softmax(logits, dim=-1).numpy()
        kept = np.take_along_axis(logp, s["target_ids"].astype(np.int64), axis=1)
        dropped = logp.copy()
        np.put_along_axis(dropped, s["target_ids"].astype(np.int64), -np.inf, axis=1)
        assert (kept.min(axis=1) >= dropped.max(axis=1) - 1e-5).all()  # a top-k set of the oracle
        want = np.maximum(kept, codec.logprob_min)
        assert (np.abs(s["target_logprobs"] - want) <= error_bound(want, codec) + 1e-4).all()
        np.testing.assert_allclose(s["tail_logprob"], np.log1p(-np.exp(kept).sum(axis=1)), atol=1e-3, rtol=1e-3)
        lz2 = torch.logsumexp(logits / 2.0, dim=-1).numpy()
        np.testing.assert_allclose(s["log_normalizers"][:, 1], lz2, rtol=1e-5, atol=1e-4)
        entropy = -(np.exp(logp) * logp).sum(axis=1)
        np.testing.assert_allclose(s["entropy"], entropy, atol=1e-3, rtol=1e-3)  # float16
