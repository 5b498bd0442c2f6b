"""The popularity baseline against a naive numpy ranking, and the demo's report tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from data_shards.batch import SequenceBatch
from data_shards.config import DataConfig
from data_shards.prepare import prepare
from data_shards.reader import iter_sequences
from data_shards.synthetic import generate_amazon
from modules.jagged import offsets_from_lengths
from modules.retrieval import count_above_target
from trainer.baselines import _popularity_ranks, evaluate_popularity
from trainer.report import mean_std_table, metrics_table, paired_difference_table


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pop")
    reviews, meta = generate_amazon(root / "raw", num_reviews=3000, num_users=300, num_items=120, seed=5)
    cfg = DataConfig(
        source="amazon2023",
        interactions=str(reviews),
        items=str(meta),
        root=str(root),
        name="pop",
        max_seq_len=10,
        users_per_shard=64,
        min_item_interactions=2,
    )
    return prepare(cfg)


def _naive_popularity(dataset, *, num_items: int, ks: list[int]) -> dict[str, float]:
    """Count training items (all but the last two), rank each test target by count (ties to the smaller id)
    among the items outside its whole history."""
    sequences = [items for _, items, _, _ in iter_sequences(dataset)]
    counts = np.zeros(num_items + 1)
    for items in sequences:
        np.add.at(counts, items[:-2], 1)
    sums = {f"hr@{k}": 0.0 for k in ks} | {f"ndcg@{k}": 0.0 for k in ks} | {"mrr": 0.0}
    for items in sequences:
        history, target = set(items[:-1].tolist()), int(items[-1])
        candidates = [i for i in range(1, num_items + 1) if i == target or i not in history]
        ordered = sorted(candidates, key=lambda i: (-counts[i], i))
        rank = ordered.index(target) + 1
        for k in ks:
            sums[f"hr@{k}"] += rank <= k
            sums[f"ndcg@{k}"] += 1 / math.log2(rank + 1) if rank <= k else 0.0
        sums["mrr"] += 1 / rank
    return {key: value / len(sequences) for key, value in sums.items()}


def test_popularity_baseline_matches_naive_ranking(dataset):
    num_items = json.loads((dataset / "manifest.json").read_text())["num_items"]
    ks = [1, 5, 20]
    got = evaluate_popularity(
        dataset, num_items=num_items, split="test", protocol="loo3", ks=ks, batch_size=37
    )
    want = _naive_popularity(dataset, num_items=num_items, ks=ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_popularity_ranks_from_sorted_scores_equal_full_catalog_scoring():
    """Counting from the sorted scores ranks exactly as scoring the whole catalog per user does, also with
    tied scores, repeated history items, a target inside its own history and a padding row (target 0)."""
    gen = torch.Generator().manual_seed(0)
    num_items, rows = 40, 64
    scores = torch.randint(0, 6, (num_items + 1,), generator=gen).to(torch.float64)  # many ties
    scores[0] = float("-inf")
    lengths = torch.randint(1, 12, (rows,), generator=gen)
    item_ids = torch.randint(1, num_items + 1, (int(lengths.sum()),), generator=gen)  # repeats likely
    targets = torch.randint(1, num_items + 1, (rows,), generator=gen)
    targets[3] = item_ids[int(lengths[:3].sum())]  # row 3's target is its own first history item
    targets[-1] = 0
    weights = torch.ones(rows)
    weights[-1] = 0.0
    batch = SequenceBatch(
        users=torch.arange(1, rows + 1),
        weights=weights,
        lengths=lengths,
        item_ids=item_ids,
        timestamps=torch.zeros_like(item_ids),
        query_times=torch.zeros_like(item_ids),
        targets=targets,
    )
    got = _popularity_ranks(scores, torch.sort(scores[1:]).values, batch)
    want = 1 + count_above_target(
        torch.ones(rows, 1, dtype=torch.float64),
        targets,
        scores[targets],
        scores[:, None],
        row_start=0,
        history_offsets=offsets_from_lengths(lengths),
        history_ids=item_ids,
    )
    assert torch.equal(got, want)


def test_report_tables():
    row = {
        "hr@10": 0.1,
        "hr@50": 0.3,
        "hr@200": 0.6,
        "ndcg@10": 0.05,
        "ndcg@50": 0.1,
        "ndcg@200": 0.15,
        "mrr": 0.04,
    }
    table = metrics_table({"HSTU": row})
    assert table.splitlines()[2] == "| HSTU | 0.1000 | 0.3000 | 0.6000 | 0.0500 | 0.1000 | 0.1500 | 0.0400 |"
    other = {k: v + 0.02 for k, v in row.items()}
    summary = mean_std_table({"HSTU": [row, other]})
    assert "| HSTU (n=2) | 0.1100 ± 0.0141 |" in summary


def test_paired_difference_table_compares_seed_by_seed():
    base = [{"hr@10": 0.20, "mrr": 0.10}, {"hr@10": 0.18, "mrr": 0.09}, {"hr@10": 0.22, "mrr": 0.11}]
    text = [{"hr@10": 0.21, "mrr": 0.10}, {"hr@10": 0.20, "mrr": 0.08}, {"hr@10": 0.21, "mrr": 0.12}]
    table = paired_difference_table("id", {"id": base, "text": text}, ("hr@10", "mrr"))
    assert table.splitlines()[0] == "| vs id | Δ hr@10 | Δ mrr | wins (hr@10) |"
    assert table.splitlines()[2] == "| text | +0.0067 ± 0.0153 | +0.0000 ± 0.0100 | 2/3 |"
    with pytest.raises(ValueError, match="text has 2 runs, id 3"):
        paired_difference_table("id", {"id": base, "text": text[:2]})
