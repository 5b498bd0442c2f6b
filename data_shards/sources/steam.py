"""Steam (the SASRec copy): reviews and games, one Python-literal dict per line, parsed with ast.literal_eval.

Reviews carry ``username``, ``product_id`` and ``date`` (``YYYY-MM-DD``, so many same-day ties: the input
order breaks them); there is no rating, so every event gets rating 1.0.
Games carry ``id`` and the text fields.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from data_shards.config import DataConfig
from data_shards.io import FileInfo, SkipStats, check_file, get_str, iter_literal_records
from data_shards.sources import (
    INTERACTION_SCHEMA,
    ITEM_SCHEMA,
    ORD_FILE_SHIFT,
    ParquetSink,
    SourceOutput,
    id_ok,
)
from data_shards.text import steam_text


def _date_ms(value: object, cache: dict[str, int]) -> int | None:
    """A ``YYYY-MM-DD`` date as unix milliseconds (midnight UTC), or None if it is not one."""
    if not isinstance(value, str):
        return None
    ms = cache.get(value)
    if ms is None:
        try:
            day = dt.datetime.strptime(value.strip(), "%Y-%m-%d").replace(tzinfo=dt.UTC)
        except ValueError:
            return None
        ms = cache[value] = int(day.timestamp()) * 1000
    return ms


def read_steam(cfg: DataConfig, work: Path, stats: SkipStats) -> SourceOutput:
    """Validate Steam reviews and games into Parquet."""
    reviews = check_file(cfg.interactions, "Steam reviews")
    games = check_file(cfg.items, "Steam games")
    out = SourceOutput(interactions=work / "interactions.parquet", items=work / "items.parquet")

    sink = ParquetSink(out.interactions, INTERACTION_SCHEMA)
    info = FileInfo(str(reviews))
    cache: dict[str, int] = {}
    for line_no, rec in iter_literal_records(reviews, stats, info=info):
        user = get_str(rec, "username", reviews, line_no, stats)
        if user is None or not id_ok(user, "username", reviews, line_no, stats):
            continue
        item = get_str(rec, "product_id", reviews, line_no, stats)
        if item is None or not id_ok(item, "product_id", reviews, line_no, stats):
            continue
        if rec.get("date") is None:
            stats.skip("missing_field:date", reviews, line_no)
            continue
        ts = _date_ms(rec["date"], cache)
        if ts is None:
            stats.skip("bad_value:date", reviews, line_no, f"expected YYYY-MM-DD, got {rec['date']!r:.30}")
            continue
        sink.append(user, item, ts, 1.0, line_no)
    sink.close()
    out.inputs.append(info)

    isink = ParquetSink(out.items, ITEM_SCHEMA)
    info = FileInfo(str(games))
    for line_no, rec in iter_literal_records(games, stats, info=info):
        item = get_str(rec, "id", games, line_no, stats)
        if item is None:
            continue
        text = steam_text(rec)
        out.items_with_empty_text += not text
        isink.append(item, text, (1 << ORD_FILE_SHIFT) | line_no)
    isink.close()
    out.inputs.append(info)
    return out
