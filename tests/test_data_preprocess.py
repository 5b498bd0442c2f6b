"""k-core against a naive reference on random data, dedup, id maps, and the reader's split protocols."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_shards.config import DataConfig
from data_shards.io import DataError
from data_shards.prepare import prepare
from data_shards.reader import SequenceLoader, iter_sequences


def write_movielens_csv(folder: Path, events: list[tuple[int, int, int]], num_items: int) -> Path:
    """ML-20M-style ratings.csv/movies.csv from (user, item, ts) events."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{i},4.0,{t}" for u, i, t in events]
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    movies = ["movieId,title,genres"] + [f"{i},Movie {i} (2000),Drama" for i in range(1, num_items + 1)]
    (folder / "movies.csv").write_text("\n".join(movies) + "\n")
    return folder / "ratings.csv"


def random_events(
    seed: int, num_users: int = 80, num_items: int = 50, n: int = 700
) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    events = []
    for _ in range(n):
        u = int(num_users * rng.random() ** 1.6) + 1  # skewed: many light users and items
        i = int(num_items * rng.random() ** 1.8) + 1
        events.append((u, i, rng.randrange(1000, 1100)))  # few distinct seconds: ties and duplicates
    return events


def naive_kcore(events, ku: int, ki: int, mode: str) -> set[tuple[int, int, int]]:
    ev = list(dict.fromkeys(events))  # drop identical duplicates (rating is constant here)

    def keep(ev, by, k):
        c = Counter(e[by] for e in ev)
        return [e for e in ev if c[e[by]] >= k]

    if mode == "paper":
        return set(keep(keep(ev, 1, ki), 0, ku))
    while True:
        nxt = keep(keep(ev, 0, ku), 1, ki)
        if len(nxt) == len(ev):
            return set(ev)
        ev = nxt


def kept_events(out: Path) -> set[tuple[int, int, int]]:
    users = (out / "user_ids.txt").read_text().split()
    items = (out / "item_ids.txt").read_text().split()
    kept = set()
    for u, seq, ts, _ in iter_sequences(out):
        assert np.all(np.diff(ts) >= 0)
        kept.update((int(users[u - 1]), int(items[i - 1]), int(t)) for i, t in zip(seq, ts, strict=True))
    return kept


@pytest.mark.parametrize("mode", ["iterative", "paper"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kcore_matches_naive_reference(tmp_path, mode, seed):
    events = random_events(seed)
    ratings = write_movielens_csv(tmp_path / "raw", events, 50)
    cfg = DataConfig(root=str(tmp_path / "out"), name="ds", interactions=str(ratings), kcore=mode,
                     min_user_interactions=5, min_item_interactions=4, users_per_shard=7)  # fmt: skip
    out = prepare(cfg)
    expected = naive_kcore(events, 5, 4, mode)
    assert 0 < len(expected) < len(set(events))  # the filter really removes something
    assert kept_events(out) == expected
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["raw_interactions"] == len(events)
    assert m["skipped"].get("duplicate_event", 0) == len(events) - len(set(events))
    assert m["num_interactions"] == len(expected)
    assert (
        m["num_users"]
        == len({e[0] for e in expected})
        == sum(s["num_samples"] for s in m["shards"]["sequences"])
    )
    if mode == "iterative":  # the fixed point really is a k-core
        assert min(Counter(e[0] for e in expected).values()) >= 5
        assert min(Counter(e[1] for e in expected).values()) >= 4
    users = [int(x) for x in (out / "user_ids.txt").read_text().split()]
    assert users == sorted(users)  # numeric ids keep their numeric order


def test_paths_with_a_quote(tmp_path):
    """Paths reach DuckDB as escaped SQL literals: input, output and scratch folders may hold a quote."""
    folder = tmp_path / "o'brien"
    ratings = write_movielens_csv(folder / "raw", [(1, i, 1000 + i) for i in range(1, 6)], 5)
    cfg = DataConfig(root=str(folder / "out"), name="ds", interactions=str(ratings), min_item_interactions=0)
    out = prepare(cfg)
    assert [ts.tolist() for _, _, ts, _ in iter_sequences(out)] == [[1001, 1002, 1003, 1004, 1005]]


def test_no_valid_interaction_names_the_file_and_the_skips(tmp_path):
    """When every line is skipped, the error names the interaction file and why its lines were skipped."""
    ratings = write_movielens_csv(tmp_path / "raw", [], 1)
    ratings.write_text("userId,movieId,rating,timestamp\n1,1,good,100\n1,1\n")
    cfg = DataConfig(root=str(tmp_path / "out"), name="ds", interactions=str(ratings))
    with pytest.raises(DataError) as err:
        prepare(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{ratings}: no valid interaction (is it a data.source='movielens' file?)")
    assert "wrong_type:rating: 1" in msg and f"e.g. {ratings}:3: expected 4 fields" in msg


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("split")
    events = [(u, i, 1000 + 10 * k) for u in range(1, 13) for k, i in enumerate(range(1, 5 + u))]
    ratings = write_movielens_csv(tmp / "raw", events, 20)
    cfg = DataConfig(root=str(tmp / "out"), name="ds", interactions=str(ratings), min_item_interactions=0,
                     users_per_shard=5)  # fmt: skip
    return prepare(cfg)


def _by_user(loader: SequenceLoader) -> dict[int, tuple[list, list, list]]:
    rows = {}
    for b in loader:
        off = b.offsets.tolist()
        for r in range(b.batch_size):
            if b.weights[r] == 0:
                continue
            inp = b.item_ids[off[r] : off[r + 1]].tolist()
            ts = b.timestamps[off[r] : off[r + 1]].tolist()
            tq = b.query_times[off[r] : off[r + 1]].tolist()
            tgt = b.targets[off[r] : off[r + 1]].tolist() if loader.split == "train" else [int(b.targets[r])]
            assert int(b.users[r]) not in rows
            rows[int(b.users[r])] = (inp, tgt, ts, tq)
    return rows


@pytest.mark.parametrize("protocol", ["loo3", "paper"])
def test_splits(small_dataset, protocol):
    seqs = {u: s.tolist() for u, s, _, _ in iter_sequences(small_dataset)}
    times = {u: t.tolist() for u, _, t, _ in iter_sequences(small_dataset)}
    assert len(seqs) == 12
    m = 4
    splits = ["train", "test"] + (["valid"] if protocol == "loo3" else [])
    for split in splits:
        loader = SequenceLoader(small_dataset, split=split, batch_size=5, max_seq_len=m, protocol=protocol,
                                shuffle=False)  # fmt: skip
        rows = _by_user(loader)
        assert sorted(rows) == sorted(seqs)
        for u, s in seqs.items():
            n, t = len(s), times[u]
            inp, tgt, ts, tq = rows[u]
            if split == "train":
                stop = (n - 2 if protocol == "loo3" else n - 1) - 1
                assert inp == s[:stop][-m:] and tgt == s[1 : stop + 1][-m:]
            elif split == "valid":
                stop = n - 2
                assert inp == s[:stop][-m:] and tgt == [s[stop]]
            else:
                stop = n - 1
                assert inp == s[:stop][-m:] and tgt == [s[stop]]
            assert 1 <= len(inp) <= m
            # each input's query time is the time of the event it predicts: the next one (its target)
            first = stop - len(inp)
            assert ts == t[first:stop] and tq == t[first + 1 : stop + 1]
    with pytest.raises(ValueError, match="no validation split"):
        SequenceLoader(small_dataset, split="valid", batch_size=5, max_seq_len=m, protocol="paper")


def test_shuffle_is_deterministic_and_resume_is_exact(small_dataset):
    def users(loader, epoch):
        loader.set_epoch(epoch)
        return [b.users.tolist() for b in loader]

    a = SequenceLoader(small_dataset, split="train", batch_size=3, max_seq_len=4, seed=7)
    b = SequenceLoader(small_dataset, split="train", batch_size=3, max_seq_len=4, seed=7)
    assert users(a, 0) == users(b, 0) and users(a, 0) != users(a, 1)
    full = [(x.users.tolist(), x.item_ids.tolist()) for x in (a.set_epoch(3) or a)]
    b.set_epoch(3)
    it = iter(b)
    first = [next(it) for _ in range(2)]
    state = b.state_dict()
    assert state == {"epoch": 3, "batches_yielded": 2}
    c = SequenceLoader(small_dataset, split="train", batch_size=3, max_seq_len=4, seed=7)
    c.load_state_dict(state)
    rest = [(x.users.tolist(), x.item_ids.tolist()) for x in c]
    assert [(x.users.tolist(), x.item_ids.tolist()) for x in first] + rest == full
    # workers: the same users, each exactly once
    w = SequenceLoader(small_dataset, split="test", batch_size=4, max_seq_len=4, num_workers=2)
    got = [u for x in w for u, wt in zip(x.users.tolist(), x.weights.tolist(), strict=True) if wt]
    assert sorted(got) == list(range(1, 13))
