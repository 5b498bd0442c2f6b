"""Exact per-rank byte accounting of the row-wise item tables and their fused optimizer state."""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZER_STATE_FLOATS = {
    "exact_sgd": (0, 0),
    "exact_rowwise_adagrad": (0, 1),
    "exact_adagrad": (1, 0),
    "adam": (2, 0),
    "partial_rowwise_adam": (1, 1),
}
"""Optimizer state per row as (floats per embedding element, floats per row), fp32 in FBGEMM."""


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds for the item tables (the most loaded rank under row-wise sharding)."""

    rows: int
    id_table: int
    id_optimizer: int
    text_table: int
    total: int


def row_wise_rank_memory(
    *, num_items: int, world_size: int, dim: int, text_dim: int, text_bytes: int, optimizer: str
) -> RankMemory:
    """Largest rank's bytes: ceil((num_items + 1) / world) rows of each table (row 0 = padding).

    The text table is frozen (stateless SGD at lr 0), so it carries no optimizer state.
    """
    if optimizer not in OPTIMIZER_STATE_FLOATS:
        raise ValueError(f"row_wise_rank_memory: unknown optimizer {optimizer!r}")
    rows = -(-(num_items + 1) // world_size)
    per_elem, per_row = OPTIMIZER_STATE_FLOATS[optimizer]
    id_table = rows * dim * 4
    id_opt = rows * (dim * per_elem + per_row) * 4
    text = rows * text_dim * text_bytes
    return RankMemory(
        rows=rows, id_table=id_table, id_optimizer=id_opt, text_table=text, total=id_table + id_opt + text
    )
