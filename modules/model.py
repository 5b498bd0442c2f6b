"""The generative recommender: fused item vectors in, HSTU over each user's history, a query vector out."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modules.config import ModelConfig
from modules.hstu import HSTUEncoder
from modules.item_embedding import ItemEmbedding


class GenerativeRecommender(nn.Module):
    """`item_embedding` (TorchRec tables + fusion; sharded by sharding/) and `encoder` (dense HSTU)."""

    def __init__(
        self,
        *,
        num_items: int,
        config: ModelConfig,
        device: str | torch.device = "cpu",
        text_fp16: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.item_embedding = ItemEmbedding(
            num_items=num_items, config=config, device=device, text_fp16=text_fp16
        )
        self.encoder = HSTUEncoder(config)

    def forward(self, item_ids: Tensor, offsets: Tensor, timestamps: Tensor, query_times: Tensor) -> Tensor:
        """Jagged history ids [T], offsets [B+1], timestamps and query times [T] -> L2-normalised outputs
        [T, d]."""
        return self.encoder(self.item_embedding(item_ids), offsets, timestamps, query_times)

    def item_vectors(self, ids: Tensor) -> Tensor:
        """Fused item vectors (for positives, negatives and catalog scoring)."""
        return self.item_embedding(ids)
