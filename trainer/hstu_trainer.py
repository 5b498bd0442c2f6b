"""HSTU training under torchrun: sharded item tables, pipelined steps, distributed evaluation, exact resume.

Randomness is a pure function of (seed, rank, step): dropout is reseeded before every step and negatives come
from a generator seeded per batch, so a run resumed from a checkpoint replays exactly the same steps even
though the train pipeline reads batches ahead.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from data_shards.batch import SequenceBatch
from data_shards.embedding_shards import load_embedding_rows, read_embedding_manifest
from data_shards.reader import NO_TRUNCATION, SequenceLoader
from modules.item_embedding import TEXT_TABLE
from sharding.model import local_rows, transform_text_table
from trainer.baselines import evaluate_popularity
from trainer.batch import ModelBatch, make_model_batch
from trainer.checkpoint import CheckpointManager
from trainer.config import JobConfig
from trainer.config_io import ConfigError, save_config
from trainer.distributed import (
    World,
    barrier,
    destroy_distributed,
    init_distributed,
    logger,
    maybe_inject_fault,
)
from trainer.evaluate import evaluate
from trainer.item_frequency import target_log_q
from trainer.model_setup import build_sharded_model, open_dataset
from trainer.monitor import Monitor, Throughput, check_finite_loss, memory_gib
from trainer.run_dir import claim_run_dir

FAULT_INJECTION_ENV = "HSTU_KILL_RANK_AT_STEP"
"""Testing aid: "RANK:STEP" makes that rank SIGKILL itself after STEP on a run's first attempt."""


def train(config: JobConfig) -> dict[str, Any]:
    """Train, evaluate and write `results.json`; the entry point of launch/train.py (under torchrun)."""
    world = init_distributed()
    trainer = None
    try:
        trainer = HSTUTrainer(config, world)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None  # nothing may hold the process groups past destroy_distributed
        destroy_distributed()


def step_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, rank, step...)."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


class HSTUTrainer:
    """Builds every component in a fixed order, then runs epochs of pipelined steps with evaluation."""

    def __init__(self, config: JobConfig, world: World) -> None:
        self.config = config
        self.world = world
        self.device = world.device

        # 1. run folder and resolved config
        self.run_dir = Path(config.run.output_root) / config.run.name
        claim_run_dir(self.run_dir, "train", is_main=world.is_main)
        if world.is_main:
            save_config(config, self.run_dir / "config.json")

        # 2. data: fail fast on anything that would waste the workers' time
        self.dataset_dir, self.manifest = open_dataset(config, world)
        self.num_items = int(self.manifest["num_items"])
        text_manifest = self._check_text_embeddings()
        self.protocol = config.data.split
        self.train_loader = self._loader("train", config.train.batch_size, config.data.max_seq_len)
        self.valid_loader: SequenceLoader | None = None
        if self.protocol == "loo3":
            self.valid_loader = self._loader("valid", config.eval.batch_size, NO_TRUNCATION)
        else:
            logger.info(
                "data.split=paper has no validation split: every train.epoch runs (no early stopping, no "
                "best-checkpoint selection) and the final model is tested"
            )
        self.test_loader = self._loader("test", config.eval.batch_size, NO_TRUNCATION)
        self.log_q_table: torch.Tensor | None = None
        if config.loss.kind == "in_batch":  # the logQ correction: each item's share of the training targets
            self.log_q_table = target_log_q(
                self.dataset_dir,
                num_items=self.num_items,
                max_seq_len=config.data.max_seq_len,
                protocol=self.protocol,
                world=world,
            )

        # 3. model: item tables on meta (DMP allocates only this rank's shard), dense layers seeded alike
        tokens = config.train.batch_size * config.data.max_seq_len
        self.dmp = build_sharded_model(config, world, num_items=self.num_items, batch_tokens=tokens)
        self.text_fit: dict[str, Any] | None = None
        if text_manifest is not None:
            self._load_text_rows()
            if config.model.text_transform != "none":
                self.text_fit = transform_text_table(self.dmp, config.model.text_transform)
                logger.info(
                    "text_transform=%s fitted over %d item vectors (catalog mean length %.3f)",
                    config.model.text_transform,
                    self.text_fit["num_vectors"],
                    self.text_fit["mean_norm"],
                )

        # 4. optimizers: fused row-wise updates of the ID table in backward; AdamW for dense parameters
        dense_params = dict(in_backward_optimizer_filter(self.dmp.named_parameters()))
        self.adamw = torch.optim.AdamW(
            list(dense_params.values()),
            lr=config.train.lr,
            betas=config.train.betas,
            weight_decay=config.train.weight_decay,
        )
        self.dense_optimizer = KeyedOptimizerWrapper(dense_params, lambda _: self.adamw)
        self.optimizer = CombinedOptimizer([self.dmp.fused_optimizer, self.dense_optimizer])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.adamw, self._lr_factor)
        self.grad_norm = float("nan")
        self.adamw.register_step_pre_hook(self._clip_gradients)

        # 5. checkpoints, monitoring and the train state they carry
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", world=world, keep_last=config.checkpoint.keep_last
        )
        self.monitor = Monitor(self.run_dir / "tensorboard", world=world, config=config.metrics)
        self.state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "step_in_epoch": 0,
            "best_metric": None,
            "best_epoch": None,
            "evals_since_best": 0,
            "history": [],
            "train_loss": [],
        }
        self._saved_step = -1
        self.meter = Throughput()
        self._in_flight: deque[tuple[int, int]] = deque()  # (sequences, tokens) of batches read ahead
        self.trained = {"steps": 0, "sequences": 0, "tokens": 0, "seconds": 0.0}
        resume = self.checkpoints.resolve_resume(config.checkpoint.resume)
        if resume is not None:
            self.dense_optimizer.init_state()  # AdamW state is lazy; DCP loads into existing tensors only
            self.state = self.checkpoints.load(resume, self._stateful())
            self.scheduler.load_state_dict(self.state.pop("scheduler"))
            self._apply_optimizer_config()
            self._saved_step = self.state["step"]
        logger.info(
            "dataset %s: %d users, %d items; world %d (%s); %d train batches/rank/epoch",
            self.dataset_dir,
            self.manifest["num_users"],
            self.num_items,
            world.world_size,
            world.backend,
            len(self.train_loader),
        )

    # ----------------------------------------------------------------------------------------- set-up

    def _check_text_embeddings(self) -> dict[str, Any] | None:
        cfg = self.config
        if cfg.model.fusion == "none":
            return None
        if not cfg.train.text_embeddings:
            raise ConfigError(
                f"model.fusion={cfg.model.fusion!r} needs train.text_embeddings: a folder written by "
                "launch/embed.py (or set model.fusion='none' for ID-only HSTU)"
            )
        manifest = read_embedding_manifest(cfg.train.text_embeddings, verify=False)
        if int(manifest["dim"]) != cfg.model.text_dim:
            raise ConfigError(
                f"{cfg.train.text_embeddings} holds {manifest['dim']}-d vectors but model.text_dim="
                f"{cfg.model.text_dim}; set model.text_dim={manifest['dim']}"
            )
        if int(manifest["num_items"]) != self.num_items:
            raise ConfigError(
                f"{cfg.train.text_embeddings} covers {manifest['num_items']} items but the dataset has "
                f"{self.num_items}: embed this dataset's items (launch/embed.py)"
            )
        return manifest

    def _loader(self, split: str, batch_size: int, max_seq_len: int) -> SequenceLoader:
        """Training reads shuffled, truncated histories; evaluation reads whole ones in order."""
        return SequenceLoader(
            self.dataset_dir,
            split=split,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            rank=self.world.rank,
            world_size=self.world.world_size,
            seed=self.config.run.seed,
            shuffle=split == "train",
            protocol=self.protocol,
        )

    @torch.no_grad()
    def _load_text_rows(self) -> None:
        """Fill this rank's row block of the frozen text table from the embedding shards."""
        block = local_rows(self.dmp, TEXT_TABLE)
        rows = load_embedding_rows(
            self.config.train.text_embeddings, block.start, block.start + block.weight.shape[0]
        )
        block.weight.copy_(torch.from_numpy(rows).to(block.weight.dtype))

    def _apply_optimizer_config(self) -> None:
        """After a resume: the checkpoint restores the optimizer's state, this run's config its settings.

        The loaded scheduler and param groups carry the first launch's lr, betas and weight decay, which
        would silently override a changed train.lr (e.g. `--resume auto train.lr=5e-4`).
        """
        cfg = self.config.train
        self.scheduler.base_lrs = [cfg.lr] * len(self.adamw.param_groups)
        lr = cfg.lr * self._lr_factor(self.scheduler.last_epoch)
        for group in self.adamw.param_groups:
            group.update(initial_lr=cfg.lr, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def _lr_factor(self, step: int) -> float:
        cfg = self.config.train
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        total = cfg.max_steps or cfg.epochs * max(len(self.train_loader), 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _clip_gradients(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.config.train.grad_clip or float("inf")
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _stateful(self) -> dict[str, Any]:
        return {"model": self.dmp, "optimizer": self.optimizer}

    # --------------------------------------------------------------------------------------- batches

    def _model_batches(
        self, batches: Iterator[SequenceBatch], *, epoch: int, first: int
    ) -> Iterator[ModelBatch]:
        """Reader batches -> model batches; negatives seeded by (seed, rank, epoch, batch index)."""
        cfg = self.config
        needs_negatives = cfg.loss.kind == "sampled_softmax"
        for index, batch in enumerate(batches, start=first):
            self._in_flight.append((int(batch.weights.sum()), int(batch.lengths.sum())))
            generator = torch.Generator().manual_seed(step_seed(cfg.run.seed, self.world.rank, epoch, index))
            yield make_model_batch(
                batch,
                num_items=self.num_items,
                num_negatives=cfg.loss.num_negatives if needs_negatives else 0,
                share_negatives=cfg.loss.share_negatives,
                with_text=cfg.model.fusion != "none",
                generator=generator,
                log_q_table=self.log_q_table,
            )

    def _eval_batch(self, batch: SequenceBatch) -> ModelBatch:
        return make_model_batch(
            batch,
            num_items=self.num_items,
            num_negatives=0,
            share_negatives=True,
            with_text=self.config.model.fusion != "none",
            generator=None,
        )

    # ------------------------------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        cfg = self.config
        start = time.perf_counter()
        stop = self._training_ended()
        while self.state["epoch"] < cfg.train.epochs and not stop:
            epoch = self.state["epoch"]
            stop = self._train_epoch(epoch)
            epoch_done = self.state["step_in_epoch"] >= len(self.train_loader)
            if epoch_done:
                self.state["epoch"] += 1
                self.state["step_in_epoch"] = 0
            last = stop or self.state["epoch"] >= cfg.train.epochs
            due = (epoch_done and self.state["epoch"] % cfg.eval.every_epochs == 0) or last
            if due and self.valid_loader is not None:
                stop = self._validate(epoch) or stop
            self._save_step_checkpoint()
        train_seconds = time.perf_counter() - start
        return self._finish(train_seconds)

    def _training_ended(self) -> bool:
        """True when the state (a resumed run's) says training is over: max_steps reached or early-stopped.

        Decided from the current config, so raising train.max_steps or eval.patience continues the run.
        """
        cfg = self.config
        reached = bool(cfg.train.max_steps) and self.state["step"] >= cfg.train.max_steps
        stopped = bool(cfg.eval.patience) and self.state["evals_since_best"] >= cfg.eval.patience
        if reached or stopped:
            logger.info(
                "training already ended at step %d (%s); testing",
                self.state["step"],
                "train.max_steps reached" if reached else "early stopping",
            )
        return reached or stopped

    def _train_epoch(self, epoch: int) -> bool:
        """One (possibly resumed) epoch of pipelined steps; True when train.max_steps is reached.

        With train.max_steps the pipeline is fed exactly the steps left, so it drains like at an epoch's end
        and leaves no input all-to-all of an untrained batch in flight (un-waited collectives at exit).
        """
        cfg = self.config
        first = self.state["step_in_epoch"]
        self.train_loader.set_epoch(epoch)
        self.train_loader.load_state_dict({"epoch": epoch, "batches_yielded": first})
        batches = self._model_batches(iter(self.train_loader), epoch=epoch, first=first)
        if cfg.train.max_steps:
            batches = itertools.islice(batches, max(cfg.train.max_steps - self.state["step"], 0))
        pipeline = TrainPipelineSparseDist(self.dmp, self.optimizer, self.device)
        self.dmp.train()
        self.meter = Throughput()
        self._in_flight.clear()
        progress = tqdm(
            total=len(self.train_loader),
            initial=first,
            desc=f"epoch {epoch}",
            disable=not self.world.is_main,
            leave=False,
        )
        start = time.perf_counter()
        try:
            while True:
                torch.manual_seed(step_seed(cfg.run.seed, self.world.rank, self.state["step"]))
                try:
                    loss = pipeline.progress(batches)
                except StopIteration:
                    break
                self.scheduler.step()
                sequences, tokens = self._in_flight.popleft()
                self.meter.add(sequences=sequences, tokens=tokens)
                self.trained["sequences"] += sequences
                self.trained["tokens"] += tokens
                self.trained["steps"] += 1
                self.state["step"] += 1
                self.state["step_in_epoch"] += 1
                progress.update(1)
                self._after_step(loss)
        finally:
            pipeline.detach()
            progress.close()
            self.trained["seconds"] += time.perf_counter() - start
        return bool(cfg.train.max_steps) and self.state["step"] >= cfg.train.max_steps

    def _after_step(self, loss: Tensor) -> None:
        cfg = self.config
        step = self.state["step"]
        if step % cfg.metrics.log_every_steps == 0:
            value = float(loss)
            check_finite_loss(value, step, self.device)
            sequences_per_s, tokens_per_s = self.meter.rate()
            self.state["train_loss"].append([step, value])
            self.monitor.scalars(
                step,
                {
                    "train/loss": value,
                    "train/lr": self.adamw.param_groups[0]["lr"],
                    "train/grad_norm": self.grad_norm,
                    "perf/sequences_per_s": sequences_per_s * self.world.world_size,
                    "perf/tokens_per_s": tokens_per_s * self.world.world_size,
                    "perf/memory_gib": memory_gib(self.device),
                },
            )
        if cfg.checkpoint.interval_steps and step % cfg.checkpoint.interval_steps == 0:
            self._save_step_checkpoint()
        maybe_inject_fault(FAULT_INJECTION_ENV, self.world.rank, step)

    def _save_step_checkpoint(self) -> None:
        if self._saved_step == self.state["step"]:
            return
        self._saved_step = self.state["step"]
        self._save(CheckpointManager.step_name(self.state["step"]))

    def _save(self, name: str) -> None:
        train_state = {**self.state, "scheduler": self.scheduler.state_dict()}
        self.checkpoints.save(name, self._stateful(), train_state)

    def _evaluate(self, loader: SequenceLoader) -> dict[str, float]:
        self.dmp.eval()
        try:
            return evaluate(
                self.dmp.module,
                loader,
                to_model_batch=self._eval_batch,
                device=self.device,
                ks=self.config.eval.ks,
                max_seq_len=self.config.data.max_seq_len,
                show_progress=self.world.is_main,
                total=len(loader),
            )
        finally:
            self.dmp.train()

    def _validate(self, epoch: int) -> bool:
        """Evaluate on validation, keep the best checkpoint; True when early stopping ends training."""
        cfg = self.config.eval
        metrics = self._evaluate(self.valid_loader)
        self.state["history"].append({"epoch": epoch, "step": self.state["step"], **metrics})
        self.monitor.scalars(self.state["step"], {f"valid/{k}": v for k, v in metrics.items()})
        value = metrics[cfg.metric]
        best = self.state["best_metric"]
        logger.info(
            "epoch %d step %d: valid %s = %.4f (best %s)",
            epoch,
            self.state["step"],
            cfg.metric,
            value,
            "-" if best is None else f"{best:.4f}",
        )
        self._saved_step = -1  # a step checkpoint taken before this evaluation must be rewritten with it
        if best is None or value > best:
            self.state.update(best_metric=value, best_epoch=epoch, evals_since_best=0)
            self._save("best")
            return False
        self.state["evals_since_best"] += 1
        return bool(cfg.patience) and self.state["evals_since_best"] >= cfg.patience

    def _finish(self, train_seconds: float) -> dict[str, Any]:
        """Test with the best checkpoint, add the popularity baseline, write results.json and hparams."""
        cfg = self.config
        best = self.checkpoints.folder / "best"
        if (best / "train_state.json").is_file():
            final_state = dict(self.state)
            self.checkpoints.load(best, self._stateful())
            self.state = final_state
        test = self._evaluate(self.test_loader)
        popularity = None
        if self.world.is_main:
            popularity = evaluate_popularity(
                self.dataset_dir,
                num_items=self.num_items,
                split="test",
                protocol=self.protocol,
                ks=cfg.eval.ks,
            )
        barrier()
        results = {
            "run": cfg.run.name,
            "dataset": str(self.dataset_dir),
            "world_size": self.world.world_size,
            "steps": self.state["step"],
            "epochs": self.state["epoch"],
            "best_epoch": self.state["best_epoch"],
            "best_valid": self.state["best_metric"],
            "valid_metric": cfg.eval.metric,
            "text_transform_fit": self.text_fit,
            "test": test,
            "popularity_test": popularity,
            "train_seconds": train_seconds,
            "throughput": self._throughput(),
            "history": self.state["history"],
            "train_loss": self.state["train_loss"],
        }
        if self.world.is_main:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            self.monitor.scalars(self.state["step"], {f"test/{k}": v for k, v in test.items()})
            self.monitor.hparams(_hparams(cfg), test)
            logger.info("test: %s", _format_metrics(test))
            logger.info("popularity baseline test: %s", _format_metrics(popularity))
            logger.info("results: %s", self.run_dir / "results.json")
        return results

    def _throughput(self) -> dict[str, float]:
        """Training speed of this launch, summed over ranks (evaluation and checkpoint time excluded).

        The reduced tensors live on the trainer's device: NCCL has no CPU collectives.
        """
        counts = [self.trained["sequences"], self.trained["tokens"]]
        totals = torch.tensor(counts, dtype=torch.float64, device=self.device)
        seconds = torch.tensor([self.trained["seconds"]], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(totals)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        sequences, tokens = totals.tolist()
        elapsed = max(seconds.item(), 1e-9)
        return {
            "steps_per_s": self.trained["steps"] / elapsed,
            "sequences_per_s": sequences / elapsed,
            "tokens_per_s": tokens / elapsed,
        }

    def close(self) -> None:
        self.monitor.close()


def _hparams(cfg: JobConfig) -> dict[str, Any]:
    return {
        "dataset": cfg.data.name,
        "fusion": cfg.model.fusion,
        "text_transform": cfg.model.text_transform,
        "embedding_dim": cfg.model.embedding_dim,
        "num_blocks": cfg.model.num_blocks,
        "num_heads": cfg.model.num_heads,
        "dropout": cfg.model.dropout,
        "lr": cfg.train.lr,
        "sparse_lr": cfg.sharding.learning_rate,
        "batch_size": cfg.train.batch_size,
        "num_negatives": cfg.loss.num_negatives,
        "loss": cfg.loss.kind,
        "precision": cfg.train.precision,
    }


def _format_metrics(metrics: dict[str, float] | None) -> str:
    return "" if metrics is None else " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
