"""Typed config section owned by sharding/: `[sharding]` (how TorchRec shards and updates the item tables)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.config_io import ConfigError

FusedOptimizer = Literal[
    "exact_rowwise_adagrad", "exact_adagrad", "exact_sgd", "adam", "partial_rowwise_adam"
]
CPU_FUSED_OPTIMIZERS = ("exact_rowwise_adagrad", "exact_adagrad", "exact_sgd")
"""FBGEMM's CPU TBE implements only these; ADAM asserts 'not supported in CPU mode' (see STACK.md)."""


@dataclass(kw_only=True)
class ShardingConfig:
    """Item-table sharding (TorchRec) and the fused optimizer that updates the ID table in backward."""

    sharding_type: str = "row_wise"
    """How both item tables are split across ranks: only row_wise, whose contiguous row block per rank is
    what evaluation and recommendation score the catalog from (and it scales to catalogs no rank holds)."""
    optimizer: FusedOptimizer = "exact_rowwise_adagrad"
    """Fused optimizer of the ID table; on CPU only exact_rowwise_adagrad, exact_adagrad, exact_sgd."""
    learning_rate: float = 0.05
    """Learning rate of the fused ID-table optimizer (retune: it is not the dense AdamW rate)."""
    eps: float = 1e-8
    """Epsilon of the fused Adagrad/Adam optimizer."""
    weight_decay: float = 0.0
    """Weight decay of the fused ID-table optimizer."""
    text_dtype: Literal["fp32", "fp16"] = "fp32"
    """Storage dtype of the frozen text table (fp16 halves its memory where the backend supports it)."""
    hbm_gb: float | None = None
    """Memory per rank the planner may use (GiB); None: the GPU's total, or on CPU the host's memory
    shared evenly by the node's ranks."""

    def __post_init__(self) -> None:
        if self.sharding_type != "row_wise":
            raise ConfigError(
                f"sharding.sharding_type={self.sharding_type!r} is not supported: evaluation and "
                "recommendation score the catalog from each rank's contiguous block of rows, which only "
                "row-wise sharding gives; set sharding.sharding_type='row_wise' (or leave it out)"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"sharding.learning_rate must be > 0, got {self.learning_rate}")
        if not self.eps > 0:
            raise ConfigError(f"sharding.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"sharding.weight_decay must be >= 0, got {self.weight_decay}")
        if self.hbm_gb is not None and not self.hbm_gb > 0:
            raise ConfigError(f"sharding.hbm_gb must be > 0 or omitted, got {self.hbm_gb}")
