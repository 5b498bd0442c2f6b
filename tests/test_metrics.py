"""Metrics and block retrieval against naive numpy implementations."""

from __future__ import annotations

import numpy as np
import torch

from modules.metrics import metric_names, rank_metrics
from modules.retrieval import count_above_target, topk_block


def test_metrics_match_numpy():
    ranks = np.array([1, 2, 10, 11, 50, 51, 200, 201, 1000, 3])
    got = rank_metrics(torch.tensor(ranks), ks=(10, 50, 200))
    for k in (10, 50, 200):
        hit = ranks <= k
        assert abs(got[f"hr@{k}"] - hit.mean()) < 1e-12
        assert abs(got[f"ndcg@{k}"] - np.where(hit, 1 / np.log2(ranks + 1), 0).mean()) < 1e-12
    assert abs(got["mrr"] - (1 / ranks).mean()) < 1e-12
    assert got["hr@10"] == 0.4  # rank 10 is a hit, 11 is not
    assert list(got) == metric_names((10, 50, 200))


def test_block_ranks_and_topk_match_numpy():
    rng = np.random.default_rng(0)
    n_items, d = 50, 8
    catalog = rng.standard_normal((n_items + 1, d)).astype(np.float32)
    queries = rng.standard_normal((5, d)).astype(np.float32)
    history = [[3, 4], [], [7], [1, 2, 9, 11], [20]]
    targets = np.array([4, 5, 6, 9, 30])  # rows 0 and 3: target also in history (never excluded)
    scores = queries @ catalog.T
    exp_ranks, exp_top = [], []
    for b in range(5):
        s = scores[b].copy()
        s[0] = -np.inf
        s[history[b]] = -np.inf
        t = targets[b]
        above = [i for i in range(n_items + 1) if i != t and s[i] > scores[b, t]]
        exp_ranks.append(1 + len(above))
        exp_top.append(sorted(range(n_items + 1), key=lambda i: (-s[i], i))[:6])
    offsets = torch.tensor(np.cumsum([0] + [len(h) for h in history]))
    hist_ids = torch.tensor([i for h in history for i in h], dtype=torch.int64)
    q, cat_t, tg = torch.tensor(queries), torch.tensor(catalog), torch.tensor(targets)
    counts = torch.zeros(5, dtype=torch.int64)
    tops_s, tops_i = [], []
    for start in (0, 17, 34):  # three row blocks, chunked smaller than a block
        rows = cat_t[start : start + 17]
        counts += count_above_target(
            q,
            tg,
            (q * cat_t[tg]).sum(-1),
            rows,
            row_start=start,
            history_offsets=offsets,
            history_ids=hist_ids,
            chunk_size=4,
        )
        s, i = topk_block(
            q, rows, row_start=start, k=6, history_offsets=offsets, history_ids=hist_ids, chunk_size=4
        )
        tops_s.append(s)
        tops_i.append(i)
    assert (counts + 1).tolist() == exp_ranks
    from modules.retrieval import merge_topk

    _, ids = merge_topk(torch.cat(tops_s, 1), torch.cat(tops_i, 1), 6)
    assert ids.tolist() == exp_top


def test_non_finite_scores_rank_the_target_last():
    """NaN never wins a comparison, so a diverged model would rank every target first without this rule."""
    catalog = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [float("nan"), 0.0]])
    queries = torch.tensor([[float("nan"), 1.0], [1.0, 0.0]])
    targets = torch.tensor([2, 1])
    target_scores = (queries * catalog[targets]).sum(-1)
    counts = count_above_target(queries, targets, target_scores, catalog, row_start=0)
    # row 0: NaN query, every candidate (ids 1, 3, 4) beats it; row 1: only the NaN item 4 is above.
    assert counts.tolist() == [3, 1]
