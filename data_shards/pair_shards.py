"""BLaIR pairs at full scale: raw reviews + metadata -> WebDataset pair shards, out of core; and their reader.

`prepare_pairs(cfg)` streams the source through the same cleaning as `pairs.load_pairs` (every skip counted
with file:line examples) into Parquet: Amazon JSONL through the Arrow block parser of `sources/amazon2023.py`
(per-line Python fallback for the blocks Arrow rejects) in `threads` worker processes; Steam (Python-literal
lines) and tables through their per-line readers. Then DuckDB (bounded memory, spilling to disk)
keeps the first record of each item (later ones counted as ``duplicate_item``), drops reviews whose item
has no metadata (counted), splits held-out vs train by a hash of (seed, review line) with `eval_fraction`,
orders train pairs by a seeded hash (a global shuffle that never holds the pairs in memory), and writes:

    <dataset_dir>/manifest.json             format_version, kind, pair_format, config, inputs, counts, skips,
                                            shards (path, sha256 of the .tar.gz file, num_samples)
    <dataset_dir>/train/pairs-000000.tar.gz one member per pair: pair.json {"item", "item_id", "line",
                                            "review", "item_text"}
    <dataset_dir>/eval/pairs-000000.tar.gz  held-out queries (at most eval_max_queries), same member
    <dataset_dir>/items/items-000000.tar.gz evaluation candidates, in item order: item.json {"item",
                                            "item_id", "text"}

Items are indexed 0..N-1 in sorted key order (as `PairCorpus.item_keys`); line = the review's line in its
file, or its row number for a table (header = row 1). Shards are gzipped tars (gzip mtime 0) written by
`threads` processes. The folder is built in `<dataset_dir>.tmp` and renamed into place (never partial; see
`prepare.publish_folder` for replacing one) and is byte-identical for the same input and config. A folder of
an older `pair_format` is refused with a request to prepare it again. `PairStream` reads one rank's train
shards for training (same number of batches on every rank, a deterministic order per epoch, resumable at any
batch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import multiprocessing as mp
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_shards.io import DataError, FileInfo, SkipStats, check_file
from data_shards.manifest import FORMAT_VERSION, MANIFEST, load_manifest, write_manifest
from data_shards.pairs import (
    AMAZON_ITEM_FIELDS,
    AMAZON_REVIEW_FIELDS,
    PairsConfig,
    clean_amazon_item,
    clean_amazon_review,
    iter_steam_items,
    iter_steam_reviews,
    resolve_path,
    table_pairs,
)
from data_shards.prepare import cpu_seconds, publish_folder
from data_shards.preprocess import connect, sql_path, sql_read_parquet, sql_scalar
from data_shards.reader import iter_samples
from data_shards.shards import TarShardWriter
from data_shards.sources import ParquetSink
from data_shards.sources.amazon2023 import JsonlKind, json_record, read_jsonl_parts

log = logging.getLogger("data_shards")
KIND = "blair_pairs"
PAIR_FORMAT = 2
"""2: one pair.json / item.json member per sample, gzipped shards (1: review.txt + item.txt + meta.json and
text.txt + meta.json members in plain tars)."""
GZIP_LEVEL = 3  # shard compression: most of level 6's size at about twice its speed on review text
_STAGE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("text", pa.string()),
        ("ord", pa.int64()),
        ("h", pa.int64()),
        ("held", pa.bool_()),
    ]
)
_FLUSH_ROWS = 16384  # rows per Parquet batch while streaming (a few MB of text)
_ROW_GROUP = 8192  # rows per row group of the sorted files the tar writer streams
# what Arrow parses of an Amazon line (other fields are ignored); a value of another type (a number title, a
# string description...) rejects the block, whose lines then go through json.loads and the same cleaning
_ARROW_TYPES = {"title": pa.string(), "text": pa.string(), "features": pa.list_(pa.string()),
                "description": pa.list_(pa.string())}  # fmt: skip
_AMAZON_FIELDS = {
    name: pa.schema([("parent_asin", pa.string())] + [(f, _ARROW_TYPES[f]) for f in fields])
    for name, fields in (("meta", AMAZON_ITEM_FIELDS), ("reviews", AMAZON_REVIEW_FIELDS))
}
# Fields that shape a prepared folder: training refuses a folder prepared with other values.
DATA_FIELDS = (
    "source", "reviews_path", "meta_path", "item_column", "review_columns", "item_columns",
    "profile_reviews_per_item", "profile_columns", "profile_sort_column", "min_chars", "eval_fraction",
    "eval_max_queries", "max_pairs", "seed", "eval_max_items", "pairs_per_shard",
)  # fmt: skip


# --------------------------------------------------------------------------- hashing


def mix64(seed: int, salt: int, values: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, salt, value) for each value: uint64, fixed here (not a library's hash)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z ^= np.uint64((seed * 0x632BE59BD9B4E019 + salt * 0x85EBCA77C2B2AE63) & 0xFFFFFFFFFFFFFFFF)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def held_out(seed: int, lines: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each review (by its line/position) is held out: a seeded hash below `fraction` of 2**64."""
    return (mix64(seed, 1, lines) >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def sample_candidates(query_items: np.ndarray, num_items: int, max_items: int, seed: int) -> np.ndarray:
    """The evaluation catalog (sorted item indices): every query's own item plus a seeded uniform sample of
    the other items, `max_items` in all; every item when `max_items` is 0 or covers the catalog."""
    if max_items == 0 or max_items >= num_items:
        return np.arange(num_items, dtype=np.int64)
    queries = np.unique(np.asarray(query_items, dtype=np.int64))
    need = max_items - len(queries)
    if need < 0:
        raise DataError(f"{len(queries)} distinct query items do not fit eval_max_items={max_items}")
    rng = np.random.default_rng([seed, 17])
    draw = rng.choice(num_items, size=min(num_items, need + len(queries)), replace=False)
    others = draw[~np.isin(draw, queries)][:need]
    return np.union1d(queries, others).astype(np.int64)


# --------------------------------------------------------------------------- stage 1: stream to Parquet


def _stream_source(cfg: PairsConfig, work: Path, stats: SkipStats) -> tuple[list[FileInfo], str, str, int]:
    """Write work/items/ and work/reviews/ Parquet parts (key, text, ord, h, held); returns inputs, paths,
    profile reviews used."""
    profile_used = 0
    if cfg.source == "amazon2023":
        meta = check_file(resolve_path(cfg.meta_path), "Amazon item metadata (blair.pairs.meta_path)")
        reviews = check_file(resolve_path(cfg.reviews_path), "Amazon reviews (blair.pairs.reviews_path)")
        inputs = [FileInfo(path=str(meta)), FileInfo(path=str(reviews))]
        for name, path, info in (("meta", meta, inputs[0]), ("reviews", reviews, inputs[1])):
            kind = _amazon_kind(name, cfg)
            out = work / ("items" if name == "meta" else "reviews")
            read_jsonl_parts(kind, path, 0, out, stats, info, cfg.threads)
        return inputs, str(meta), str(reviews), profile_used
    (work / "items").mkdir()
    (work / "reviews").mkdir()
    items_sink = ParquetSink(work / "items" / "part-000000.parquet", _STAGE_SCHEMA, flush_rows=_FLUSH_ROWS)
    reviews_sink = ParquetSink(
        work / "reviews" / "part-000000.parquet", _STAGE_SCHEMA, flush_rows=_FLUSH_ROWS
    )
    if cfg.source == "table":
        reviews_path = meta_path = str(Path(resolve_path(cfg.reviews_path)))
        table_items, table_reviews, profile_used = table_pairs(cfg, stats)  # a table is small: read in memory
        items = ((k, key, text) for k, (key, text) in enumerate(table_items.items()))
        reviews = iter(table_reviews)  # (row, key, text): the row is the review's identity
        inputs = [FileInfo(path=reviews_path)]
        _fill_info(inputs[0])
    else:  # steam: Python-literal lines, parsed line by line (Arrow cannot read them)
        meta_path = str(Path(resolve_path(cfg.meta_path)))
        reviews_path = str(Path(resolve_path(cfg.reviews_path)))
        inputs = [FileInfo(path=meta_path), FileInfo(path=reviews_path)]
        items = iter_steam_items(cfg, stats, info=inputs[0])
        reviews = iter_steam_reviews(cfg, stats, info=inputs[1])
    _sink_records(items, items_sink, cfg, salt=_SALT["meta"])
    _sink_records(reviews, reviews_sink, cfg, salt=_SALT["reviews"])
    items_sink.close()
    reviews_sink.close()
    return inputs, meta_path, reviews_path, profile_used


_SALT = {"meta": 3, "reviews": 2}  # order-hash salts of item and review lines


def _stage_table(keys: list[str] | pa.ChunkedArray, texts: list[str] | pa.ChunkedArray, lines: np.ndarray,
                 seed: int, salt: int, eval_fraction: float) -> pa.Table:  # fmt: skip
    """Stage-1 rows with the seeded order hash `h` and the held-out flag of each line."""
    h = mix64(seed, salt, lines).view(np.int64)
    return pa.table([keys, texts, lines, h, held_out(seed, lines, eval_fraction)], schema=_STAGE_SCHEMA)


# ASCII whitespace that `text_of` (str.split) or `get_str` (str.strip) would change (all but one inner space)
_NOT_PLAIN = r"[\t\n\x0b\x0c\r\x1c-\x1f]|  |^ | $"


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per value: ASCII that Python's whitespace cleaning leaves as is (nulls count as plain)."""
    ascii_ = pc.fill_null(pc.string_is_ascii(col), True)
    return pc.and_(ascii_, pc.invert(pc.fill_null(pc.match_substring_regex(col, pattern=_NOT_PLAIN), False)))


def _plain_reviews(t: pa.Table, min_chars: int) -> tuple[np.ndarray, pa.ChunkedArray]:
    """Vectorised `clean_amazon_review` for the rows where it is a plain join: key, title and text plain
    ASCII (so strip/split change nothing), a key, and a long enough text. Returns that row mask and every
    row's title + text; the other rows (skips, non-ASCII, odd whitespace) go through Python."""
    title, text = pc.fill_null(t["title"], ""), pc.fill_null(t["text"], "")
    has_title, has_text = pc.greater(pc.utf8_length(title), 0), pc.greater(pc.utf8_length(text), 0)
    both = pc.binary_join_element_wise(title, text, " ")
    joined = pc.if_else(pc.and_(has_title, has_text), both, pc.if_else(has_title, title, text))
    key = t["parent_asin"]
    ok = pc.and_(_plain(key), pc.fill_null(pc.greater(pc.utf8_length(key), 0), False))
    ok = pc.and_(
        pc.and_(ok, _plain(title)), pc.and_(_plain(text), pc.greater(pc.utf8_length(joined), min_chars))
    )
    return ok.to_numpy(zero_copy_only=False), joined


def _amazon_handlers(path, file_index, sink, stats, empty, *, clean: Callable, min_chars: int, seed: int,
                     salt: int, eval_fraction: float):  # fmt: skip
    """`JsonlKind` handlers for pair records: Arrow-parsed blocks and fallback lines go through `clean`
    (`clean_amazon_item` / `clean_amazon_review`, what `load_pairs` uses), so skips and texts are the same;
    plain review rows take the vectorised equivalent (`_plain_reviews`)."""

    def on_table(t: pa.Table, first: int) -> None:
        rows = np.arange(t.num_rows)
        if clean is clean_amazon_review:
            fast, joined = _plain_reviews(t, min_chars)
            rows = np.flatnonzero(~fast)
            if len(rows) < t.num_rows:
                lines = (first + np.flatnonzero(fast)).astype(np.int64)
                keep = pa.array(fast)
                sink.write_table(_stage_table(t["parent_asin"].filter(keep), joined.filter(keep), lines, seed,
                                              salt, eval_fraction))  # fmt: skip
            t = t.take(rows)
        keys, texts, lines = [], [], []
        for i, rec in zip(rows.tolist(), t.to_pylist(), strict=True):  # in line order: skip examples too
            got = clean(rec, path, first + i, stats, min_chars)
            if got is not None:
                keys.append(got[0])
                texts.append(got[1])
                lines.append(first + i)
        sink.write_table(
            _stage_table(keys, texts, np.asarray(lines, dtype=np.int64), seed, salt, eval_fraction)
        )

    def on_line(line_no: int, line: bytes) -> None:
        rec = json_record(line, path, line_no, stats)
        got = None if rec is None else clean(rec, path, line_no, stats, min_chars)
        if got is not None:
            line = np.array([line_no], dtype=np.int64)
            h = int(mix64(seed, salt, line).view(np.int64)[0])
            sink.append(got[0], got[1], line_no, h, bool(held_out(seed, line, eval_fraction)[0]))

    return on_table, on_line


def _amazon_kind(name: str, cfg: PairsConfig) -> JsonlKind:
    clean = clean_amazon_item if name == "meta" else clean_amazon_review
    handlers = functools.partial(_amazon_handlers, clean=clean, min_chars=cfg.min_chars, seed=cfg.seed,
                                 salt=_SALT[name], eval_fraction=cfg.eval_fraction)  # fmt: skip
    return JsonlKind(handlers, _AMAZON_FIELDS[name], _STAGE_SCHEMA)


def _fill_info(info: FileInfo) -> None:
    from data_shards.shards import sha256_file

    info.bytes = Path(info.path).stat().st_size
    info.sha256 = sha256_file(Path(info.path))


def _sink_records(records: Iterator[tuple[int, str, str]], sink: ParquetSink, cfg: PairsConfig, *, salt: int):
    """Append records in batches, with the seeded order hash `h` and the held-out flag of each line."""
    batch: list[tuple[int, str, str]] = []

    def flush() -> None:
        lines = np.fromiter((r[0] for r in batch), dtype=np.int64, count=len(batch))
        keys, texts = [r[1] for r in batch], [r[2] for r in batch]
        sink.write_table(_stage_table(keys, texts, lines, cfg.seed, salt, cfg.eval_fraction))
        batch.clear()

    for rec in records:
        batch.append(rec)
        if len(batch) >= _FLUSH_ROWS:
            flush()
    if batch:
        flush()


# --------------------------------------------------------------------------- stage 2: DuckDB


def _examples(stats: SkipStats, reason: str, path: str, rows: list[tuple[int, str]], total: int) -> None:
    """Count `total` skips for `reason`, with the first rows (line, key) as file:line examples."""
    for line, key in rows:
        stats.skip(reason, path, int(line), key)
    stats.add(reason, total - len(rows))


def _sql_steps(con, cfg: PairsConfig, work: Path, stats: SkipStats, meta_path: str, reviews_path: str):
    items_raw, reviews = sql_read_parquet(work / "items"), sql_read_parquet(work / "reviews")
    n_examples = stats.max_examples
    # first record of each item wins (file order), as in load_pairs; items indexed in sorted key order
    con.execute(
        "CREATE TABLE items AS SELECT key, text, (row_number() OVER (ORDER BY key) - 1)::BIGINT AS idx "
        f"FROM (SELECT key, arg_min(text, ord) AS text FROM {items_raw} GROUP BY key)"
    )
    num_items = sql_scalar(con, "SELECT count(*) FROM items")
    duplicates = sql_scalar(con, f"SELECT count(*) FROM {items_raw}") - num_items
    if duplicates:
        rows = con.execute(
            "SELECT ord, key FROM (SELECT ord, key, row_number() OVER (PARTITION BY key ORDER BY ord) AS rn "
            f"FROM {items_raw}) WHERE rn > 1 ORDER BY ord LIMIT {n_examples}"
        ).fetchall()
        _examples(stats, "duplicate_item", meta_path, rows, duplicates)
    missing = sql_scalar(con, f"SELECT count(*) FROM {reviews} r ANTI JOIN items i USING (key)")
    if missing:
        rows = con.execute(
            f"SELECT ord, key FROM {reviews} r ANTI JOIN items i USING (key) ORDER BY ord LIMIT {n_examples}"
        ).fetchall()
        _examples(stats, "review_item_without_metadata", reviews_path, rows, missing)
    pairs = f"{reviews} r JOIN items i USING (key)"
    held = sql_scalar(con, f"SELECT count(*) FROM {pairs} WHERE r.held")
    train_all = sql_scalar(con, f"SELECT count(*) FROM {pairs} WHERE NOT r.held")
    if held + train_all == 0:
        raise DataError(f"no usable (review, item) pairs in {reviews_path}: {stats.summary()}; check paths")
    if train_all == 0:
        raise DataError(f"{reviews_path}: all {held} pairs went to the held-out split; lower eval_fraction")
    if held == 0:
        raise DataError(f"{reviews_path}: no review was held out of {train_all}; raise eval_fraction")
    cols = "r.ord AS line, i.idx AS item, i.key AS item_id, r.text AS review, i.text AS item_text"
    limit = f"LIMIT {cfg.max_pairs}" if cfg.max_pairs else ""
    for name, where, lim in (
        ("train", "NOT r.held", limit),
        ("eval", "r.held", f"LIMIT {cfg.eval_max_queries}"),
    ):
        con.execute(
            f"COPY (SELECT {cols} FROM {pairs} WHERE {where} ORDER BY r.h, r.ord {lim}) "
            f"TO {sql_path(work / f'{name}.parquet')} (FORMAT parquet, ROW_GROUP_SIZE {_ROW_GROUP})"
        )
    query_items = pq.read_table(work / "eval.parquet", columns=["item"])["item"].to_numpy()
    cands = sample_candidates(query_items, num_items, cfg.eval_max_items, cfg.seed)
    con.register("cands", pa.table({"idx": cands}))
    con.execute(
        "COPY (SELECT idx AS item, key AS item_id, text FROM items WHERE idx IN (SELECT idx FROM cands) "
        f"ORDER BY idx) TO {sql_path(work / 'items_out.parquet')} "
        f"(FORMAT parquet, ROW_GROUP_SIZE {_ROW_GROUP})"
    )
    counts = {
        "items": num_items,
        "pairs": held + train_all,
        "train_pairs": min(train_all, cfg.max_pairs) if cfg.max_pairs else train_all,
        "heldout_pairs": held,
        "eval_queries": len(query_items),
        "eval_candidates": len(cands),
    }
    return counts


# --------------------------------------------------------------------------- stage 3: tar shards


def _write_tars(parquet: Path, out_dir: Path, *, prefix: str, per_shard: int, pairs: bool,
                workers: int) -> list[dict]:  # fmt: skip
    """Stream a sorted Parquet file into gzipped tar shards of `per_shard` samples, `workers` shards at a time
    (each a row range of the file, written by its own process); returns the manifest entries in order."""
    out_dir.mkdir(parents=True)
    num_rows = pq.ParquetFile(parquet).metadata.num_rows
    tasks = [
        (str(parquet), str(out_dir / f"{prefix}-{k:06d}.tar.gz"), lo, min(lo + per_shard, num_rows), pairs)
        for k, lo in enumerate(range(0, num_rows, per_shard))
    ]
    if workers <= 1 or len(tasks) <= 1:
        results = [_write_tar(t) for t in tasks]
    else:  # fork: the DuckDB connection is closed by now; each child reads its own rows of the file
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_write_tar, tasks))
    for r in results:
        r["path"] = f"{out_dir.name}/{r['path']}"
    return results


_js = json.encoder.encode_basestring  # a JSON string literal (C-accelerated, non-ASCII kept as is)


def _write_tar(task: tuple[str, str, int, int, bool]) -> dict:
    """Rows [lo, hi) of the Parquet file as one shard: pair.json per pair (key = global row, 12 digits) or
    item.json per item (key = item index, 10 digits)."""
    parquet, out_path, lo, hi, pairs = task
    pf = pq.ParquetFile(parquet)
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    groups = [g for g in range(pf.num_row_groups) if starts[g] < hi and starts[g + 1] > lo]
    cols = ["item", "item_id", "line", "review", "item_text"] if pairs else ["item", "item_id", "text"]
    writer = TarShardWriter(Path(out_path), gzip_level=GZIP_LEVEL)
    pos = int(starts[groups[0]]) if groups else lo
    for batch in pf.iter_batches(batch_size=4096, row_groups=groups, columns=cols, use_threads=False):
        columns = [c.to_pylist() for c in batch.columns]
        for row in zip(*columns, strict=True):
            if lo <= pos < hi:
                if pairs:
                    item, item_id, line, review, item_text = row
                    name = f"{pos:012d}.pair.json"
                    body = (f'{{"item":{item},"item_id":{_js(item_id)},"line":{line},"review":{_js(review)},'
                            f'"item_text":{_js(item_text)}}}')  # fmt: skip
                else:
                    item, item_id, text = row
                    name = f"{item:010d}.item.json"
                    body = f'{{"item":{item},"item_id":{_js(item_id)},"text":{_js(text)}}}'
                writer.add(name, body.encode("utf-8"))
                writer.num_samples += 1
            pos += 1
    if writer.num_samples != hi - lo:
        raise RuntimeError(f"{out_path}: wrote {writer.num_samples} samples, expected rows {lo}..{hi - 1}")
    return writer.close()


# --------------------------------------------------------------------------- prepare


def prepare_pairs(cfg: PairsConfig) -> Path:
    """Build `cfg.dataset_dir` (see the module doc) from the configured source; returns its path."""
    if not cfg.dataset_dir:
        raise DataError("blair.pairs.dataset_dir is empty: name the folder the prepared pairs go to")
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    final = Path(cfg.dataset_dir)
    if final.exists() and not cfg.overwrite:
        raise DataError(f"{final} already exists: set blair.pairs.overwrite=true to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():  # left by an interrupted run of this job
        shutil.rmtree(tmp)
    tmp.mkdir()
    scratch = Path(cfg.temp_dir) if cfg.temp_dir else final.parent
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.work-", dir=scratch))
    stats = SkipStats()
    timings: dict[str, float] = {}
    try:
        log.info("reading %s pairs ...", cfg.source)
        inputs, meta_path, reviews_path, profile_used = _stream_source(cfg, work, stats)
        timings["read_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        con = connect(cfg, work)
        try:
            counts = _sql_steps(con, cfg, work, stats, meta_path, reviews_path)
        finally:
            con.close()
        counts["profile_reviews"] = profile_used
        timings["duckdb_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        shards = {
            "train": _write_tars(work / "train.parquet", tmp / "train", prefix="pairs",
                                 per_shard=cfg.pairs_per_shard, pairs=True, workers=cfg.threads),
            "eval": _write_tars(work / "eval.parquet", tmp / "eval", prefix="pairs",
                                per_shard=cfg.pairs_per_shard, pairs=True, workers=cfg.threads),
            "items": _write_tars(work / "items_out.parquet", tmp / "items", prefix="items",
                                 per_shard=cfg.pairs_per_shard, pairs=False, workers=cfg.threads),
        }  # fmt: skip
        timings["shards_s"] = time.perf_counter() - t2
        skipped = stats.to_dict()
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "pair_format": PAIR_FORMAT,
            "source": cfg.source,
            # only the settings that shape the output: how it ran (threads, memory, folders) changes no byte
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k in DATA_FIELDS},
            "inputs": [{"path": i.path, "bytes": i.bytes, "sha256": i.sha256} for i in inputs],
            "counts": counts,
            "skipped": skipped["counts"],
            "skipped_examples": skipped["examples"],
            "num_items": counts["items"],
            "shards": shards,
        }
        write_manifest(tmp, manifest)
        publish_folder(tmp, final, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t0
    timings["total_cpu_s"] = cpu_seconds() - cpu0
    log.info("%s", stats.summary())
    log.info(
        "wrote %s: %s; %d train / %d eval / %d item shards; %s",
        final, counts, len(shards["train"]), len(shards["eval"]), len(shards["items"]),
        ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
    )  # fmt: skip
    return final


# --------------------------------------------------------------------------- reading


def load_pair_manifest(dataset_dir: str | Path, cfg: PairsConfig | None = None) -> dict[str, Any]:
    """A prepared pair folder's manifest; with `cfg`, also check it was prepared with cfg's data fields."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} not found: prepare the pairs first "
            "(`python launch/blair_pairs.py --config <the same config>`)"
        )
    manifest = load_manifest(dataset_dir)
    if manifest.get("kind") != KIND:
        raise DataError(f"{path}: not a BLaIR pair folder (kind {manifest.get('kind')!r}, expected {KIND!r})")
    version = manifest.get("pair_format", 1)
    if version != PAIR_FORMAT:
        raise DataError(
            f"{path}: pair folder format {version}, this code reads format {PAIR_FORMAT} (one pair.json per "
            "sample, gzipped shards); prepare it again: `python launch/blair_pairs.py --config <the same "
            "config> blair.pairs.overwrite=true`"
        )
    if cfg is not None:
        prepared = manifest["config"]
        diff = [
            f"{k}={prepared.get(k)!r} (config: {getattr(cfg, k)!r})"
            for k in DATA_FIELDS
            if prepared.get(k) != getattr(cfg, k)
        ]
        if diff:
            raise DataError(
                f"{path}: prepared with blair.pairs {', '.join(diff)}; run launch/blair_pairs.py again with "
                "blair.pairs.overwrite=true, or use the values it was prepared with"
            )
    return manifest


class Pair(NamedTuple):
    """One training or held-out pair of a prepared folder."""

    item: int  # item index 0..N-1
    review: str
    item_text: str
    line: int  # the review's line in its file (its identity; held-out lines never appear in train)


def iter_pairs(dataset_dir: str | Path, split: str = "train") -> Iterator[Pair]:
    """Every pair of a split (train / eval) in stored order."""
    manifest = load_pair_manifest(dataset_dir)
    for entry in manifest["shards"][split]:
        for s in iter_samples(Path(dataset_dir) / entry["path"]):
            yield _pair(s["pair.json"])


def _pair(d: dict[str, Any]) -> Pair:
    return Pair(d["item"], d["review"], d["item_text"], d["line"])


def read_candidates(dataset_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """The evaluation candidates: sorted item indices and their texts."""
    manifest = load_pair_manifest(dataset_dir)
    items, texts = [], []
    for entry in manifest["shards"]["items"]:
        for s in iter_samples(Path(dataset_dir) / entry["path"]):
            items.append(s["item.json"]["item"])
            texts.append(s["item.json"]["text"])
    return np.asarray(items, dtype=np.int64), texts


class PairStream:
    """One rank's training pairs from a prepared folder, batch by batch.

    Train shards go round-robin to ranks (shard k to rank k % world_size). Every rank runs
    `steps_per_epoch` = (fewest pairs any rank holds) // batch_size batches per epoch, so collectives never
    wait on a rank that ran out. Epoch e reads this rank's shards in a seeded order through a seeded shuffle
    buffer ((seed, e, rank) fixes both), so `epoch(e, start)` replays exactly the batches from `start` on.
    """

    def __init__(
        self, dataset_dir: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int,
        shuffle_buffer: int,
    ) -> None:  # fmt: skip
        self.root = Path(dataset_dir)
        shards = load_pair_manifest(self.root)["shards"]["train"]
        if len(shards) < world_size:
            raise DataError(
                f"{self.root}: {len(shards)} train shard(s) cannot feed {world_size} ranks; prepare it again "
                f"with a smaller blair.pairs.pairs_per_shard (at least one shard per rank)"
            )
        rows = [sum(int(s["num_samples"]) for s in shards[r::world_size]) for r in range(world_size)]
        self.steps_per_epoch = min(rows) // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.root}: the rank with the fewest pairs holds {min(rows)}, less than one batch of "
                f"{batch_size}; lower blair.batch_size or prepare more pairs"
            )
        self._shards = [s["path"] for s in shards[rank::world_size]]
        self.rank, self.batch_size, self.seed, self.shuffle_buffer = rank, batch_size, seed, shuffle_buffer

    def _pairs(self, rng: np.random.Generator) -> Iterator[Pair]:
        order = rng.permutation(len(self._shards))
        buf: list[Pair] = []
        for k in order:
            for s in iter_samples(self.root / self._shards[k]):
                pair = _pair(s["pair.json"])
                if len(buf) < self.shuffle_buffer:
                    buf.append(pair)
                    continue
                j = int(rng.integers(len(buf)))
                yield buf[j]
                buf[j] = pair
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[Pair]]:
        """Batches `start`, `start`+1, ... of `epoch` (earlier ones are read and dropped, not tokenised)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        batch: list[Pair] = []
        done = 0
        for pair in self._pairs(rng):
            batch.append(pair)
            if len(batch) == self.batch_size:
                if done >= start:
                    yield batch
                batch = []
                done += 1
                if done == self.steps_per_epoch:
                    return
