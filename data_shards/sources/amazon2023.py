"""Amazon Reviews 2023: reviews JSONL(.gz) or the 5-core rating-only CSV, plus item metadata JSONL(.gz).

Speed: each block of lines is first parsed by Arrow's multithreaded JSON reader with an explicit schema and
validated with vectorised checks; a block Arrow rejects (malformed line, wrong type, bad UTF-8, blank line) is
bisected, and only the small pieces that still fail go through the line-by-line Python validator, which
applies the same rules and records every skip with its file:line. Timestamps are milliseconds in the files and
seconds in the dataset.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from data_shards.config import DataConfig
from data_shards.io import (
    FileInfo,
    SkipStats,
    check_file,
    decode_line,
    get_number,
    get_str,
    iter_line_blocks,
    parse_json_line,
)
from data_shards.sources import INTERACTION_SCHEMA, ITEM_SCHEMA, ORD_FILE_SHIFT, ParquetSink, SourceOutput
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


def _arrow_parse(block: bytes, schema: pa.Schema) -> pa.Table | None:
    """Arrow's parse of a block, or None if Arrow rejects it or the row count does not match the lines."""
    if not block.isascii():
        try:  # Arrow does not check fields it ignores: bad bytes anywhere on a line reject the line
            block.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        table = pj.read_json(
            io.BytesIO(block),
            read_options=pj.ReadOptions(block_size=max(1 << 20, len(block) // 2 + 1)),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != block.count(
        b"\n"
    ):  # blank lines are skipped silently by Arrow: let Python count them
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


def _null_or_blank(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    missing = col.is_null().to_numpy(zero_copy_only=False)
    blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), False)
    return missing, blank.to_numpy(zero_copy_only=False)


def read_reviews_jsonl(
    path: Path, file_index: int, sink: ParquetSink, stats: SkipStats, info: FileInfo
) -> None:
    """Validate review lines into the interaction sink (Arrow fast path, Python fallback)."""
    base = file_index << ORD_FILE_SHIFT

    def on_table(t: pa.Table, first: int) -> None:
        n = t.num_rows
        u_miss, u_blank = _null_or_blank(t["user_id"])
        i_miss, i_blank = _null_or_blank(t["parent_asin"])
        r_miss = t["rating"].is_null().to_numpy(zero_copy_only=False)
        r_nan = pc.fill_null(pc.is_nan(t["rating"]), False).to_numpy(zero_copy_only=False)
        ts = t["timestamp"]
        t_miss = ts.is_null().to_numpy(zero_copy_only=False)
        t_bad = pc.fill_null(pc.less_equal(ts, 0), False).to_numpy(zero_copy_only=False)
        checks = [
            ("missing_field:user_id", u_miss), ("empty_field:user_id", u_blank),
            ("missing_field:parent_asin", i_miss), ("empty_field:parent_asin", i_blank),
            ("missing_field:rating", r_miss), ("wrong_type:rating", r_nan),
            ("missing_field:timestamp", t_miss), ("bad_value:timestamp", t_bad),
        ]  # fmt: skip
        code = _first_failure(checks, n)
        if code.any():
            _record_failures(checks, code, first, path, stats)
        keep = pa.array(code == 0)
        lines = np.arange(first, first + n, dtype=np.int64) + base
        out = pa.table(
            {
                "user_id": pc.utf8_trim_whitespace(t["user_id"]),
                "item_id": pc.utf8_trim_whitespace(t["parent_asin"]),
                "ts": pc.divide(ts, 1000),
                "rating": t["rating"],
                "ord": lines,
            }
        ).filter(keep)
        sink.write_table(out)

    def on_line(line_no: int, line: bytes) -> None:
        if not line.strip():
            stats.skip("blank_line", path, line_no)
            return
        rec = parse_json_line(line, path, line_no, stats)
        if rec is None:
            return
        user = get_str(rec, "user_id", path, line_no, stats)
        if user is None:
            return
        item = get_str(rec, "parent_asin", path, line_no, stats)
        if item is None:
            return
        rating = get_number(rec, "rating", path, line_no, stats)
        if rating is None:
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
        if ts <= 0:
            stats.skip("bad_value:timestamp", path, line_no, str(ts))
            return
        sink.append(user, item, ts // 1000, rating, base | line_no)

    for first, block in iter_line_blocks(path, stats, info=info):
        _blocks_with_fallback(block, first, REVIEW_FIELDS, on_table, on_line)


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
            try:
                rating = float(parts[2])
            except ValueError:
                stats.skip("wrong_type:rating", path, line_no, f"{parts[2]!r} is not a number")
                continue
            try:
                ts = int(parts[3])
            except ValueError:
                stats.skip("wrong_type:timestamp", path, line_no, f"{parts[3]!r} is not an integer")
                continue
            if ts <= 0:
                stats.skip("bad_value:timestamp", path, line_no, str(ts))
                continue
            sink.append(user, item, ts // 1000, rating, base | line_no)


def read_metadata(path: Path, file_index: int, sink: ParquetSink, stats: SkipStats, info: FileInfo) -> int:
    """Item metadata lines -> (parent_asin, assembled text). Returns how many items have an empty text."""
    base = file_index << ORD_FILE_SHIFT
    empty = 0

    def on_table(t: pa.Table, first: int) -> None:
        nonlocal empty
        i_miss, i_blank = _null_or_blank(t["parent_asin"])
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
        empty += sum(1 for x in texts if not x)
        sink.write_table(
            pa.table({"item_id": pc.utf8_trim_whitespace(t["parent_asin"]), "text": texts, "ord": ords})
        )

    def on_line(line_no: int, line: bytes) -> None:
        nonlocal empty
        if not line.strip():
            stats.skip("blank_line", path, line_no)
            return
        rec = parse_json_line(line, path, line_no, stats)
        if rec is None:
            return
        item = get_str(rec, "parent_asin", path, line_no, stats)
        if item is None:
            return
        text = amazon_text(rec)
        empty += not text
        sink.append(item, text, base | line_no)

    for first, block in iter_line_blocks(path, stats, info=info):
        _blocks_with_fallback(block, first, META_FIELDS, on_table, on_line)
    return empty


def read_amazon2023(cfg: DataConfig, work: Path, stats: SkipStats) -> SourceOutput:
    """Validate Amazon reviews (or 5-core CSV) and metadata into Parquet."""
    reviews = check_file(cfg.interactions, "Amazon reviews")
    meta = check_file(cfg.items, "Amazon item metadata")
    out = SourceOutput(interactions=work / "interactions.parquet", items=work / "items.parquet")
    sink = ParquetSink(out.interactions, INTERACTION_SCHEMA)
    info = FileInfo(str(reviews))
    if reviews.name.lower().removesuffix(".gz").endswith(".csv"):
        read_ratings_csv(reviews, 0, sink, stats, info)
    else:
        read_reviews_jsonl(reviews, 0, sink, stats, info)
    sink.close()
    out.inputs.append(info)
    isink = ParquetSink(out.items, ITEM_SCHEMA)
    info = FileInfo(str(meta))
    out.items_with_empty_text = read_metadata(meta, 1, isink, stats, info)
    isink.close()
    out.inputs.append(info)
    return out
