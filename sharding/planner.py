"""Constraints, sharders, topology and the TorchRec sharding plan for the two item tables."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from modules.item_embedding import ID_TABLE, TEXT_TABLE
from sharding.config import ShardingConfig

GIB = 1024**3

FUSED_KERNEL = EmbeddingComputeKernel.FUSED.value
"""The only kernel that works for sequence tables on CPU (the dense CPU TBE ignores PoolingMode.NONE)."""


def table_constraints(
    config: ShardingConfig, *, batch_tokens: int | None = None
) -> dict[str, ParameterConstraints]:
    """Both item tables: row-wise (the only type allowed), fused kernel (else the planner picks dense)."""
    kwargs = {}
    if batch_tokens is not None:
        kwargs["batch_sizes"] = [batch_tokens]
    return {
        name: ParameterConstraints(
            sharding_types=[config.sharding_type], compute_kernels=[FUSED_KERNEL], **kwargs
        )
        for name in (ID_TABLE, TEXT_TABLE)
    }


def sharders() -> list[ModuleSharder[nn.Module]]:
    """One EmbeddingCollection sharder; per-table optimizers come from `apply_optimizer_in_backward`."""
    return [EmbeddingCollectionSharder()]


def make_topology(
    *,
    world_size: int,
    local_world_size: int,
    compute_device: str,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
) -> Topology:
    """Planner topology for CPU (gloo: memory is 'ddr' to the planner) or GPU (per-rank hbm_cap)."""
    if compute_device not in ("cpu", "cuda"):
        raise ValueError(f"make_topology: compute_device must be 'cpu' or 'cuda', got {compute_device!r}")
    kwargs = {}
    if hbm_gb is not None:
        kwargs["hbm_cap"] = int(hbm_gb * GIB)
    if ddr_gb is not None:
        kwargs["ddr_cap"] = int(ddr_gb * GIB)
    return Topology(
        world_size=world_size, local_world_size=local_world_size, compute_device=compute_device, **kwargs
    )


def make_plan(
    module: nn.Module,
    config: ShardingConfig,
    *,
    topology: Topology,
    pg: dist.ProcessGroup | None = None,
    batch_tokens: int | None = None,
) -> ShardingPlan:
    """The sharding plan: collective (identical on every rank) when a process group is given."""
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=table_constraints(config, batch_tokens=batch_tokens)
    )
    if pg is not None:
        return planner.collective_plan(module, sharders(), pg)
    return planner.plan(module, sharders())


def rank_memory_gb(device: torch.device, local_world_size: int) -> float:
    """Memory one rank has: its GPU's total on CUDA; on CPU, the host's physical memory split evenly
    among the node's `local_world_size` ranks (TorchRec's 'ddr' capacity is per rank)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host / max(local_world_size, 1) / GIB


def default_topology(config: ShardingConfig, device: torch.device, world_size: int, local_world_size: int):
    """Topology for a real run on `device`, each rank capped at sharding.hbm_gb or else its own memory
    (`rank_memory_gb`): HBM on CUDA, host memory ('ddr' to the planner) on CPU."""
    memory_gb = config.hbm_gb if config.hbm_gb is not None else rank_memory_gb(device, local_world_size)
    if device.type == "cuda":
        return make_topology(
            world_size=world_size, local_world_size=local_world_size, compute_device="cuda", hbm_gb=memory_gb
        )
    return make_topology(
        world_size=world_size, local_world_size=local_world_size, compute_device="cpu", ddr_gb=memory_gb
    )
