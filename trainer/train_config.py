"""Config sections of the HSTU training loop ([train]), its evaluation ([eval]) and serving ([recommend])."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trainer.config_io import ConfigError


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation of the dense (data-parallel) part and the length of training."""

    epochs: int = 100
    """Upper bound on epochs; early stopping on validation usually ends the run first."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: no limit). Handy for smoke runs and tests."""
    batch_size: int = 128
    """Sequences per rank per step."""
    lr: float = 1e-3
    """AdamW learning rate of the dense parameters (HSTU layers, projections, position embeddings)."""
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up of the dense learning rate."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Dense learning-rate schedule after warm-up (cosine decays to 10% over the run's step budget)."""
    grad_clip: float = 1.0
    """Clip the dense gradient norm to this value (0: no clipping). Fused sparse updates are not clipped."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Dense compute: bf16 autocast (fp32 master weights) or fp32; auto = bf16 on CUDA, fp32 on CPU."""
    text_embeddings: str = ""
    """Item-embedding shards (from launch/embed.py) for the frozen text table; needed unless fusion = none."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("train.epochs must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if self.max_steps < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("train.max_steps, train.warmup_steps and train.grad_clip must be >= 0")


@dataclass(kw_only=True)
class EvalConfig:
    """Full-catalog evaluation: when, how big, which metrics, and early stopping.

    Validation needs data.split=loo3; under `paper` there is none, so every epoch trains and the final
    model is tested. Each user's whole history is left out of the ranking.
    """

    every_epochs: int = 1
    """Evaluate on the validation split every this many epochs (and after the last epoch)."""
    batch_size: int = 256
    """Users per rank per evaluation batch."""
    ks: list[int] = field(default_factory=lambda: [10, 50, 200])
    """Cut-offs for HR@K and NDCG@K."""
    metric: str = "ndcg@10"
    """Validation metric that picks the best epoch and drives early stopping."""
    patience: int = 10
    """Stop after this many evaluations without improvement (0: never stop early)."""

    def __post_init__(self) -> None:
        if self.every_epochs < 1 or self.batch_size < 1:
            raise ConfigError("eval.every_epochs and eval.batch_size must be >= 1")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("eval.ks must list cut-offs >= 1")
        known = {"mrr"} | {f"{m}@{k}" for m in ("hr", "ndcg") for k in self.ks}
        if self.metric not in known:
            raise ConfigError(f"eval.metric={self.metric!r} is not one of {sorted(known)}")
        if self.patience < 0:
            raise ConfigError("eval.patience must be >= 0")


@dataclass(kw_only=True)
class RecommendConfig:
    """Top-K lists for every user of a trained run (launch/recommend.py)."""

    k: int = 10
    """Items recommended per user."""
    checkpoint: str = "best"
    """`best` (the best validation epoch), `latest` (the newest step checkpoint) or a checkpoint folder."""
    exclude_history: bool = True
    """Leave out items the user already interacted with (false: repeat consumption is allowed)."""
    batch_size: int = 256
    """Users per rank per scoring batch."""
    output_dir: str = ""
    """Where the Parquet parts and manifest go; empty = `<run>/recommendations`. Replaced atomically."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.batch_size < 1:
            raise ConfigError("recommend.k and recommend.batch_size must be >= 1")
        if not self.checkpoint:
            raise ConfigError("recommend.checkpoint must be best, latest or a checkpoint folder")
