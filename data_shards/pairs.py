"""BLaIR pair sources: (review text, item metadata text) pairs with a held-out review split.

Sources (each skip is counted by reason, with file:line examples):
- `amazon2023`: Amazon Reviews 2023 reviews JSONL (`title`, `text`, `parent_asin`) and item metadata JSONL
  (`parent_asin`, `title`, `features`, `description`); review = title + text, item = title + features +
  description, both longer than `min_chars`, as BLaIR does.
- `steam`: the SASRec Steam dumps (Python-literal lines): reviews (`product_id`, `text`) and games (`id`,
  `app_name`, `publisher`, `developer`, `genres`, `tags`, `specs`).
- `table`: one parquet/CSV table of reviews with item-metadata columns (e.g. the Women's Clothing corpus).

The item text never contains text of a held-out review, so the held-out Recall@K is honest.
`load_pairs` holds the corpus in memory (small corpora, e.g. the demo); at full scale `pair_shards.py` streams
the same records into WebDataset pair shards that training reads per rank (Amazon through the Arrow block
reader of `sources/amazon2023.py` with the `clean_amazon_*` functions below; Steam through `iter_steam_*`).
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_shards.io import (
    DataError,
    FileInfo,
    SkipStats,
    check_file,
    get_str,
    iter_json_records,
    iter_literal_records,
    text_of,
)

PairSource = Literal["amazon2023", "steam", "table"]
Record = tuple[int, str, str]
"""(line number in its file, item key, cleaned text)."""
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


def resolve_path(path: str) -> str:
    """Expand `pkg:<package>/<rest>` to a file inside an installed package (found with importlib)."""
    if not path.startswith("pkg:"):
        return path
    package, _, rest = path[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{path}: package {package!r} is not installed (see STACK.md: data packages)")
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)


@dataclass(kw_only=True)
class PairsConfig:
    """Where BLaIR's (review, item metadata) pairs come from and how they are cleaned and split."""

    source: PairSource = "table"
    """amazon2023 | steam | table."""
    reviews_path: str = ""
    """Reviews file: Amazon reviews JSONL(.gz), Steam reviews dump, or a parquet/CSV table; `pkg:` allowed."""
    meta_path: str = ""
    """Item metadata file (amazon2023: meta JSONL; steam: games dump); unused for `table`."""
    item_column: str = "Clothing ID"
    """table: the item id column."""
    review_columns: list[str] = field(default_factory=lambda: ["Title", "Review Text"])
    """table: review text = these columns joined (missing values dropped)."""
    item_columns: list[str] = field(
        default_factory=lambda: ["Division Name", "Department Name", "Class Name"]
    )
    """table: item metadata columns (taken from the item's first row); joined with ' | '."""
    profile_reviews_per_item: int = 0
    """table: reserve this many reviews per item (most helpful first) to describe the item; never queries."""
    profile_columns: list[str] = field(default_factory=lambda: ["Title"])
    """table: columns of the reserved reviews added to the item text (e.g. their headlines)."""
    profile_sort_column: str = ""
    """table: column ranking reviews for the profile (descending); empty = file order."""
    min_chars: int = 30
    """Both texts must be longer than this many characters (BLaIR: 30)."""
    eval_fraction: float = 0.1
    """Fraction of (non-profile) reviews held out for the Recall@K evaluation."""
    eval_max_queries: int = 1000
    """At most this many held-out reviews are scored (sampled with the seed)."""
    max_pairs: int = 0
    """Cap on training pairs (0 = all)."""
    seed: int = 0
    """Seed of the hold-out split and sampling."""
    eval_max_items: int = 0
    """Candidate catalog of the Recall@K evaluation: every query's own item plus a seeded sample of other
    items, this many in all (0 = every item; small corpora). Must be 0 or >= eval_max_queries."""
    dataset_dir: str = ""
    """Prepared pair folder (manifest.json, train/ eval/ items/ WebDataset shards): `launch/blair_pairs.py`
    writes it, training streams it. Empty = read the source into memory on every rank (small corpora)."""
    pairs_per_shard: int = 100_000
    """prepare: samples per tar shard (train, eval and item shards); every rank needs >= 1 train shard."""
    memory_limit: str = "2GB"
    """prepare: DuckDB memory limit; beyond it DuckDB spills to `temp_dir`."""
    threads: int = 2
    """prepare: DuckDB threads."""
    temp_dir: str = ""
    """prepare: scratch folder for Parquet batches and DuckDB spill files; empty = next to dataset_dir."""
    overwrite: bool = False
    """prepare: replace an existing dataset_dir (by rename, never partial)."""
    shuffle_buffer: int = 10_000
    """training from dataset_dir: pairs in each rank's seeded shuffle buffer (on top of the prepared global
    shuffle and a per-epoch shard order)."""

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise DataError(f"blair.pairs.min_chars must be >= 0, got {self.min_chars}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise DataError(f"blair.pairs.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.profile_reviews_per_item < 0 or self.eval_max_queries < 1 or self.max_pairs < 0:
            raise DataError(
                "blair.pairs: profile_reviews_per_item and max_pairs must be >= 0, eval_max_queries >= 1"
            )
        if self.source == "table" and not self.review_columns:
            raise DataError("blair.pairs.review_columns must name at least one column for source='table'")
        if self.eval_max_items < 0 or (0 < self.eval_max_items < self.eval_max_queries):
            raise DataError(
                f"blair.pairs.eval_max_items={self.eval_max_items}: must be 0 (all items) or >= "
                f"eval_max_queries ({self.eval_max_queries}) so that every query's own item is a candidate"
            )
        for name in ("pairs_per_shard", "threads", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise DataError(f"blair.pairs.{name} must be >= 1, got {getattr(self, name)}")
        if not _MEMORY.match(self.memory_limit.strip()):
            raise DataError(
                f"blair.pairs.memory_limit must look like '2GB' or '512MB', got {self.memory_limit!r}"
            )
        if self.dataset_dir and Path(self.dataset_dir).name in ("", ".", ".."):
            raise DataError(f"blair.pairs.dataset_dir must name a folder, got {self.dataset_dir!r}")


@dataclass
class PairCorpus:
    """Items with their metadata text and the reviews pointing at them, split into train and held-out."""

    item_keys: list[str]
    item_texts: list[str]
    train: list[tuple[int, str]]
    """(item position in item_keys, review text)."""
    eval: list[tuple[int, str]]
    stats: SkipStats
    counts: dict[str, int]

    def summary(self) -> dict[str, Any]:
        return {"counts": self.counts, "skipped": self.stats.to_dict()}


def _join(parts: list[str], sep: str = " ") -> str:
    return sep.join(p for p in (text_of(x) for x in parts) if p)


def load_pairs(cfg: PairsConfig) -> PairCorpus:
    """Read the configured source and build the corpus (item texts, train and held-out reviews)."""
    stats = SkipStats()
    if cfg.source == "amazon2023":
        items, reviews = _collect(cfg, stats, iter_amazon_items, iter_amazon_reviews)
        profile_used = 0
    elif cfg.source == "steam":
        items, reviews = _collect(cfg, stats, iter_steam_items, iter_steam_reviews)
        profile_used = 0
    elif cfg.source == "table":
        items, records, profile_used = table_pairs(cfg, stats)
        reviews = [(key, text) for _, key, text in records]
    else:
        raise DataError(f"unknown pair source {cfg.source!r}")
    return _split(cfg, items, reviews, stats, profile_used=profile_used)


def _split(
    cfg: PairsConfig,
    items: dict[str, str],
    reviews: list[tuple[str, str]],
    stats: SkipStats,
    *,
    profile_used: int,
) -> PairCorpus:
    keys = sorted(items)
    position = {k: i for i, k in enumerate(keys)}
    pairs = []
    for key, text in reviews:
        if key not in position:
            stats.add("review_item_without_metadata", 1)
            continue
        pairs.append((position[key], text))
    if not pairs:
        raise DataError(
            f"no usable (review, item) pairs in {cfg.reviews_path}: {stats.summary()}; check paths/columns"
        )
    rng = random.Random(cfg.seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    num_eval = max(1, round(len(pairs) * cfg.eval_fraction))
    held = [pairs[i] for i in order[:num_eval]]
    train = [pairs[i] for i in order[num_eval:]]
    if cfg.max_pairs:
        train = train[: cfg.max_pairs]
    held = held[: cfg.eval_max_queries]
    if not train:
        raise DataError(
            f"{cfg.reviews_path}: all {len(pairs)} pairs went to the held-out split; lower eval_fraction"
        )
    counts = {
        "items": len(keys),
        "pairs": len(pairs),
        "train_pairs": len(train),
        "eval_queries": len(held),
        "profile_reviews": profile_used,
    }
    return PairCorpus(
        item_keys=keys,
        item_texts=[items[k] for k in keys],
        train=train,
        eval=held,
        stats=stats,
        counts=counts,
    )


def _long_enough(text: str, cfg: PairsConfig) -> bool:
    return len(text) > cfg.min_chars


AMAZON_ITEM_FIELDS = ("title", "features", "description")
AMAZON_REVIEW_FIELDS = ("title", "text")


def _clean_amazon(
    rec: dict, fields: tuple[str, ...], too_short: str, path: str | Path, line_no: int, stats: SkipStats,
    min_chars: int,
) -> tuple[str, str] | None:  # fmt: skip
    """(parent_asin, `fields` joined) of one record, or None with the skip counted under its reason."""
    key = get_str(rec, "parent_asin", path, line_no, stats)
    if key is None:
        return None
    text = _join([rec.get(f) for f in fields])
    if len(text) <= min_chars:
        stats.skip(too_short, path, line_no, f"{len(text)} chars")
        return None
    return key, text


def clean_amazon_item(
    rec: dict, path: str | Path, line_no: int, stats: SkipStats, min_chars: int
) -> tuple[str, str] | None:
    """One metadata record -> (parent_asin, title + features + description), or None with the skip counted.

    Shared by `iter_amazon_items` (line by line) and the block reader of `pair_shards.prepare_pairs`, so both
    clean and skip identically.
    """
    return _clean_amazon(rec, AMAZON_ITEM_FIELDS, "item_text_too_short", path, line_no, stats, min_chars)


def clean_amazon_review(
    rec: dict, path: str | Path, line_no: int, stats: SkipStats, min_chars: int
) -> tuple[str, str] | None:
    """One review record -> (parent_asin, title + text), or None with the skip counted (see above)."""
    return _clean_amazon(rec, AMAZON_REVIEW_FIELDS, "review_too_short", path, line_no, stats, min_chars)


def iter_amazon_items(cfg: PairsConfig, stats: SkipStats, info: FileInfo | None = None) -> Iterator[Record]:
    """Amazon metadata lines -> (line, parent_asin, title + features + description) longer than min_chars."""
    meta_path = check_file(resolve_path(cfg.meta_path), "Amazon item metadata (blair.pairs.meta_path)")
    for line_no, rec in iter_json_records(meta_path, stats, info=info):
        got = clean_amazon_item(rec, meta_path, line_no, stats, cfg.min_chars)
        if got is not None:
            yield line_no, *got


def iter_amazon_reviews(cfg: PairsConfig, stats: SkipStats, info: FileInfo | None = None) -> Iterator[Record]:
    """Amazon review lines -> (line, parent_asin, title + text) longer than min_chars."""
    reviews_path = check_file(resolve_path(cfg.reviews_path), "Amazon reviews (blair.pairs.reviews_path)")
    for line_no, rec in iter_json_records(reviews_path, stats, info=info):
        got = clean_amazon_review(rec, reviews_path, line_no, stats, cfg.min_chars)
        if got is not None:
            yield line_no, *got


STEAM_ITEM_FIELDS = ("app_name", "publisher", "developer", "genres", "tags", "specs")


def iter_steam_items(cfg: PairsConfig, stats: SkipStats, info: FileInfo | None = None) -> Iterator[Record]:
    """Steam game lines -> (line, id, app_name | publisher | ... | specs) longer than min_chars."""
    games_path = check_file(resolve_path(cfg.meta_path), "Steam games (blair.pairs.meta_path)")
    for line_no, rec in iter_literal_records(games_path, stats, info=info):
        key = get_str(rec, "id", games_path, line_no, stats)
        if key is None:
            continue
        text = " | ".join(t for t in (text_of(rec.get(f)) for f in STEAM_ITEM_FIELDS) if t)
        if not _long_enough(text, cfg):
            stats.skip("item_text_too_short", games_path, line_no, f"{len(text)} chars")
            continue
        yield line_no, key, text


def iter_steam_reviews(cfg: PairsConfig, stats: SkipStats, info: FileInfo | None = None) -> Iterator[Record]:
    """Steam review lines -> (line, product_id, text) longer than min_chars."""
    reviews_path = check_file(resolve_path(cfg.reviews_path), "Steam reviews (blair.pairs.reviews_path)")
    for line_no, rec in iter_literal_records(reviews_path, stats, info=info):
        key = get_str(rec, "product_id", reviews_path, line_no, stats)
        if key is None:
            continue
        text = text_of(rec.get("text"))
        if not _long_enough(text, cfg):
            stats.skip("review_too_short", reviews_path, line_no, f"{len(text)} chars")
            continue
        yield line_no, key, text


def _collect(
    cfg: PairsConfig, stats: SkipStats, items_iter, reviews_iter
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """In memory: the first record of each item (later ones counted as duplicate_item) and every review."""
    items: dict[str, str] = {}
    path = Path(resolve_path(cfg.meta_path))
    for line_no, key, text in items_iter(cfg, stats):
        if key in items:
            stats.skip("duplicate_item", path, line_no, key)
            continue
        items[key] = text
    reviews = [(key, text) for _, key, text in reviews_iter(cfg, stats)]
    return items, reviews


def _read_table(path: Path) -> list[dict[str, Any]]:
    name = path.name.lower()
    if ".parquet" in name:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith((".csv", ".csv.gz", ".tsv")):
        import pyarrow.csv as pacsv

        opts = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",", newlines_in_values=True)
        return pacsv.read_csv(path, parse_options=opts).to_pylist()
    raise DataError(f"{path}: unsupported table format; use .parquet[.*] or .csv/.tsv")


def table_pairs(cfg: PairsConfig, stats: SkipStats) -> tuple[dict[str, str], list[Record], int]:
    """A review table -> (item key -> metadata text, [(row, item key, review)], profile reviews used).

    Reviews come grouped by item; `row` is the review's row number (the header is row 1, as in skip
    examples), so a review's identity does not depend on the other rows.
    """
    path = check_file(resolve_path(cfg.reviews_path), "review table (blair.pairs.reviews_path)")
    rows = _read_table(path)
    if not rows:
        raise DataError(f"{path}: the table is empty")
    needed = [cfg.item_column, *cfg.review_columns, *cfg.item_columns]
    if cfg.profile_reviews_per_item:
        needed += cfg.profile_columns + ([cfg.profile_sort_column] if cfg.profile_sort_column else [])
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the table has {sorted(rows[0])}")
    by_item: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for row_no, row in enumerate(rows, start=2):  # row 1 = header, as a CSV reader would number it
        key = row.get(cfg.item_column)
        if key is None or (isinstance(key, str) and not key.strip()):
            stats.skip(f"missing_field:{cfg.item_column}", path, row_no)
            continue
        by_item[str(key)].append((row_no, row))
    items: dict[str, str] = {}
    reviews: list[Record] = []
    profile_used = 0
    for key, item_rows in by_item.items():
        meta = " | ".join(t for t in (text_of(item_rows[0][1].get(c)) for c in cfg.item_columns) if t)
        queries = item_rows
        if cfg.profile_reviews_per_item:
            ranked = item_rows
            if cfg.profile_sort_column:
                ranked = sorted(item_rows, key=lambda r: -(r[1].get(cfg.profile_sort_column) or 0))
            profile = ranked[: cfg.profile_reviews_per_item]
            taken = {row_no for row_no, _ in profile}
            queries = [r for r in item_rows if r[0] not in taken]
            profile_used += len(profile)
            lines = [_join([row.get(c) for c in cfg.profile_columns]) for _, row in profile]
            lines = [t for t in lines if t]
            if lines:
                meta = f"{meta}. Highlights: " + "; ".join(lines)
        if not _long_enough(meta, cfg):
            stats.skip("item_text_too_short", path, item_rows[0][0], f"item {key}: {len(meta)} chars")
        else:
            items[key] = meta
        for row_no, row in queries:
            text = _join([row.get(c) for c in cfg.review_columns])
            if not _long_enough(text, cfg):
                stats.skip("review_too_short", path, row_no, f"{len(text)} chars")
                continue
            reviews.append((row_no, key, text))
    return items, reviews, profile_used
