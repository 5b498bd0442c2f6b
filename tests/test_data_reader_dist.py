"""A real 2-rank torchrun (gloo) read: every user exactly once, the same batch count on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_data_preprocess import write_movielens_csv

from data_shards.config import DataConfig
from data_shards.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from data_shards.reader import SequenceLoader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset, out = sys.argv[1], sys.argv[2]
    result = {}
    for split in ("train", "test"):
        loader = SequenceLoader(dataset, split=split, batch_size=3, max_seq_len=4, rank=rank,
                                world_size=world, seed=1, verify=True)
        users, batches = [], 0
        for batch in loader:
            total = batch.weights.sum()
            dist.all_reduce(total)  # a collective per step: an uneven rank would hang here
            users += [u for u, w in zip(batch.users.tolist(), batch.weights.tolist()) if w == 1.0]
            assert batch.batch_size == 3 and batch.lengths.min() >= 1
            batches += 1
        gathered = [None] * world
        dist.all_gather_object(gathered, {"users": users, "batches": batches, "len": len(loader)})
        result[split] = gathered
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()
    """
)


@pytest.mark.multiprocess
def test_two_rank_read_covers_each_user_once(tmp_path):
    events = [(u, i, 1000 + k) for u in range(1, 14) for k, i in enumerate(range(1, 6 + u % 4))]
    ratings = write_movielens_csv(tmp_path / "raw", events, 10)
    # 13 users, 5 per shard -> shards of 5, 5, 3: rank 0 gets 8 rows (3 batches), rank 1 gets 5 (2 batches)
    out = prepare(DataConfig(root=str(tmp_path / "out"), name="ds", interactions=str(ratings),
                             min_item_interactions=0, users_per_shard=5))  # fmt: skip
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result_path = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=2", str(script), str(out), str(result_path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    for split in ("train", "test"):
        ranks = result[split]
        assert [r["batches"] for r in ranks] == [3, 3] and [r["len"] for r in ranks] == [3, 3]
        users = ranks[0]["users"] + ranks[1]["users"]
        assert sorted(users) == list(range(1, 14))  # each user exactly once across ranks
        assert len(ranks[0]["users"]) == 8 and len(ranks[1]["users"]) == 5
