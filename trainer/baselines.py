"""Most-popular baseline: every user gets the items with the most training interactions, history excluded.

It runs on the same splits, exclusion rule and metric code as the model, so the two numbers compare.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_shards.reader import NO_TRUNCATION, SequenceLoader
from modules.jagged import last_positions, offsets_from_lengths
from modules.metrics import metric_names, metric_sums
from modules.retrieval import count_above_target


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
    rows = scores[:, None]
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
        queries = torch.ones(batch.targets.numel(), 1, dtype=torch.float64)
        above = count_above_target(
            queries,
            batch.targets,
            scores[batch.targets],
            rows,
            row_start=0,
            history_offsets=offsets_from_lengths(batch.lengths),
            history_ids=batch.item_ids,
        )
        sums += metric_sums(above + 1, ks, batch.weights)
        count += float(batch.weights.sum())
    return {name: float(s) / max(count, 1.0) for name, s in zip(metric_names(ks), sums, strict=True)}
