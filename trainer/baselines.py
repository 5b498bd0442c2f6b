"""Most-popular baseline: every user gets the items with the most training interactions, history excluded.

It runs on the same splits, exclusion rule and metric code as the model, so the two numbers compare.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_shards.batch import SequenceBatch
from data_shards.reader import NO_TRUNCATION, SequenceLoader
from modules.jagged import last_positions, offsets_from_lengths
from modules.metrics import metric_names, metric_sums


def popularity_scores(dataset_dir: str | Path, *, num_items: int, protocol: str) -> torch.Tensor:
    """[N+1] float64 training-interaction counts, ties broken towards the smaller id; padding id at -inf."""
    counts = torch.zeros(num_items + 1, dtype=torch.float64)
    loader = SequenceLoader(
        dataset_dir,
        split="train",
        batch_size=1024,
        max_seq_len=NO_TRUNCATION,
        shuffle=False,
        protocol=protocol,
    )
    for batch in loader:
        real = batch.weights > 0
        tokens_real = real.repeat_interleave(batch.lengths)
        counts += torch.bincount(batch.item_ids[tokens_real], minlength=num_items + 1).to(torch.float64)
        last_targets = batch.targets[last_positions(offsets_from_lengths(batch.lengths))][real]
        counts += torch.bincount(last_targets, minlength=num_items + 1).to(torch.float64)
    ids = torch.arange(num_items + 1, dtype=torch.float64)
    scores = counts + (num_items + 1 - ids) / (num_items + 2)
    scores[0] = float("-inf")
    return scores


def evaluate_popularity(
    dataset_dir: str | Path,
    *,
    num_items: int,
    split: str,
    protocol: str,
    ks: list[int],
    batch_size: int = 1024,
) -> dict[str, float]:
    """HR@K / NDCG@K / MRR of the popularity ranking on `split` (single process), whole history excluded."""
    scores = popularity_scores(dataset_dir, num_items=num_items, protocol=protocol)
    ranked = torch.sort(scores[1:]).values  # every user shares one ranking: sort the catalog once
    sums = torch.zeros(len(metric_names(ks)), dtype=torch.float64)
    count = 0.0
    loader = SequenceLoader(
        dataset_dir,
        split=split,
        batch_size=batch_size,
        max_seq_len=NO_TRUNCATION,
        shuffle=False,
        protocol=protocol,
    )
    for batch in loader:
        sums += metric_sums(_popularity_ranks(scores, ranked, batch), ks, batch.weights)
        count += float(batch.weights.sum())
    return {name: float(s) / max(count, 1.0) for name, s in zip(metric_names(ks), sums, strict=True)}


def _popularity_ranks(scores: torch.Tensor, ranked: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """[B] 1-based target ranks: items scoring strictly above the target, less the user's history items.

    Exactly the ranks of scoring the whole catalog per user (modules/retrieval.count_above_target) at a cost
    of O(history) per user: the padding id and the target never score above the target themselves, so only
    the distinct history items above it are subtracted.
    """
    target_scores = scores[batch.targets]
    above = ranked.numel() - torch.searchsorted(ranked, target_scores, right=True)
    rows = torch.repeat_interleave(torch.arange(batch.batch_size), batch.lengths)
    pairs = torch.unique(rows * scores.numel() + batch.item_ids)  # each (user, history item) once
    rows, history = pairs // scores.numel(), pairs % scores.numel()
    hidden = torch.bincount(rows[scores[history] > target_scores[rows]], minlength=batch.batch_size)
    return above - hidden + 1
