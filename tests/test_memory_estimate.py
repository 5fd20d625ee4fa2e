"""The analytic memory estimate of LoRA training on a LLaMA-family LM (``benchmarks.memory_estimate``): parameter counts
exact against real models, terms that scale as documented, and activations that match the tensors autograd
really saves in a forward pass of a tiny LLaMA captioner."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

from benchmarks.memory_estimate import (
    CARD_BUDGETS,
    VIT_B32_CLIP_PARAMETERS,
    base_weight_bytes,
    estimate_lora_memory,
    largest_fitting_batch,
    layer_activation_bytes,
    llama2_7b_config,
    llama_parameter_count,
    lora_parameter_count,
    mlp_mapper_parameter_count,
)
from clipcap.captioner import CaptionTokens, ClipCaptioner
from clipcap.lm import PrefixLM
from clipcap.lora import LoraSettings
from clipcap.mapper import MLPMapper
from clipcap.objectives.cross_entropy import token_cross_entropy
from clipcap.objectives.rewards import caption_log_probs
from tiny_models import save_tiny_llama

LLAMA2_7B_PARAMETERS = 6_738_415_616
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX, CLIP_DIM = 3, 16
ACTIVATION_TOLERANCE = 0.002
"""Relative: the estimate leaves out only scalars (the loss's total weight, a reduction's divisor)."""


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def llama64_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA: width 64, 4 heads, 2 key-value heads (grouped-query), MLP 128, 2 layers."""
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), hidden=64)


def tiny_captioner(folder: Path, dtype: str = "float32", **lora_options) -> ClipCaptioner:
    torch.manual_seed(0)
    gradient_checkpointing = lora_options.pop("gradient_checkpointing", False)
    lm = PrefixLM(
        str(folder),
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        lora=LoraSettings(**{"rank": 4, **lora_options}),
    )
    return ClipCaptioner(lm, functools.partial(MLPMapper, prefix_length=PREFIX), clip_dim=CLIP_DIM)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_key_value_heads": 2},
        {"attention_bias": True, "mlp_bias": True},
        {"tie_word_embeddings": True},
        {"head_dim": 8},
    ],
)
def test_the_llama_parameter_count_is_exact(options: dict) -> None:
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        **options,
    )
    assert llama_parameter_count(config) == numel(LlamaForCausalLM(config))


def test_llama2_7b_has_its_known_parameter_count_and_fp16_weights() -> None:
    config = llama2_7b_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert llama_parameter_count(config) == numel(model) == LLAMA2_7B_PARAMETERS
    estimate = estimate_lora_memory(config, batch=8, dtype_bytes=2)
    assert estimate.base_weights == LLAMA2_7B_PARAMETERS * 2
    assert estimate.base_parameters == LLAMA2_7B_PARAMETERS


@pytest.mark.parametrize("targets", [None, ["k_proj", "o_proj"], ALL_LINEARS])
def test_adapter_and_mapper_counts_match_a_tiny_lora_captioner(llama64_folder: Path, targets) -> None:
    captioner = tiny_captioner(llama64_folder, target_modules=targets)
    config = captioner.lm.base_model.config
    adapters = sum(p.numel() for name, p in captioner.lm.named_parameters() if "lora_" in name)
    assert lora_parameter_count(config, rank=4, targets=targets) == adapters
    assert mlp_mapper_parameter_count(CLIP_DIM, 64, PREFIX) == numel(captioner.mapper)
    trainable = sum(p.numel() for p in captioner.parameters() if p.requires_grad)
    estimate = estimate_lora_memory(
        config, batch=2, prefix_length=PREFIX, lora_rank=4, lora_targets=targets, clip_dim=CLIP_DIM
    )
    assert estimate.adapter_parameters + estimate.mapper_parameters == trainable
    assert estimate.base_parameters == numel(captioner.lm.base_model) - adapters


def test_a_narrower_mapper_is_counted_exactly() -> None:
    mapper = MLPMapper(512, 4096, prefix_length=10, hidden_dim=2048)
    assert mlp_mapper_parameter_count(512, 4096, 10, hidden_dim=2048) == numel(mapper) == 84_977_664
    # ClipCap's own hidden width P·D/2 at LLaMA's width: the mapper is 849 M parameters.
    assert mlp_mapper_parameter_count(512, 4096, 10) == 849_408_000


def test_the_receiver_constant_is_clip_vit_b32() -> None:
    with torch.device("meta"):
        assert numel(CLIPModel(CLIPConfig())) == VIT_B32_CLIP_PARAMETERS


def test_terms_scale_as_documented() -> None:
    config = llama2_7b_config()
    estimate = functools.partial(estimate_lora_memory, config)
    one, two = estimate(batch=8), estimate(batch=16)
    assert two.activations == pytest.approx(2 * one.activations, rel=1e-4)
    assert two.working_set == 2 * one.working_set
    assert (two.base_weights, two.adam_states, two.gradients) == (
        one.base_weights,
        one.adam_states,
        one.gradients,
    )
    assert one.adam_states == 2 * (one.adapter_weights + one.mapper_weights)  # m and v, float32
    assert one.gradients == one.optimizer_temporary == one.trainable_weights
    assert estimate(batch=8, adam_foreach=False).optimizer_temporary == 0

    checkpointed = estimate(batch=8, gradient_checkpointing=True)
    assert checkpointed.activations < one.activations / 10
    assert checkpointed.recompute == layer_activation_bytes(
        config, 8, 1 + 10 + 20 - 1, 2, 8
    )  # <s>, prefix, caption but its last token
    assert one.recompute == 0 and one.activations > 32 * checkpointed.recompute
    assert estimate(batch=8, dtype_bytes=4).base_weights == 2 * one.base_weights

    eight_bit = estimate(batch=8, quantization="8bit").base_weights
    four_bit = estimate(batch=8, quantization="4bit").base_weights
    # The layers' linear weights halve exactly (plus a float32 scale per row); the 2 × 131 M embedding
    # and LM-head weights stay in 16 bits.
    assert 0.5 < eight_bit / one.base_weights < 0.53
    assert 0.25 < four_bit / one.base_weights < 0.3
    linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rows = 32 * (4 * 4096 + 2 * 11008 + 4096)
    assert one.base_weights - eight_bit == linears * 2 - linears - 4 * rows
    assert estimate(batch=8, quantization="8bit").activations > one.activations  # int8 matmuls keep inputs
    assert estimate(batch=8, quantization="4bit").activations == one.activations

    discritune = estimate(batch=8, objective="discritune")
    assert one.kv_cache == 0 and discritune.kv_cache == 2 * 32 * 8 * (1 + 10 + 20 - 1) * 4096 * 2
    assert estimate(batch=16, objective="discritune").kv_cache == 2 * discritune.kv_cache
    assert discritune.receiver_weights == 4 * VIT_B32_CLIP_PARAMETERS
    assert discritune.peak_allocated > one.peak_allocated


def test_the_peak_is_static_memory_plus_the_largest_phase() -> None:
    estimate = estimate_lora_memory(llama2_7b_config(), batch=8)
    assert estimate.peak_allocated == estimate.static + max(estimate.phases.values())
    assert estimate.total == estimate.peak_allocated + estimate.overhead
    # ClipCap's 849 M-parameter mapper: its gradients and AdamW's temporary outweigh the activations.
    assert estimate.peak_phase == "optimizer step"
    assert estimate.peak_allocated > CARD_BUDGETS["16 GB"]
    narrow = estimate_lora_memory(llama2_7b_config(), batch=8, mapper_hidden_dim=2048)
    assert narrow.peak_phase == "backward"


@pytest.mark.parametrize("threshold", [0, 1, 5, 8, 9, 100, 1000, 5000])
def test_largest_fitting_batch_finds_the_threshold(threshold: int) -> None:
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= threshold

    assert largest_fitting_batch(fits, start=8, limit=4096) == min(threshold, 4096)
    assert len(tried) <= 2 * 13 + 1  # doubling then bisection, not a scan
    assert len(tried) == len(set(tried))


def test_largest_fitting_batch_by_the_estimate_is_tight() -> None:
    config = llama2_7b_config()

    def fits(batch: int) -> bool:
        estimate = estimate_lora_memory(config, batch, mapper_hidden_dim=2048, gradient_checkpointing=True)
        return estimate.peak_allocated <= CARD_BUDGETS["16 GB"]

    largest = largest_fitting_batch(fits)
    assert largest >= 8 and fits(largest) and not fits(largest + 1)


def saved_tensor_bytes(captioner: ClipCaptioner, objective: str, batch: int, caption_tokens: int) -> int:
    """Bytes of the distinct storages autograd saves in one teacher-forced forward with the loss, the
    model's own parameters and buffers left out (they are held anyway)."""
    held = {t.untyped_storage().data_ptr() for t in [*captioner.parameters(), *captioner.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in held:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    vocab = captioner.lm.base_model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, caption_tokens), generator=generator)
    # Captions of one length, as the estimate assumes: no padding, so SDPA runs causal without a mask.
    tokens = CaptionTokens(ids, torch.ones_like(ids), ids.clone())
    features = torch.randn(batch, CLIP_DIM, generator=generator)
    captioner.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = captioner(features, tokens)
        if objective == "ce":
            loss = token_cross_entropy(outputs.logits, outputs.labels)[0]
        else:
            lengths = torch.full((batch,), caption_tokens - 1)
            loss = caption_log_probs(outputs.logits, tokens.input_ids, lengths).mean()
    loss.backward()  # the graph is whole: what was saved is what backward needed
    return sum(saved.values())


@pytest.mark.parametrize(
    "dtype, dropout, checkpointing, objective",
    [
        ("bfloat16", 0.0, False, "ce"),
        ("float16", 0.0, False, "discritune"),
        ("float32", 0.0, False, "ce"),
        ("bfloat16", 0.05, False, "ce"),
        ("float32", 0.05, False, "ce"),
        ("bfloat16", 0.05, True, "ce"),
        ("bfloat16", 0.0, True, "discritune"),
    ],
)
def test_activations_match_the_tensors_autograd_saves(
    llama64_folder: Path, dtype: str, dropout: float, checkpointing: bool, objective: str
) -> None:
    targets = ["q_proj", "v_proj", "down_proj"]
    captioner = tiny_captioner(
        llama64_folder, dtype, dropout=dropout, target_modules=targets, gradient_checkpointing=checkpointing
    )
    config = captioner.lm.base_model.config
    batch, caption_tokens = 4, 6
    measured = saved_tensor_bytes(captioner, objective, batch, caption_tokens)
    estimate = estimate_lora_memory(
        config,
        batch,
        prefix_length=PREFIX,
        caption_tokens=caption_tokens,
        rollout_tokens=caption_tokens,
        dtype_bytes=torch.tensor([], dtype=getattr(torch, dtype)).element_size(),
        lora_rank=4,
        lora_targets=targets,
        lora_dropout=dropout,
        gradient_checkpointing=checkpointing,
        objective=objective,
        clip_dim=CLIP_DIM,
    )
    expected = estimate.activations
    if dropout > 0 and not checkpointing:
        # CPU dropout is not fused: its mask is a float32 tensor (4 bytes), not CUDA's bool (1 byte).
        tokens = batch * (1 + PREFIX + caption_tokens - 1)  # <s>, the prefix, the caption but its last token
        adapter_inputs = 64 + 64 + config.intermediate_size  # q_proj, v_proj, down_proj
        expected += config.num_hidden_layers * 3 * tokens * adapter_inputs
    assert measured == pytest.approx(expected, rel=ACTIVATION_TOLERANCE)


def test_bad_settings_are_refused() -> None:
    config = llama2_7b_config()
    with pytest.raises(ValueError, match="objective"):
        estimate_lora_memory(config, 8, objective="gumbel")
    with pytest.raises(ValueError, match="quantization"):
        base_weight_bytes(config, 2, "3bit")
    with pytest.raises(ValueError, match="LoRA targets"):
        lora_parameter_count(config, 8, ["c_attn"])
