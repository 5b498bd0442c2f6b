"""Source readers on hand-written fixtures in the exact raw formats, malformed lines included."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import data_shards.io as dio
from data_shards.config import DataConfig
from data_shards.id_maps import read_id_map
from data_shards.io import DataError, SkipStats, iter_json_records, iter_literal_records
from data_shards.prepare import prepare
from data_shards.reader import iter_item_texts, iter_sequences
from data_shards.sources import amazon2023
from data_shards.sources.amazon2023 import read_amazon2023
from data_shards.sources.movielens import read_movielens
from data_shards.sources.steam import read_steam
from data_shards.synthetic import generate_amazon

FIX = Path(__file__).parent / "fixtures"


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("root", str(tmp_path / "out"))
    kw.setdefault("name", "ds")
    return DataConfig(**kw)


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _amazon_files(folder: Path, reviews: list[dict | bytes], items: str) -> tuple[Path, Path]:
    """reviews.jsonl (dicts as JSON, bytes as they are) and meta.jsonl with a titled record per item."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in reviews]
    (folder / "reviews.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    (folder / "meta.jsonl").write_text(
        "".join(json.dumps({"parent_asin": i, "title": i}) + "\n" for i in items)
    )
    return folder / "reviews.jsonl", folder / "meta.jsonl"


def _review(item: str, ts: int, user: str = "U") -> dict:
    return {"user_id": user, "parent_asin": item, "rating": 5.0, "timestamp": ts}


def test_amazon_reviews_and_metadata(tmp_path):
    stats = SkipStats()
    cfg = _cfg(tmp_path, source="amazon2023", interactions=str(FIX / "amazon/reviews.jsonl"),
               items=str(FIX / "amazon/meta.jsonl"))  # fmt: skip
    out = read_amazon2023(cfg, tmp_path, stats)
    rows = _rows(out.interactions)
    assert len(rows) == 14
    assert rows[0] == {"user_id": "U1", "item_id": "I1", "ts": 1_000_000, "rating": 5.0, "ord": 1}
    assert {r["ord"] for r in rows} == {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 16, 17, 18, 19}
    c = stats.counts
    assert c["malformed_json"] == 2  # reviews line 10, meta line 6
    assert c["missing_field:user_id"] == 1 and c["wrong_type:timestamp"] == 1 and c["wrong_type:rating"] == 1
    assert c["blank_line"] == 1 and c["empty_field:user_id"] == 1 and c["non_utf8"] == 1
    assert c["not_an_object"] == 1 and c["missing_field:parent_asin"] == 1
    assert stats.examples["malformed_json"][0].startswith(f"{FIX / 'amazon/reviews.jsonl'}:10")
    assert stats.examples["non_utf8"][0].startswith(f"{FIX / 'amazon/reviews.jsonl'}:21")
    texts = {r["item_id"]: r["text"] for r in reversed(_rows(out.items))}
    assert texts["I1"] == "Speed Racer | Fast cars Split screen | Video Games, Racing | Race the world."
    assert texts["I3"] == "Mystery | a string, not a list | C | d"  # a string where a list was expected
    assert texts["I4"] == "" and out.items_with_empty_text == 1
    assert [i.lines for i in out.inputs] == [22, 7] and all(len(i.sha256) == 64 for i in out.inputs)


def test_amazon_prepare_dedup_tiebreak_and_metadata_filter(tmp_path):
    cfg = _cfg(tmp_path, source="amazon2023", interactions=str(FIX / "amazon/reviews.jsonl"),
               items=str(FIX / "amazon/meta.jsonl"), min_user_interactions=4,
               min_item_interactions=0)  # fmt: skip
    out = prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["raw_interactions"] == 14 and m["counts"]["raw_users"] == 3
    assert m["skipped"]["duplicate_event"] == 1
    assert m["skipped"]["item_without_metadata"] == 1
    assert m["skipped"]["duplicate_metadata"] == 1
    assert "I9" in m["skipped_examples"]["item_without_metadata"][0]
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (3, 4, 12)
    assert (out / "user_ids.txt").read_text().split() == ["U1", "U2", "U3"]
    assert (out / "item_ids.txt").read_text().split() == ["I1", "I2", "I3", "I4"]
    seqs = {u: (items.tolist(), ts.tolist()) for u, items, ts, _ in iter_sequences(out)}
    # U2 has I1 and I2 at the same second: input order breaks the tie
    assert seqs[2] == ([1, 2, 3, 4], [1500, 1500, 2500, 3500])
    texts = {item: text for item, _, text in iter_item_texts(out, verify=True)}
    assert texts[2] == "Puzzle Box" and texts[4] == ""


def test_amazon_orders_and_dedups_on_milliseconds(tmp_path):
    """Events within one second keep their millisecond order; the same item again at another ms is kept."""
    t = 1_600_000_000_000
    events = [
        ("A", t + 900),
        ("B", t + 100),
        ("C", t + 1000),
        ("D", t + 2000),
        ("D", t + 2500),
        ("D", t + 2500),
    ]
    reviews, meta = _amazon_files(tmp_path / "raw", [_review(i, ts) for i, ts in events], "ABCD")
    cfg = _cfg(tmp_path, source="amazon2023", interactions=str(reviews), items=str(meta),
               min_user_interactions=4, min_item_interactions=0)  # fmt: skip
    out = prepare(cfg)
    ((_, items, ts, _),) = list(iter_sequences(out))
    names = (out / "item_ids.txt").read_text().split()
    assert [names[i - 1] for i in items] == ["B", "A", "C", "D", "D"]
    assert ts.tolist() == [1_600_000_000, 1_600_000_000, 1_600_000_001, 1_600_000_002, 1_600_000_002]
    assert json.loads((out / "manifest.json").read_text())["skipped"] == {"duplicate_event": 1}


@pytest.mark.parametrize("arrow", [True, False])
def test_amazon_absurd_timestamp_or_rating_is_a_counted_skip(tmp_path, monkeypatch, arrow):
    """Timestamps beyond int64 ms or <= 0 and ratings that are no finite float32 (an int of 401 digits too)
    are skips, never crashes; the Arrow block path (file 1 parses in Arrow) and the per-line path count the
    same."""
    if not arrow:
        monkeypatch.setattr(amazon2023, "_arrow_parse", lambda block, schema: None)
    t = 1_600_000_000_000
    good = [_review(i, t + k * 1000) for k, i in enumerate("ABCD")]
    huge = b'{"user_id": "V", "parent_asin": "A", "rating": 1' + b"0" * 400 + b', "timestamp": 1600000000000}'
    parsed = [
        _review("A", 0, "V"),
        {"user_id": "V", "parent_asin": "A", "rating": -1e39, "timestamp": t},
        huge,
    ]
    rejected = [
        b'{"user_id": "V", "parent_asin": "A", "rating": 5.0, "timestamp": 99999999999999999999999}',
        json.dumps(_review("A", 2**63, "V")).encode(),
        b'{"user_id": "V", "parent_asin": "A", "rating": NaN, "timestamp": 1600000000000}',
        b'{"user_id": "V", "parent_asin": "A", "rating": Infinity, "timestamp": 1600000000000}',
        b'{"user_id": "V", "parent_asin": "A", "rating": 5.0, "timestamp": ' + b"9" * 5000 + b"}",
    ]
    for name, bad, counts in (
        ("1", parsed, {"bad_value:timestamp": 1, "wrong_type:rating": 2}),
        ("2", rejected, {"bad_value:timestamp": 2, "wrong_type:rating": 2, "malformed_json": 1}),
    ):
        reviews, meta = _amazon_files(tmp_path / name, good + bad, "ABCD")
        cfg = _cfg(tmp_path, source="amazon2023", interactions=str(reviews), items=str(meta))
        stats = SkipStats()
        out = read_amazon2023(cfg, tmp_path / name, stats)
        assert [r["item_id"] for r in _rows(out.interactions)] == ["A", "B", "C", "D"]
        assert stats.counts == counts
        assert stats.examples["bad_value:timestamp"][0].startswith(f"{reviews}:5")
    csv = tmp_path / "ratings.csv"
    rows = ["U,A,5.0,1000", "U,B,nan,2000", "U,C,inf,3000", "U,D,5.0,99999999999999999999999", "U,E,5.0,-1"]
    csv.write_text("user_id,parent_asin,rating,timestamp\n" + "\n".join(rows) + "\n")
    stats = SkipStats()
    (tmp_path / "csv").mkdir()
    out = read_amazon2023(_cfg(tmp_path, source="amazon2023", interactions=str(csv), items=str(meta)),
                          tmp_path / "csv", stats)  # fmt: skip
    assert [r["item_id"] for r in _rows(out.interactions)] == ["A"]
    assert stats.counts == {"wrong_type:rating": 2, "bad_value:timestamp": 2}
    assert stats.examples["wrong_type:rating"] == [f"{csv}:3: 'nan' is not a finite float32",
                                                   f"{csv}:4: 'inf' is not a finite float32"]  # fmt: skip


def test_metadata_matching_no_item_is_its_own_error(tmp_path):
    """Metadata keyed otherwise (2018-style `asin`) drops every interaction: the error names the metadata
    file, the count and an item without metadata, not the k-core thresholds."""
    reviews, _ = _amazon_files(tmp_path / "raw", [_review(i, 1000 * k) for k, i in enumerate("ABCDE", 1)], "")
    meta = tmp_path / "raw" / "meta.jsonl"
    meta.write_text("".join(json.dumps({"asin": i, "title": i}) + "\n" for i in "ABCDE"))
    cfg = _cfg(tmp_path, source="amazon2023", interactions=str(reviews), items=str(meta),
               min_user_interactions=4, min_item_interactions=0)  # fmt: skip
    expected = f"{meta}: no interacted item has a metadata record (5 interactions dropped as "
    with pytest.raises(
        DataError, match="^" + re.escape(expected + "item_without_metadata, e.g. item 'A'); ")
    ):
        prepare(cfg)


@pytest.mark.parametrize("blank", [b"", b" \t\r"])
def test_glued_records_next_to_a_blank_line_are_malformed(tmp_path, blank):
    """Two objects on one line are malformed_json even where a blank line in the same block evens out
    Arrow's row count (each line is then checked by Python)."""
    t = 1_600_000_000_000
    glued = json.dumps(_review("A", t)).encode() + json.dumps(_review("B", t + 1000)).encode()
    rest = [_review(i, t + 1000 * k) for k, i in enumerate("CDEF", 2)]
    reviews, meta = _amazon_files(tmp_path / "raw", [glued, blank, *rest], "ABCDEF")
    stats = SkipStats()
    out = read_amazon2023(_cfg(tmp_path, source="amazon2023", interactions=str(reviews), items=str(meta)),
                          tmp_path, stats)  # fmt: skip
    assert [r["item_id"] for r in _rows(out.interactions)] == ["C", "D", "E", "F"]
    assert stats.counts == {"malformed_json": 1, "blank_line": 1}
    assert stats.examples["malformed_json"][0].startswith(f"{reviews}:1: ")


@pytest.mark.parametrize("arrow", [True, False])
def test_amazon_ids_with_control_characters_are_counted_skips(tmp_path, monkeypatch, arrow):
    """An id holding \\n, \\r or another control character would break the one-id-per-line id maps."""
    if not arrow:
        monkeypatch.setattr(amazon2023, "_arrow_parse", lambda block, schema: None)
    t = 1_600_000_000_000
    good = [_review(i, t + 1000 * k) for k, i in enumerate("ABCD")]
    bad = [_review("A", t, "bob\rsmith"), _review("car\nol", t), _review("A", t, "x\x1fy")]
    reviews, meta = _amazon_files(tmp_path / "raw", good + bad, "ABCD")
    stats = SkipStats()
    out = read_amazon2023(_cfg(tmp_path, source="amazon2023", interactions=str(reviews), items=str(meta)),
                          tmp_path, stats)  # fmt: skip
    assert [r["item_id"] for r in _rows(out.interactions)] == ["A", "B", "C", "D"]
    assert stats.counts == {"bad_value:user_id": 2, "bad_value:parent_asin": 1}
    assert stats.examples["bad_value:parent_asin"][0].startswith(f"{reviews}:6")


@pytest.mark.parametrize("arrow", [True, False])
def test_json_lines_that_are_no_object_are_not_an_object_on_both_paths(tmp_path, monkeypatch, arrow):
    """A ``null`` line (which Arrow would read as a row of nulls) is not_an_object on the Arrow path too; a
    record indented by a space is still read."""
    if not arrow:
        monkeypatch.setattr(amazon2023, "_arrow_parse", lambda block, schema: None)
    t = 1_600_000_000_000
    good = [_review(i, t + 1000 * k) for k, i in enumerate("ABC")]
    indented = b" " + json.dumps(_review("D", t + 3000)).encode()
    reviews, meta = _amazon_files(tmp_path / "raw", [*good, b"null", indented], "ABCD")
    stats = SkipStats()
    out = read_amazon2023(_cfg(tmp_path, source="amazon2023", interactions=str(reviews), items=str(meta)),
                          tmp_path, stats)  # fmt: skip
    assert [r["item_id"] for r in _rows(out.interactions)] == ["A", "B", "C", "D"]
    assert stats.counts == {"not_an_object": 1}
    assert stats.examples["not_an_object"] == [f"{reviews}:4: got NoneType"]


def test_deeply_nested_metadata_is_flattened_not_a_crash(tmp_path):
    """Nesting json.loads accepts (400 lists) flattens to its text instead of overflowing the stack."""
    t = 1_600_000_000_000
    reviews, meta = _amazon_files(tmp_path / "raw", [_review("A", t)], "")
    meta.write_bytes(b'{"parent_asin": "A", "title": "T", "features": ' + b"[" * 400 + b'"deep"' + b"]" * 400
                     + b"}\n")  # fmt: skip
    stats = SkipStats()
    out = read_amazon2023(_cfg(tmp_path, source="amazon2023", interactions=str(reviews), items=str(meta)),
                          tmp_path, stats)  # fmt: skip
    assert [(r["item_id"], r["text"]) for r in _rows(out.items)] == [("A", "T | deep")]
    assert stats.total == 0


def test_corrupt_gzip_names_the_last_line_read(tmp_path, monkeypatch):
    """The corrupt_gzip example names the last whole line read before the damage, not the first line of the
    data still pending when the stream broke."""
    data = b"".join(b'{"n": %d, "pad": "%s"}\n' % (k, b"%064x" % (k * 2654435761)) for k in range(20000))
    gz = bytearray(gzip.compress(data, mtime=0))
    gz[len(gz) // 2 :] = bytes(b ^ 0xFF for b in gz[len(gz) // 2 :])  # zlib fails a few blocks later
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(bytes(gz))
    monkeypatch.setattr(dio, "READ_BYTES", 4096)  # the damage is found many reads after line 1
    stats = SkipStats()
    lines = sum(block.count(b"\n") for _, block in dio.iter_line_blocks(path, stats))
    assert 1000 < lines < 15000 and stats.counts == {"corrupt_gzip": 1, "truncated_line": 1}
    assert stats.examples["corrupt_gzip"][0].startswith(f"{path}:{lines}: stream unreadable after this line")


def test_steam_and_movielens_ids_with_control_characters_are_counted_skips(tmp_path):
    """Steam usernames and MovieLens ids with a control character are skipped; the id maps read back."""
    raw = tmp_path / "raw"
    raw.mkdir()
    reviews = raw / "reviews.txt"
    lines = [repr({"username": u, "product_id": g, "date": f"2017-01-0{k}"})
             for u in ("alice", "bob\rsmith", "carol\nx") for k, g in enumerate("12345", 1)]  # fmt: skip
    reviews.write_text("\n".join(lines) + "\n")
    games = raw / "games.txt"
    games.write_text("".join(repr({"id": g, "app_name": f"Game {g}"}) + "\n" for g in "12345"))
    cfg = _cfg(tmp_path, source="steam", interactions=str(reviews), items=str(games), min_item_interactions=0)
    out = prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped"] == {"bad_value:username": 10}
    assert (
        m["skipped_examples"]["bad_value:username"][0]
        == f"{reviews}:6: control character in id 'bob\\rsmith'"
    )
    assert read_id_map(out, "user", m["num_users"]).to_pylist() == ["alice"]
    ratings = raw / "ratings.csv"
    ratings.write_text("userId,movieId,rating,timestamp\n1,10,4.0,100\n1\x1f2,10,4.0,101\n1,1\x002,4.0,102\n")
    (raw / "movies.csv").write_text("movieId,title,genres\n10,Movie (2000),Drama\n")
    stats = SkipStats()
    got = read_movielens(_cfg(tmp_path, interactions=str(ratings)), tmp_path, stats)
    assert [(r["user_id"], r["item_id"]) for r in _rows(got.interactions)] == [("1", "10")]
    assert stats.counts == {"bad_value:user_id": 1, "bad_value:item_id": 1}


def test_amazon_rating_only_csv(tmp_path):
    stats = SkipStats()
    cfg = _cfg(tmp_path, source="amazon2023", interactions=str(FIX / "amazon/ratings.csv"),
               items=str(FIX / "amazon/meta.jsonl"))  # fmt: skip
    out = read_amazon2023(cfg, tmp_path, stats)
    rows = _rows(out.interactions)
    assert [(r["user_id"], r["item_id"], r["ts"]) for r in rows][:2] == [
        ("U1", "I1", 1_000_000),
        ("U1", "I2", 2_000_000),
    ]
    assert len(rows) == 6
    assert stats.counts["malformed_row"] == 1 and stats.counts["wrong_type:rating"] == 1


def test_arrow_fast_path_matches_python_path(tmp_path, monkeypatch):
    reviews, meta = generate_amazon(tmp_path / "raw", num_reviews=20000, bad_every=3000, seed=3)
    cfg = _cfg(tmp_path, source="amazon2023", interactions=str(reviews), items=str(meta))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fast_stats, slow_stats = SkipStats(), SkipStats()
    fast = read_amazon2023(cfg, tmp_path / "a", fast_stats)
    monkeypatch.setattr(amazon2023, "_arrow_parse", lambda block, schema: None)  # force line-by-line Python
    slow = read_amazon2023(cfg, tmp_path / "b", slow_stats)
    assert fast_stats.counts == slow_stats.counts and fast_stats.total == len(range(1500, 20000, 3000))
    assert _rows(fast.interactions) == _rows(slow.interactions)
    assert _rows(fast.items) == _rows(slow.items)
    assert fast.items_with_empty_text == slow.items_with_empty_text


def test_truncated_gzip_is_counted_not_fatal(tmp_path):
    data = (FIX / "amazon/meta.jsonl").read_bytes() * 200
    gz = gzip.compress(data)
    path = tmp_path / "meta.jsonl.gz"
    path.write_bytes(gz[: len(gz) // 2])
    stats = SkipStats()
    records = list(iter_json_records(path, stats))
    assert 0 < len(records) < 200 * 6
    assert stats.counts["truncated_gzip"] == 1
    full = tmp_path / "full.jsonl.gz"
    full.write_bytes(gz + gzip.compress(b'{"x": 1}\n'))  # two gzip members
    stats = SkipStats()
    assert len(list(iter_json_records(full, stats))) == 200 * 6 + 1  # 6 objects per copy, 1 malformed
    assert "truncated_gzip" not in stats.counts


def test_steam_literal_lines(tmp_path):
    stats = SkipStats()
    recs = list(iter_literal_records(FIX / "steam/reviews.json", stats))
    assert len(recs) == 8 and stats.counts["malformed_literal"] == 1  # __import__(...) is not a literal
    stats = SkipStats()
    cfg = _cfg(tmp_path, source="steam", interactions=str(FIX / "steam/reviews.json"),
               items=str(FIX / "steam/games.json"))  # fmt: skip
    out = read_steam(cfg, tmp_path, stats)
    rows = _rows(out.interactions)
    assert [r["item_id"] for r in rows if r["user_id"] == "alice"] == ["10", "20", "30", "40", "99"]
    assert rows[0]["ts"] == 1513468800_000 and rows[0]["rating"] == 1.0  # 2017-12-17 UTC, in ms
    assert stats.counts["bad_value:date"] == 1 and stats.counts["missing_field:username"] == 1
    assert stats.counts["missing_field:id"] == 1
    texts = {r["item_id"]: r["text"] for r in _rows(out.items)}
    assert texts["10"] == "Game Ten | Pub A | Dev A | Action, Indie | Action, Co-op | Single-player"


def test_steam_paper_keeps_games_without_metadata(tmp_path):
    cfg = _cfg(tmp_path, source="steam", interactions=str(FIX / "steam/reviews.json"),
               items=str(FIX / "steam/games.json"), kcore="paper")  # fmt: skip
    out = prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (1, 5, 5)  # bob has 1 event: dropped
    assert m["counts"]["kept_items_without_text"] == 1  # game 99: no record, kept with empty text
    ((_user, items, ts, _),) = list(iter_sequences(out))
    assert items.tolist() == [1, 2, 3, 4, 5] and np.all(np.diff(ts) >= 0)


def test_movielens_dat_and_csv(tmp_path):
    stats = SkipStats()
    cfg = _cfg(tmp_path, interactions=str(FIX / "movielens/ratings.dat"))
    out = read_movielens(cfg, tmp_path, stats)
    assert len(_rows(out.interactions)) == 7
    assert stats.counts["wrong_type:rating"] == 1 and stats.counts["malformed_row"] == 1
    texts = {r["item_id"]: r["text"] for r in _rows(out.items)}
    assert texts["10"] == "Toy Story | 1995 | Animation, Children's, Comedy"
    assert texts["30"].startswith("Cité des enfants perdus, La | 1995")  # latin-1 file
    assert texts["40"] == "No Year Movie | Drama"
    stats = SkipStats()
    cfg = _cfg(tmp_path, interactions=str(FIX / "movielens/ratings.csv"))
    (tmp_path / "csv").mkdir()
    out = read_movielens(cfg, tmp_path / "csv", stats)
    assert [r["ts"] for r in _rows(out.interactions)] == [1_000_000, 1_001_000, 1_002_000, 1_003_000]
    texts = {r["item_id"]: r["text"] for r in _rows(out.items)}
    assert texts["20"] == "American President, The | 1995 | Comedy, Drama, Romance"
    assert texts["40"] == "Untitled" and stats.total == 0


def test_movielens_files_without_a_header_keep_their_first_row(tmp_path):
    """Line 1 is skipped only when it names the first column (``userId``, ``movieId``, recbole ``*:token``):
    a file without a header keeps its first row."""
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "ratings.csv").write_text("1,10,4.0,100\n1,11,3.0,101\n")
    (folder / "movies.csv").write_text("10,Movie A (1995),Comedy\n11,Movie B (1996),Drama\n")
    (folder / "r.inter").write_text("1\t10\t4\t100\n")
    (folder / "r.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\n10\tMovie A\t1995\n"
    )
    stats = SkipStats()
    out = read_movielens(_cfg(tmp_path, interactions=str(folder / "ratings.csv")), tmp_path, stats)
    assert [r["item_id"] for r in _rows(out.interactions)] == ["10", "11"]
    assert [r["item_id"] for r in _rows(out.items)] == ["10", "11"]
    (tmp_path / "inter").mkdir()
    out = read_movielens(_cfg(tmp_path, interactions=str(folder / "r.inter")), tmp_path / "inter", stats)
    assert [r["item_id"] for r in _rows(out.interactions)] == ["10"]
    assert [r["text"] for r in _rows(out.items)] == ["Movie A | 1995"]
    assert stats.total == 0


def test_movielens_absurd_timestamp_or_rating_is_a_counted_skip(tmp_path):
    """inf, 1e400, NaN or negative seconds and non-finite ratings are skips with file:line, never crashes."""
    folder = tmp_path / "raw"
    folder.mkdir()
    rows = ["1,1,4.0,100", "1,2,4.0,inf", "1,3,4.0,1e400", "1,4,4.0,nan", "1,5,4.0,-5", "1,6,4.0,1e16",
            "1,7,nan,101", "1,8,-inf,102", "1,9,1e39,103"]  # fmt: skip
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n")
    (folder / "movies.csv").write_text("movieId,title,genres\n1,Movie (2000),Drama\n")
    stats = SkipStats()
    out = read_movielens(_cfg(tmp_path, interactions=str(folder / "ratings.csv")), tmp_path, stats)
    assert [(r["item_id"], r["ts"]) for r in _rows(out.interactions)] == [("1", 100_000)]
    assert stats.counts == {"bad_value:timestamp": 5, "wrong_type:rating": 3}
    assert (
        stats.examples["bad_value:timestamp"][0]
        == f"{folder / 'ratings.csv'}:3: 'inf' is not unix seconds >= 0"
    )


@pytest.mark.slow
def test_ml100k_from_recbole(tmp_path):
    cfg = _cfg(tmp_path, name="ml100k", users_per_shard=100)
    out = prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert (c["raw_users"], c["raw_items"], c["raw_interactions"]) == (943, 1682, 100_000)
    assert m["num_users"] == 943 and len(m["shards"]["sequences"]) >= 8
    assert sum(s["num_samples"] for s in m["shards"]["items"]) == m["num_items"]
