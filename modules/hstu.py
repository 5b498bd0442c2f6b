"""HSTU layers and encoder on jagged [total_tokens, d] tensors (the reference research code's math)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.config import ModelConfig
from modules.hstu_attention import AttentionPlan, hstu_attention, plan_attention
from modules.jagged import positions_in_sequence

if TYPE_CHECKING:
    from modules.hstu_attention_triton import TritonPlan


class HSTULayer(nn.Module):
    """One HSTU block: y = x + W_o(Dropout(U * LayerNorm(A V))), A = SiLU(alpha QK^T + rab) / N, causal.

    U, V, Q, K = split(SiLU(LayerNorm(x) @ W_uvqk)); LayerNorms carry no affine parameters; rab is a
    learned relative-position bias plus a log-bucketed time-gap bias, shared by the heads.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self._config = config
        d, h = config.embedding_dim, config.num_heads
        self._splits = [h * config.v_dim, h * config.v_dim, h * config.qk_dim, h * config.qk_dim]
        self.uvqk = nn.Parameter(torch.empty(d, sum(self._splits)).normal_(mean=0.0, std=0.02))
        self.output = nn.Linear(h * config.v_dim, d)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.pos_weights = nn.Parameter(torch.empty(2 * config.max_seq_len - 1).normal_(mean=0.0, std=0.02))
        self.time_weights = nn.Parameter(torch.empty(config.num_time_buckets + 1).normal_(mean=0.0, std=0.02))
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        offsets: Tensor,
        timestamps: Tensor,
        query_times: Tensor,
        plan: AttentionPlan | TritonPlan | None = None,
    ) -> Tensor:
        """x: [T, d], offsets: [B+1], timestamps and query times: [T] -> [T, d]; `plan` shares attention
        indices."""
        c = self._config
        total, h = x.shape[0], c.num_heads
        normed = F.layer_norm(x, [c.embedding_dim], eps=c.layer_norm_eps)
        u, v, q, k = torch.split(F.silu(normed @ self.uvqk), self._splits, dim=1)
        attn = hstu_attention(
            q.reshape(total, h, c.qk_dim),
            k.reshape(total, h, c.qk_dim),
            v.reshape(total, h, c.v_dim),
            offsets,
            timestamps,
            query_times,
            self.pos_weights,
            self.time_weights,
            max_seq_len=c.max_seq_len,
            alpha=c.alpha,
            denominator=c.resolved_denominator,
            backend=c.attention_backend,
            plan=plan,
        ).reshape(total, h * c.v_dim)
        gated = u * F.layer_norm(attn, [h * c.v_dim], eps=c.layer_norm_eps)
        return x + self.output(self.dropout(gated))


class HSTUEncoder(nn.Module):
    """Input emb * sqrt(d) + learned absolute position, dropout, HSTU layers, L2-normalised output."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self._config = config
        self.position = nn.Embedding(config.max_seq_len, config.embedding_dim)
        nn.init.trunc_normal_(self.position.weight, std=math.sqrt(1.0 / config.embedding_dim))
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.num_blocks))

    def forward(self, x: Tensor, offsets: Tensor, timestamps: Tensor, query_times: Tensor) -> Tensor:
        """x: [T, d] item vectors (oldest first per sequence), offsets: [B+1], timestamps: [T] (each item's),
        query_times: [T] (the time of the event each position predicts: its target's) -> [T, d]."""
        c = self._config
        positions = positions_in_sequence(offsets, x.shape[0])
        h = x * math.sqrt(c.embedding_dim) + self.position(positions)
        h = self.dropout(h)
        # The attention plan depends only on offsets and times: build it once, share it by the layers.
        plan = plan_attention(
            offsets,
            timestamps,
            query_times,
            max_seq_len=c.max_seq_len,
            num_time_buckets=c.num_time_buckets,
            backend=c.attention_backend,
            num_heads=c.num_heads,
        )
        for layer in self.layers:
            h = layer(h, offsets, timestamps, query_times, plan)
        return F.normalize(h, p=2.0, dim=-1, eps=1e-6)
