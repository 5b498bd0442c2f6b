"""Ranking metrics from 1-based target ranks (pure): HR@K, NDCG@K and MRR.

rank = 1 + number of candidates scoring above the target; a hit at K means rank <= K;
NDCG@K = 1 / log2(rank + 1) if rank <= K else 0 (one relevant item); MRR = mean(1 / rank).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_KS = (10, 50, 200)


def metric_names(ks: tuple[int, ...] | list[int] = DEFAULT_KS) -> list[str]:
    """Names in the order `metric_sums` returns them."""
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]


def metric_sums(
    ranks: Tensor, ks: tuple[int, ...] | list[int] = DEFAULT_KS, weights: Tensor | None = None
) -> Tensor:
    """Per-metric sums over rows (float64, order of `metric_names`), ready to all_reduce then divide."""
    if ranks.numel() and int(ranks.min()) < 1:
        raise ValueError(f"metric_sums: ranks are 1-based, got a rank of {int(ranks.min())}")
    r = ranks.to(torch.float64)
    w = torch.ones_like(r) if weights is None else weights.to(torch.float64)
    hits = [((r <= k).to(torch.float64) * w).sum() for k in ks]
    ndcg = [(torch.where(r <= k, 1.0 / torch.log2(r + 1.0), 0.0) * w).sum() for k in ks]
    mrr = [(w / r).sum()]
    return torch.stack(hits + ndcg + mrr)


def rank_metrics(
    ranks: Tensor, ks: tuple[int, ...] | list[int] = DEFAULT_KS, weights: Tensor | None = None
) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR of 1-based ranks (weights: 0 drops a padding row)."""
    count = float(ranks.numel()) if weights is None else float(weights.sum())
    sums = metric_sums(ranks, ks, weights)
    return {name: float(s) / max(count, 1e-12) for name, s in zip(metric_names(ks), sums, strict=True)}
