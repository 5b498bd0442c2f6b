"""Item vectors: a TorchRec ID table plus a frozen TorchRec text table, fused by `TextFusion`.

Both tables are `EmbeddingCollection`s (sequence tables, one id per lookup) so sharding/ can shard them
row-wise; row 0 is the padding id. `ItemEmbedding(ids)` is the one function that turns any id set
(inputs, negatives, targets) into fused vectors; `fuse` does the same for rows already fetched (the
catalog row block a rank owns), so evaluation uses exactly the training-time item vector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType

from modules.config import ModelConfig
from modules.fusion import TextFusion

ID_TABLE = "item_id_table"
ID_FEATURE = "item_id"
TEXT_TABLE = "item_text_table"
TEXT_FEATURE = "item_text"


def build_id_collection(num_items: int, embedding_dim: int, *, device: str | torch.device = "cpu"):
    """EmbeddingCollection for item ids 0..num_items (0 = padding)."""
    table = EmbeddingConfig(
        name=ID_TABLE,
        embedding_dim=embedding_dim,
        num_embeddings=num_items + 1,
        feature_names=[ID_FEATURE],
        data_type=DataType.FP32,
    )
    return EmbeddingCollection(tables=[table], device=torch.device(device))


def build_text_collection(
    num_items: int, text_dim: int, *, device: str | torch.device = "cpu", fp16: bool = False
) -> EmbeddingCollection:
    """EmbeddingCollection for the frozen text vectors of items 0..num_items (row 0 stays zero)."""
    table = EmbeddingConfig(
        name=TEXT_TABLE,
        embedding_dim=text_dim,
        num_embeddings=num_items + 1,
        feature_names=[TEXT_FEATURE],
        data_type=DataType.FP16 if fp16 else DataType.FP32,
        init_fn=nn.init.zeros_,
    )
    return EmbeddingCollection(tables=[table], device=torch.device(device))


def _single_id_kjt(feature: str, ids: Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[feature], values=ids, lengths=torch.ones_like(ids, dtype=torch.int32)
    )


class ItemEmbedding(nn.Module):
    """Fused item vectors for any ids: TextFusion(E_id[ids], T[ids]); T is never trained."""

    def __init__(
        self,
        *,
        num_items: int,
        config: ModelConfig,
        device: str | torch.device = "cpu",
        text_fp16: bool = False,
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"ItemEmbedding: num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.id_collection = build_id_collection(num_items, config.embedding_dim, device=device)
        self.text_collection: EmbeddingCollection | None = None
        if config.fusion != "none":
            self.text_collection = build_text_collection(
                num_items, config.text_dim, device=device, fp16=text_fp16
            )
            self.text_collection.requires_grad_(False)
        self.fusion = TextFusion(
            mode=config.fusion, embedding_dim=config.embedding_dim, text_dim=config.text_dim
        )

    def lookup(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Raw rows (E_id[ids], T[ids]) for [n] int64 ids; the text rows are detached (frozen)."""
        flat = ids.reshape(-1)
        id_rows = self.id_collection(_single_id_kjt(ID_FEATURE, flat))[ID_FEATURE].values()
        text_rows = None
        if self.text_collection is not None:
            text_rows = self.text_collection(_single_id_kjt(TEXT_FEATURE, flat))[TEXT_FEATURE].values()
            text_rows = text_rows.detach()
        return id_rows, text_rows

    def fuse(self, id_rows: Tensor, text_rows: Tensor | None, ids: Tensor) -> Tensor:
        """Fused vectors from already-fetched rows (e.g. a rank's local catalog block)."""
        return self.fusion(id_rows, text_rows, ids)

    def forward(self, ids: Tensor) -> Tensor:
        """Ids of any shape -> fused vectors of shape ids.shape + [d]."""
        id_rows, text_rows = self.lookup(ids)
        out = self.fuse(id_rows, text_rows, ids.reshape(-1))
        return out.reshape(*ids.shape, out.shape[-1])

    @torch.no_grad()
    def load_text_rows(self, start: int, rows: Tensor) -> None:
        """Unsharded only: write frozen text rows [start, start + n) (sharded: sharding.model.local_rows)."""
        if self.text_collection is None:
            raise ValueError("ItemEmbedding.load_text_rows: model.fusion='none' has no text table")
        weight = self.text_collection.embeddings[TEXT_TABLE].weight
        weight[start : start + rows.shape[0]].copy_(rows.to(weight.dtype))
