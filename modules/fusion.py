"""Fusion of a trainable ID embedding with a frozen text vector: none | add (paper) | concat | gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modules.config import Fusion


class TextFusion(nn.Module):
    """Maps (E_id[i], T[i]) to the item vector; T is frozen upstream, only these layers train.

    add: E_id + Linear(text_dim -> d)(T)  (HSTU-BLaIR); concat: Linear(d + text_dim -> d)([E_id; T]);
    gate: g * E_id + (1 - g) * P(T), g = sigmoid(Linear(2d -> d)([E_id; P(T)])); none: E_id.
    The padding id 0's text row counts as zero: under add it keeps E_id[0] alone; under concat and gate the
    layers' biases still reach it (nothing scores or attends to the padding id).
    """

    def __init__(self, *, mode: Fusion, embedding_dim: int, text_dim: int) -> None:
        super().__init__()
        self.mode = mode
        self.projection: nn.Linear | None = None
        self.gate: nn.Linear | None = None
        if mode in ("add", "gate"):
            self.projection = nn.Linear(text_dim, embedding_dim)
        elif mode == "concat":
            self.projection = nn.Linear(embedding_dim + text_dim, embedding_dim)
        if mode == "gate":
            self.gate = nn.Linear(2 * embedding_dim, embedding_dim)
        elif mode not in ("none", "add", "concat"):
            raise ValueError(f"TextFusion: unknown fusion {mode!r}; use none, add, concat or gate")

    def forward(self, id_vectors: Tensor, text_vectors: Tensor | None, ids: Tensor) -> Tensor:
        """id_vectors: [n, d], text_vectors: [n, text_dim] (frozen rows) or None, ids: [n] -> [n, d]."""
        if self.mode == "none":
            return id_vectors
        if text_vectors is None:
            raise ValueError(f"TextFusion: fusion={self.mode!r} needs text vectors, got None")
        text = text_vectors.to(id_vectors.dtype) * (ids != 0).unsqueeze(-1).to(id_vectors.dtype)
        if self.mode == "add":
            return id_vectors + self.projection(text) * (ids != 0).unsqueeze(-1).to(id_vectors.dtype)
        if self.mode == "concat":
            return self.projection(torch.cat([id_vectors, text], dim=-1))
        projected = self.projection(text)
        g = torch.sigmoid(self.gate(torch.cat([id_vectors, projected], dim=-1)))
        return g * id_vectors + (1.0 - g) * projected
