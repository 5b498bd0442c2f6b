"""CPU time of one ML-100K training step (model forward + sampled softmax + backward), per attention backend.

Builds `GenerativeRecommender` unsharded on CPU with launch/configs/ml100k.toml's [model]/[loss] sections
(d=48, 2 blocks, 1 head, history 200, 128 shared negatives) and times forward+backward on real train batches
of 128 sequences read from data/ml100k (run launch/prepare.py first), or on uniform lengths 3..200 with
`--synthetic`. Reports best and median wall/CPU seconds per step and ends with one `RESULT` line.
Run: .venv/bin/python benchmarks/hstu_train_step.py [--batches 4] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

# Spinning OpenMP threads burn the CPU an oversubscribed (shared) machine needs: on this 2-core box a
# 2-thread run is otherwise several times slower, most of all for code with many small kernels (the
# jagged backend). Set before torch loads libgomp; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from modules.config import LossConfig, ModelConfig
from modules.losses import sample_uniform_negatives, sampled_softmax_loss
from modules.model import GenerativeRecommender
from trainer.config import JobConfig
from trainer.config_io import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "launch" / "configs" / "ml100k.toml"


def _real_batches(job: JobConfig, count: int, batch_size: int) -> list[tuple]:
    from data_shards.reader import SequenceLoader

    root = REPO / job.data.root / job.data.name
    if not (root / "manifest.json").is_file():
        raise SystemExit(
            f"{root}/manifest.json missing: run .venv/bin/python launch/prepare.py --config {CONFIG}"
        )
    loader = SequenceLoader(
        root, split="train", batch_size=batch_size, max_seq_len=job.model.max_seq_len, seed=0
    )
    out = []
    for batch in loader:
        out.append((batch.item_ids, batch.lengths, batch.timestamps, batch.query_times, batch.targets))
        if len(out) == count:
            break
    return out


def _synthetic_batches(count: int, batch_size: int, num_items: int, max_len: int) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        lengths = torch.randint(3, max_len + 1, (batch_size,), generator=g)
        total = int(lengths.sum())
        ids = torch.randint(1, num_items + 1, (total,), generator=g)
        times = torch.cumsum(torch.randint(1, 100000, (total + 1,), generator=g), 0) + 9 * 10**8
        targets = torch.randint(1, num_items + 1, (total,), generator=g)
        out.append((ids, lengths, times[:-1], times[1:], targets))  # query times: the targets' (next) times
    return out


def _step(model: GenerativeRecommender, loss_cfg: LossConfig, batch, num_items: int, g: torch.Generator):
    ids, lengths, ts, tq, targets = batch
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    negatives = sample_uniform_negatives(num_items, (loss_cfg.num_negatives,), generator=g)
    outputs = model(ids, offsets, ts, tq)
    loss = sampled_softmax_loss(
        outputs,
        targets,
        model.item_vectors(targets),
        negatives,
        model.item_vectors(negatives),
        temperature=loss_cfg.temperature,
    )
    loss.backward()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synthetic", action="store_true", help="uniform lengths 3..200 instead of data/")
    parser.add_argument("--backends", nargs="+", default=["reference", "jagged"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    job = load_config(JobConfig, CONFIG, [])
    if args.synthetic:
        num_items = 1682
        batches = _synthetic_batches(args.batches, job.train.batch_size, num_items, job.model.max_seq_len)
    else:
        import json

        manifest = json.loads((REPO / job.data.root / job.data.name / "manifest.json").read_text())
        num_items = int(manifest["num_items"])
        batches = _real_batches(job, args.batches, job.train.batch_size)
    tokens = [int(b[1].sum()) for b in batches]
    print(
        f"{len(batches)} batches of {job.train.batch_size}: tokens/batch {tokens}, "
        f"max len {[int(b[1].max()) for b in batches]}, threads={args.threads}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    parts = []
    for backend in args.backends:
        model_cfg = ModelConfig(**{**vars(job.model), "attention_backend": backend})
        torch.manual_seed(0)
        model = GenerativeRecommender(num_items=num_items, config=model_cfg).train()
        g = torch.Generator().manual_seed(0)
        _step(model, job.loss, batches[0], num_items, g)  # warm-up
        walls, cpus = [], []
        for _ in range(args.repeats):
            for batch in batches:
                model.zero_grad(set_to_none=True)
                wall, cpu = time.perf_counter(), time.process_time()
                _step(model, job.loss, batch, num_items, g)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
        print(
            f"{backend:>9}: step wall best {min(walls):.3f}s median {statistics.median(walls):.3f}s | "
            f"CPU best {min(cpus):.3f}s median {statistics.median(cpus):.3f}s"
        )
        parts += [
            f"{backend}_wall_s={statistics.median(walls):.3f}",
            f"{backend}_cpu_s={statistics.median(cpus):.3f}",
        ]
    print("RESULT " + " ".join(parts))


if __name__ == "__main__":
    main()
