"""How much GPU memory a LLaMA-family prefix LM with LoRA needs to train: an analytic estimate.

:func:`estimate_lora_memory` adds up, in bytes, what one training step of ``ClipCaptioner`` (an
``MLPMapper`` in front of a frozen LLaMA-shaped base with LoRA adapters, AdamW on the adapters and the
mapper) holds on the GPU, term by term, for the cross-entropy objective or DiscriTune. Parameter counts
are exact for the given config; activation terms count the tensors autograd saves for backward, which
``tests/test_memory_estimate.py`` checks against a real forward pass. ``benchmarks/bench_llama_lora.py``
prints the estimate beside what it measures on a GPU, and the estimate alone where there is none.

Legend: B batch, P prefix length, T_c target caption tokens (EOS included; for DiscriTune the R rollout
tokens), T = P + T_c − 1 positions in the teacher-forced pass (one more with a BOS such as LLaMA's <s>; the
caption's last token predicts nothing and is not fed), N = B·T, D hidden size, L layers, H attention
heads, H_kv key-value heads, d head size, I MLP width, V vocabulary, r LoRA rank, b bytes per element of
the base's dtype (2 for float16/bfloat16, 4 for float32), h the mapper's hidden width (P·D/2, ClipCap's).

Worked example, LLaMA-2-7B (D 4096, L 32, H = H_kv 32, d 128, I 11008, V 32000), float16, batch 8, P 10,
T_c 20 (so T 30 with LLaMA's <s>, N 240), LoRA r 8 on q_proj and v_proj with dropout 0.05, ClipCap's MLP mapper from
512-d CLIP features (h 20480); GiB = 2^30 bytes:

- base weights: 6,738,415,616 parameters × b = 13,476,831,232 B = 12.55 GiB. Parameters: embeddings
  V·D and an untied LM head V·D (131,072,000 each), per layer q/k/v/o 4·D² = 67,108,864, MLP 3·D·I =
  135,266,304 and two RMSNorm weights 2·D; one final norm D. 8-bit (LLM.int8, bitsandbytes): the layers'
  linear weights take 1 byte each plus one float32 scale per output row; embeddings, LM head and norms stay
  in b bytes (bitsandbytes converts ``nn.Linear`` layers only, and transformers keeps the LM head out):
  7,006,265,344 B = 6.53 GiB. 4-bit NF4 with double quantization (what ``PrefixLM`` asks for): half a byte
  per linear weight, one int8 absolute maximum per 64 weights, one float32 per 256 of those: 3.60 GiB.
- adapter weights: r·(d_in + d_out) per adapted linear, in float32 (``apply_lora`` keeps adapters float32
  whatever the base dtype): 32 layers × 2 × 8 × (4096 + 4096) = 4,194,304 parameters, 16 MiB.
- mapper weights (float32): D_clip·h + h + h·P·D + P·D = 849,408,000 parameters, 3.16 GiB. ClipCap's hidden
  width P·D/2 is 20,480 at LLaMA's width, so the mapper's second layer alone is 20,480 × 40,960: the mapper
  is 200 times the adapters and, with its gradient and Adam states, the largest trainable cost by far.
  ``mapper_hidden_dim`` sets a narrower one (2048: 84,977,664 parameters, 0.32 GiB).
- gradients: float32, as the trainable weights: 3.18 GiB (the adapters' share 16 MiB).
- Adam states: m and v in float32, 8 bytes per trainable parameter: 6.36 GiB. No float32 master copy:
  the trainable weights already are float32.
- optimizer-step temporary: ``torch.optim.AdamW``'s default foreach implementation on CUDA allocates one
  float32 copy of all trainable weights (``sqrt(v)``) during the step: 3.18 GiB; ``fused=True`` does
  without (``adam_foreach=False``).
- activations kept for backward, per layer (the base's weights are frozen, so its linear layers save
  nothing for a weight gradient; these are the tensors autograd saves):

  - two RMSNorms, each its input cast to float32 and its float32 reciprocal RMS: 2·(4·N·D + 4·N);
  - attention: rotated q and k, v, and SDPA's output at b bytes, and SDPA's float32 log-sum-exp:
    b·N·(2·H·d + 2·H_kv·d) + 4·B·H·T (SDPA is causal without a mask: captions of one length);
  - MLP: SiLU's input (the gate projection), its output and the up projection, all (B, T, I):
    3·b·N·I;
  - each adapter: its input cast to float32 (or, with dropout, the dropout output) 4·N·d_in, the dropout
    mask 1·N·d_in (a bool on CUDA; a float on CPU, where dropout is not fused), and A's output
    4·N·r: for q_proj and v_proj 2·(5·N·D + 4·N·r);
  - 8-bit base only: bitsandbytes' int8 matmul keeps its input for backward even when the weight is
    frozen: b·N·(D + H·d + D + I) (the inputs of q/k/v, o, gate/up and down; bitsandbytes ≥ 0.45 no
    longer keeps a transposed int8 copy when the weight needs no gradient). The 4-bit matmul keeps none.

  7B: 7,866,240 + 7,895,040 + 15,851,520 + 9,845,760 = 41,458,560 B (39.5 MiB) per layer, 1.24 GiB for
  32. Once per model: the final RMSNorm 4·N·D + 4·N (3.75 MiB), rotary cos and sin 2·T·d·b, the loss's
  float32 log-softmax 4·B·T_c·V (19.5 MiB), int64 targets 8·B·T_c and the T_c int64 positions the LM head
  keeps logits for 8·T_c, and the mapper's input and tanh output 4·B·(D_clip + h).
  With gradient checkpointing (non-reentrant, per decoder layer) each layer keeps only its input,
  L·b·N·D = 60 MiB, and backward recomputes one layer at a time: one layer's activations (39.5 MiB) are
  counted once more as ``recompute``.
- working set: transient memory beyond the saved tensors at the worst moment of forward and backward:
  the loss's two float32 (B, T_c, V) buffers (the fp32 logits in forward; the incoming and outgoing
  gradients of the log-softmax in backward) 8·B·T_c·V, and a layer's MLP gradients in backward, about
  4·b·N·I; for a quantized base also one linear weight dequantized to b bytes, b·D·I.
- KV cache (DiscriTune's rollout: greedy ``generate`` of R tokens under ``no_grad``): keys and values of
  every layer for the P + R − 1 positions fed to the model, 2·L·B·(P + R − 1)·H_kv·d·b: 7B, R 20:
  116 MiB.
- receiver CLIP (DiscriTune): the frozen CLIP that scores the rollout's captions, float32; ViT-B/32 has
  151,277,313 parameters, 0.56 GiB. Its text forward runs under ``no_grad`` and is small.
- overhead: a stated constant, 0.75 GiB: the CUDA context and kernels, cuBLAS workspaces and the caching
  allocator's rounding and fragmentation. None of it shows in ``torch.cuda.max_memory_allocated``.

The peak is not the sum of all terms: the activations are freed by the end of backward, before the
optimizer step, and the rollout's KV cache before the teacher-forced pass. ``peak_allocated`` (what
``torch.cuda.max_memory_allocated`` reports) is the static memory (base, trainable weights, Adam states,
receiver) plus the largest of three phases:

- rollout: the KV cache (DiscriTune only);
- backward: activations + recompute + working set + the adapters' gradients (they appear during
  backward; the mapper's only at its very end, after the LM's activations are gone);
- optimizer step: all gradients + the optimizer-step temporary.

``total`` adds the overhead. For the 7B example with cross-entropy: static 12.55 + 3.18 + 0.02 + 6.36 =
22.1 GiB, the optimizer phase 6.36 GiB beats backward (1.3 GiB), so the peak is 28.5 GiB: ClipCap's
mapper, not the LM, is what keeps the step off a 16 GB card.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from clipcap.lora import DEFAULT_TARGET_MODULES

MiB = 2**20
GiB = 2**30

CUDA_OVERHEAD_BYTES = 768 * MiB
"""Memory outside PyTorch's tensors: CUDA context and kernels, cuBLAS workspaces, allocator slack. An
assumption (not measured here); with it a 16 GB V100 (15.78 GiB usable) holds about 15 GiB of tensors."""

CARD_BUDGETS: dict[str, int] = {"16 GB": 15 * GiB, "32 GB": 31 * GiB}
"""Peak allocated tensor memory (``torch.cuda.max_memory_allocated``) that fits each card: 15 GiB on a
16 GB V100 (the target for cross-entropy LoRA training), 31 GiB on a 32 GB one (DiscriTune's), each
leaving about :data:`CUDA_OVERHEAD_BYTES` of the card's usable memory."""

VIT_B32_CLIP_PARAMETERS = 151_277_313
"""Parameters of a ``CLIPModel`` of the ViT-B/32 shape (``CLIPConfig()``), DiscriTune's usual receiver."""

QUANTIZATIONS = ("8bit", "4bit")
OBJECTIVES = ("ce", "discritune")
_NF4_BLOCK = 64  # weights per 4-bit block (one absmax each)
_NF4_SECOND_BLOCK = 256  # absmax values per float32 scale under double quantization


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a LLaMA-family decoder that memory depends on, read from its config."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention_bias: bool
    mlp_bias: bool
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Any) -> LlamaShape:
        """Reads a ``LlamaConfig`` (or any config with the same attribute names)."""
        heads = int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=int(config.intermediate_size),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def linear_sizes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer, by module name."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        width, mlp = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (width, q_width),
            "k_proj": (width, kv_width),
            "v_proj": (width, kv_width),
            "o_proj": (q_width, width),
            "gate_proj": (width, mlp),
            "up_proj": (width, mlp),
            "down_proj": (mlp, width),
        }

    def linear_weights_per_layer(self) -> int:
        return sum(fan_in * fan_out for fan_in, fan_out in self.linear_sizes().values())

    def biases_per_layer(self) -> int:
        sizes = self.linear_sizes()
        attention = sum(sizes[n][1] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        mlp = sum(sizes[n][1] for n in ("gate_proj", "up_proj", "down_proj"))
        return (attention if self.attention_bias else 0) + (mlp if self.mlp_bias else 0)

    def embedding_parameters(self) -> int:
        """Input embeddings and the LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def norm_parameters(self) -> int:
        """Two RMSNorm weights per layer and the final norm."""
        return (2 * self.num_layers + 1) * self.hidden_size


def llama_parameter_count(config: Any) -> int:
    """Exact parameter count of a ``LlamaForCausalLM`` built from ``config`` (buffers not included)."""
    shape = LlamaShape.from_config(config)
    per_layer = shape.linear_weights_per_layer() + shape.biases_per_layer()
    return shape.embedding_parameters() + shape.num_layers * per_layer + shape.norm_parameters()


def lora_parameter_count(config: Any, rank: int, targets: Sequence[str] | None = None) -> int:
    """Parameters of LoRA adapters of rank ``rank`` on ``targets`` (LLaMA's defaults when None) in every
    layer: r·(in + out) per adapted linear (no adapter biases)."""
    shape = LlamaShape.from_config(config)
    sizes = shape.linear_sizes()
    return shape.num_layers * sum(rank * sum(sizes[name]) for name in _check_targets(targets, sizes))


def mlp_mapper_parameter_count(
    clip_dim: int, lm_dim: int, prefix_length: int, hidden_dim: int | None = None
) -> int:
    """Parameters of ``MLPMapper(clip_dim, lm_dim, prefix_length, hidden_dim)``: D_clip → h → P·D."""
    hidden = hidden_dim or (prefix_length * lm_dim) // 2
    return clip_dim * hidden + hidden + hidden * prefix_length * lm_dim + prefix_length * lm_dim


def base_weight_bytes(config: Any, dtype_bytes: int, quantization: str | None = None) -> int:
    """Bytes of the frozen base's weights: all in ``dtype_bytes``, or the layers' linear weights in 8 bits
    (plus a float32 scale per output row) or NF4 with double quantization; the rest stays in dtype."""
    shape = LlamaShape.from_config(config)
    if quantization is None:
        return llama_parameter_count(config) * dtype_bytes
    _check_quantization(quantization)
    unquantized = shape.embedding_parameters() + shape.norm_parameters()
    unquantized += shape.num_layers * shape.biases_per_layer()
    quantized = 0
    for fan_in, fan_out in shape.linear_sizes().values():
        weights = fan_in * fan_out
        if quantization == "8bit":
            quantized += weights + 4 * fan_out
        else:
            blocks = math.ceil(weights / _NF4_BLOCK)
            quantized += math.ceil(weights / 2) + blocks + 4 * math.ceil(blocks / _NF4_SECOND_BLOCK)
    return unquantized * dtype_bytes + shape.num_layers * quantized


@dataclass(frozen=True)
class MemoryEstimate:
    """An estimate of one training step's GPU memory, in bytes (parameter counts where named so).

    See the module docstring for every term's formula. ``peak_allocated`` compares with
    ``torch.cuda.max_memory_allocated``; ``total`` adds the overhead outside PyTorch's tensors.
    """

    base_parameters: int
    adapter_parameters: int
    mapper_parameters: int
    receiver_parameters: int
    base_weights: int
    adapter_weights: int
    mapper_weights: int
    receiver_weights: int
    gradients: int
    adapter_gradients: int
    adam_states: int
    optimizer_temporary: int
    activations: int
    """Tensors saved for backward at the end of the forward pass."""
    recompute: int
    """One layer's activations, recomputed in backward under checkpointing (0 without)."""
    working_set: int
    kv_cache: int
    overhead: int

    @property
    def trainable_weights(self) -> int:
        """Adapters and mapper."""
        return self.adapter_weights + self.mapper_weights

    @property
    def static(self) -> int:
        """Held through the whole step: weights, Adam states, the receiver."""
        return self.base_weights + self.trainable_weights + self.adam_states + self.receiver_weights

    @property
    def phases(self) -> dict[str, int]:
        """Memory on top of :attr:`static` in each phase of the step."""
        return {
            "rollout": self.kv_cache,
            "backward": self.activations + self.recompute + self.working_set + self.adapter_gradients,
            "optimizer step": self.gradients + self.optimizer_temporary,
        }

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=phases.__getitem__)

    @property
    def peak_allocated(self) -> int:
        """The tensors' peak: what ``torch.cuda.max_memory_allocated`` would report."""
        return self.static + max(self.phases.values())

    @property
    def total(self) -> int:
        """The peak with the overhead outside PyTorch's tensors: what the card must hold."""
        return self.peak_allocated + self.overhead


def layer_activation_bytes(
    config: Any,
    batch: int,
    positions: int,
    dtype_bytes: int,
    lora_rank: int,
    lora_targets: Sequence[str] | None = None,
    lora_dropout: float = 0.05,
    quantization: str | None = None,
) -> int:
    """Bytes one decoder layer saves for backward (module docstring), for ``batch`` rows of ``positions``
    (T) positions with no attention mask (SDPA causal)."""
    shape = LlamaShape.from_config(config)
    sizes = shape.linear_sizes()
    targets = _check_targets(lora_targets, sizes)
    tokens = batch * positions
    width, mlp, b = shape.hidden_size, shape.intermediate_size, dtype_bytes
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    norms = 2 * (4 * tokens * width + 4 * tokens)
    attention = b * tokens * (2 * q_width + 2 * kv_width) + 4 * batch * shape.num_heads * positions
    feed_forward = 3 * b * tokens * mlp
    adapter_inputs = 0
    if lora_dropout > 0 or dtype_bytes != 4:
        # Each adapter casts its input to float32 (a copy unless the base is float32) and drops out of it.
        for name in targets:
            fan_in = sizes[name][0]
            adapter_inputs += 4 * tokens * fan_in + (tokens * fan_in if lora_dropout > 0 else 0)
    else:
        # A float32 base without dropout: the adapters of one input (q, k, v; gate, up) share it.
        inputs = {_LAYER_INPUT[name]: sizes[name][0] for name in targets}
        adapter_inputs = sum(4 * tokens * fan_in for fan_in in inputs.values())
    adapters = adapter_inputs + len(targets) * 4 * tokens * lora_rank
    int8_inputs = 0
    if quantization == "8bit":
        int8_inputs = b * tokens * (width + q_width + width + mlp)
    return norms + attention + feed_forward + adapters + int8_inputs


_LAYER_INPUT = {
    "q_proj": "attention input",
    "k_proj": "attention input",
    "v_proj": "attention input",
    "o_proj": "attention output",
    "gate_proj": "mlp input",
    "up_proj": "mlp input",
    "down_proj": "mlp product",
}


def estimate_lora_memory(
    config: Any,
    batch: int,
    prefix_length: int = 10,
    caption_tokens: int = 20,
    dtype_bytes: int = 2,
    quantization: str | None = None,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    gradient_checkpointing: bool = False,
    objective: str = "ce",
    clip_dim: int = 512,
    rollout_tokens: int = 20,
    *,
    lora_dropout: float = 0.05,
    bos: bool = True,
    mapper_hidden_dim: int | None = None,
    receiver_parameters: int = VIT_B32_CLIP_PARAMETERS,
    adam_foreach: bool = True,
    overhead: int = CUDA_OVERHEAD_BYTES,
) -> MemoryEstimate:
    """Estimates the GPU memory of one LoRA training step of a ``ClipCaptioner`` on a LLaMA-family LM.

    Args:
        config: the LM's config (``LlamaConfig``, or any config with its attribute names).
        batch: images per step (B).
        prefix_length: the mapper's prefix length (P).
        caption_tokens: target tokens per caption, EOS included (T_c), for cross-entropy.
        dtype_bytes: bytes per element of the base's dtype: 2 (float16, bfloat16) or 4 (float32).
        quantization: None, ``"8bit"`` or ``"4bit"`` (NF4, double quantization), as ``PrefixLM`` loads.
        lora_rank: the adapters' rank (r).
        lora_targets: adapted linear layers (LLaMA's ``q_proj``, ``v_proj`` when None).
        gradient_checkpointing: per-layer activation checkpointing, as ``PrefixLM`` enables it.
        objective: ``"ce"`` (teacher forcing on T_c tokens) or ``"discritune"`` (a greedy rollout of
            ``rollout_tokens`` with a KV cache, then teacher forcing on them; the receiver CLIP on the GPU).
        clip_dim: CLIP feature size (D_clip) the mapper takes.
        rollout_tokens: DiscriTune's rollout length (R); the teacher-forced pass then has T_c = R.
        lora_dropout: the adapters' dropout; > 0 saves a mask per adapter.
        bos: the sequence starts with the LM's BOS before the prefix (LLaMA's tokenizer convention, which
            ``ClipCaptioner`` follows by default): one more position.
        mapper_hidden_dim: the MLP mapper's hidden width; ClipCap's P·D/2 when None.
        receiver_parameters: parameters of DiscriTune's receiver CLIP (float32).
        adam_foreach: AdamW's default foreach step (one float32 temporary of the trainable weights);
            False for ``fused=True`` or the per-parameter loop (no temporary).
        overhead: bytes outside PyTorch's tensors (:data:`CUDA_OVERHEAD_BYTES`).

    Returns:
        The terms, their peak and total (module docstring).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"estimate_lora_memory: objective must be one of {OBJECTIVES}, got {objective!r}")
    if dtype_bytes not in (2, 4):
        raise ValueError(f"estimate_lora_memory: dtype_bytes must be 2 or 4, got {dtype_bytes}")
    if quantization is not None:
        _check_quantization(quantization)
    if min(batch, prefix_length, caption_tokens, rollout_tokens, lora_rank) < 1:
        raise ValueError("estimate_lora_memory: batch, lengths and rank must be ≥ 1")
    shape = LlamaShape.from_config(config)
    discritune = objective == "discritune"
    targets_tokens = rollout_tokens if discritune else caption_tokens
    lead = prefix_length + int(bos)  # what the LM reads before the caption
    positions = lead + targets_tokens - 1  # the last caption token is not fed (ClipCaptioner.forward)
    tokens = batch * positions
    width, b = shape.hidden_size, dtype_bytes
    hidden = mapper_hidden_dim or (prefix_length * width) // 2

    base_parameters = llama_parameter_count(config)
    adapter_parameters = lora_parameter_count(config, lora_rank, lora_targets)
    mapper_parameters = mlp_mapper_parameter_count(clip_dim, width, prefix_length, mapper_hidden_dim)
    trainable = adapter_parameters + mapper_parameters
    receivers = receiver_parameters if discritune else 0

    layer = layer_activation_bytes(
        config, batch, positions, dtype_bytes, lora_rank, lora_targets, lora_dropout, quantization
    )
    final_norm = 4 * tokens * width + 4 * tokens
    # The float32 log-softmax, the int64 targets, and the int64 positions the LM head's logits are kept
    # for (T_c, gathered from the hidden states: clipcap.lm.PrefixLM).
    loss = 4 * batch * targets_tokens * shape.vocab_size + 8 * batch * targets_tokens + 8 * targets_tokens
    mapper = 4 * batch * (clip_dim + hidden)
    if gradient_checkpointing:
        layers, recompute = shape.num_layers * b * tokens * width, layer
        rotary = 0  # cos and sin reach the checkpointed layers as closures, not as saved tensors
    else:
        layers, recompute = shape.num_layers * layer, 0
        rotary = 2 * positions * shape.head_dim * b
    working_set = 8 * batch * targets_tokens * shape.vocab_size + 4 * b * tokens * shape.intermediate_size
    if quantization is not None:
        working_set += b * width * shape.intermediate_size
    kv_cache = 0
    if discritune:
        fed = lead + rollout_tokens - 1
        kv_cache = 2 * shape.num_layers * batch * fed * shape.num_kv_heads * shape.head_dim * b

    return MemoryEstimate(
        base_parameters=base_parameters,
        adapter_parameters=adapter_parameters,
        mapper_parameters=mapper_parameters,
        receiver_parameters=receivers,
        base_weights=base_weight_bytes(config, dtype_bytes, quantization),
        adapter_weights=4 * adapter_parameters,
        mapper_weights=4 * mapper_parameters,
        receiver_weights=4 * receivers,
        gradients=4 * trainable,
        adapter_gradients=4 * adapter_parameters,
        adam_states=8 * trainable,
        optimizer_temporary=4 * trainable if adam_foreach else 0,
        activations=layers + final_norm + rotary + loss + mapper,
        recompute=recompute,
        working_set=working_set,
        kv_cache=kv_cache,
        overhead=overhead,
    )


def largest_fitting_batch(fits: Callable[[int], bool], start: int = 8, limit: int = 1 << 16) -> int:
    """The largest batch ``b ≤ limit`` with ``fits(b)``, for a ``fits`` that holds up to some batch and
    fails beyond it: doubles from ``start`` while it fits, then bisects between the last batch that fit
    and the first that did not. 0 when not even batch 1 fits."""
    if start < 1 or limit < 1:
        raise ValueError(f"largest_fitting_batch: start and limit must be ≥ 1, got {start}, {limit}")
    fitting, failing = 0, None
    candidate = min(start, limit)
    while failing is None:
        if fits(candidate):
            fitting = candidate
            if candidate == limit:
                return limit
            candidate = min(2 * candidate, limit)
        else:
            failing = candidate
    while failing - fitting > 1:
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting


def llama2_7b_config() -> Any:
    """LLaMA-2-7B's ``LlamaConfig`` (sizes only; no weights, no download)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def _check_targets(targets: Sequence[str] | None, sizes: dict[str, tuple[int, int]]) -> list[str]:
    targets = list(DEFAULT_TARGET_MODULES["llama"] if targets is None else targets)
    unknown = [name for name in targets if name not in sizes]
    if unknown or not targets:
        raise ValueError(
            f"LoRA targets must be some of a LLaMA layer's linears {sorted(sizes)}, got {targets}"
        )
    return targets


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
