"""plan.py dry run: the 32-GPU full-catalog case plans row-wise fused tables and fits per-rank memory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sharding.memory import row_wise_rank_memory

ROOT = Path(__file__).resolve().parents[1]


def test_memory_accounting_is_exact():
    mem = row_wise_rank_memory(
        num_items=9, world_size=4, dim=8, text_dim=6, text_bytes=2, optimizer="exact_rowwise_adagrad"
    )
    assert mem.rows == 3  # ceil(10 / 4)
    assert (mem.id_table, mem.id_optimizer, mem.text_table) == (3 * 8 * 4, 3 * 4, 3 * 6 * 2)


def test_plan_32_gpu_full_catalog_fits(capsys):
    spec = importlib.util.spec_from_file_location("plan", ROOT / "launch" / "plan.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    rc = plan.main(
        [
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--hbm-gb",
            "80",
            "--items",
            "48200000",
            "--dim",
            "256",
            "--text-dim",
            "768",
            "--text-dtype",
            "fp16",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "item_id_table: row_wise / fused, 32 shards" in out
    assert "item_text_table: row_wise / fused, 32 shards" in out
    result = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
    assert result["fits"] == "1" and int(result["rows_per_rank"]) == -(-48200001 // 32)
    assert int(result["rank_bytes"]) < 80 * 1024**3
