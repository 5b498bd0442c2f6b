"""The module DistributedModelParallel shards and the train pipeline drives: model + next-item loss.

`forward(batch)` looks the batch's KJTs up in the item tables (the only part TorchRec must see, so its
pipeline can run the input distribution ahead), then `_loss_from_rows` — an fx leaf — fuses the rows, runs
HSTU and returns `(loss, loss.detach())` as TrainPipelineSparseDist expects.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modules.config import LossConfig
from modules.item_embedding import ID_FEATURE, TEXT_FEATURE
from modules.jagged import last_positions, lengths_from_offsets
from modules.losses import in_batch_softmax_loss, sampled_softmax_loss
from modules.model import GenerativeRecommender
from trainer.batch import ModelBatch


class RecommenderTrain(nn.Module):
    """Wraps a GenerativeRecommender with its training loss and its evaluation encoder."""

    def __init__(
        self, model: GenerativeRecommender, loss: LossConfig, *, autocast_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_config = loss
        self.autocast_dtype = autocast_dtype

    def autocast(self, device_type: str) -> torch.autocast:
        """Mixed precision for the dense part (HSTU, fusion, loss); tables and optimizer state stay fp32."""
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast(device_type=device_type, dtype=dtype, enabled=self.autocast_dtype is not None)

    def lookup(self, batch: ModelBatch) -> tuple[Tensor, Tensor | None]:
        """Rows of every id in the batch from the ID table and (frozen) text table."""
        emb = self.model.item_embedding
        id_rows = emb.id_collection(batch.id_features)[ID_FEATURE].values()
        text_rows = None
        if emb.text_collection is not None:
            text_rows = emb.text_collection(batch.text_features)[TEXT_FEATURE].values()
        return id_rows, text_rows

    def forward(self, batch: ModelBatch) -> tuple[Tensor, Tensor]:
        id_rows, text_rows = self.lookup(batch)
        return _loss_from_rows(self, batch, id_rows, text_rows)

    @torch.no_grad()
    def encode(self, batch: ModelBatch) -> Tensor:
        """Evaluation and recommendation: the query vector at each row's last position, [B, d] fp32."""
        id_rows, text_rows = self.lookup(batch)
        with self.autocast(id_rows.device.type):
            history, _, _ = _split_fused(self, batch, id_rows, text_rows)
            out = self.model.encoder(history, batch.offsets, batch.timestamps, batch.query_times)
        return out[last_positions(batch.offsets)].float()


def _split_fused(
    task: RecommenderTrain, batch: ModelBatch, id_rows: Tensor, text_rows: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Fuse all looked-up rows once, then split them into history, target and negative vectors."""
    ids = batch.id_features.values()
    frozen = None if text_rows is None else text_rows.detach()
    fused = task.model.item_embedding.fuse(id_rows, frozen, ids)
    num_history, num_targets = batch.timestamps.numel(), batch.targets.numel()
    history = fused[:num_history]
    targets = fused[num_history : num_history + num_targets]
    negatives = fused[num_history + num_targets :]
    return history, targets, negatives.reshape(*batch.negatives.shape, fused.shape[-1])


@torch.fx.wrap
def _loss_from_rows(
    task: RecommenderTrain, batch: ModelBatch, id_rows: Tensor, text_rows: Tensor | None
) -> tuple[Tensor, Tensor]:
    with task.autocast(id_rows.device.type):
        return _loss(task, batch, id_rows, text_rows)


def _loss(
    task: RecommenderTrain, batch: ModelBatch, id_rows: Tensor, text_rows: Tensor | None
) -> tuple[Tensor, Tensor]:
    history, targets, negatives = _split_fused(task, batch, id_rows, text_rows)
    outputs = task.model.encoder(history, batch.offsets, batch.timestamps, batch.query_times)
    weights = batch.weights.repeat_interleave(lengths_from_offsets(batch.offsets))
    cfg = task.loss_config
    if cfg.kind == "sampled_softmax":
        loss = sampled_softmax_loss(
            outputs,
            batch.targets,
            targets,
            batch.negatives,
            negatives,
            temperature=cfg.temperature,
            weights=weights,
        )
    else:
        loss = in_batch_softmax_loss(
            outputs, batch.targets, targets, temperature=cfg.temperature, log_q=batch.log_q, weights=weights
        )
    return loss, loss.detach()
