"""Source readers: each turns one raw format into clean Parquet chunks of interactions and item texts.

Interactions: ``user_id`` (str), ``item_id`` (str), ``ts`` (int64 unix milliseconds: the sources' full
precision, so that ordering and dedup see it; the shards store seconds), ``rating`` (float32), ``ord`` (int64
input order, the stable tie-break). Items: ``item_id`` (str), ``text`` (str, may be empty), ``ord``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_shards.config import DataConfig
from data_shards.io import FileInfo, SkipStats

INTERACTION_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("ts", pa.int64()), ("rating", pa.float32()),
     ("ord", pa.int64())]
)  # fmt: skip
ITEM_SCHEMA = pa.schema([("item_id", pa.string()), ("text", pa.string()), ("ord", pa.int64())])
ORD_FILE_SHIFT = 40  # ord = file_index << 40 | line_no: input order across several files
MAX_TS_MS = (1 << 63) - 1  # ``ts`` is an int64 of milliseconds; a later (absurd) time is a bad_value skip
MAX_RATING = float(np.finfo(np.float32).max)  # ratings are stored as float32


# ASCII control characters (\n, \r, the \x1f delimiter of `read_id_map`...) break the id maps (one id a line)
ID_CONTROL_CHARS = r"[\x00-\x1f\x7f]"
_ID_CONTROL = re.compile(ID_CONTROL_CHARS)


def id_ok(value: str, field: str, path: str | os.PathLike, line_no: int, stats: SkipStats) -> bool:
    """Whether an id is fit for the id maps; if not (a control character), a ``bad_value:<field>`` skip."""
    if _ID_CONTROL.search(value) is None:
        return True
    stats.skip(f"bad_value:{field}", path, line_no, f"control character in id {value!r:.40}")
    return False


def rating_ok(value: float, raw: object, path: str | os.PathLike, line_no: int, stats: SkipStats) -> bool:
    """Whether a rating survives as a finite float32; if not (NaN, infinite, too large), a
    ``wrong_type:rating`` skip showing the `raw` value."""
    if abs(value) <= MAX_RATING:
        return True
    stats.skip("wrong_type:rating", path, line_no, f"{raw!r} is not a finite float32")
    return False


class ParquetSink:
    """Buffers rows (Python lists or Arrow tables) and writes them as row groups of one Parquet file."""

    def __init__(self, path: Path, schema: pa.Schema, *, flush_rows: int = 262144) -> None:
        self.path = path
        self.schema = schema
        self._writer = pq.ParquetWriter(path, schema, compression="snappy")
        self._cols: list[list] = [[] for _ in schema.names]
        self._flush_rows = flush_rows
        self.num_rows = 0

    def append(self, *values) -> None:
        for col, v in zip(self._cols, values, strict=True):
            col.append(v)
        if len(self._cols[0]) >= self._flush_rows:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        self._flush()
        if table.num_rows:
            self._writer.write_table(table.cast(self.schema))
            self.num_rows += table.num_rows

    def _flush(self) -> None:
        if self._cols[0]:
            arrays = [pa.array(c, type=f.type) for c, f in zip(self._cols, self.schema, strict=True)]
            self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
            self.num_rows += len(self._cols[0])
            self._cols = [[] for _ in self.schema.names]

    def close(self) -> None:
        self._flush()
        self._writer.close()


@dataclass
class SourceOutput:
    """What a source reader produced: the Parquet files and the inputs it read."""

    interactions: Path
    items: Path
    inputs: list[FileInfo] = field(default_factory=list)
    items_with_empty_text: int = 0


SourceFn = Callable[[DataConfig, Path, SkipStats], SourceOutput]


def get_source(name: str) -> SourceFn:
    """The reader function for a `data.source` name."""
    if name == "movielens":
        from data_shards.sources.movielens import read_movielens

        return read_movielens
    if name == "amazon2023":
        from data_shards.sources.amazon2023 import read_amazon2023

        return read_amazon2023
    if name == "steam":
        from data_shards.sources.steam import read_steam

        return read_steam
    raise ValueError(f"unknown source {name!r}")
