"""plan.py dry run: the 32-GPU full-catalog case plans row-wise fused tables and fits per-rank memory;
the memory a real run plans with; the sharding types a run accepts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from sharding.config import ShardingConfig
from sharding.memory import row_wise_rank_memory
from sharding.planner import GIB, default_topology
from trainer.config_io import ConfigError

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


def test_cpu_run_plans_with_its_share_of_host_memory_or_hbm_gb():
    """sharding.hbm_gb unset on CPU: each of a node's ranks gets an even share of the host's memory as the
    planner's 'ddr' capacity (not TorchRec's 128 GiB default); set: that many GiB per rank."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = torch.device("cpu")
    topology = default_topology(ShardingConfig(), cpu, world_size=4, local_world_size=2)
    assert [d.storage.ddr for d in topology.devices] == pytest.approx([host / 2] * 4, abs=1)
    topology = default_topology(ShardingConfig(hbm_gb=1.5), cpu, world_size=2, local_world_size=2)
    assert [d.storage.ddr for d in topology.devices] == [int(1.5 * GIB)] * 2


def test_only_row_wise_sharding_is_accepted():
    """Evaluation scores the catalog from each rank's row block: other types fail when the config loads."""
    assert ShardingConfig(sharding_type="row_wise").sharding_type == "row_wise"
    for other in ("table_wise", "column_wise"):
        with pytest.raises(
            ConfigError, match=rf"sharding\.sharding_type='{other}' is not supported.*row_wise"
        ):
            ShardingConfig(sharding_type=other)
