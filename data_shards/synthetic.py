"""Synthetic Amazon Reviews 2023 data, in the exact file formats, for scale tests and benchmarks.

Each item has a hidden category; its title, features, categories and description use that category's words,
and each user mostly reviews items of one preferred category, so item text carries signal about who buys what.
Popularity is skewed, about 0.1% of events are exact duplicates, ~1% of items have no metadata, and a few
lines per million are broken (malformed JSON, bad UTF-8, missing or mistyped fields)
to exercise the slow path.
Rows are generated in DuckDB (hash-based, deterministic for a seed) and streamed to disk in chunks.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import duckdb

CATEGORIES = [
    ("Racing", "car speed track drift turbo lap engine nitro"),
    ("Puzzle", "logic tile riddle brain match block clue maze"),
    ("Shooter", "gun squad sniper ammo tactical mission arena recoil"),
    ("Role Playing", "quest dragon sword mage dungeon loot party spell"),
    ("Sports", "soccer ball league goal coach season stadium team"),
    ("Strategy", "empire army resource siege tactics map kingdom turn"),
    ("Horror", "zombie dark fear haunted survival ghost night scream"),
    ("Music", "rhythm guitar beat song dance drum melody stage"),
    ("Flight", "plane pilot cockpit runway jet altitude wing radar"),
    ("Farming", "crop tractor harvest barn seed cattle field orchard"),
    ("Fighting", "combo punch kick tournament fighter arcade round duel"),
    ("Kids", "cartoon friendly colorful learn animal family fun simple"),
]
ADJ = ["great", "solid", "fun", "cheap", "premium", "classic", "new", "deluxe", "compact", "ultimate"]
BAD_LINES = [
    b'{"rating": 5.0, "title": "cut off", "user_id": "AB',
    b'{"rating": 4.0, "title": "bad \xff\xfe", "parent_asin": "B000000000", "user_id": "X", "timestamp": 1}',
    b'{"rating": 3.0, "title": "no user", "parent_asin": "B000000001", "timestamp": 1600000000000}',
    b'{"rating": "five", "user_id": "AXX", "parent_asin": "B000000002", "timestamp": 1600000000000}',
    b'{"rating": 2.0, "user_id": "AYY", "parent_asin": "B000000003", "timestamp": "yesterday"}',
    b"[1, 2, 3]",
]


def _con(threads: int) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {threads}")
    con.execute("SET memory_limit = '1GB'")
    con.execute("SET enable_progress_bar = false")
    return con


def _macros(con: duckdb.DuckDBPyConnection, seed: int) -> None:
    cats = ", ".join(f"'{name}'" for name, _ in CATEGORIES)
    words = ", ".join(f"{[w for w in ws.split()]}" for _, ws in CATEGORIES)
    adj = f"{ADJ}"
    con.execute(f"CREATE MACRO rnd(x, k) AS (hash(x * 131 + k * 7919 + {seed}) % 1000000) / 1000000.0")
    con.execute(f"CREATE MACRO cat_name(c) AS list_element([{cats}], c + 1)")
    con.execute(f"CREATE MACRO cat_word(c, x, k) AS list_element(list_element([{words}], c + 1), "
                "(hash(x * 17 + k) % 8)::INT + 1)")  # fmt: skip
    con.execute(f"CREATE MACRO adj(x) AS list_element({adj}, (hash(x * 29) % {len(ADJ)})::INT + 1)")
    con.execute("CREATE MACRO uid(u) AS 'A' || upper(substr(md5('u' || u::VARCHAR), 1, 27))")
    con.execute("CREATE MACRO asin(i) AS 'B0' || upper(substr(md5('i' || i::VARCHAR), 1, 8))")


def _write_lines(
    con: duckdb.DuckDBPyConnection, sql: str, path: Path, *, bad_every: int, compress: bool
) -> int:
    opener = gzip.open if compress else open
    n = 0
    with opener(path, "wb") as fh:
        reader = con.sql(sql).to_arrow_reader(500_000)
        for batch in reader:
            lines = batch.column(0).to_pylist()
            data = ("\n".join(lines) + "\n").encode("utf-8")
            if bad_every:
                parts = data.split(b"\n")
                for j, k in enumerate(range(bad_every // 2, len(parts) - 1, bad_every)):
                    parts[k] = BAD_LINES[(n + j) % len(BAD_LINES)]
                data = b"\n".join(parts)
            fh.write(data)
            n += len(lines)
    return n


def generate_amazon(
    out_dir: str | Path,
    *,
    num_reviews: int,
    num_users: int | None = None,
    num_items: int | None = None,
    seed: int = 0,
    bad_every: int = 250_000,
    compress: bool = False,
    threads: int = 2,
) -> tuple[Path, Path]:
    """Write ``reviews.jsonl`` and ``meta.jsonl`` (``.gz`` if `compress`) under `out_dir`; return both paths.

    `bad_every`: one broken line per this many reviews (0 = none).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_users = num_users or max(10, num_reviews // 8)
    num_items = num_items or max(20, num_reviews // 25)
    ncat = len(CATEGORIES)
    ext = ".jsonl.gz" if compress else ".jsonl"
    con = _con(threads)
    _macros(con, seed)
    # a duplicate of the previous event every 1000 rows; user popularity and item choice are skewed
    reviews_sql = f"""
    SELECT json_object(
        'rating', (1 + floor(rnd(s, 1) * 5))::DOUBLE,
        'title', adj(s) || ' ' || cat_word(c, s, 2),
        'text', 'I bought this for the ' || cat_word(c, s, 3) || ' and the ' || cat_word(c, s, 4)
                || '. It is ' || adj(s + 1) || ', the ' || cat_word(c, s, 5) || ' works as described and '
                || 'I would recommend it to anyone who likes ' || cat_name(c) || ' games.',
        'images', []::VARCHAR[],
        'asin', asin(i) || 'X',
        'parent_asin', asin(i),
        'user_id', uid(u),
        'timestamp', (1300000000000 + floor(rnd(s, 6) * 380000000000))::BIGINT,
        'helpful_vote', (hash(s * 3) % 5)::INT,
        'verified_purchase', rnd(s, 7) < 0.9
    )::VARCHAR AS line
    FROM (
        SELECT s, u, c, CASE WHEN rnd(s, 8) < 0.8
            THEN (floor(pow(rnd(s, 9), 1.5) * {num_items // ncat})::BIGINT * {ncat} + c) % {num_items}
            ELSE floor(pow(rnd(s, 10), 2.0) * {num_items})::BIGINT END AS i
        FROM (
            SELECT s, u, u % {ncat} AS c FROM (
                SELECT s, floor(pow(rnd(s, 11), 1.3) * {num_users})::BIGINT AS u FROM (
                    SELECT CASE WHEN r % 1000 = 999 THEN r - 1 ELSE r END AS s FROM range({num_reviews}) t(r)
                )
            )
        )
    )
    """
    reviews = out / f"reviews{ext}"
    _write_lines(con, reviews_sql, reviews, bad_every=bad_every, compress=compress)
    meta_sql = f"""
    SELECT json_object(
        'main_category', 'Video Games',
        'title', cat_word(c, i, 1) || ' ' || cat_word(c, i, 2) || ' ' || adj(i) || ' edition ' || i::VARCHAR,
        'average_rating', round(1 + rnd(i, 3) * 4, 1),
        'rating_number', (hash(i) % 5000)::INT,
        'features', CASE WHEN i % 97 = 5 THEN []::VARCHAR[] ELSE
            [cat_word(c, i, 4) || ' mode', 'supports ' || cat_word(c, i, 5), adj(i + 2) || ' controls'] END,
        'description', CASE WHEN i % 97 = 5 THEN []::VARCHAR[] ELSE
            ['A ' || cat_name(c) || ' game about ' || cat_word(c, i, 6) || ' and ' || cat_word(c, i, 7)] END,
        'price', CASE WHEN i % 3 = 0 THEN NULL ELSE round(5 + rnd(i, 8) * 55, 2) END,
        'images', []::VARCHAR[],
        'videos', []::VARCHAR[],
        'store', 'Studio ' || (hash(i * 5) % 300)::VARCHAR,
        'categories', ['Video Games', cat_name(c)],
        'details', json_object('Release date', '2019', 'Platform', 'PC'),
        'parent_asin', asin(i),
        'bought_together', NULL,
        'subtitle', NULL,
        'author', NULL
    )::VARCHAR AS line
    FROM (SELECT i, i % {ncat} AS c FROM range({num_items}) t(i) WHERE i % 101 <> 7)
    """
    meta = out / f"meta{ext}"
    _write_lines(con, meta_sql, meta, bad_every=0, compress=compress)
    con.close()
    return reviews, meta
