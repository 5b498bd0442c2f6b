"""The in-batch loss's logQ table: each item's share of the training targets, counted once per run."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from data_shards.reader import SequenceLoader
from modules.losses import log_sampling_probs
from trainer.distributed import World


def train_target_counts(
    dataset_dir: str | Path, *, num_items: int, max_seq_len: int, protocol: str, rank: int, world_size: int
) -> Tensor:
    """[N+1] int64: how often each item is a target in the windows training reads from this rank's shards
    (padding rows left out)."""
    loader = SequenceLoader(
        dataset_dir,
        split="train",
        batch_size=1024,
        max_seq_len=max_seq_len,
        rank=rank,
        world_size=world_size,
        shuffle=False,
        protocol=protocol,
    )
    counts = torch.zeros(num_items + 1, dtype=torch.int64)
    for batch in loader:
        real = (batch.weights > 0).repeat_interleave(batch.lengths)
        counts += torch.bincount(batch.targets[real], minlength=num_items + 1)
    return counts


def target_log_q(
    dataset_dir: str | Path, *, num_items: int, max_seq_len: int, protocol: str, world: World
) -> Tensor:
    """[N+1] float32 `log_sampling_probs` of the training targets (the positives' true sampling
    distribution): each rank counts its own shards and the counts are summed over the world."""
    counts = train_target_counts(
        dataset_dir,
        num_items=num_items,
        max_seq_len=max_seq_len,
        protocol=protocol,
        rank=world.rank,
        world_size=world.world_size,
    )
    if dist.is_initialized():
        counts = counts.to(world.device)
        dist.all_reduce(counts)
    return log_sampling_probs(counts.cpu())
