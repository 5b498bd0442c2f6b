"""Scale benchmark of the BLaIR pair prepare step: N synthetic Amazon 2023 reviews -> pair shards, measured.

    .venv/bin/python benchmarks/blair_pairs_scale.py --n 1000000 10000000

The synthetic files are written first (`data_shards.synthetic.generate_amazon`, not timed), then
`prepare_pairs` runs in a fresh child process per N, so its peak RSS (resource.getrusage ru_maxrss of the
child and of its own children) is not mixed with generation or another N. Throughput is end to end
(Arrow block read + cleaning in `--threads` worker processes, DuckDB split/shuffle/join, gzipped tar shards
written by `--threads` processes). output_gb is the prepared folder on disk; the synthetic reviews repeat a
few templates, so they compress far better than real text (real reviews: about 6.6x at gzip level 3 with the
tar padding, measured on the Women's Clothing corpus). Last lines: `RESULT n=... reviews_per_s=...
peak_rss_gb=... output_gb=...` per N.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _scale_runs import measure_in_child, print_rows


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _prepare(n: int, workdir: Path, threads: int, memory_limit: str) -> dict:
    from data_shards.pair_shards import prepare_pairs
    from data_shards.pairs import PairsConfig

    raw = workdir / "raw"
    cfg = PairsConfig(
        source="amazon2023", reviews_path=str(raw / "reviews.jsonl"), meta_path=str(raw / "meta.jsonl"),
        dataset_dir=str(workdir / "pairs"), eval_max_queries=10_000, eval_max_items=100_000,
        threads=threads, memory_limit=memory_limit,
    )  # fmt: skip
    t0 = time.perf_counter()
    out = prepare_pairs(cfg)
    total_s = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"]
    return {
        "n": n,
        "input_gb": round(sum(i["bytes"] for i in manifest["inputs"]) / 1e9, 3),
        "total_s": round(total_s, 1),
        "cpu_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
        "reviews_per_s": round(n / total_s),
        "peak_rss_gb": round(max(u.ru_maxrss for u in usage) / 1e6, 3),
        "output_gb": round(_du(out) / 1e9, 3),
        "items": manifest["counts"]["items"],
        "train_pairs": manifest["counts"]["train_pairs"],
        "eval_queries": manifest["counts"]["eval_queries"],
        "candidates": manifest["counts"]["eval_candidates"],
        "train_shards": len(shards["train"]),
        "skipped": sum(manifest["skipped"].values()),
        "load": [round(x, 1) for x in os.getloadavg()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="review counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB memory limit")
    parser.add_argument("--workdir", default="", help="scratch folder (default: a temp dir, removed after)")
    parser.add_argument("--child", choices=["generate", "prepare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "generate":
        from data_shards.synthetic import generate_amazon

        generate_amazon(Path(args.workdir) / "raw", num_reviews=args.n[0], threads=args.threads)
        return 0
    if args.child == "prepare":  # one measurement in a fresh process
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(_prepare(args.n[0], Path(args.workdir), args.threads, args.memory_limit)))
        return 0
    rows = []
    for n in args.n:
        work = Path(tempfile.mkdtemp(prefix=f"blair_pairs_scale_{n}_", dir=args.workdir or None))
        try:
            base = [sys.executable, __file__, "--n", str(n), "--workdir", str(work),
                    "--threads", str(args.threads), "--memory-limit", args.memory_limit]  # fmt: skip
            t0 = time.perf_counter()
            subprocess.run([*base, "--child", "generate"], check=True)
            gen_s = time.perf_counter() - t0
            rows.append(dict(measure_in_child([*base, "--child", "prepare"]), generate_s=round(gen_s, 1)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    cols = ["n", "input_gb", "generate_s", "total_s", "cpu_s", "reviews_per_s", "peak_rss_gb", "output_gb",
            "items", "train_pairs", "eval_queries", "candidates", "train_shards", "skipped"]  # fmt: skip
    print(f"DuckDB memory_limit {args.memory_limit}, {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '')}")  # fmt: skip
    print_rows(rows, cols)
    for r in rows:
        print(f"n={r['n']}: machine load average {r['load']}")
    for r in rows:
        print(
            f"RESULT n={r['n']} reviews_per_s={r['reviews_per_s']} peak_rss_gb={r['peak_rss_gb']} "
            f"output_gb={r['output_gb']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
