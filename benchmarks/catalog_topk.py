"""Full-catalog top-K scoring, the inner loop of launch/recommend.py and evaluation, on one rank's rows.

Scores a batch of query vectors against N item rows in chunks (`modules.retrieval.topk_block`, history
items masked) and reports users/s and item scores/s per catalog size. Under torchrun each rank does this
on its own N / world rows, so a rank's time at N / world items predicts a sharded catalog of N.
Run: .venv/bin/python benchmarks/catalog_topk.py [--items 1000000 10000000] [--dim 64] [--threads 2]
Ends with one `RESULT key=value ...` line.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/hstu_layer.py

import torch
import torch.nn.functional as F

from modules.jagged import offsets_from_lengths
from modules.retrieval import topk_block


def _time_topk(rows, queries, history_offsets, history_ids, k: int, repeats: int) -> float:
    """Best-of-repeats wall seconds of one batch's top-K over `rows`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        topk_block(queries, rows, row_start=0, k=k, history_offsets=history_offsets, history_ids=history_ids)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256, help="users per scoring batch")
    parser.add_argument("--history", type=int, default=50, help="history items masked per user")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=-1)
    lengths = torch.full((args.batch,), args.history)
    print(f"{'items':>11s} {'ms/batch':>9s} {'users/s':>9s} {'scores/s':>10s}")
    result = []
    for n in args.items:
        rows = F.normalize(torch.randn(n + 1, args.dim, generator=g), dim=-1)
        history_ids = torch.randint(1, n + 1, (args.batch * args.history,), generator=g)
        seconds = _time_topk(rows, queries, offsets_from_lengths(lengths), history_ids, args.k, args.repeats)
        users = args.batch / seconds
        print(f"{n:11d} {seconds * 1e3:9.1f} {users:9.0f} {users * n:10.3g}")
        result.append(f"users_per_s_{n}={users:.0f}")
        del rows
    print(f"RESULT dim={args.dim} batch={args.batch} k={args.k} threads={args.threads} " + " ".join(result))


if __name__ == "__main__":
    main()
