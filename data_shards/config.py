"""The `[data]` section: which raw files to read, how to filter them, and where the dataset directory goes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and where it came from.

    Defined here, the lowest layer that raises it, so `data_shards` imports nothing of `trainer`;
    `trainer.config_io` re-exports it."""


@dataclass(kw_only=True)
class DataConfig:
    """Raw inputs, preprocessing and output layout of one dataset (`<root>/<name>/`)."""

    root: str = "data"
    """Folder that holds dataset directories."""
    name: str = "ml100k"
    """Dataset directory name under `root`; also what training reads."""
    source: Literal["movielens", "amazon2023", "steam"] = "movielens"
    """Raw format: MovieLens (100K/1M/20M), Amazon Reviews 2023, or the SASRec Steam dump."""
    interactions: str = ""
    """Interaction file: MovieLens ratings (.inter/.dat/.csv; empty = ML-100K from the recbole package),
    Amazon reviews JSONL(.gz) or 5-core CSV, Steam reviews (Python-literal lines, .gz ok)."""
    items: str = ""
    """Item metadata file: MovieLens .item/movies.dat/movies.csv, Amazon meta JSONL(.gz), Steam games."""
    kcore: Literal["iterative", "paper"] = "iterative"
    """`iterative`: repeat user/item thresholds to a fixed point. `paper`: drop items without metadata, one
    pass item >= min_item then user >= min_user (Steam: users only), as in the HSTU-BLaIR paper."""
    min_user_interactions: int = 5
    """Users need at least this many interactions (>= 4: leave-one-out needs a train pair, valid and test)."""
    min_item_interactions: int = 5
    """Items need at least this many interactions (0 disables the item threshold)."""
    drop_items_without_metadata: bool = True
    """Drop interactions whose item has no metadata record (`iterative` only; `paper` always drops them,
    except for Steam, where it keeps every game as the paper did)."""
    split: Literal["loo3", "paper"] = "loo3"
    """Split protocol recorded for the reader: loo3 = train/valid/test leave-one-out; paper = train/test."""
    max_seq_len: int = 200
    """Longest input history the reader yields (the most recent items are kept)."""
    users_per_shard: int = 5000
    """Users per sequence shard; use enough shards that every rank (and worker) gets at least one."""
    items_per_shard: int = 50000
    """Items per item-text shard."""
    memory_limit: str = "2GB"
    """DuckDB memory limit; beyond it DuckDB spills to `temp_dir`."""
    threads: int = 2
    """DuckDB threads and shard-writer processes."""
    temp_dir: str = ""
    """Scratch folder for intermediate Parquet and DuckDB spill files; empty = next to the output."""
    overwrite: bool = False
    """Replace an existing dataset directory of the same name (the old one is kept if publishing fails)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"data.name must be a plain folder name, got {self.name!r}")
        if not self.root:
            raise ConfigError("data.root must be a folder path, got an empty string")
        if self.min_user_interactions < 4:
            raise ConfigError(
                f"data.min_user_interactions={self.min_user_interactions}: must be >= 4 so that every user "
                "has a train pair, a validation target and a test target"
            )
        if self.min_item_interactions < 0:
            raise ConfigError(f"data.min_item_interactions must be >= 0, got {self.min_item_interactions}")
        for key in ("max_seq_len", "users_per_shard", "items_per_shard", "threads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if not _MEMORY.match(self.memory_limit.strip()):
            raise ConfigError(f"data.memory_limit must look like '2GB' or '512MB', got {self.memory_limit!r}")
        if self.source != "movielens" and not self.interactions:
            raise ConfigError(
                f"data.interactions: a {self.source} dataset needs the path of its interaction file"
            )
        if self.source != "movielens" and not self.items:
            raise ConfigError(f"data.items: a {self.source} dataset needs the path of its item metadata file")
