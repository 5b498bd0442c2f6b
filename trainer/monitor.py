"""Training telemetry: throughput/memory meters and a TensorBoard writer owned by rank 0."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.config_io import ConfigError
from trainer.distributed import World


@dataclass(kw_only=True)
class MetricsConfig:
    """What goes to TensorBoard and how often."""

    log_every_steps: int = 10
    """Write training scalars (loss, lr, grad norm, throughput, memory) every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under `<run>/tensorboard`."""

    def __post_init__(self) -> None:
        if self.log_every_steps < 1:
            raise ConfigError("metrics.log_every_steps must be >= 1")


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite on some rank."""


def check_finite_loss(loss: float, step: int, device: torch.device) -> None:
    """Stop every rank together once any rank's loss is NaN or infinite, instead of training on."""
    finite = torch.tensor([1.0 if math.isfinite(loss) else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1.0:
        raise TrainingDiverged(
            f"the training loss is not finite at step {step} (this rank: {loss}): the model diverged; lower "
            "train.lr or sharding.learning_rate, set train.grad_clip, or train in fp32 (train.precision)"
        )


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Throughput:
    """Sequences and tokens per second over the window since the last `rate()` call."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._sequences = 0
        self._tokens = 0

    def add(self, *, sequences: int, tokens: int) -> None:
        self._sequences += sequences
        self._tokens += tokens

    def rate(self) -> tuple[float, float]:
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        rates = self._sequences / elapsed, self._tokens / elapsed
        self._start, self._sequences, self._tokens = now, 0, 0
        return rates


class Monitor:
    """Writes scalars and hparams to TensorBoard from rank 0; other ranks do nothing."""

    def __init__(self, folder: Path, *, world: World, config: MetricsConfig) -> None:
        self._writer = None
        if world.is_main and config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self._writer is None:
            return
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()}
        self._writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
