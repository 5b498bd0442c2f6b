"""The batch the sharded model consumes: a reader batch plus sampled negatives and the KJTs to look up.

All ids a step needs (history, targets, negatives) go through the item tables in ONE lookup, carried by the
batch as KeyedJaggedTensors so TorchRec's TrainPipelineSparseDist can start their input distribution
while the previous step still computes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torchrec import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from data_shards.batch import SequenceBatch
from modules.item_embedding import ID_FEATURE, TEXT_FEATURE
from modules.jagged import offsets_from_lengths
from modules.losses import sample_uniform_negatives


def _ids_kjt(feature: str, ids: Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[feature], values=ids, lengths=torch.ones_like(ids, dtype=torch.int32)
    )


@dataclass
class ModelBatch(Pipelineable):
    """Jagged histories, their targets and negatives, and the lookups (id and text tables) they need."""

    id_features: KeyedJaggedTensor
    """ID-table lookups: history ids [T], then targets, then negatives (flattened)."""
    text_features: KeyedJaggedTensor | None
    """The same ids for the frozen text table (None when model.fusion = "none")."""
    offsets: Tensor
    """[B+1] row offsets into the history."""
    timestamps: Tensor
    """[T] history timestamps (seconds)."""
    query_times: Tensor
    """[T] the time of the event each position predicts (its target's; seconds)."""
    targets: Tensor
    """Training: [T] next item at every position. Evaluation: [B] the held-out item."""
    negatives: Tensor
    """[R] negatives shared by the batch, [T, R] per position, or [0] when the loss needs none."""
    log_q: Tensor
    """[T] float32 log sampling probability of each training target (the in-batch loss's logQ), else [0]."""
    weights: Tensor
    """[B] 1 for real rows, 0 for rows that only pad this rank's batch count."""

    @property
    def num_rows(self) -> int:
        return self.weights.numel()

    @property
    def num_tokens(self) -> int:
        return self.timestamps.numel()

    def _map(self, fn) -> ModelBatch:
        return ModelBatch(**{f.name: _apply(fn, getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device, non_blocking: bool = False) -> ModelBatch:
        return self._map(lambda x: x.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value.record_stream(stream)

    def pin_memory(self) -> ModelBatch:
        return self._map(lambda x: x.pin_memory())


def _apply(fn, value):
    return None if value is None else fn(value)


def make_model_batch(
    batch: SequenceBatch,
    *,
    num_items: int,
    num_negatives: int,
    share_negatives: bool,
    with_text: bool,
    generator: torch.Generator | None,
    log_q_table: Tensor | None = None,
) -> ModelBatch:
    """Add uniform negatives (0 for none) drawn from `generator`, the targets' log q from `log_q_table`
    ([N+1], in-batch loss) and build the lookup KJTs."""
    num_tokens = batch.item_ids.numel()
    if num_negatives == 0:
        negatives = torch.empty(0, dtype=torch.int64)
    else:
        shape = (num_negatives,) if share_negatives else (num_tokens, num_negatives)
        negatives = sample_uniform_negatives(num_items, shape, generator=generator)
    ids = torch.cat([batch.item_ids, batch.targets, negatives.reshape(-1)])
    return ModelBatch(
        id_features=_ids_kjt(ID_FEATURE, ids),
        text_features=_ids_kjt(TEXT_FEATURE, ids) if with_text else None,
        offsets=offsets_from_lengths(batch.lengths),
        timestamps=batch.timestamps,
        query_times=batch.query_times,
        targets=batch.targets,
        negatives=negatives,
        log_q=torch.empty(0) if log_q_table is None else log_q_table[batch.targets],
        weights=batch.weights,
    )
