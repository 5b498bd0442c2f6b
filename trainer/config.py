"""The job's config tree: one typed section per component, loaded from `launch/configs/*.toml`.

Each section's dataclass lives with the component that owns it; this module only composes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_shards.config import DataConfig
from modules.config import LossConfig, ModelConfig
from sharding.config import ShardingConfig
from trainer.blair_config import BlairConfig, EmbedConfig
from trainer.checkpoint import CheckpointConfig
from trainer.config_io import ConfigError
from trainer.monitor import MetricsConfig
from trainer.train_config import EvalConfig, RecommendConfig, TrainConfig


@dataclass(kw_only=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = "run"
    """Run name; outputs go to `<output_root>/<name>`."""
    output_root: str = "runs"
    """Folder that holds one sub-folder per run (checkpoints, TensorBoard events, results, config)."""
    seed: int = 42
    """Seed for model init, data order and negative sampling."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name must be a non-empty folder name, got {self.name!r}")


@dataclass(kw_only=True)
class JobConfig:
    """Every section a job may read; each entry point uses the ones it needs."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    blair: BlairConfig = field(default_factory=BlairConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
