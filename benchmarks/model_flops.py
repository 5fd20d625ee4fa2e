"""Model FLOPs of one cross-entropy training sample, counted from the shapes, for model FLOPs utilisation.

Legend: L layers, D width, V vocabulary of the GPT-2-shaped LM; P prefix positions, T caption tokens (EOS
included), S = P + T − 1 positions the LM runs and K = T positions the LM head runs (``ClipCaptioner.forward``
feeds the prefix and every caption token but the last, and keeps the logits of the last T positions); D_c
the CLIP feature size. MLP mapper: hidden width h
(ClipCap's P·D/2). Transformer mapper: C tokens made from the CLIP embedding, M = C + P positions, N layers,
feed-forward width r·D.

Only matrix products count (layer norms, activations, softmax and the loss are left out), two FLOPs a
multiply-add, attention as full S × S products (PaLM's convention, causal masking not subtracted):

- forward, LM: 2·S·12·L·D² (per layer Q/K/V 3D², output D², MLP 8D²) + 2·K·V·D (head) + attention
  4·L·S²·D (QKᵀ and the weighted sum of V);
- forward, MLP mapper: 2·(D_c·h + h·P·D); Transformer mapper: 2·D_c·C·D + 2·M·N·(4 + 2r)·D² + 4·N·M²·D;
- backward: a product whose weight trains costs 2× its forward (gradient of the input and of the weight),
  one whose weight is frozen 1× (the input's gradient, which the trained mapper below it needs); the
  mapper's first layer, whose input is the CLIP features, 1× (the weight's gradient only); attention 2×
  (gradients of both operands of both products).

``tests/test_gpu_check.py`` checks these counts against ``torch.utils.flop_counter.FlopCounterMode`` on a
real step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

FORMULA = (
    "per sample, forward = LM 2·S·12·L·D² + head 2·K·V·D + attention 4·L·S²·D + mapper "
    "(MLP 2·(D_c·h + h·P·D); Transformer 2·D_c·C·D + 2·M·N·(4+2r)·D² + 4·N·M²·D); backward = 2× forward for "
    "trained weights, 1× for frozen ones and for the mapper's first layer, 2× for attention; "
    "S = P + T − 1, K = T, M = C + P"
)


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of one sample's forward and backward, by part (``lm``, ``lm_attention``, ``mapper``,
    ``mapper_attention``): each ``(forward, backward)``."""

    parts: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def forward(self) -> float:
        return sum(forward for forward, _ in self.parts.values())

    @property
    def backward(self) -> float:
        return sum(backward for _, backward in self.parts.values())

    @property
    def total(self) -> float:
        return self.forward + self.backward


def cross_entropy_flops(
    layers: int,
    width: int,
    vocab_size: int,
    *,
    lm_trained: bool,
    mapper: str,
    prefix_length: int = 10,
    caption_tokens: int = 20,
    clip_dim: int = 512,
    mapper_hidden: int | None = None,
    clip_length: int = 10,
    mapper_layers: int = 8,
    mlp_ratio: float = 2.0,
) -> TrainingFlops:
    """FLOPs of one cross-entropy training sample of a ``ClipCaptioner`` over a GPT-2-shaped LM.

    Args:
        layers, width, vocab_size: the LM's L, D and V.
        lm_trained: whether the LM's weights train (its backward then also computes their gradients).
        mapper: ``mlp`` (``MLPMapper``) or ``transformer`` (``TransformerMapper``).
        prefix_length, caption_tokens, clip_dim: P, T and D_c.
        mapper_hidden: the MLP mapper's h; P·D/2 when None, as ``MLPMapper``.
        clip_length, mapper_layers, mlp_ratio: the Transformer mapper's C, N and r.
    """
    P, T, D, L, V = prefix_length, caption_tokens, width, layers, vocab_size
    S, K = P + T - 1, T
    lm = 2 * S * 12 * L * D * D + 2 * K * V * D
    lm_attention = 4 * L * S * S * D
    parts = {
        "lm": (lm, (2 if lm_trained else 1) * lm),
        "lm_attention": (lm_attention, 2 * lm_attention),
    }
    if mapper == "mlp":
        h = mapper_hidden or P * D // 2
        first, second = 2 * clip_dim * h, 2 * h * P * D
        parts["mapper"] = (first + second, first + 2 * second)
    elif mapper == "transformer":
        M, N = clip_length + P, mapper_layers
        first = 2 * clip_dim * clip_length * D
        body = 2 * M * N * (4 + 2 * mlp_ratio) * D * D
        attention = 4 * N * M * M * D
        parts["mapper"] = (first + body, first + 2 * body)
        parts["mapper_attention"] = (attention, 2 * attention)
    else:
        raise ValueError(f"mapper must be mlp or transformer, got {mapper!r}")
    return TrainingFlops({name: (float(f), float(b)) for name, (f, b) in parts.items()})


def setting_flops(
    layers: int,
    width: int,
    vocab_size: int,
    mapper: functools.partial,
    lm_trained: bool,
    caption_tokens: int,
    clip_dim: int,
) -> TrainingFlops:
    """:func:`cross_entropy_flops` of a benchmark training setting: ``mapper`` is the ``MLPMapper`` or
    ``TransformerMapper`` factory of ``bench_captioner.training_settings``, whose keywords give P (and C
    and N for the Transformer mapper)."""
    options = mapper.keywords
    transformer = "clip_length" in options
    return cross_entropy_flops(
        layers,
        width,
        vocab_size,
        lm_trained=lm_trained,
        mapper="transformer" if transformer else "mlp",
        prefix_length=options["prefix_length"],
        caption_tokens=caption_tokens,
        clip_dim=clip_dim,
        **(
            {"clip_length": options["clip_length"], "mapper_layers": options["num_layers"]}
            if transformer
            else {}
        ),
    )


BF16_DENSE_PEAKS = (
    ("H200", ("H200",), 989e12),
    ("H100 PCIe", ("H100", "PCIe"), 756e12),
    ("H100 NVL", ("H100", "NVL"), 835e12),
    ("H100 SXM", ("H100",), 989e12),  # torch names it "NVIDIA H100 80GB HBM3"
    ("A100", ("A100",), 312e12),
)
"""bf16 dense (no sparsity) tensor-core peak FLOP/s, from NVIDIA's data sheets: ``(label, words the device
name contains, peak)``; the first entry whose words are all in the name wins."""


def bf16_dense_peak(device_name: str) -> tuple[str, float] | None:
    """``(label, peak FLOP/s)`` for a CUDA device name, or None when it is not in the table."""
    for label, words, peak in BF16_DENSE_PEAKS:
        if all(word in device_name for word in words):
            return label, peak
    return None
