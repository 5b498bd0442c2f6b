"""launch/recommend.py on a run trained with text fusion: torchrun worlds, resharding, a naive oracle."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from data_shards.batch import SequenceBatch
from data_shards.id_maps import read_id_map
from data_shards.io import DataError
from data_shards.reader import iter_sequences
from sharding.model import local_item_vectors
from trainer.batch import make_model_batch
from trainer.config import JobConfig
from trainer.config_io import ConfigError, load_config
from trainer.distributed import destroy_distributed, init_distributed
from trainer.recommend import MANIFEST, Recommender
from trainer.report import recommendation_sample
from trainer.run_dir import claim_run_dir

from _runs import REPO, make_tiny_dataset, random_text_embeddings, torchrun, write_config

TRAIN = str(REPO / "launch" / "train.py")
RECOMMEND = str(REPO / "launch" / "recommend.py")
K = 7


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(dataset, folder holding the runs, config) of a 2-rank run with fusion=add and a best checkpoint."""
    root = tmp_path_factory.mktemp("recommend")
    dataset = make_tiny_dataset(root / "data")
    random_text_embeddings(root / "emb", dataset, 12)
    extra = f'\n[checkpoint]\nresume = "never"\n\n[recommend]\nk = {K}\nbatch_size = 32\n'
    config = write_config(root, dataset, "fused", extra)
    fusion = ["model.fusion=add", "model.text_dim=12", f"train.text_embeddings={root / 'emb'}"]
    steps = "train.max_steps=10"
    torchrun(["--standalone", "--nproc-per-node=2", TRAIN, "--config", str(config), steps, *fusion])
    return dataset, root / "runs", config


def _read(folder: Path):
    return pq.read_table(folder).sort_by("user_index").to_pydict()


@contextlib.contextmanager
def _in_process(config: Path, overrides: list[str]) -> Iterator[tuple[dict, Recommender]]:
    """A world-of-one Recommender run in this process: (manifest, recommender) while its group is alive."""
    world = init_distributed()
    try:
        recommender = Recommender(load_config(JobConfig, config, overrides), world)
        yield recommender.run(), recommender
    finally:
        destroy_distributed()


def _naive_top_k(rec: Recommender, dataset: Path) -> tuple[list[list[int]], np.ndarray]:
    """The oracle: score the whole catalog for every user at once, mask history and padding, take the top K.

    Returns (item ids, scores) per user in user-index order, from the model `rec` loaded.
    """
    sequences = sorted(iter_sequences(dataset), key=lambda s: s[0])
    batch = SequenceBatch(
        users=torch.tensor([u for u, _, _, _ in sequences]),
        weights=torch.ones(len(sequences)),
        lengths=torch.tensor([len(s) for _, s, _, _ in sequences]),
        item_ids=torch.from_numpy(np.concatenate([s for _, s, _, _ in sequences]).astype(np.int64)),
        timestamps=torch.from_numpy(np.concatenate([t for _, _, t, _ in sequences]).astype(np.int64)),
        query_times=torch.from_numpy(np.concatenate([np.append(t[1:], t[-1:]) for _, _, t, _ in sequences])),
        targets=torch.empty(0, dtype=torch.int64),
    )
    model_batch = make_model_batch(
        batch.most_recent(rec.max_seq_len),
        num_items=rec.num_items,
        num_negatives=0,
        share_negatives=True,
        with_text=True,
        generator=None,
    )
    with torch.no_grad():
        queries = rec.dmp.module.encode(model_batch)
        start, rows = local_item_vectors(rec.dmp.module)
    assert start == 0 and rows.shape[0] == rec.num_items + 1
    scores = queries @ F.normalize(rows.float(), dim=-1).T
    scores[:, 0] = float("-inf")
    for row, (_, seq, _, _) in enumerate(sequences):
        scores[row, torch.from_numpy(seq.astype(np.int64))] = float("-inf")
    top = torch.topk(scores, K, dim=1)
    return top.indices.tolist(), top.values.numpy()


@pytest.mark.multiprocess
def test_two_ranks_write_every_user_once_in_original_ids(trained):
    dataset, runs, config = trained
    # The command line says fusion=none: the run's own config (fusion=add) must win, with a warning.
    proc = torchrun(["--standalone", "--nproc-per-node=2", RECOMMEND, "--config", str(config)])
    assert "this command's config differs in: model.fusion" in proc.stdout + proc.stderr
    out = runs / "fused" / "recommendations"
    manifest = json.loads((out / MANIFEST).read_text())
    num_users = json.loads((dataset / "manifest.json").read_text())["num_users"]
    assert manifest["num_users"] == num_users and manifest["world_size"] == 2 and manifest["k"] == K
    assert [p["path"] for p in manifest["parts"]] == ["part-00000.parquet", "part-00001.parquet"]
    assert manifest["checkpoint"].endswith("best")
    recs = _read(out)
    assert recs["user_index"] == list(range(1, num_users + 1))
    users = read_id_map(dataset, "user", num_users).to_pylist()
    items = read_id_map(dataset, "item", manifest["num_items"]).to_pylist()
    assert recs["user"] == users
    histories = {user: set(seq.tolist()) for user, seq, _, _ in iter_sequences(dataset)}
    for user, ids, names, scores in zip(
        recs["user_index"], recs["item_indices"], recs["items"], recs["scores"], strict=True
    ):
        assert len(ids) == K and len(set(ids)) == K
        assert names == [items[i - 1] for i in ids]
        assert scores == sorted(scores, reverse=True)
        assert not histories[user] & set(ids), f"user {user} was recommended an item from their history"
    sample = recommendation_sample(dataset, out, user_index=2, n=3).splitlines()
    assert sample[0] == f"User {users[1]}, most recent first:"
    assert [line.split(":")[0] for line in sample[2:]] == ["- watched"] * 3 + [
        f"- recommended ({s:.3f})" for s in recs["scores"][1][:3]
    ]


@pytest.mark.multiprocess
def test_one_rank_matches_two_ranks_and_a_naive_full_scoring(trained, tmp_path):
    dataset, runs, config = trained
    two = runs / "fused" / "recommendations"
    if not (two / MANIFEST).is_file():
        torchrun(["--standalone", "--nproc-per-node=2", RECOMMEND, "--config", str(config)])
    with _in_process(config, [f"recommend.output_dir={tmp_path / 'one'}"]) as (manifest, rec):
        oracle_ids, oracle_scores = _naive_top_k(rec, dataset)
    one, expected = _read(tmp_path / "one"), _read(two)
    assert manifest["world_size"] == 1 and one["items"] == expected["items"]
    np.testing.assert_allclose(np.array(one["scores"]), np.array(expected["scores"]), atol=1e-6)
    assert expected["item_indices"] == oracle_ids
    np.testing.assert_allclose(np.array(expected["scores"]), oracle_scores, atol=1e-5)


def test_including_history_never_lowers_the_kth_best_score(trained, tmp_path):
    _, _, config = trained
    for name, overrides in (("excl", []), ("incl", ["recommend.exclude_history=false"])):
        with _in_process(config, [f"recommend.output_dir={tmp_path / name}", *overrides]):
            pass
    excluded, included = _read(tmp_path / "excl"), _read(tmp_path / "incl")
    assert (np.array(included["scores"]) >= np.array(excluded["scores"]) - 1e-6).all()
    assert included["items"] != excluded["items"], "some user should get a history item back"


def test_unknown_run_and_missing_checkpoint_fail_with_instructions(trained, tmp_path):
    _, runs, config = trained
    claim_run_dir(runs / "encoder_run", "blair", is_main=True)
    with (
        pytest.raises(ConfigError, match=r"holds a blair run: run\.name must name a run of launch/train\.py"),
        _in_process(config, ["run.name=encoder_run"]),
    ):
        pass
    with (
        pytest.raises(ConfigError, match=r"must name a run trained by launch/train\.py"),
        _in_process(config, ["run.name=never_trained"]),
    ):
        pass
    with (
        pytest.raises(ConfigError, match=r"is not a complete checkpoint"),
        _in_process(config, [f"recommend.checkpoint={tmp_path}"]),
    ):
        pass


def test_id_map_with_a_wrong_line_count_names_the_file(tmp_path):
    (tmp_path / "item_ids.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"item_ids\.txt: 2 lines but the dataset manifest has 3 items"):
        read_id_map(tmp_path, "item", 3)
    (tmp_path / "user_ids.txt").write_text('u"1\nu,2\n')
    assert read_id_map(tmp_path, "user", 2).to_pylist() == ['u"1', "u,2"]
