"""MovieLens: 100K from the installed recbole package (default), 1M (``::`` .dat) or 20M/25M (.csv) files."""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path

from data_shards.config import DataConfig
from data_shards.io import DataError, FileInfo, SkipStats, check_file, iter_lines
from data_shards.sources import (
    INTERACTION_SCHEMA,
    ITEM_SCHEMA,
    MAX_TS_MS,
    ORD_FILE_SHIFT,
    ParquetSink,
    SourceOutput,
    id_ok,
    rating_ok,
)
from data_shards.text import movielens_text

_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
# first column names of a header line (recbole `user_id:token`, MovieLens csv `userId`), lowercased
_RATINGS_HEADER = {"user_id", "userid"}
_ITEMS_HEADER = {"item_id", "movieid"}


def _is_header(line_no: int, first_field: str, names: set[str]) -> bool:
    """Whether this is line 1 naming the first column: only then is it skipped, so a header-less file keeps
    its first row."""
    return line_no == 1 and first_field.strip().partition(":")[0].lower() in names


def recbole_ml100k() -> tuple[Path, Path]:
    """Paths of ML-100K's ``.inter`` and ``.item`` inside the installed recbole wheel (never imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "MovieLens-100K comes from the recbole package, which is not installed: run `make install`"
        )
    folder = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    return check_file(folder / "ml-100k.inter", "ML-100K ratings"), check_file(
        folder / "ml-100k.item", "ML-100K items"
    )


def _decode(line: bytes, latin1_ok: bool, path: Path, line_no: int, stats: SkipStats) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        if latin1_ok:  # ML-1M's movies.dat is ISO-8859-1
            return line.decode("latin-1")
        stats.skip("non_utf8", path, line_no)
        return None


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for ext in (".inter", ".item", ".dat", ".csv"):
        if name.endswith(ext):
            return ext[1:]
    raise DataError(f"{path}: unknown MovieLens file type (expected .inter/.item from recbole, .dat or .csv)")


def _default_items(ratings: Path) -> Path:
    kind = _kind(ratings)
    candidates = {"inter": [ratings.with_suffix(".item")], "dat": [ratings.parent / "movies.dat"],
                  "csv": [ratings.parent / "movies.csv"]}[kind]  # fmt: skip
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"data.items is empty and no {candidates[0].name} next to {ratings}: set data.items")


def read_movielens(cfg: DataConfig, work: Path, stats: SkipStats) -> SourceOutput:
    """Validate MovieLens ratings and movies into Parquet (ids kept as strings, timestamps in ms)."""
    if cfg.interactions:
        ratings = check_file(cfg.interactions, "MovieLens ratings")
        items = check_file(cfg.items, "MovieLens movies") if cfg.items else _default_items(ratings)
    else:
        ratings, items = recbole_ml100k()
        if cfg.items:
            items = check_file(cfg.items, "MovieLens movies")
    out = SourceOutput(interactions=work / "interactions.parquet", items=work / "items.parquet")

    info = FileInfo(str(ratings))
    sink = ParquetSink(out.interactions, INTERACTION_SCHEMA)
    kind = _kind(ratings)
    sep = {"inter": "\t", "dat": "::", "csv": ","}.get(kind)
    if sep is None:
        raise DataError(f"{ratings}: not a ratings file (.inter, .dat or .csv)")
    for line_no, raw in iter_lines(ratings, stats, info=info):
        text = _decode(raw, False, ratings, line_no, stats)
        if text is None:
            continue
        parts = text.split(sep)
        if _is_header(line_no, parts[0], _RATINGS_HEADER):
            continue
        if len(parts) < 4:
            stats.skip("malformed_row", ratings, line_no, f"expected 4 fields, got {len(parts)}")
            continue
        user, item = parts[0].strip(), parts[1].strip()
        if not user or not item:
            stats.skip("empty_field:user_id" if not user else "empty_field:item_id", ratings, line_no)
            continue
        if not id_ok(user, "user_id", ratings, line_no, stats):
            continue
        if not id_ok(item, "item_id", ratings, line_no, stats):
            continue
        try:
            rating = float(parts[2])
        except ValueError:
            stats.skip("wrong_type:rating", ratings, line_no, f"{parts[2]!r} is not a number")
            continue
        if not rating_ok(rating, parts[2], ratings, line_no, stats):
            continue
        try:
            secs = float(parts[3])
        except ValueError:
            stats.skip("wrong_type:timestamp", ratings, line_no, f"{parts[3]!r} is not a number")
            continue
        if not 0 <= secs < MAX_TS_MS / 1000:  # also NaN and inf (1e400 parses as inf)
            stats.skip("bad_value:timestamp", ratings, line_no, f"{parts[3]!r:.30} is not unix seconds >= 0")
            continue
        sink.append(user, item, int(secs) * 1000, rating, line_no)
    sink.close()
    out.inputs.append(info)

    info = FileInfo(str(items))
    isink = ParquetSink(out.items, ITEM_SCHEMA)
    ikind = _kind(items)
    lines = iter_lines(items, stats, info=info)
    if ikind == "csv":
        rows = ((n, r) for n, r in _csv_rows(lines, items, stats))
    else:
        rows = _sep_rows(lines, items, stats, "\t" if ikind == "item" else "::", latin1_ok=ikind == "dat")
    for line_no, parts in rows:
        if _is_header(line_no, parts[0], _ITEMS_HEADER):
            continue
        if len(parts) < 3:
            stats.skip("malformed_row", items, line_no, f"expected at least 3 fields, got {len(parts)}")
            continue
        item = parts[0].strip()
        if not item:
            stats.skip("empty_field:item_id", items, line_no)
            continue
        if ikind == "item":  # item_id, movie_title, release_year, class (space-separated genres)
            title, year = parts[1], parts[2]
            genres = parts[3].split() if len(parts) > 3 else []
        else:  # movieId, "Title (Year)", Genre|Genre
            m = _YEAR.match(parts[1].strip())
            title, year = (m.group(1), m.group(2)) if m else (parts[1], "")
            genres = [] if parts[2].strip() == "(no genres listed)" else parts[2].split("|")
        text = movielens_text(title, year, genres)
        if not text:
            out.items_with_empty_text += 1
        isink.append(item, text, (1 << ORD_FILE_SHIFT) | line_no)
    isink.close()
    out.inputs.append(info)
    return out


def _sep_rows(lines, path: Path, stats: SkipStats, sep: str, *, latin1_ok: bool):
    for line_no, raw in lines:
        text = _decode(raw, latin1_ok, path, line_no, stats)
        if text is not None:
            yield line_no, text.split(sep)


def _csv_rows(lines, path: Path, stats: SkipStats):
    for line_no, raw in lines:
        text = _decode(raw, False, path, line_no, stats)
        if text is None:
            continue
        try:
            row = next(csv.reader([text]))
        except csv.Error as err:
            stats.skip("malformed_row", path, line_no, str(err))
            continue
        yield line_no, row
