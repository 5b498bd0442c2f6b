"""Comparison tables from runs' `results.json` files (what the demo prints and the README shows)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

METRICS = ("hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr")


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run did not finish")
    return json.loads(path.read_text())


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per named metrics dict, test metrics as columns."""
    header = "| model | " + " | ".join(METRICS) + " |"
    lines = [header, "|---|" + "---:|" * len(METRICS)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines)


def mean_std_table(rows: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table of mean ± std over seeds for each named list of metrics dicts."""
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, runs in rows.items():
        cells = []
        for m in METRICS:
            values = [r[m] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} ± {std:.4f}")
        lines.append(f"| {name} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference_table(
    baseline: str,
    rows: dict[str, list[dict[str, float]]],
    metrics: tuple[str, ...] = ("hr@10", "ndcg@10", "mrr"),
) -> str:
    """Markdown table of each model's per-seed difference to `baseline` (same seeds, same order).

    Runs that share a seed share data order and negatives, so the paired difference is what a variant
    changed; "wins" counts the seeds on which it beat the baseline.
    """
    lines = [
        "| vs " + baseline + " | " + " | ".join(f"Δ {m}" for m in metrics) + " | wins (" + metrics[0] + ") |"
    ]
    lines.append("|---|" + "---:|" * (len(metrics) + 1))
    base = rows[baseline]
    for name, runs in rows.items():
        if name == baseline:
            continue
        if len(runs) != len(base):
            raise ValueError(f"paired_difference_table: {name} has {len(runs)} runs, {baseline} {len(base)}")
        cells = []
        for m in metrics:
            diffs = [r[m] - b[m] for r, b in zip(runs, base, strict=True)]
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            cells.append(f"{statistics.fmean(diffs):+.4f} ± {std:.4f}")
        wins = sum(r[metrics[0]] > b[metrics[0]] for r, b in zip(runs, base, strict=True))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wins}/{len(runs)} |")
    return "\n".join(lines)


def recommendation_sample(
    dataset_dir: str | Path, recommendations: str | Path, user_index: int, n: int
) -> str:
    """Markdown lines: one user's last `n` items and their top-`n` recommendations, as item texts."""
    import pyarrow.parquet as pq

    from data_shards.reader import iter_item_texts, iter_sequences

    table = pq.read_table(recommendations, filters=[("user_index", "=", user_index)]).to_pylist()
    if not table:
        raise ValueError(f"{recommendations}: no recommendations for user index {user_index}")
    (row,) = table
    history = next(items for user, items, _, _ in iter_sequences(dataset_dir) if user == user_index)
    wanted = {int(i) for i in history[-n:]} | set(row["item_indices"][:n])
    texts = {t.item: t.text for t in iter_item_texts(dataset_dir) if t.item in wanted}
    lines = [f"User {row['user']}, most recent first:", ""]
    lines += [f"- watched: {texts[int(i)]}" for i in reversed(history[-n:])]
    picks = zip(row["item_indices"][:n], row["scores"][:n], strict=True)
    lines += [f"- recommended ({score:.3f}): {texts[i]}" for i, score in picks]
    return "\n".join(lines)
