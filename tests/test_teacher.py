"""Tests for kdcache.capture.teacher on tiny real models saved to disk and loaded back through ``from_pretrained``.

For every architecture the chunked head must reproduce ``log_softmax(model(ids).logits)`` computed independently
here, row by row without padding, including Gemma 2 soft-capping and Granite / Cohere logit scaling.

Run: ``python -m pytest tests/test_teacher.py -q``
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, GEMMA2_FINAL_LOGIT_SOFTCAP, SCALED_ARCHS, build_tiny_model, build_tiny_tokenizer
from transformers import AutoModelForCausalLM

import kdcache.capture.head_transforms as head_transforms
import kdcache.capture.teacher as teacher_module
from kdcache.capture.targets import TokenTargets, select_topk
from kdcache.capture.teacher import Teacher, load_tokenizer, read_model_info, resolve_dtype
from kdcache.errors import ConfigError
from kdcache.identity import tokenizer_fingerprint

TEMPS = (1.0, 2.0)
K = 16
ATOL = 2e-5  # fp32: padded batch vs unpadded rows and chunked vs full matmuls differ by a few ulps
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os",
    "class Point:\n    x: int = 0\n    y: int = 0\n    def norm(self):",
    "for i in range(10): print(i)",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for arch in ARCHS + SCALED_ARCHS:
        dirs[arch] = build_tiny_tokenizer(build_tiny_model(arch, root / arch))
    return dirs


@pytest.fixture(scope="module")
def batch(model_dirs: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = load_tokenizer(str(model_dirs["llama"]))
    tokenizer.padding_side = "right"
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == len(TEXTS), "rows must have different lengths"
    return enc["input_ids"], enc["attention_mask"]


def independent_logits(model_dir: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype=torch.float32):
    """Logits ``[N, V]`` of the valid positions from the model's own forward, one unpadded row at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    rows = []
    with torch.no_grad():
        for ids, mask in zip(input_ids, attention_mask):
            length = int(mask.sum())
            rows.append(model(input_ids=ids[None, :length]).logits[0])
    return torch.cat(rows), model


def assert_targets_match_logits(targets: TokenTargets, logits: torch.Tensor, atol: float = ATOL) -> None:
    """Compare every field of ``targets`` with a dense float64 computation from full logits ``[N, V]``."""
    z = logits.double()
    logp = torch.log_softmax(z, dim=-1)
    ref_ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, : targets.ids.shape[1]]
    assert torch.equal(targets.ids, ref_ids.sort(dim=-1).values)
    torch.testing.assert_close(targets.logprobs.double(), logp.gather(1, targets.ids), atol=atol, rtol=0)
    in_head = torch.zeros_like(z, dtype=torch.bool).scatter_(1, targets.ids, True)
    for j, t in enumerate(TEMPS):
        torch.testing.assert_close(
            targets.log_normalizers[:, j].double(), torch.logsumexp(z / t, dim=-1), atol=atol, rtol=0
        )
        tail = torch.log(torch.softmax(z / t, dim=-1).masked_fill(in_head, 0.0).sum(dim=-1))
        torch.testing.assert_close(targets.tail_logprobs[:, j].double(), tail, atol=atol, rtol=0)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    torch.testing.assert_close(targets.entropy.double(), entropy, atol=atol, rtol=0)


@pytest.mark.parametrize("arch", ARCHS + SCALED_ARCHS)
def test_compute_targets_matches_model_forward(model_dirs: dict[str, Path], batch, arch: str) -> None:
    input_ids, attention_mask = batch
    # 3 positions per chunk: the ~40 valid positions take many chunks.
    teacher = Teacher(str(model_dirs[arch]), dtype="float32", device="cpu", chunk_bytes=3 * 256 * 4)
    assert teacher.padded_vocab_size == 256 and teacher.dtype == torch.float32
    targets = teacher.compute_targets(input_ids, attention_mask, k=K, temperatures=TEMPS)
    n_valid = int(attention_mask.sum())
    assert targets.ids.shape == (n_valid, K) and targets.tail_logprobs.shape == (n_valid, len(TEMPS))

    logits, _ = independent_logits(model_dirs[arch], input_ids, attention_mask)
    assert_targets_match_logits(targets, logits)

    full = teacher.full_log_softmax(input_ids, attention_mask)
    assert full.shape == (n_valid, 256)
    assert torch.equal(targets.ids, full.topk(K, dim=-1).indices.sort(dim=-1).values)
    torch.testing.assert_close(targets.logprobs, full.gather(1, targets.ids), atol=ATOL, rtol=0)

    one_chunk = Teacher(str(model_dirs[arch]), dtype="float32", device="cpu")
    whole = one_chunk.compute_targets(input_ids, attention_mask, k=K, temperatures=TEMPS)
    assert torch.equal(whole.ids, targets.ids)
    torch.testing.assert_close(whole.tail_logprobs, targets.tail_logprobs, atol=ATOL, rtol=0)


def test_gemma2_softcapping_is_applied(model_dirs: dict[str, Path], batch) -> None:
    input_ids, attention_mask = batch
    teacher = Teacher(str(model_dirs["gemma2"]), dtype="float32", device="cpu", chunk_bytes=5 * 256 * 4)
    targets = teacher.compute_targets(input_ids, attention_mask, k=K, temperatures=TEMPS)
    cap = GEMMA2_FINAL_LOGIT_SOFTCAP
    assert teacher.model.config.final_logit_softcapping == cap

    # Logits recovered from the targets lie inside (-cap, cap) ...
    recovered = targets.logprobs + targets.log_normalizers[:, :1]
    assert recovered.abs().max().item() < cap
    # ... while the raw head output goes well past the cap, so capping changes the distribution.
    _, model = independent_logits(model_dirs["gemma2"], input_ids, attention_mask)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        uncapped = model.lm_head(hidden[attention_mask.bool()])
    assert uncapped.abs().max().item() > 2 * cap
    torch.testing.assert_close(recovered, torch.tanh(uncapped / cap).gather(1, targets.ids) * cap, atol=1e-4, rtol=0)
    uncapped_logp = torch.log_softmax(uncapped, dim=-1).gather(1, targets.ids)
    assert (uncapped_logp - targets.logprobs).abs().max().item() > 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_bf16_teacher_matches_bf16_forward(model_dirs: dict[str, Path], batch, arch: str, device: str) -> None:
    input_ids, attention_mask = batch
    teacher = Teacher(str(model_dirs[arch]), dtype="bfloat16", device=device, chunk_bytes=4 * 256 * 4)
    assert teacher.dtype == torch.bfloat16 and next(teacher.model.parameters()).dtype == torch.bfloat16
    targets = teacher.compute_targets(input_ids, attention_mask, k=K, temperatures=TEMPS)
    assert targets.logprobs.dtype == torch.float32 and targets.ids.device.type == device
    full = teacher.full_log_softmax(input_ids, attention_mask)
    # nats; bf16 logits of magnitude <= 16 carry up to 0.06 rounding. On CUDA the chunked [n, H] x [H, V] product
    # and the forward's [B, L, H] one may run different GEMM kernels, so a logit can land one bf16 step (<= 0.0625
    # below 16) away.
    tol = 0.05 if device == "cpu" else 0.0625 + 0.01
    torch.testing.assert_close(targets.logprobs, full.gather(1, targets.ids), atol=tol, rtol=0)
    # The kept ids are a top-k of the bf16 forward up to rounding (near-ties may swap).
    in_head = torch.zeros_like(full, dtype=torch.bool).scatter_(1, targets.ids, True)
    worst_kept = full.masked_fill(~in_head, float("inf")).min(dim=-1).values
    best_dropped = full.masked_fill(in_head, float("-inf")).max(dim=-1).values
    assert (worst_kept >= best_dropped - tol).all()
    # bf16 logits are full of exact ties; among them the lowest ids are kept, as in a stable sort of the forward.
    stable = torch.sort(full, dim=-1, descending=True, stable=True).indices[:, :K].sort(dim=-1).values
    same_rows = (targets.ids == stable).all(dim=-1).float().mean().item()
    assert same_rows > (0.9 if device == "cpu" else 0.75), same_rows  # CUDA: a one-step flip can reorder a tie
    # Every field on this device equals select_topk of the same bf16 chunk logits on CPU: the device's topk and
    # reductions do not change which ids are kept, and values agree to float32 rounding.
    with torch.inference_mode():  # the same chunks (same GEMM shapes) as compute_targets, in bf16, moved to CPU
        chunks = teacher.map_logit_chunks(input_ids, attention_mask, lambda z: z.cpu(), as_float32=False)
    assert chunks[0].dtype == torch.bfloat16
    on_cpu = select_topk(torch.cat(chunks), K, TEMPS)
    assert torch.equal(targets.ids.cpu(), on_cpu.ids)
    for name in ("logprobs", "log_normalizers", "tail_logprobs", "entropy"):
        torch.testing.assert_close(getattr(targets, name).cpu(), getattr(on_cpu, name), atol=1e-5, rtol=0)


def test_empty_and_bad_batches(model_dirs: dict[str, Path], batch) -> None:
    teacher = Teacher(str(model_dirs["llama"]), device="cpu")
    assert teacher.device == torch.device("cpu") and teacher.dtype == torch.float32  # "auto" on cpu
    input_ids, attention_mask = batch
    empty = teacher.compute_targets(input_ids, torch.zeros_like(attention_mask), k=4, temperatures=[1.0])
    assert empty.ids.shape == (0, 4) and empty.log_normalizers.shape == (0, 1)
    left_padded = attention_mask.flip(dims=[1])
    with pytest.raises(ValueError, match="right-padded"):
        teacher.compute_targets(input_ids, left_padded, k=4, temperatures=[1.0])
    with pytest.raises(ValueError, match="\\[B, L\\]"):
        teacher.compute_targets(input_ids[0], attention_mask[0], k=4, temperatures=[1.0])
    with pytest.raises(ValueError, match="start with 1.0"):
        teacher.compute_targets(input_ids, attention_mask, k=4, temperatures=[2.0])
    with pytest.raises(ConfigError, match="chunk_bytes"):
        Teacher(str(model_dirs["llama"]), device="cpu", chunk_bytes=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "cohere"])
def test_reused_head_buffer_gives_bitwise_the_same_logits(model_dirs: dict[str, Path], batch, arch: str) -> None:
    # compute_targets writes every chunk's head product into one buffer (mm/addmm with out=, as nn.Linear calls them).
    input_ids, attention_mask = batch
    teacher = Teacher(str(model_dirs[arch]), dtype="float32", device="cpu", chunk_bytes=3 * 256 * 4)
    assert teacher._plain_head
    storages: list[int] = []

    def keep(z: torch.Tensor) -> torch.Tensor:
        storages.append(z.untyped_storage().data_ptr())
        return z.clone()

    with torch.inference_mode():
        fresh = teacher.map_logit_chunks(input_ids, attention_mask, lambda z: z.clone())
        reused = teacher.map_logit_chunks(input_ids, attention_mask, keep, reuse_buffer=True)
    assert len(fresh) == len(reused) > 1 and all(torch.equal(a, b) for a, b in zip(fresh, reused))
    if arch in ("llama", "gpt2"):  # no final-logit transform: the chunks are views of the one buffer
        assert len(set(storages)) == 1


def test_chunk_bytes_default_depends_on_the_device(model_dirs: dict[str, Path]) -> None:
    assert Teacher(str(model_dirs["llama"]), device="cpu").chunk_bytes == 64 * 2**20
    assert Teacher(str(model_dirs["llama"]), device="cpu", chunk_bytes=4096).chunk_bytes == 4096
    assert teacher_module.default_chunk_bytes("cpu") == 64 * 2**20
    assert teacher_module.default_chunk_bytes("cuda:1") == teacher_module.default_chunk_bytes("cuda") == 2**30


@pytest.mark.parametrize("arch, strategy", [("llama", "auto"), ("gemma2", "balanced")])
def test_device_map_replica_gives_the_same_targets(model_dirs: dict[str, Path], batch, arch: str, strategy) -> None:
    # a replica loaded through accelerate's device map: on CPU every device is the CPU, on a machine with several GPUs
    # (bench/gpu_check.sh runs this) "balanced" spreads the layers over them: inputs go to the embedding's device,
    # hidden states to the head's device
    input_ids, attention_mask = batch
    plain = Teacher(str(model_dirs[arch]), dtype="float32", device="cpu", chunk_bytes=3 * 256 * 4)
    mapped = Teacher(str(model_dirs[arch]), dtype="float32", device_map=strategy, chunk_bytes=3 * 256 * 4)
    assert mapped.device_map and mapped.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    a = plain.compute_targets(input_ids, attention_mask, k=K, temperatures=TEMPS)
    b = mapped.compute_targets(input_ids, attention_mask, k=K, temperatures=TEMPS)
    torch.testing.assert_close(a.ids, b.ids.cpu(), atol=0, rtol=0)
    torch.testing.assert_close(a.logprobs, b.logprobs.cpu(), atol=ATOL, rtol=0)
    torch.testing.assert_close(a.tail_logprobs, b.tail_logprobs.cpu(), atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match="device or device_map"):
        Teacher(str(model_dirs[arch]), device="cpu", device_map="auto")


def test_unlisted_class_runs_its_own_forward_from_the_body_on(model_dirs: dict[str, Path], batch, monkeypatch) -> None:
    # Gemma 2 soft-caps its logits. Unlisted, its class gets no known transform: the teacher runs the model's own
    # forward from the body on (the cap included) on a few positions at a time, instead of refusing the class.
    monkeypatch.delitem(head_transforms.HEAD_TRANSFORMS, "Gemma2ForCausalLM")
    input_ids, attention_mask = batch
    teacher = Teacher(str(model_dirs["gemma2"]), dtype="float32", device="cpu", chunk_bytes=3 * 256 * 4)
    assert teacher.head_kind == "forward" and not teacher._plain_head and teacher.batching == "padded"
    targets = teacher.compute_targets(input_ids, attention_mask, k=K, temperatures=TEMPS)
    logits, _ = independent_logits(model_dirs["gemma2"], input_ids, attention_mask)
    assert logits.abs().max() < GEMMA2_FINAL_LOGIT_SOFTCAP  # capped, as the forward caps them
    assert_targets_match_logits(targets, logits)


def test_wrong_transform_fails_the_probe(model_dirs: dict[str, Path], monkeypatch) -> None:
    monkeypatch.setitem(head_transforms.HEAD_TRANSFORMS, "LlamaForCausalLM", lambda model, logits: logits * 2)
    with pytest.raises(ConfigError, match="differs from the model's forward"):
        Teacher(str(model_dirs["llama"]), device="cpu")


def test_resolve_dtype() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu, config_dtype=torch.bfloat16) == torch.float32
    assert resolve_dtype("auto", cuda, config_dtype=torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", cuda, config_dtype="float16") == torch.float16
    assert resolve_dtype("auto", cuda) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cuda) == torch.float16
    assert resolve_dtype("float32", cuda, config_dtype=torch.bfloat16) == torch.float32
    for bad in ("fp16", "bf16", "float64", ""):
        with pytest.raises(ValueError, match="teacher.dtype"):
            resolve_dtype(bad, cpu)


def test_read_model_info(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    padded = build_tiny_model("qwen2", tmp_path / "padded", vocab_size=320)
    info = read_model_info(str(padded))
    assert info["padded_vocab_size"] == 320 and info["model_type"] == "qwen2"
    assert info["architectures"] == ["Qwen2ForCausalLM"] and info["config_dtype"] == "float32"
    assert json.loads(json.dumps(info)) == info, "must be JSON-serialisable for the manifest"
    assert Teacher(str(padded), device="cpu").padded_vocab_size == 320

    gemma = read_model_info(str(model_dirs["gemma2"]))
    assert gemma["final_logit_softcapping"] == GEMMA2_FINAL_LOGIT_SOFTCAP
    assert read_model_info(str(model_dirs["granite"]))["logits_scaling"] == 2.0
    assert read_model_info(str(model_dirs["cohere"]))["logit_scale"] == 0.5

    fingerprint = info["weights_fingerprint"]
    assert len(fingerprint) == 64 and read_model_info(str(padded))["weights_fingerprint"] == fingerprint
    assert read_model_info(str(model_dirs["qwen2"]))["weights_fingerprint"] != fingerprint


def test_tokenizer_fingerprint(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(model_dirs["llama"]))
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert fingerprint["vocab_size"] == 256 == len(tokenizer)
    assert (fingerprint["bos_token_id"], fingerprint["eos_token_id"]) == (1, 2)
    assert len(fingerprint["hash"]) == 64
    # Stable across loads and across calls that set truncation/padding state on the backend.
    tokenizer(TEXTS, padding="max_length", truncation=True, max_length=8)
    assert tokenizer_fingerprint(tokenizer) == fingerprint
    assert tokenizer_fingerprint(load_tokenizer(str(model_dirs["gpt2"]))) == fingerprint
    other = tokenizer_fingerprint(load_tokenizer(str(build_tiny_tokenizer(tmp_path / "tok", vocab_size=200))))
    assert other["hash"] != fingerprint["hash"] and other["vocab_size"] == 200
