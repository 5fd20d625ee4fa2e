"""Mapping networks: a CLIP image embedding becomes a prefix of LM input embeddings.

Shapes: B batch, D_clip CLIP embedding size, P prefix length, D the LM's embedding size,
C the number of tokens the Transformer mapper makes from the CLIP embedding (``clip_length``),
G the number of CLIP grid tokens when the input is a sequence of patch features.

Both mappers take their two sizes first so that a config can name a mapper without knowing them:
the captioner calls ``mapper(clip_dim, lm_dim)`` once the language model is loaded (a jsonargparse
callable: ``class_path`` plus the remaining ``init_args``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Mapper(nn.Module, ABC):
    """Maps CLIP features to ``prefix_length`` LM input embeddings.

    Attributes:
        clip_dim: the CLIP feature size the mapper was built for (D_clip).
        lm_dim: the LM embedding size it produces (D).
        prefix_length: the number of prefix positions it produces (P).
    """

    def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int) -> None:
        super().__init__()
        if min(clip_dim, lm_dim, prefix_length) < 1:
            raise ValueError(
                f"mapper sizes must be positive: clip_dim={clip_dim}, lm_dim={lm_dim}, "
                f"prefix_length={prefix_length}"
            )
        self.clip_dim = clip_dim
        self.lm_dim = lm_dim
        self.prefix_length = prefix_length

    @abstractmethod
    def forward(self, clip_features: torch.Tensor) -> torch.Tensor:
        """Maps (B, D_clip) pooled features, or (B, G, D_clip) grid features, to a (B, P, D) prefix."""


MapperFactory = Callable[[int, int], Mapper]
"""What configs give the captioner: a mapper class with its options, still missing (clip_dim, lm_dim)."""


class MLPMapper(Mapper):
    """ClipCap's MLP: D_clip → P·D/2 → P·D with tanh, reshaped to (B, P, D).

    Args:
        clip_dim: CLIP feature size (D_clip).
        lm_dim: LM embedding size (D).
        prefix_length: prefix positions (P).
        hidden_dim: width of the hidden layer; ClipCap's choice P·D/2 when None.
        dropout: dropout after the hidden activation.
    """

    def __init__(
        self,
        clip_dim: int,
        lm_dim: int,
        prefix_length: int = 10,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(clip_dim, lm_dim, prefix_length)
        hidden_dim = hidden_dim or (prefix_length * lm_dim) // 2
        self.net = nn.Sequential(
            nn.Linear(clip_dim, hidden_dim),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, prefix_length * lm_dim),
        )

    def forward(self, clip_features: torch.Tensor) -> torch.Tensor:
        if clip_features.dim() != 2:
            raise ValueError(
                f"MLPMapper takes pooled CLIP features (B, D_clip); got shape {tuple(clip_features.shape)}"
            )
        return self.net(clip_features).view(clip_features.shape[0], self.prefix_length, self.lm_dim)


class FusedAttentionEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (pre-norm, batch first) whose self-attention, when gradients are
    recorded, is one packed Q/K/V product and ``F.scaled_dot_product_attention``.

    ``nn.MultiheadAttention``'s training path splits, copies and transposes Q, K and V through
    ``F.multi_head_attention_forward`` before the same attention kernel: at ClipCap's 8 layers, batch 32,
    20 tokens, the mapper's forward + backward is 1.04× (width 768) to 1.16× (width 256) faster this way
    (docs/benchmarks.md, "Transformer mapper attention"). Without gradients, in eval mode, torch's own fused encoder
    kernel is faster still, and runs unchanged. The parameters and their state-dict keys are the parent's,
    so checkpoints load either way; outputs equal the parent's.
    """

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        plain = src_mask is None and src_key_padding_mask is None and not is_causal
        packed = self.norm_first and self.self_attn.batch_first and self.self_attn._qkv_same_embed_dim
        if not (torch.is_grad_enabled() and plain and packed):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        attention = self.self_attn
        batch, length, width = src.shape
        heads = attention.num_heads
        qkv = F.linear(self.norm1(src), attention.in_proj_weight, attention.in_proj_bias)
        query, key, value = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=attention.dropout if self.training else 0.0
        )
        attended = attention.out_proj(attended.transpose(1, 2).reshape(batch, length, width))
        hidden = src + self.dropout1(attended)
        return hidden + self._ff_block(self.norm2(hidden))


class TransformerMapper(Mapper):
    """ClipCap's Transformer mapper.

    The CLIP embedding is projected to C = ``clip_length`` tokens (or, for grid features, each of the G
    patch tokens is projected), learned prefix constants are appended, N Transformer encoder layers run
    over both, and the last P positions are the prefix.

    Args:
        clip_dim: CLIP feature size (D_clip).
        lm_dim: LM embedding size (D); also the Transformer's width.
        prefix_length: prefix positions (P), the number of learned constants.
        clip_length: tokens made from a pooled CLIP embedding (C).
        num_layers: Transformer encoder layers.
        num_heads: attention heads; must divide ``lm_dim``.
        mlp_ratio: feed-forward width as a multiple of ``lm_dim``.
        dropout: dropout inside the Transformer layers.
    """

    def __init__(
        self,
        clip_dim: int,
        lm_dim: int,
        prefix_length: int = 10,
        clip_length: int = 10,
        num_layers: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(clip_dim, lm_dim, prefix_length)
        if lm_dim % num_heads:
            raise ValueError(f"TransformerMapper: num_heads={num_heads} must divide lm_dim={lm_dim}")
        self.clip_length = clip_length
        self.pooled_projection = nn.Linear(clip_dim, clip_length * lm_dim)
        self.grid_projection = nn.Linear(clip_dim, lm_dim)
        self.prefix_constants = nn.Parameter(torch.randn(prefix_length, lm_dim))
        layer = FusedAttentionEncoderLayer(
            d_model=lm_dim,
            nhead=num_heads,
            dim_feedforward=int(lm_dim * mlp_ratio),
            dropout=dropout,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)

    def forward(self, clip_features: torch.Tensor) -> torch.Tensor:
        batch = clip_features.shape[0]
        if clip_features.dim() == 2:
            tokens = self.pooled_projection(clip_features).view(batch, self.clip_length, self.lm_dim)
        elif clip_features.dim() == 3:
            tokens = self.grid_projection(clip_features)
        else:
            raise ValueError(
                "TransformerMapper takes (B, D_clip) pooled or (B, G, D_clip) grid features; "
                f"got shape {tuple(clip_features.shape)}"
            )
        constants = self.prefix_constants.unsqueeze(0).expand(batch, -1, -1)
        hidden = self.transformer(torch.cat([tokens, constants], dim=1))
        return hidden[:, -self.prefix_length :]
