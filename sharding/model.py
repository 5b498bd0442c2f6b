"""Turn a plain GenerativeRecommender into a DistributedModelParallel with row-wise item tables.

The ID table trains with a fused optimizer inside backward; the text table gets SGD with learning rate 0
and never receives a gradient (its rows are detached in modules/item_embedding.py), so it stays
bit-identical. `local_rows` exposes this rank's contiguous row block of a table for loading frozen text
vectors and for scoring the catalog shard by shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from modules.config import TextTransform
from modules.item_embedding import ID_TABLE, TEXT_TABLE, ItemEmbedding
from modules.text_transform import apply_text_transform, fit_text_transform, text_moments
from sharding.config import CPU_FUSED_OPTIMIZERS, ShardingConfig
from sharding.planner import default_topology, make_plan, sharders


def _optimizer(config: ShardingConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    from torchrec.optim import SGD, Adagrad, Adam, PartialRowWiseAdam

    lr, eps, wd = config.learning_rate, config.eps, config.weight_decay
    return {
        "exact_rowwise_adagrad": (RowWiseAdagrad, {"lr": lr, "eps": eps, "weight_decay": wd}),
        "exact_adagrad": (Adagrad, {"lr": lr, "eps": eps, "weight_decay": wd}),
        "exact_sgd": (SGD, {"lr": lr}),
        "adam": (Adam, {"lr": lr, "eps": eps, "weight_decay": wd}),
        "partial_rowwise_adam": (PartialRowWiseAdam, {"lr": lr, "eps": eps, "weight_decay": wd}),
    }[config.optimizer]


def _item_embedding(model: nn.Module) -> ItemEmbedding:
    found = [m for m in model.modules() if isinstance(m, ItemEmbedding)]
    if len(found) != 1:
        raise ValueError(f"shard_model: expected exactly one ItemEmbedding in the model, found {len(found)}")
    return found[0]


def shard_model(
    model: nn.Module,
    config: ShardingConfig,
    *,
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
    batch_tokens: int | None = None,
) -> DistributedModelParallel:
    """DMP over `model`: item tables row-wise sharded with fused optimizers; dense parts data-parallel.

    Call after `dist.init_process_group`; the model may live on `meta`. On CPU only
    exact_rowwise_adagrad, exact_adagrad and exact_sgd are available (FBGEMM's CPU TBE).
    """
    if device.type == "cpu" and config.optimizer not in CPU_FUSED_OPTIMIZERS:
        raise ValueError(
            f"sharding.optimizer={config.optimizer!r} has no CPU kernel in FBGEMM; on CPU use one of "
            f"{', '.join(CPU_FUSED_OPTIMIZERS)}"
        )
    pg = pg or dist.group.WORLD
    items = _item_embedding(model)
    opt_cls, opt_kwargs = _optimizer(config)
    apply_optimizer_in_backward(opt_cls, items.id_collection.parameters(), opt_kwargs)
    if items.text_collection is not None:
        from torchrec.optim import SGD

        # The text table has requires_grad=False (no backward hook possible); tell the sharder directly
        # to give its TBE stateless SGD at lr 0, so it holds no optimizer state and could never move.
        for param in items.text_collection.parameters():
            param._optimizer_classes = [SGD]
            param._optimizer_kwargs = [{"lr": 0.0}]
    world = dist.get_world_size(pg)
    local = int(torch.cuda.device_count()) if device.type == "cuda" else world
    topology = default_topology(config, device, world, min(local, world) or world)
    plan = make_plan(model, config, topology=topology, pg=pg, batch_tokens=batch_tokens)
    return DistributedModelParallel(
        module=model, device=device, plan=plan, sharders=sharders(), env=ShardingEnv.from_process_group(pg)
    )


@dataclass
class LocalRows:
    """This rank's contiguous block of a table: ids [start, start + weight.shape[0])."""

    start: int
    weight: Tensor


def local_rows(model: nn.Module, table: str) -> LocalRows:
    """A writable view of this rank's rows of `table` (ID_TABLE or TEXT_TABLE); unsharded: all rows.

    Row-wise sharding (the only kind shard_model plans) gives each rank one contiguous block of whole rows.
    """
    if table not in (ID_TABLE, TEXT_TABLE):
        raise ValueError(f"local_rows: table must be {ID_TABLE!r} or {TEXT_TABLE!r}, got {table!r}")
    for name, value in model.state_dict(keep_vars=True).items():
        if not name.endswith(f"embeddings.{table}.weight"):
            continue
        if isinstance(value, torch.distributed._shard.sharded_tensor.ShardedTensor):
            shards = value.local_shards()
            assert len(shards) == 1 and shards[0].tensor.shape[1] == value.size(1), f"{table} is not row-wise"
            shard = shards[0]
            return LocalRows(start=int(shard.metadata.shard_offsets[0]), weight=shard.tensor)
        return LocalRows(start=0, weight=value.data if isinstance(value, nn.Parameter) else value)
    raise ValueError(f"local_rows: no table {table!r} in the model (fusion='none' has no text table)")


@torch.no_grad()
def local_item_vectors(model: nn.Module) -> tuple[int, Tensor]:
    """(start, fused vectors [n, d]) of the item ids this rank holds, for catalog scoring."""
    items = _item_embedding(model)
    id_rows = local_rows(model, ID_TABLE)
    text = local_rows(model, TEXT_TABLE).weight if items.text_collection is not None else None
    if text is not None and local_rows(model, TEXT_TABLE).start != id_rows.start:
        raise ValueError("local_item_vectors: ID and text tables are sharded over different row ranges")
    ids = torch.arange(id_rows.start, id_rows.start + id_rows.weight.shape[0], device=id_rows.weight.device)
    return id_rows.start, items.fuse(id_rows.weight.float(), text, ids)


@torch.no_grad()
def transform_text_table(model: nn.Module, mode: TextTransform, pg: dist.ProcessGroup | None = None) -> dict:
    """Center or whiten the frozen text table in place, fitted over all ranks' rows (modules/text_transform).

    Moments are summed over the world; rank 0 fits the transform and broadcasts it, so every rank applies
    exactly the same one to its own block. Returns {num_vectors, mean_norm} of the raw table for the log.
    """
    block = local_rows(model, TEXT_TABLE)
    moments = text_moments(block.weight, with_outer=mode == "whiten")
    sums = [moments.count, moments.total] + ([moments.outer] if moments.outer is not None else [])
    for tensor in sums:
        dist.all_reduce(tensor, group=pg)
    if moments.count < 2:  # checked on every rank, before rank 0 fits, so no rank waits in broadcast
        raise ValueError(
            f"model.text_transform={mode!r} needs at least 2 items with a non-zero text vector, the table "
            f"has {int(moments.count)}; check the embeddings, or set model.text_transform='none'"
        )
    dim, device = block.weight.shape[1], block.weight.device
    mean = torch.zeros(dim, dtype=torch.float64, device=device)
    matrix = torch.zeros(dim, dim, dtype=torch.float64, device=device) if mode == "whiten" else None
    if dist.get_rank(pg) == 0:
        fitted_mean, fitted_matrix = fit_text_transform(moments, mode)
        mean.copy_(fitted_mean)
        if matrix is not None:
            matrix.copy_(fitted_matrix)
    src = dist.get_global_rank(pg, 0) if pg is not None else 0
    for tensor in [mean] + ([matrix] if matrix is not None else []):
        dist.broadcast(tensor, src=src, group=pg)
    block.weight.copy_(apply_text_transform(block.weight, mean, matrix))
    return {"num_vectors": int(moments.count), "mean_norm": float(mean.norm())}
