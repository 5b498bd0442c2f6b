"""Distributed full-catalog retrieval: every rank scores its own row block, results merge over a group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from modules.retrieval import DEFAULT_CHUNK, count_above_target, merge_topk, topk_block


def target_scores(
    queries: Tensor, target_ids: Tensor, rows: Tensor, *, row_start: int, pg: dist.ProcessGroup | None = None
) -> Tensor:
    """[B] score of each target's own catalog row: the owning rank's dot product, summed over the group.

    Taken from the same rows every other item is scored with, so a target is never compared with itself
    computed another way (e.g. fused under autocast).
    """
    local = target_ids - row_start
    owned = (local >= 0) & (local < rows.shape[0])
    scores = torch.zeros(queries.shape[0], dtype=queries.dtype, device=queries.device)
    scores[owned] = (queries[owned] * rows[local[owned]].to(queries.dtype)).sum(-1)
    if dist.is_initialized():
        dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=pg)
    return scores


def distributed_target_ranks(
    queries: Tensor,
    target_ids: Tensor,
    rows: Tensor,
    *,
    row_start: int,
    history_offsets: Tensor | None = None,
    history_ids: Tensor | None = None,
    pg: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """[B] 1-based exact ranks: local counts of items above the target, summed with all_reduce."""
    counts = count_above_target(
        queries,
        target_ids,
        target_scores(queries, target_ids, rows, row_start=row_start, pg=pg),
        rows,
        row_start=row_start,
        history_offsets=history_offsets,
        history_ids=history_ids,
        chunk_size=chunk_size,
    )
    if dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=pg)
    return counts + 1


def distributed_topk(
    queries: Tensor,
    rows: Tensor,
    *,
    row_start: int,
    k: int,
    history_offsets: Tensor | None = None,
    history_ids: Tensor | None = None,
    pg: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Global top-k (scores, ids) [B, k]: local top-k per rank, all_gather, deterministic merge."""
    scores, ids = topk_block(
        queries,
        rows,
        row_start=row_start,
        k=k,
        history_offsets=history_offsets,
        history_ids=history_ids,
        chunk_size=chunk_size,
    )
    if not dist.is_initialized() or dist.get_world_size(pg) == 1:
        return scores, ids
    world = dist.get_world_size(pg)
    all_scores = [torch.empty_like(scores) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_scores, scores.contiguous(), group=pg)
    dist.all_gather(all_ids, ids.contiguous(), group=pg)
    merged_s, merged_i = merge_topk(torch.cat(all_scores, dim=1), torch.cat(all_ids, dim=1), k)
    return merged_s, torch.where(torch.isneginf(merged_s), torch.full_like(merged_i, -1), merged_i)
