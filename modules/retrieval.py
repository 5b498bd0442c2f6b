"""Full-catalog scoring on one contiguous row block of item vectors (pure; sharding/ merges the blocks).

A block holds the fused vectors of ids [row_start, row_start + n). Scores are dot products computed in
chunks of rows so memory stays [B, chunk]. Excluded from every count and top-K list: the padding id 0
and each query's history items. A target's rank = 1 + items (other than itself) scoring strictly above it,
summed over blocks; top-K lists from blocks merge by (score desc, id asc).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK = 65536


def _history_pairs(history_offsets: Tensor | None, history_ids: Tensor | None, num_queries: int):
    if history_offsets is None or history_ids is None:
        return None
    lengths = history_offsets[1:] - history_offsets[:-1]
    if lengths.numel() != num_queries:
        raise ValueError(f"retrieval: history_offsets describe {lengths.numel()} rows, queries {num_queries}")
    rows = torch.repeat_interleave(torch.arange(num_queries, device=history_ids.device), lengths)
    return rows, history_ids


def _masked_chunk_scores(queries, rows, lo, hi, row_start, pairs, extra_ids: Tensor | None) -> Tensor:
    """Scores of ids [row_start+lo, row_start+hi) with padding, history (and extra_ids per row) at -inf."""
    scores = queries @ rows[lo:hi].T
    id_lo, id_hi = row_start + lo, row_start + hi
    if id_lo <= 0 < id_hi:
        scores[:, -id_lo] = float("-inf")
    if pairs is not None:
        q_idx, ids = pairs
        sel = (ids >= id_lo) & (ids < id_hi)
        scores[q_idx[sel], ids[sel] - id_lo] = float("-inf")
    if extra_ids is not None:
        sel = (extra_ids >= id_lo) & (extra_ids < id_hi)
        q_idx = torch.arange(queries.shape[0], device=queries.device)[sel]
        scores[q_idx, extra_ids[sel] - id_lo] = float("-inf")
    return scores


def count_above_target(
    queries: Tensor,
    target_ids: Tensor,
    target_scores: Tensor,
    rows: Tensor,
    *,
    row_start: int,
    history_offsets: Tensor | None = None,
    history_ids: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """[B] int64: items of this block scoring strictly above each target (target, history, id 0 excluded).

    A NaN score counts as above the target, and a non-finite target score is beaten by every candidate, so
    a diverged model ranks its targets last instead of first (NaN compares false with everything).
    """
    pairs = _history_pairs(history_offsets, history_ids, queries.shape[0])
    counts = torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device)
    target_broken = ~torch.isfinite(target_scores)[:, None]
    for lo in range(0, rows.shape[0], chunk_size):
        hi = min(lo + chunk_size, rows.shape[0])
        scores = _masked_chunk_scores(queries, rows, lo, hi, row_start, pairs, target_ids)
        candidate = ~torch.isneginf(scores)
        above = (scores > target_scores[:, None]) | (candidate & (scores.isnan() | target_broken))
        counts += above.sum(dim=1)
    return counts


def merge_topk(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Best k of [B, m] candidates by (score desc, id asc); a deterministic merge of block lists."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), ids.gather(1, by_score)


def topk_block(
    queries: Tensor,
    rows: Tensor,
    *,
    row_start: int,
    k: int,
    history_offsets: Tensor | None = None,
    history_ids: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Top-k (scores [B, k], ids [B, k]) of this block; short blocks pad with (-inf, -1)."""
    pairs = _history_pairs(history_offsets, history_ids, queries.shape[0])
    num_q = queries.shape[0]
    best_s = torch.full((num_q, k), float("-inf"), dtype=queries.dtype, device=queries.device)
    best_i = torch.full((num_q, k), -1, dtype=torch.int64, device=queries.device)
    for lo in range(0, rows.shape[0], chunk_size):
        hi = min(lo + chunk_size, rows.shape[0])
        scores = _masked_chunk_scores(queries, rows, lo, hi, row_start, pairs, None)
        kk = min(k, hi - lo)
        s, i = torch.topk(scores, kk, dim=1)
        best_s, best_i = merge_topk(
            torch.cat([best_s, s], dim=1), torch.cat([best_i, i + row_start + lo], dim=1), k
        )
    best_i = torch.where(torch.isneginf(best_s), torch.full_like(best_i, -1), best_i)
    return best_s, best_i
