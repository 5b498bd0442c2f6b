"""What training and recommendation build alike: the checked dataset and the sharded recommender."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchrec.distributed import DistributedModelParallel

from data_shards.manifest import load_manifest
from modules.model import GenerativeRecommender
from sharding.model import shard_model
from trainer.config import JobConfig
from trainer.config_io import ConfigError
from trainer.distributed import World
from trainer.train_module import RecommenderTrain


def open_dataset(config: JobConfig, world: World) -> tuple[Path, dict[str, Any]]:
    """(dataset folder, manifest), failing fast on anything that would waste the workers' time."""
    dataset_dir = Path(config.data.root) / config.data.name
    if not (dataset_dir / "manifest.json").is_file():
        raise ConfigError(
            f"no dataset at {dataset_dir}: run `python launch/prepare.py --config <this config>` first"
        )
    manifest = load_manifest(dataset_dir)
    num_shards = len(manifest["shards"]["sequences"])
    if num_shards < world.world_size:
        raise ConfigError(
            f"{dataset_dir} has {num_shards} sequence shards but the job has {world.world_size} ranks: "
            "every rank needs a shard; re-run prepare.py with a smaller data.users_per_shard"
        )
    if config.model.max_seq_len != config.data.max_seq_len:
        raise ConfigError(
            f"model.max_seq_len={config.model.max_seq_len} differs from data.max_seq_len="
            f"{config.data.max_seq_len}; set both to the same history length"
        )
    return dataset_dir, manifest


def build_sharded_model(
    config: JobConfig, world: World, *, num_items: int, batch_tokens: int
) -> DistributedModelParallel:
    """The recommender with its loss, item tables row-sharded over the world (only this rank's rows exist).

    Dense layers are initialised from `run.seed`, so every rank starts from the same weights.
    """
    torch.manual_seed(config.run.seed)
    model = GenerativeRecommender(
        num_items=num_items,
        config=config.model,
        device=torch.device("meta"),
        text_fp16=config.sharding.text_dtype == "fp16",
    )
    precision = config.train.precision
    bf16 = precision == "bf16" or (precision == "auto" and world.device.type == "cuda")
    task = RecommenderTrain(model, config.loss, autocast_dtype=torch.bfloat16 if bf16 else None)
    return shard_model(task, config.sharding, device=world.device, batch_tokens=batch_tokens)
