"""Top-K recommendations for every user of a trained run, scored over the row-sharded catalog.

Every rank reads its users' whole histories, encodes the most recent `max_seq_len` items with the run's
checkpoint, and joins a distributed top-K: queries are all-gathered, each rank ranks only its own catalog
rows, and the per-rank lists merge deterministically, so no rank ever holds the catalog. Each rank then
writes its own users' lists, in original user and item ids, as one Parquet part; the folder appears
atomically with `_manifest.json`. The model's shape comes from the run's saved `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data_shards.batch import SequenceBatch
from data_shards.id_maps import read_id_map
from data_shards.prepare import publish_folder
from data_shards.reader import SequenceLoader
from modules.jagged import offsets_from_lengths
from sharding.model import local_item_vectors
from sharding.retrieval import distributed_topk
from trainer.batch import make_model_batch
from trainer.checkpoint import TRAIN_STATE_FILE, CheckpointManager
from trainer.config import JobConfig
from trainer.config_io import ConfigError, from_dict
from trainer.distributed import World, barrier, destroy_distributed, init_distributed, logger
from trainer.evaluate import all_gather_rows
from trainer.model_setup import build_sharded_model, open_dataset
from trainer.run_dir import run_dir_owner

TRAINED_SECTIONS = ("data", "model", "sharding")
"""Sections taken from the trained run: they fix the dataset and the model's shape."""
SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("user_index", pa.int64()),
        ("items", pa.list_(pa.string())),
        ("item_indices", pa.list_(pa.int64())),
        ("scores", pa.list_(pa.float32())),
    ]
)
MANIFEST = "_manifest.json"
"""Underscore-prefixed, so `pyarrow.parquet.read_table(folder)` and pandas read the parts and skip it."""


def recommend(config: JobConfig) -> dict[str, Any]:
    """Write `<output>/part-RRRRR.parquet` (one per rank) and `_manifest.json` (launch/recommend.py)."""
    world = init_distributed()
    try:
        return Recommender(config, world).run()
    finally:
        destroy_distributed()


def trained_config(config: JobConfig, run_dir: Path) -> JobConfig:
    """This job's config with the data, model and sharding sections of the run's saved `config.json`."""
    path = run_dir / "config.json"
    owner = run_dir_owner(run_dir)
    if owner not in (None, "train"):
        raise ConfigError(f"{run_dir} holds a {owner} run: run.name must name a run of launch/train.py")
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: run.output_root/run.name must name a run trained by launch/train.py"
        )
    saved = from_dict(JobConfig, json.loads(path.read_text(encoding="utf-8")), source=str(path))
    changed = [
        f"{section}.{key}"
        for section in TRAINED_SECTIONS
        for key, value in dataclasses.asdict(getattr(config, section)).items()
        if dataclasses.asdict(getattr(saved, section))[key] != value
    ]
    if changed and (not dist.is_initialized() or dist.get_rank() == 0):
        logger.warning(
            "using the run's own %s (from %s); this command's config differs in: %s",
            ", ".join(TRAINED_SECTIONS),
            path,
            ", ".join(changed),
        )
    return dataclasses.replace(config, **{section: getattr(saved, section) for section in TRAINED_SECTIONS})


class Recommender:
    """Loads a run's checkpoint into the sharded model, then scores and writes every user's top-K."""

    def __init__(self, config: JobConfig, world: World) -> None:
        self.world = world
        self.run_dir = Path(config.run.output_root) / config.run.name
        self.config = trained_config(config, self.run_dir)
        self.options = config.recommend
        self.dataset_dir, manifest = open_dataset(self.config, world)
        self.num_items = int(manifest["num_items"])
        self.num_users = int(manifest["num_users"])
        self.max_seq_len = self.config.data.max_seq_len
        self.output_dir = Path(self.options.output_dir or self.run_dir / "recommendations")

        tokens = self.options.batch_size * self.max_seq_len
        self.dmp = build_sharded_model(self.config, world, num_items=self.num_items, batch_tokens=tokens)
        checkpoints = CheckpointManager(self.run_dir / "checkpoints", world=world, keep_last=1)
        self.checkpoint = self._resolve_checkpoint(checkpoints)
        self.train_state = checkpoints.load(self.checkpoint, {"model": self.dmp})
        self.dmp.eval()

        # Whole histories: the model reads the most recent max_seq_len items, exclusion uses all of them.
        self.loader = SequenceLoader(
            self.dataset_dir,
            split="all",
            batch_size=self.options.batch_size,
            max_seq_len=int(manifest["sequence_length"]["max"]),
            rank=world.rank,
            world_size=world.world_size,
            shuffle=False,
            protocol=self.config.data.split,
        )
        self.user_ids = read_id_map(self.dataset_dir, "user", self.num_users)
        self.item_ids = read_id_map(self.dataset_dir, "item", self.num_items)

    def _resolve_checkpoint(self, checkpoints: CheckpointManager) -> Path:
        choice = self.options.checkpoint
        if choice == "latest":
            path = checkpoints.latest()
            if path is None:
                raise ConfigError(f"{checkpoints.folder} holds no complete step checkpoint; train first")
            return path
        path = checkpoints.folder / "best" if choice == "best" else Path(choice)
        if not (path / TRAIN_STATE_FILE).is_file():
            hint = "; use recommend.checkpoint=latest if the run never validated" if choice == "best" else ""
            raise ConfigError(f"recommend.checkpoint={choice!r}: {path} is not a complete checkpoint{hint}")
        return path

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        tmp = self.output_dir.with_name(self.output_dir.name + ".tmp")
        if self.world.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        task = self.dmp.module
        row_start, rows = local_item_vectors(task)
        rows = F.normalize(rows.float(), dim=-1)
        part = tmp / f"part-{self.world.rank:05d}.parquet"
        written = 0
        with pq.ParquetWriter(part, SCHEMA) as writer:
            for batch in tqdm(self.loader, desc="recommend", disable=not self.world.is_main, leave=False):
                scores, ids = self._top_k(task, batch, rows, row_start)
                table = self._table(batch, scores, ids)
                writer.write_table(table)
                written += table.num_rows
        parts = _all_gather_object({"path": part.name, "num_users": written})
        total = sum(p["num_users"] for p in parts)
        if total != self.num_users:
            raise RuntimeError(f"recommend: wrote {total} users but the dataset has {self.num_users}")
        manifest = {
            "run": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "checkpoint_step": self.train_state.get("step"),
            "dataset": str(self.dataset_dir),
            "k": self.options.k,
            "exclude_history": self.options.exclude_history,
            "num_users": total,
            "num_items": self.num_items,
            "world_size": self.world.world_size,
            "columns": {f.name: str(f.type) for f in SCHEMA},
            "parts": parts,
            "seconds": time.perf_counter() - start,
        }
        if self.world.is_main:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            publish_folder(tmp, self.output_dir, overwrite=True)
            logger.info(
                "top-%d for %d users from %s -> %s (%.1fs)",
                self.options.k,
                total,
                self.checkpoint,
                self.output_dir,
                manifest["seconds"],
            )
        barrier()
        return manifest

    def _top_k(self, task, batch: SequenceBatch, rows: torch.Tensor, row_start: int):
        """This rank's rows of the global top-K (scores, 1-based item ids; -1 where fewer than K remain)."""
        device = self.world.device
        model_batch = make_model_batch(
            batch.most_recent(self.max_seq_len),
            num_items=self.num_items,
            num_negatives=0,
            share_negatives=True,
            with_text=self.config.model.fusion != "none",
            generator=None,
        ).to(device)
        queries = task.encode(model_batch)
        history = {}
        if self.options.exclude_history:
            lengths = all_gather_rows(batch.lengths.to(device))
            history = {
                "history_offsets": offsets_from_lengths(lengths),
                "history_ids": all_gather_rows(batch.item_ids.to(device)),
            }
        scores, ids = distributed_topk(
            all_gather_rows(queries.float()), rows, row_start=row_start, k=self.options.k, **history
        )
        # Every rank yields batches of the same size, so rank r's rows follow the r ranks before it.
        mine = slice(self.world.rank * batch.batch_size, (self.world.rank + 1) * batch.batch_size)
        if scores.shape[0] != self.world.world_size * batch.batch_size:
            raise RuntimeError("recommend: ranks gathered batches of different sizes")
        return scores[mine].cpu(), ids[mine].cpu()

    def _table(self, batch: SequenceBatch, scores: torch.Tensor, ids: torch.Tensor) -> pa.Table:
        """The real (weight 1) rows of a batch as Parquet rows, in original ids."""
        real = batch.weights > 0
        users, scores, ids = batch.users[real], scores[real], ids[real]
        found = ids > 0
        offsets = pa.array(offsets_from_lengths(found.sum(dim=1)).numpy().astype("int32"))
        flat_ids = ids[found].numpy()
        item_index = pa.array(flat_ids, pa.int64())
        return pa.table(
            {
                "user": pc.take(self.user_ids, pa.array(users.numpy() - 1)),
                "user_index": pa.array(users.numpy(), pa.int64()),
                "items": pa.ListArray.from_arrays(offsets, pc.take(self.item_ids, pa.array(flat_ids - 1))),
                "item_indices": pa.ListArray.from_arrays(offsets, item_index),
                "scores": pa.ListArray.from_arrays(offsets, pa.array(scores[found].numpy(), pa.float32())),
            },
            schema=SCHEMA,
        )


def _all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
