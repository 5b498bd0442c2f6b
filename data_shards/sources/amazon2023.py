"""Amazon Reviews 2023: reviews JSONL(.gz) or the 5-core rating-only CSV, plus item metadata JSONL(.gz).

Speed: each block of lines is first parsed by Arrow's multithreaded JSON reader with an explicit schema and
validated with vectorised checks; a block Arrow rejects (malformed line, wrong type, bad UTF-8, blank line) is
bisected, and only the small pieces that still fail go through the line-by-line Python validator, which
applies the same rules and records every skip with its file:line. Timestamps stay in milliseconds, as in the
files (the shards store seconds). Large JSONL files are cut into line-aligned blocks by the main process
(which also hashes them) and validated by `data.threads` worker processes, one Parquet part per block, with
the skips merged in block order so counts and examples match a sequential read.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from data_shards.config import DataConfig
from data_shards.io import (
    GZIP_MAGIC,
    FileInfo,
    SkipStats,
    check_file,
    decode_line,
    get_number,
    get_str,
    iter_line_blocks,
    iter_line_spans,
    parse_json_line,
)
from data_shards.sources import (
    ID_CONTROL_CHARS,
    INTERACTION_SCHEMA,
    ITEM_SCHEMA,
    MAX_RATING,
    MAX_TS_MS,
    ORD_FILE_SHIFT,
    ParquetSink,
    SourceOutput,
    id_ok,
    rating_ok,
)
from data_shards.text import amazon_text

REVIEW_FIELDS = pa.schema(
    [
        ("user_id", pa.string()),
        ("parent_asin", pa.string()),
        ("rating", pa.float64()),
        ("timestamp", pa.int64()),
    ]
)
META_FIELDS = pa.schema(
    [("parent_asin", pa.string()), ("title", pa.string()), ("features", pa.list_(pa.string())),
     ("categories", pa.list_(pa.string())), ("description", pa.list_(pa.string()))]
)  # fmt: skip
MIN_ARROW_LINES = 64  # below this a rejected piece goes straight to Python
# a line Python's `bytes.strip` empties: Arrow skips it, so its row count could still match the newlines
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")
_BLANK_FIRST_LINE = re.compile(rb"[ \t\r\x0b\x0c]*\n")
_OPEN_BRACE = ord("{")
PARALLEL_MIN_BYTES = 32 << 20  # smaller files are validated in-process (starting workers costs more)
_ARROW_THREADS = True


def json_record(line: bytes, path, line_no: int, stats: SkipStats) -> dict | None:
    """One JSONL line as a dict, or None with the skip (blank line, malformed JSON) counted."""
    if not line.strip():
        stats.skip("blank_line", path, line_no)
        return None
    return parse_json_line(line, path, line_no, stats)


class _TableSink:
    """Collects one block's valid rows (Arrow tables and single Python rows) in line order."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._tables: list[pa.Table] = []
        self._cols: list[list] = [[] for _ in schema.names]

    def append(self, *values) -> None:
        for col, v in zip(self._cols, values, strict=True):
            col.append(v)

    def _flush(self) -> None:
        if self._cols[0]:
            arrays = [pa.array(c, type=f.type) for c, f in zip(self._cols, self.schema, strict=True)]
            self._tables.append(pa.Table.from_arrays(arrays, schema=self.schema))
            self._cols = [[] for _ in self.schema.names]

    def write_table(self, table: pa.Table) -> None:
        self._flush()
        self._tables.append(table.cast(self.schema))

    def table(self) -> pa.Table:
        self._flush()
        return pa.concat_tables(self._tables) if self._tables else self.schema.empty_table()


def _arrow_parse(block: bytes, schema: pa.Schema) -> pa.Table | None:
    """Arrow's parse of a block, or None if Arrow rejects it, the row count does not match the lines, a
    blank line (which Arrow skips) could hide two objects glued on one line, or a line does not start with
    ``{`` (Arrow reads ``null`` as a row of nulls; Python counts it as ``not_an_object``): Python then counts
    each line."""
    if _BLANK_FIRST_LINE.match(block) or _BLANK_LINE.search(block):
        return None
    raw = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(raw == 10)
    if raw[0] != _OPEN_BRACE or (raw[newlines[newlines < len(raw) - 1] + 1] != _OPEN_BRACE).any():
        return None
    if not block.isascii():
        try:  # Arrow does not check fields it ignores: bad bytes anywhere on a line reject the line
            block.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        table = pj.read_json(
            io.BytesIO(block),
            read_options=pj.ReadOptions(
                block_size=max(1 << 20, len(block) // 2 + 1), use_threads=_ARROW_THREADS
            ),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != len(newlines):  # e.g. two objects glued on one line
        return None
    return table


def _blocks_with_fallback(
    block: bytes,
    first_line: int,
    schema: pa.Schema,
    on_table: Callable[[pa.Table, int], None],
    on_line: Callable[[int, bytes], None],
) -> None:
    """Parse `block` with Arrow; bisect rejected blocks down to small pieces handled line by line."""
    table = _arrow_parse(block, schema)
    if table is not None:
        on_table(table, first_line)
        return
    lines = block.split(b"\n")[:-1]
    if len(lines) <= MIN_ARROW_LINES:
        for i, line in enumerate(lines):
            on_line(first_line + i, line)
        return
    mid = len(lines) // 2
    _blocks_with_fallback(b"\n".join(lines[:mid]) + b"\n", first_line, schema, on_table, on_line)
    _blocks_with_fallback(b"\n".join(lines[mid:]) + b"\n", first_line + mid, schema, on_table, on_line)


def _first_failure(checks: list[tuple[str, np.ndarray]], n: int) -> np.ndarray:
    """Per row, the index+1 of the first failing check (0 = valid), so each row has one skip reason."""
    code = np.zeros(n, dtype=np.int8)
    for k, (_, fail) in enumerate(checks, start=1):
        code[(code == 0) & fail] = k
    return code


def _record_failures(
    checks: list[tuple[str, np.ndarray]], code: np.ndarray, first_line: int, path: Path, stats: SkipStats
) -> None:
    for k, (reason, _) in enumerate(checks, start=1):
        rows = np.flatnonzero(code == k)
        if len(rows):
            stats.skip(reason, path, first_line + int(rows[0]), n=len(rows))
            for r in rows[1 : stats.max_examples]:
                stats.skip(reason, path, first_line + int(r), n=0)


def _null_or_blank(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, pa.ChunkedArray]:
    """Missing and blank masks of a string column, and the trimmed column (computed once, reused)."""
    missing = col.is_null().to_numpy(zero_copy_only=False)
    trimmed = pc.utf8_trim_whitespace(col)
    blank = pc.fill_null(pc.equal(pc.utf8_length(trimmed), 0), False)
    return missing, blank.to_numpy(zero_copy_only=False), trimmed


def _review_handlers(path: Path, file_index: int, sink: _TableSink, stats: SkipStats, empty: list[int]):
    """Block (Arrow) and line (Python) handlers that validate review lines into `sink`."""
    base = file_index << ORD_FILE_SHIFT

    def on_table(t: pa.Table, first: int) -> None:
        n = t.num_rows
        u_miss, u_blank, users = _null_or_blank(t["user_id"])
        i_miss, i_blank, items = _null_or_blank(t["parent_asin"])
        u_bad, i_bad = (
            pc.fill_null(pc.match_substring_regex(c, ID_CONTROL_CHARS), False).to_numpy(zero_copy_only=False)
            for c in (users, items)
        )
        r_miss = t["rating"].is_null().to_numpy(zero_copy_only=False)
        r_ok = pc.less_equal(pc.abs(t["rating"]), MAX_RATING)  # as `rating_ok`: NaN compares false
        r_bad = pc.fill_null(pc.invert(r_ok), False).to_numpy(zero_copy_only=False)
        ts = t["timestamp"]
        t_miss = ts.is_null().to_numpy(zero_copy_only=False)
        t_bad = pc.fill_null(pc.less_equal(ts, 0), False).to_numpy(zero_copy_only=False)
        checks = [
            ("missing_field:user_id", u_miss), ("empty_field:user_id", u_blank), ("bad_value:user_id", u_bad),
            ("missing_field:parent_asin", i_miss), ("empty_field:parent_asin", i_blank),
            ("bad_value:parent_asin", i_bad),
            ("missing_field:rating", r_miss), ("wrong_type:rating", r_bad),
            ("missing_field:timestamp", t_miss), ("bad_value:timestamp", t_bad),
        ]  # fmt: skip
        code = _first_failure(checks, n)
        if code.any():
            _record_failures(checks, code, first, path, stats)
        keep = pa.array(code == 0)
        lines = np.arange(first, first + n, dtype=np.int64) + base
        out = pa.table(
            {
                "user_id": users,
                "item_id": items,
                "ts": ts,
                "rating": t["rating"],
                "ord": lines,
            }
        ).filter(keep)
        sink.write_table(out)

    def on_line(line_no: int, line: bytes) -> None:
        rec = json_record(line, path, line_no, stats)
        if rec is None:
            return
        user = get_str(rec, "user_id", path, line_no, stats)
        if user is None or not id_ok(user, "user_id", path, line_no, stats):
            return
        item = get_str(rec, "parent_asin", path, line_no, stats)
        if item is None or not id_ok(item, "parent_asin", path, line_no, stats):
            return
        rating = get_number(rec, "rating", path, line_no, stats)
        if rating is None:
            return
        if not rating_ok(rating, rating, path, line_no, stats):
            return
        ts = rec.get("timestamp")
        if ts is None:
            stats.skip("missing_field:timestamp", path, line_no)
            return
        if isinstance(ts, bool) or not isinstance(ts, int):
            stats.skip(
                "wrong_type:timestamp", path, line_no, f"expected integer milliseconds, got {ts!r:.30}"
            )
            return
        if not 0 < ts <= MAX_TS_MS:
            stats.skip("bad_value:timestamp", path, line_no, f"{ts!r:.30} is not a positive int64 of ms")
            return
        sink.append(user, item, ts, rating, base | line_no)

    return on_table, on_line


def read_ratings_csv(
    path: Path, file_index: int, sink: ParquetSink, stats: SkipStats, info: FileInfo
) -> None:
    """The 5-core rating-only CSV: header ``user_id,parent_asin,rating,timestamp`` (timestamp in ms)."""
    base = file_index << ORD_FILE_SHIFT
    for first, block in iter_line_blocks(path, stats, info=info):
        for i, line in enumerate(block.split(b"\n")[:-1]):
            line_no = first + i
            text = decode_line(line.rstrip(b"\r"), path, line_no, stats)
            if text is None:
                continue
            if line_no == 1 and text.startswith("user_id"):
                continue
            if not text.strip():
                stats.skip("blank_line", path, line_no)
                continue
            parts = text.split(",")
            if len(parts) != 4:
                stats.skip("malformed_row", path, line_no, f"expected 4 fields, got {len(parts)}")
                continue
            user, item = parts[0].strip(), parts[1].strip()
            if not user or not item:
                stats.skip("empty_field:user_id" if not user else "empty_field:parent_asin", path, line_no)
                continue
            if not id_ok(user, "user_id", path, line_no, stats):
                continue
            if not id_ok(item, "parent_asin", path, line_no, stats):
                continue
            try:
                rating = float(parts[2])
            except ValueError:
                stats.skip("wrong_type:rating", path, line_no, f"{parts[2]!r} is not a number")
                continue
            if not rating_ok(rating, parts[2], path, line_no, stats):
                continue
            try:
                ts = int(parts[3])
            except ValueError:
                stats.skip("wrong_type:timestamp", path, line_no, f"{parts[3]!r} is not an integer")
                continue
            if not 0 < ts <= MAX_TS_MS:
                stats.skip(
                    "bad_value:timestamp", path, line_no, f"{parts[3]!r:.30} is not a positive int64 of ms"
                )
                continue
            sink.append(user, item, ts, rating, base | line_no)


def _meta_handlers(path: Path, file_index: int, sink: _TableSink, stats: SkipStats, empty: list[int]):
    """Block and line handlers: item metadata lines -> (parent_asin, assembled text); counts empty texts."""
    base = file_index << ORD_FILE_SHIFT

    def on_table(t: pa.Table, first: int) -> None:
        i_miss, i_blank, _ = _null_or_blank(t["parent_asin"])
        checks = [("missing_field:parent_asin", i_miss), ("empty_field:parent_asin", i_blank)]
        code = _first_failure(checks, t.num_rows)
        if code.any():
            _record_failures(checks, code, first, path, stats)
        keep = pa.array(code == 0)
        t = t.filter(keep)
        ords = (np.flatnonzero(code == 0) + first + base).astype(np.int64)
        texts = [
            amazon_text(rec)
            for rec in t.select(["title", "features", "categories", "description"]).to_pylist()
        ]
        empty[0] += sum(1 for x in texts if not x)
        sink.write_table(
            pa.table({"item_id": pc.utf8_trim_whitespace(t["parent_asin"]), "text": texts, "ord": ords})
        )

    def on_line(line_no: int, line: bytes) -> None:
        rec = json_record(line, path, line_no, stats)
        if rec is None:
            return
        item = get_str(rec, "parent_asin", path, line_no, stats)
        if item is None:
            return
        text = amazon_text(rec)
        empty[0] += not text
        sink.append(item, text, base | line_no)

    return on_table, on_line


class JsonlKind(NamedTuple):
    """How `read_jsonl_parts` validates one kind of JSONL line (picklable: it travels to worker processes).

    `handlers(path, file_index, sink, stats, empty)` returns ``(on_table, on_line)``: the Arrow-block and the
    per-line handler, which append valid rows of `schema` to `sink` and count skips (and empty texts in
    ``empty[0]``); `fields` is the explicit schema Arrow parses each block with. Other readers (the BLaIR
    pairs) pass their own kind, e.g. a `functools.partial` of module-level handlers.
    """

    handlers: Callable
    fields: pa.Schema
    schema: pa.Schema


_KINDS = {
    "reviews": JsonlKind(_review_handlers, REVIEW_FIELDS, INTERACTION_SCHEMA),
    "meta": JsonlKind(_meta_handlers, META_FIELDS, ITEM_SCHEMA),
}


def _validate_block(job: tuple) -> tuple[SkipStats, int]:
    """Validate one block of whole lines into its own Parquet part; returns its skips and empty-text count.

    `data` is the block itself, or ``(offset, length)`` to read from a plain file (cheaper than sending bytes
    to a worker process).
    """
    kind, path, file_index, first, data, part = job
    if isinstance(data, tuple):
        with open(path, "rb") as fh:
            fh.seek(data[0])
            data = fh.read(data[1])
    handlers, fields, schema = _KINDS[kind] if isinstance(kind, str) else kind
    stats, empty = SkipStats(), [0]
    sink = _TableSink(schema)
    on_table, on_line = handlers(path, file_index, sink, stats, empty)
    _blocks_with_fallback(data, first, fields, on_table, on_line)
    # scratch files read once by DuckDB: plain encoding is ~4x cheaper to write than snappy + dictionary
    pq.write_table(sink.table(), part, compression="none", use_dictionary=False)
    return stats, empty[0]


def _worker_init() -> None:
    global _ARROW_THREADS
    _ARROW_THREADS = False  # the parallelism is the worker processes


def read_jsonl_parts(
    kind: str | JsonlKind,
    path: Path,
    file_index: int,
    out_dir: Path,
    stats: SkipStats,
    info: FileInfo,
    workers: int,
) -> int:
    """Validate a JSONL(.gz) file block by block into ``out_dir/part-NNNNNN.parquet`` (in line order).

    Blocks are parsed by `workers` processes when the file is large; skips are merged in block order, so
    counts and ``file:line`` examples are exactly those of a sequential read. `kind`: "reviews" / "meta", or
    a `JsonlKind`. Returns the empty-text count.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        plain = fh.read(2) != GZIP_MAGIC

    def part(k: int) -> str:
        return str(out_dir / f"part-{k:06d}.parquet")

    def jobs() -> Iterator[tuple]:
        if plain:  # the workers read their own span of the file: the blocks are never copied here
            spans = iter_line_spans(path, info=info)
            for k, (first, offset, length, data) in enumerate(spans):
                yield kind, str(path), file_index, first, data or (offset, length), part(k)
        else:
            for k, (first, block) in enumerate(iter_line_blocks(path, stats, info=info)):
                yield kind, str(path), file_index, first, block, part(k)

    empty = parts = 0
    if workers <= 1 or size < PARALLEL_MIN_BYTES:
        for block_stats, n in map(_validate_block, jobs()):
            stats.merge(block_stats)
            empty, parts = empty + n, parts + 1
    else:
        # fork (spawn would re-import the caller's __main__): the main process reads, hashes and cuts the file
        # into line-aligned blocks while the workers parse them; results are merged in block order
        ctx = mp.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
            pending: deque = deque()
            for job in jobs():
                pending.append(pool.submit(_validate_block, job))
                while len(pending) > 2 * workers or (pending and pending[0].done()):
                    block_stats, n = pending.popleft().result()
                    stats.merge(block_stats)
                    empty, parts = empty + n, parts + 1
            for fut in pending:
                block_stats, n = fut.result()
                stats.merge(block_stats)
                empty, parts = empty + n, parts + 1
    if parts == 0:  # an empty file still gives one (empty) part, so readers always find a file
        schema = (_KINDS[kind] if isinstance(kind, str) else kind).schema
        pq.write_table(schema.empty_table(), out_dir / "part-000000.parquet")
    return empty


def read_amazon2023(cfg: DataConfig, work: Path, stats: SkipStats) -> SourceOutput:
    """Validate Amazon reviews (or 5-core CSV) and metadata into Parquet."""
    reviews = check_file(cfg.interactions, "Amazon reviews")
    meta = check_file(cfg.items, "Amazon item metadata")
    jsonl = not reviews.name.lower().removesuffix(".gz").endswith(".csv")
    # JSONL inputs are validated into folders of Parquet parts (one per block, in line order)
    out = SourceOutput(
        interactions=work / ("interactions" if jsonl else "interactions.parquet"), items=work / "items"
    )
    info = FileInfo(str(reviews))
    if jsonl:
        read_jsonl_parts("reviews", reviews, 0, out.interactions, stats, info, cfg.threads)
    else:
        sink = ParquetSink(out.interactions, INTERACTION_SCHEMA)
        read_ratings_csv(reviews, 0, sink, stats, info)
        sink.close()
    out.inputs.append(info)
    info = FileInfo(str(meta))
    out.items_with_empty_text = read_jsonl_parts("meta", meta, 1, out.items, stats, info, cfg.threads)
    out.inputs.append(info)
    return out
