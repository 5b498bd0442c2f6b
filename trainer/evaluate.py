"""Distributed full-catalog evaluation: exact ranks of held-out items over a row-sharded catalog.

Every rank encodes its own users, the queries (with targets and histories) are all-gathered, and each rank
counts the items of ITS catalog rows that score above each target (scored from its own catalog row);
summing those counts gives exact 1-based ranks, so no rank ever holds the whole catalog and every rank ends
with the same metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from data_shards.batch import SequenceBatch
from modules.jagged import offsets_from_lengths
from modules.metrics import metric_names, metric_sums
from sharding.model import local_item_vectors
from sharding.retrieval import distributed_target_ranks
from trainer.batch import ModelBatch
from trainer.train_module import RecommenderTrain


def all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's `x` along dim 0 (ranks may hold different numbers of rows)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes, strict=True)])


@torch.no_grad()
def evaluate(
    task: RecommenderTrain,
    batches: Iterable[SequenceBatch],
    *,
    to_model_batch: Callable[[SequenceBatch], ModelBatch],
    device: torch.device,
    ks: list[int],
    max_seq_len: int,
    show_progress: bool = False,
    total: int | None = None,
) -> dict[str, float]:
    """HR@K, NDCG@K and MRR over all users of `batches` (this rank's share), identical on every rank.

    Batches carry each user's whole history: the model reads its last `max_seq_len` items, and all of it
    is excluded from the ranking (as in recommendation).
    """
    row_start, rows = local_item_vectors(task)
    rows = F.normalize(rows.float(), dim=-1)
    sums = torch.zeros(len(metric_names(ks)), dtype=torch.float64)
    count = 0.0
    for seq_batch in tqdm(batches, total=total, desc="eval", disable=not show_progress, leave=False):
        batch = to_model_batch(seq_batch.most_recent(max_seq_len)).to(device)
        queries = task.encode(batch)
        weights = all_gather_rows(batch.weights)
        ranks = distributed_target_ranks(
            all_gather_rows(queries.float()),
            all_gather_rows(batch.targets),
            rows,
            row_start=row_start,
            history_offsets=offsets_from_lengths(all_gather_rows(seq_batch.lengths.to(device))),
            history_ids=all_gather_rows(seq_batch.item_ids.to(device)),
        )
        sums += metric_sums(ranks.cpu(), ks, weights.cpu())
        count += float(weights.sum())
    return {name: float(s) / max(count, 1.0) for name, s in zip(metric_names(ks), sums, strict=True)}
