"""Forward + backward throughput of one HSTU layer: jagged backend vs padded reference backend.

Config (the paper's Amazon layer): d=64, 4 heads, d_qk=d_v=16, dropout 0.5, float32, CPU.
Per max length N in (50, 200, 1000): sequence lengths uniform in [1, N] (mean about N/2), about 8k
tokens per batch. Prints tokens/s per backend and ends with one `RESULT key=value ...` line.
Run: .venv/bin/python benchmarks/hstu_layer.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

# Spinning OpenMP threads burn the CPU an oversubscribed (shared) machine needs: on this 2-core box a
# 2-thread run is otherwise several times slower, most of all for code with many small kernels (the
# jagged backend). Set before torch loads libgomp; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from modules.config import ModelConfig
from modules.hstu import HSTULayer

BATCH = {50: 256, 200: 64, 1000: 16}


def _make_batch(max_len: int, batch: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len  # the padded backend pays for the longest row
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(offsets[-1])
    x = torch.randn(total, dim, generator=g, requires_grad=True)
    ts = torch.cumsum(torch.randint(1, 100000, (total,), generator=g), 0)
    return x, offsets, ts


def _time(layer: HSTULayer, x, offsets, ts, repeats: int) -> tuple[float, float]:
    """Best-of-repeats (wall seconds, process CPU seconds); CPU time is robust to a shared machine."""

    def step():
        out = layer(x, offsets, ts)
        out.square().sum().backward()

    step()  # warm-up
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-lens", type=int, nargs="+", default=[50, 200, 1000])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    print(
        f"HSTU layer fwd+bwd, d=64 heads=4 qk=v=16 dropout=0.5 fp32, threads={args.threads}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    for max_len in args.max_lens:
        batch = BATCH.get(max_len, max(1, 8192 * 2 // max_len))
        x, offsets, ts = _make_batch(max_len, batch, 64, seed=max_len)
        tokens = x.shape[0]
        row = {}
        for backend in ("reference", "jagged"):
            config = ModelConfig(
                embedding_dim=64,
                num_heads=4,
                qk_dim=16,
                v_dim=16,
                max_seq_len=max_len,
                dropout=0.5,
                attention_backend=backend,
            )
            torch.manual_seed(0)
            layer = HSTULayer(config).train()
            wall, cpu = _time(layer, x, offsets, ts, args.repeats)
            row[backend] = tokens / wall
            row[backend + "_cpu"] = tokens / cpu
        speedup = row["jagged"] / row["reference"]
        speedup_cpu = row["jagged_cpu"] / row["reference_cpu"]
        print(
            f"max_len={max_len:5d} batch={batch:4d} tokens={tokens:6d} "
            f"padded={row['reference']:8.0f} jagged={row['jagged']:8.0f} tok/s x{speedup:.2f} (wall); "
            f"CPU: padded={row['reference_cpu']:8.0f} jagged={row['jagged_cpu']:.0f} x{speedup_cpu:.2f}"
        )
        results[max_len] = (row, speedup, speedup_cpu)
    parts = []
    for max_len, (row, speedup, speedup_cpu) in results.items():
        parts += [
            f"padded_tok_s_{max_len}={row['reference']:.0f}",
            f"jagged_tok_s_{max_len}={row['jagged']:.0f}",
            f"speedup_{max_len}={speedup:.2f}",
            f"speedup_cpu_{max_len}={speedup_cpu:.2f}",
        ]
    print("RESULT " + " ".join(parts))


if __name__ == "__main__":
    main()
