"""Typed config sections owned by modules/: `[model]` (HSTU + item embedding) and `[loss]`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from trainer.config_io import ConfigError

AttentionBackend = Literal["reference", "jagged", "triton"]
Fusion = Literal["none", "add", "concat", "gate"]
TextTransform = Literal["none", "center", "whiten"]


@dataclass(kw_only=True)
class ModelConfig:
    """HSTU encoder and item-embedding shape; defaults are the paper's Amazon/Steam setting."""

    embedding_dim: int = 64
    """Model width d: item embeddings, HSTU residual stream and output vectors."""
    num_blocks: int = 4
    """Number of HSTU layers."""
    num_heads: int = 4
    """Attention heads per layer."""
    qk_dim: int = 16
    """Per-head query/key width."""
    v_dim: int = 16
    """Per-head value (and U gate) width."""
    max_seq_len: int = 50
    """Longest input history; sizes the learned absolute and relative position tables."""
    dropout: float = 0.5
    """Dropout on the input embeddings and on each layer's U * LayerNorm(AV) before W_o."""
    attention_backend: AttentionBackend = "jagged"
    """`reference` (padded oracle), `jagged` (no compute on padding) or `triton` (GPU kernels)."""
    alpha: float = 1.0
    """Scale on Q K^T: 1.0 as in the research code (1/sqrt(qk_dim) is the transformer-style choice)."""
    denominator: Literal["max_seq_len", "seq_len"] = "max_seq_len"
    """Divide SiLU attention by max_seq_len (reference) or by each sequence's own length."""
    num_time_buckets: int = 128
    """Log-bucketed time-gap bias has num_time_buckets + 1 learned weights per layer."""
    fusion: Fusion = "add"
    """How the frozen text vector joins the ID embedding: none | add (paper) | concat | gate."""
    text_dim: int = 768
    """Width of the frozen text table (768 for BLaIR/roberta-base, 384 for MiniLM)."""
    text_transform: TextTransform = "none"
    """Fitted once over the catalog before training: none (paper) | center | whiten; then unit length."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the parameter-free LayerNorms inside each HSTU layer."""

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_blocks", "num_heads", "qk_dim", "v_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.embedding_dim % 4 or (self.fusion != "none" and self.text_dim % 4):
            raise ConfigError(
                f"model.embedding_dim={self.embedding_dim} and model.text_dim={self.text_dim} must be "
                "multiples of 4: FBGEMM's table-batched embedding kernels require it (e.g. 48, not 50)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"model.alpha must be a positive number, got {self.alpha}")
        if self.num_time_buckets < 1:
            raise ConfigError(f"model.num_time_buckets must be >= 1, got {self.num_time_buckets}")
        if self.fusion == "none" and self.text_transform != "none":
            raise ConfigError(
                f"model.text_transform={self.text_transform!r} transforms text vectors, but model.fusion="
                "'none' uses none; set model.fusion (add, concat or gate) or leave text_transform out"
            )
        if self.fusion != "none" and self.text_dim < 1:
            raise ConfigError(f"model.text_dim must be >= 1 when model.fusion={self.fusion!r}")
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"model.layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def resolved_denominator(self) -> float | None:
        """What `hstu_attention(denominator=...)` takes: a constant, or None for per-sequence length."""
        return float(self.max_seq_len) if self.denominator == "max_seq_len" else None


@dataclass(kw_only=True)
class LossConfig:
    """Next-item loss: sampled softmax over uniform negatives, or in-batch negatives with logQ."""

    kind: Literal["sampled_softmax", "in_batch"] = "sampled_softmax"
    """`sampled_softmax` (reference: R uniform negatives) or `in_batch` (batch targets, logQ-corrected)."""
    num_negatives: int = 512
    """R uniform negatives per batch for sampled_softmax (reference: 512 Amazon, 128 MovieLens)."""
    temperature: float = 0.05
    """Softmax temperature on cosine similarities."""
    share_negatives: bool = True
    """Draw one set of R negatives per batch shared by all positions (False: R per position)."""

    def __post_init__(self) -> None:
        if self.kind == "sampled_softmax" and self.num_negatives < 1:
            raise ConfigError(f"loss.num_negatives must be >= 1, got {self.num_negatives}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")
