"""Shared by the tests that launch jobs: a tiny synthetic dataset, a tiny model config and torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from data_shards.config import DataConfig
from data_shards.embedding_shards import write_embedding_shards
from data_shards.prepare import prepare
from data_shards.synthetic import generate_amazon

REPO = Path(__file__).resolve().parent.parent

TINY_MODEL = """
[model]
embedding_dim = 16
num_blocks = 1
num_heads = 2
qk_dim = 8
v_dim = 8
max_seq_len = 20
dropout = 0.1
fusion = "none"

[loss]
num_negatives = 32

[sharding]
learning_rate = 0.1

[train]
epochs = 50
batch_size = 16
lr = 5e-3

[eval]
batch_size = 64
patience = 0

[metrics]
log_every_steps = 1
"""


def make_tiny_dataset(root: Path) -> Path:
    """A synthetic Amazon-format dataset: ~350 users in 8 sequence shards, histories cut to 20 items."""
    reviews, meta = generate_amazon(root / "raw", num_reviews=4000, num_users=350, num_items=150, seed=3)
    cfg = DataConfig(
        source="amazon2023",
        interactions=str(reviews),
        items=str(meta),
        root=str(root),
        name="tiny",
        max_seq_len=20,
        users_per_shard=45,
        min_item_interactions=2,
    )
    return prepare(cfg)


def write_config(tmp_path: Path, dataset: Path, name: str, extra: str = "") -> Path:
    """A TOML config for run `name` under `tmp_path/runs`, on `dataset`, with the tiny model."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[run]\nname = "{name}"\noutput_root = "{tmp_path / "runs"}"\nseed = 7\n\n'
        f'[data]\nroot = "{dataset.parent}"\nname = "{dataset.name}"\nmax_seq_len = 20\n' + TINY_MODEL + extra
    )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(
    args: list[str], *, env: dict | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run ARGS` from the repository root, one thread per worker."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def random_text_embeddings(out: Path, dataset: Path, dim: int) -> np.ndarray:
    """Write random fp16 item vectors for `dataset` as embedding shards at `out`; returns the vectors."""
    num_items = json.loads((dataset / "manifest.json").read_text())["num_items"]
    vectors = np.random.default_rng(0).standard_normal((num_items, dim)).astype(np.float16)
    write_embedding_shards(
        out,
        np.arange(1, num_items + 1),
        vectors,
        encoder={"name": "random-test-vectors"},
        pooling="none",
        normalized=False,
        num_items=num_items,
        items_per_shard=64,
    )
    return vectors
