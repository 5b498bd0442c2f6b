"""BLaIR pair shards: out-of-core prepare matches `load_pairs`, is reproducible, trains under torchrun."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "blair"))

import blair_helpers as H

import data_shards.io as io_mod
import data_shards.sources.amazon2023 as amazon2023
from data_shards.io import DataError
from data_shards.pair_shards import (
    PairStream,
    iter_pairs,
    load_pair_manifest,
    prepare_pairs,
    read_candidates,
    sample_candidates,
)
from data_shards.pairs import PairsConfig, load_pairs
from data_shards.reader import iter_samples
from data_shards.synthetic import ADJ, CATEGORIES, generate_amazon


def _amazon_input(tmp_path: Path, num_reviews: int = 3000) -> tuple[Path, Path]:
    """Synthetic Amazon files plus the mess the pair readers must count: a duplicate item record (kept:
    the first), a duplicate whose first record is too short (kept: the second), a blank line."""
    reviews, meta = generate_amazon(tmp_path / "raw", num_reviews=num_reviews, bad_every=400, seed=5)
    lines = meta.read_text().splitlines()
    first = json.loads(lines[0])
    dup = dict(first, title="a different title for the same item, listed twice in the metadata file")
    short = {"parent_asin": "SHORT1", "title": "tiny", "features": [], "description": []}
    long = {"parent_asin": "SHORT1", "title": "the second record of this item is long enough to keep"}
    extra = [json.dumps(dup), "", json.dumps(short), json.dumps(long)]
    meta.write_text("\n".join(lines + extra) + "\n")
    # whitespace and non-ASCII the cleaning normalises (Python path) next to plain rows (vectorised path)
    key, pad = first["parent_asin"], "x" * 30
    odd = [{"title": "double  space title", "text": pad}, {"title": " lead", "text": f"{pad} "},
           {"title": "tab\there", "text": pad}, {"title": "nbsp\u00a0and\u2003em space", "text": pad},
           {"title": "sep\x1cchar", "text": pad}, {"title": None, "text": pad}, {"title": "", "text": pad},
           {"title": "héllo wörld", "text": pad}, {"title": "x" * 30}, {"text": "x" * 31},
           {"title": "exactly thirty characters long"}, {"text": pad, "parent_asin": f" {key} "},
           {"title": "plain", "text": pad, "parent_asin": " "}]  # fmt: skip
    rows = [json.dumps({"parent_asin": key, **o}) for o in odd]
    with reviews.open("a") as fh:
        fh.write("\n".join(rows * 3) + "\n")
    return reviews, meta


def _cfg(reviews: Path, meta: Path, out: Path, **kw) -> PairsConfig:
    base = dict(source="amazon2023", reviews_path=str(reviews), meta_path=str(meta), dataset_dir=str(out),
                eval_fraction=0.1, eval_max_queries=10**6, pairs_per_shard=400, seed=7)  # fmt: skip
    base.update(kw)
    return PairsConfig(**base)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _check_same_pairs_as_load_pairs(cfg: PairsConfig, out: Path) -> dict:
    """The shards hold exactly load_pairs' pairs (same items, texts, filtering, skip counts)."""
    corpus = load_pairs(cfg)
    manifest = load_pair_manifest(out, cfg)
    train, held = list(iter_pairs(out, "train")), list(iter_pairs(out, "eval"))
    ours = Counter((p.item, p.review, p.item_text) for p in train + held)
    theirs = Counter((i, t, corpus.item_texts[i]) for i, t in corpus.train + corpus.eval)
    assert ours == theirs
    assert manifest["counts"]["items"] == corpus.counts["items"]
    assert manifest["counts"]["pairs"] == corpus.counts["pairs"] == len(train) + len(held)
    assert manifest["skipped"] == dict(sorted(corpus.stats.counts.items()))
    for reason, examples in corpus.stats.examples.items():  # same file:line examples, in file order
        if reason != "review_item_without_metadata":  # load_pairs counts those without examples
            assert manifest["skipped_examples"][reason] == examples, reason
    train_lines, held_lines = {p.line for p in train}, {p.line for p in held}
    assert len(train_lines) == len(train) and not train_lines & held_lines  # held-out never trained on
    assert [p.line for p in train] != sorted(p.line for p in train)  # globally shuffled
    items, texts = read_candidates(out)
    assert items.tolist() == list(range(len(corpus.item_keys))) and texts == corpus.item_texts
    ids = [
        s["item.json"]["item_id"] for e in manifest["shards"]["items"] for s in iter_samples(out / e["path"])
    ]
    assert ids == corpus.item_keys  # original ids travel in item.json
    for split in ("train", "eval", "items"):  # one member per sample, gzipped, as the manifest says
        for e in manifest["shards"][split]:
            shard = out / e["path"]
            assert (
                shard.name.endswith(".tar.gz")
                and hashlib.sha256(shard.read_bytes()).hexdigest() == e["sha256"]
            )
            with tarfile.open(shard, "r:gz") as tar:
                names = tar.getnames()
            assert len(names) == e["num_samples"] and {n.split(".", 1)[1] for n in names} == {
                "item.json" if split == "items" else "pair.json"
            }
    return manifest


def test_amazon_shards_match_load_pairs_and_are_byte_reproducible(tmp_path):
    reviews, meta = _amazon_input(tmp_path)
    out = tmp_path / "pairs"
    cfg = _cfg(reviews, meta, out)
    manifest = _check_same_pairs_as_load_pairs(cfg, out=prepare_pairs(cfg))
    counts = manifest["counts"]
    assert manifest["skipped"]["duplicate_item"] == 1 and manifest["skipped"]["item_text_too_short"] >= 1
    assert {"malformed_json", "non_utf8", "review_item_without_metadata"} <= set(manifest["skipped"])
    assert 0.06 < counts["heldout_pairs"] / counts["pairs"] < 0.14  # eval_fraction by hash, not exact
    assert counts["train_pairs"] + counts["heldout_pairs"] == counts["pairs"]
    assert [e["num_samples"] for e in manifest["shards"]["train"]][:-1] == [400] * (
        len(manifest["shards"]["train"]) - 1
    )
    assert [i["sha256"] for i in manifest["inputs"]] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (meta, reviews)
    ]
    first = _tree_digest(out)
    assert not (tmp_path / "pairs.tmp").exists()
    with pytest.raises(DataError, match="already exists"):
        prepare_pairs(cfg)
    # same input and config, published over the old folder (then with other threads/memory): the same bytes
    prepare_pairs(_cfg(reviews, meta, out, overwrite=True))
    again = _tree_digest(out)
    assert again == first
    prepare_pairs(_cfg(reviews, meta, out, overwrite=True, threads=1, memory_limit="300MB"))
    assert _tree_digest(out) == first
    # caps: max_pairs, eval_max_queries, eval_max_items (each query's item is a candidate)
    capped = _cfg(reviews, meta, tmp_path / "capped", max_pairs=500, eval_max_queries=30, eval_max_items=40)
    prepare_pairs(capped)
    m = load_pair_manifest(tmp_path / "capped", capped)
    assert (m["counts"]["train_pairs"], m["counts"]["eval_queries"], m["counts"]["eval_candidates"]) == (
        500, 30, 40,
    )  # fmt: skip
    items, _ = read_candidates(tmp_path / "capped")
    assert len(items) == 40 and {p.item for p in iter_pairs(tmp_path / "capped", "eval")} <= set(
        items.tolist()
    )
    # the capped train pairs are the first 500 of the uncapped global order
    assert [p.line for p in iter_pairs(tmp_path / "capped")] == [p.line for p in iter_pairs(out)][:500]


def test_amazon_blocks_in_worker_processes_give_the_same_folder(tmp_path, monkeypatch):
    """Stage 1 cut into many small blocks (Arrow, with bisection to per-line parsing around the broken lines)
    in 2 worker processes, from plain and .gz input: load_pairs' pairs and skips, and the same shard bytes
    as a single in-process block."""
    reviews, meta = _amazon_input(tmp_path)
    ref = prepare_pairs(_cfg(reviews, meta, tmp_path / "ref", threads=1))

    def shard_digests(folder: Path) -> dict[str, str]:
        return {k: v for k, v in _tree_digest(folder).items() if k != "manifest.json"}

    small = 16 << 10  # ~60 blocks of the ~1 MB review file
    monkeypatch.setattr(amazon2023, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(
        amazon2023, "iter_line_spans", functools.partial(io_mod.iter_line_spans, block_bytes=small)
    )
    monkeypatch.setattr(
        amazon2023, "iter_line_blocks", functools.partial(io_mod.iter_line_blocks, block_bytes=small)
    )
    cfg = _cfg(reviews, meta, tmp_path / "blocks", threads=2)
    out = prepare_pairs(cfg)
    _check_same_pairs_as_load_pairs(cfg, out)
    assert _tree_digest(out) == _tree_digest(ref)  # the manifest too (threads do not shape the output)
    gz = tmp_path / "reviews.jsonl.gz"
    gz.write_bytes(gzip.compress(reviews.read_bytes(), mtime=0))
    cfg = _cfg(gz, meta, tmp_path / "gz", threads=2)
    out = prepare_pairs(cfg)
    _check_same_pairs_as_load_pairs(cfg, out)
    assert shard_digests(out) == shard_digests(ref)


def test_vectorised_review_cleaning_equals_python():
    """Random titles/texts/keys with every kind of whitespace: rows `_plain_reviews` takes get exactly
    clean_amazon_review's text, and no row it takes is one Python would skip."""
    import pyarrow as pa

    from data_shards.io import SkipStats
    from data_shards.pair_shards import _plain_reviews
    from data_shards.pairs import clean_amazon_review

    rng = np.random.default_rng(0)
    odd = ["\t", "\n", "\r", "\x0b", "\x1c", "\x1f", "\u00a0", "\u2003", "é", "\x85"]
    alphabet, p = ["a", "b", " ", *odd], [0.5, 0.35, 0.1] + [0.05 / len(odd)] * len(odd)

    def rand() -> str | None:
        return None if rng.random() < 0.1 else "".join(rng.choice(alphabet, size=rng.integers(0, 12), p=p))

    recs = [{"parent_asin": rand(), "title": rand(), "text": rand()} for _ in range(20_000)]
    fast, joined = _plain_reviews(pa.Table.from_pylist(recs), min_chars=4)
    assert 1000 < fast.sum() < len(recs) - 1000  # both paths are exercised
    for rec, ok, text in zip(recs, fast, joined.to_pylist(), strict=True):
        if ok:
            assert clean_amazon_review(rec, "f", 1, SkipStats(), 4) == (rec["parent_asin"], text), rec


def test_deeply_nested_metadata_is_flattened_on_every_path(tmp_path):
    """Nesting json.loads accepts (400 lists) flattens to its text in load_pairs and prepare_pairs alike,
    instead of a RecursionError naming no file."""
    deep = "[" * 400 + json.dumps("a wireless mouse with silent clicks") + "]" * 400
    other = json.dumps({"parent_asin": "A2", "title": "Keyboard with backlit keys and a wrist rest"})
    meta = tmp_path / "meta.jsonl"
    meta.write_text(f'{{"parent_asin": "A1", "title": "Mouse", "description": {deep}}}\n{other}\n')
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"parent_asin": f"A{1 + k % 2}", "title": f"review {k}",
                                           "text": "works well, quiet and comfortable every day"}) + "\n"
                               for k in range(20)))  # fmt: skip
    cfg = _cfg(reviews, meta, tmp_path / "out")
    corpus = load_pairs(cfg)
    assert corpus.item_texts[0] == "Mouse a wireless mouse with silent clicks" and corpus.stats.total == 0
    _check_same_pairs_as_load_pairs(cfg, prepare_pairs(cfg))


def test_steam_shards_match_load_pairs(tmp_path):
    games = tmp_path / "steam_games.json"
    games.write_text(
        "\n".join(
            str(g)
            for g in [
                {"id": "10", "app_name": "Counter-Strike", "developer": "Valve", "genres": ["Action"],
                 "tags": ["FPS", "Multiplayer"], "specs": ["Online PvP"]},
                {"id": 20, "app_name": "Farm Together", "publisher": "Milkstone", "genres": ["Casual"],
                 "tags": ["Farming", "Relaxing"]},
                {"id": "10", "app_name": "Counter-Strike again", "tags": ["a duplicate record"]},
                {"id": "30", "app_name": "X"},
            ]
        )
        + "\n{'id': 'broken'\n"
    )  # fmt: skip
    texts = [
        ("10", "Classic shooter, still the best team game around."),
        ("20", "Relaxing farming with friends, I planted pumpkins for hours."),
        ("10", "Great multiplayer maps and tight gunplay, a classic."),
        ("30", "A game whose metadata is too short to be an item at all."),
        ("99", "This review points at a game that is not in the games file."),
        ("20", "short"),
    ] * 4
    reviews = tmp_path / "steam_reviews.json"
    reviews.write_text(
        "\n".join(str({"username": f"u{k}", "product_id": g, "text": t}) for k, (g, t) in enumerate(texts))
        + "\nnot a dict at all\n"
    )
    cfg = PairsConfig(source="steam", reviews_path=str(reviews), meta_path=str(games),
                      dataset_dir=str(tmp_path / "out"), eval_fraction=0.25, pairs_per_shard=3)  # fmt: skip
    manifest = _check_same_pairs_as_load_pairs(cfg, prepare_pairs(cfg))
    assert manifest["counts"]["items"] == 2 and manifest["counts"]["pairs"] == 12
    assert manifest["skipped"]["duplicate_item"] == 1 and manifest["skipped"]["malformed_literal"] == 2
    assert manifest["skipped_examples"]["duplicate_item"] == [f"{games}:3: 10"]
    assert manifest["skipped"]["review_item_without_metadata"] == 8


def test_table_pair_lines_are_table_rows(tmp_path):
    """A table review's line is its row (header = row 1), so a row added for one item changes no other
    review's line or held-out split; the shards hold load_pairs' pairs."""
    table = H.write_review_table(tmp_path / "reviews.csv", reviews_per_item=6)
    cfg = PairsConfig(source="table", reviews_path=str(table), item_column="item",
                      item_columns=["Division Name", "Class Name"], dataset_dir=str(tmp_path / "a"),
                      min_chars=5, eval_fraction=0.25, eval_max_queries=10**6, pairs_per_shard=50,
                      seed=1)  # fmt: skip
    _check_same_pairs_as_load_pairs(cfg, prepare_pairs(cfg))

    def pairs_by_line(out: Path) -> dict[int, tuple[str, str]]:
        return {p.line: (p.review, split) for split in ("train", "eval") for p in iter_pairs(out, split)}

    rows = pacsv.read_csv(table).to_pylist()
    first = pairs_by_line(tmp_path / "a")
    assert len(first) == 32 * 6 and all(rows[line - 2]["Review Text"] in r for line, (r, _) in first.items())
    extra = dict(rows[0], **{"Review Text": "one more review of the first item, long enough to keep"})
    pacsv.write_csv(pa.Table.from_pylist([*rows, extra]), table)  # appended: item 1 gets a seventh review
    prepare_pairs(dataclasses.replace(cfg, dataset_dir=str(tmp_path / "b")))
    second = pairs_by_line(tmp_path / "b")
    new_row = len(rows) + 2
    assert second.pop(new_row)[0].endswith(extra["Review Text"]) and second == first


def test_bad_input_and_config_are_clear_errors(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"parent_asin": "A1", "title": "Wireless mouse with silent clicks"}) + "\n")
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text('{"parent_asin": "A1", "title": "cut off\n[1, 2]\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"(?s)no usable .*{reviews}:1: .*{reviews}:2: got list"):
        prepare_pairs(_cfg(reviews, meta, out))
    assert not out.exists() and not (tmp_path / "out.tmp").exists()  # nothing half-written is left
    with pytest.raises(DataError, match=r"Amazon reviews .* not found"):
        prepare_pairs(_cfg(tmp_path / "nope.jsonl", meta, out))
    with pytest.raises(DataError, match=r"eval_max_items=5: must be 0 .* or >= eval_max_queries"):
        PairsConfig(eval_max_queries=10, eval_max_items=5)
    with pytest.raises(DataError, match="memory_limit"):
        PairsConfig(memory_limit="lots")
    with pytest.raises(DataError, match="dataset_dir is empty"):
        prepare_pairs(_cfg(reviews, meta, ""))
    with pytest.raises(DataError, match="prepare the pairs first"):
        load_pair_manifest(tmp_path)
    good, gmeta = _amazon_input(tmp_path, num_reviews=400)
    cfg = _cfg(good, gmeta, out, pairs_per_shard=150)
    prepare_pairs(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    old = tmp_path / "old"  # a folder of the first pair format (no pair_format key): prepare again
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "pair_format"}))
    with pytest.raises(
        DataError, match=r"pair folder format 1, this code reads format 2 .* prepare it again"
    ):
        PairStream(old, rank=0, world_size=1, batch_size=2, seed=0, shuffle_buffer=8)
    with pytest.raises(DataError, match=r"prepared with blair.pairs min_chars=30 \(config: 10\)"):
        load_pair_manifest(out, _cfg(good, gmeta, out, pairs_per_shard=150, min_chars=10))
    with pytest.raises(DataError, match=r"3 train shard.* cannot feed 4 ranks"):
        PairStream(out, rank=0, world_size=4, batch_size=2, seed=0, shuffle_buffer=8)
    with pytest.raises(DataError, match="less than one batch of 1000"):
        PairStream(out, rank=0, world_size=2, batch_size=1000, seed=0, shuffle_buffer=8)


def test_paths_with_a_quote(tmp_path):
    """Input, output and scratch folders holding a quote reach DuckDB as escaped SQL literals."""
    folder = tmp_path / "o'brien"
    reviews, meta = _amazon_input(folder, num_reviews=400)
    out = prepare_pairs(_cfg(reviews, meta, folder / "pairs"))
    assert load_pair_manifest(out)["counts"]["pairs"] == len(list(iter_pairs(out))) + len(
        list(iter_pairs(out, "eval"))
    )


def test_pair_stream_splits_ranks_and_replays_any_batch(tmp_path):
    reviews, meta = _amazon_input(tmp_path, num_reviews=1000)
    out = prepare_pairs(_cfg(reviews, meta, tmp_path / "out", pairs_per_shard=100))
    all_lines = [p.line for p in iter_pairs(out)]
    streams = [
        PairStream(out, rank=r, world_size=2, batch_size=16, seed=3, shuffle_buffer=50) for r in (0, 1)
    ]
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch > 0
    epoch0 = [list(s.epoch(0)) for s in streams]
    seen = [p.line for rank in epoch0 for batch in rank for p in batch]
    rank_batches = epoch0[0]
    assert all(len(b) == 16 for rank in epoch0 for b in rank) and len(rank_batches) == len(epoch0[1])
    assert len(seen) == len(set(seen)) and set(seen) <= set(all_lines)  # each pair once per epoch at most
    assert len(seen) >= len(all_lines) - 2 * 100 - 2 * 16  # only the tail of the fuller rank is dropped
    for start in (0, 1, 5, len(rank_batches) - 1):  # resume at any batch replays the same batches
        assert list(streams[0].epoch(0, start)) == rank_batches[start:]
    assert list(streams[0].epoch(1)) != rank_batches  # a new order every epoch
    again = PairStream(out, rank=0, world_size=2, batch_size=16, seed=3, shuffle_buffer=50)
    assert list(again.epoch(0)) == rank_batches  # and the same order for the same seed
    cands = sample_candidates(np.array([3, 3, 17]), 1000, 10, seed=1)
    assert len(cands) == 10 and {3, 17} <= set(cands.tolist()) and (np.diff(cands) > 0).all()
    assert cands.tolist() == sample_candidates(np.array([17, 3]), 1000, 10, seed=1).tolist()
    assert sample_candidates(np.array([1]), 5, 0, seed=1).tolist() == [0, 1, 2, 3, 4]


def _synthetic_words() -> list[str]:
    words = {w for _, ws in CATEGORIES for w in ws.split()} | {n.lower() for n, _ in CATEGORIES} | set(ADJ)
    filler = "i bought this for the and it is works as described would recommend to anyone who likes games"
    words |= set(filler.split()) | {"mode", "supports", "controls", "a", "game", "about", "edition"}
    return H.SPECIAL + sorted(words) + [".", ","]


@pytest.mark.multiprocess
def test_two_rank_deepspeed_run_streams_shards_and_resumes_exactly(tmp_path):
    from trainer.blair import _fingerprint

    encoder = H.make_tiny_bert(tmp_path / "bert", words=_synthetic_words())
    reviews, meta = generate_amazon(tmp_path / "raw", num_reviews=700, bad_every=0, seed=2)
    pairs_dir = tmp_path / "pairs"
    config = tmp_path / "blair.toml"
    config.write_text(f"""
[run]
name = "streamed"
output_root = "{tmp_path / "runs"}"
seed = 4
[blair]
encoder_path = "{encoder}"
pooling = "mean"
max_length = 32
batch_size = 8
lr = 5e-3
warmup_ratio = 0.0
max_steps = 3
zero_stage = 2
log_every = 1
eval_batch_size = 16
[blair.pairs]
source = "amazon2023"
reviews_path = "{reviews}"
meta_path = "{meta}"
dataset_dir = "{pairs_dir}"
eval_fraction = 0.1
eval_max_queries = 20
eval_max_items = 24
pairs_per_shard = 150
shuffle_buffer = 40
""")
    env = H.torchrun_env()
    cmd = [sys.executable, str(H.REPO / "launch" / "blair_pairs.py"), "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = load_pair_manifest(pairs_dir)
    assert len(manifest["shards"]["train"]) >= 2
    # 3 steps (checkpoint), then resume to 5: steps 4-5 must be the batches an uninterrupted run takes
    H.torchrun("blair.py", ["--config", str(config)], timeout=240)
    run_dir = tmp_path / "runs" / "streamed"
    first = json.loads((run_dir / "results.json").read_text())
    H.torchrun("blair.py", ["--config", str(config), "blair.max_steps=5"], timeout=240)
    second = json.loads((run_dir / "results.json").read_text())
    assert first["steps"] == 3 and second["steps"] == 5 and second["steps_this_run"] == 2
    assert first["logits_shape"] == [8, 16] and second["world_size"] == 2
    assert second["losses"][:3] == first["losses"]
    streams = [
        PairStream(pairs_dir, rank=r, world_size=2, batch_size=8, seed=4, shuffle_buffer=40) for r in (0, 1)
    ]
    expected = []
    for step in range(5):
        epoch, offset = divmod(step, streams[0].steps_per_epoch)
        expected.append([_fingerprint(next(s.epoch(epoch, offset))) for s in streams])
    assert second["batch_fingerprints"] == expected
    assert second["eval"] == {"queries": 20, "candidates": 24, "catalog_items": manifest["counts"]["items"]}
    assert second["corpus"]["dataset_dir"] == str(pairs_dir)
    assert 0.0 <= second["recall@10_after"] <= 1.0 and second["before"] == first["before"]
