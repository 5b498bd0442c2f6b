"""Scale benchmark of the data pipeline: generate N synthetic Amazon 2023 reviews, run `prepare`, measure.

    .venv/bin/python benchmarks/prepare_scale.py --n 1000000 10000000

Throughput is end to end (validation + DuckDB + shards; generation excluded). Peak RSS is the max of this
process and its children (resource.getrusage RUSAGE_SELF / RUSAGE_CHILDREN ru_maxrss), measured in a fresh
child process per N so one run's peak does not hide the next's. Last line: `RESULT n=... reviews_per_s=...
peak_rss_gb=...` for the largest N.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _scale_runs import measure_in_child, print_rows


def _one(n: int, workdir: Path, threads: int, memory_limit: str) -> dict:
    from data_shards.config import DataConfig
    from data_shards.prepare import prepare
    from data_shards.synthetic import generate_amazon

    raw = workdir / "raw"
    t0 = time.perf_counter()
    reviews, meta = generate_amazon(raw, num_reviews=n, threads=threads)
    gen_s = time.perf_counter() - t0
    cfg = DataConfig(
        source="amazon2023", interactions=str(reviews), items=str(meta), root=str(workdir / "out"),
        name=f"syn{n}", kcore="paper", max_seq_len=50, users_per_shard=20000, items_per_shard=100000,
        threads=threads, memory_limit=memory_limit,
    )  # fmt: skip
    before_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t1 = time.perf_counter()
    out = prepare(cfg)
    total_s = time.perf_counter() - t1
    peak_kb = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "n": n,
        "input_gb": round(sum(i["bytes"] for i in manifest["inputs"]) / 1e9, 3),
        "generate_s": round(gen_s, 1),
        "validate_s": manifest["timings"]["validate_s"],
        "preprocess_s": manifest["timings"]["preprocess_s"],
        "shards_s": manifest["timings"]["shards_s"],
        "total_s": round(total_s, 1),
        "cpu_s": manifest["timings"]["total_cpu_s"],
        "cpu_breakdown": {k: v for k, v in manifest["timings"].items() if k.endswith("cpu_s")},
        "reviews_per_s": round(n / total_s),
        "peak_rss_gb": round(peak_kb / 1e6, 3),
        "rss_after_generate_gb": round(before_self / 1e6, 3),
        "kept_users": manifest["num_users"],
        "kept_items": manifest["num_items"],
        "kept_interactions": manifest["num_interactions"],
        "skipped": sum(manifest["skipped"].values()),
        "load": [round(x, 1) for x in os.getloadavg()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000, 10_000_000], help="review counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="1500MB", help="DuckDB memory limit")
    parser.add_argument("--workdir", default="", help="scratch folder (default: a temp dir, removed after)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement in a fresh process
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(_one(args.n[0], Path(args.workdir), args.threads, args.memory_limit)))
        return 0
    rows = []
    for n in args.n:
        work = Path(tempfile.mkdtemp(prefix=f"prepare_scale_{n}_", dir=args.workdir or None))
        try:
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--workdir", str(work),
                   "--threads", str(args.threads), "--memory-limit", args.memory_limit]  # fmt: skip
            rows.append(measure_in_child(cmd))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    cols = ["n", "input_gb", "generate_s", "validate_s", "preprocess_s", "shards_s", "total_s", "cpu_s",
            "reviews_per_s", "peak_rss_gb", "kept_users", "kept_items", "kept_interactions",
            "skipped"]  # fmt: skip
    print_rows(rows, cols)
    for r in rows:
        print(f"n={r['n']}: CPU seconds by stage {r['cpu_breakdown']}; machine load average {r['load']}")
    for r in rows:
        print(f"RESULT n={r['n']} reviews_per_s={r['reviews_per_s']} peak_rss_gb={r['peak_rss_gb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
