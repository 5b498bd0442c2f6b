"""ML-100K quality over seeds: ID-only HSTU vs the popularity baseline, mean ± std of the test metrics.

    python benchmarks/ml100k_quality.py [--seeds 1 2 3] [--nproc 2] [section.key=value ...]

Each seed is a full `launch/train.py` run (early stopping on validation NDCG@10, test with the best
checkpoint). Prints a markdown table and ends with one RESULT line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.report import load_results, mean_std_table  # noqa: E402

CONFIG = "launch/configs/ml100k.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--output", default="runs/ml100k_quality")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    args = parser.parse_args()
    out = Path(args.output)
    if not (REPO / "data" / "ml100k" / "manifest.json").is_file():
        subprocess.run([sys.executable, "launch/prepare.py", "--config", CONFIG], cwd=REPO, check=True)
    runs = []
    for seed in args.seeds:
        name = f"seed{seed}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, f"--nproc-per-node={args.nproc}", "launch/train.py", "--config", CONFIG]
        cmd += [f"run.output_root={out}", f"run.name={name}", f"run.seed={seed}", "checkpoint.resume=never"]
        cmd += args.overrides
        print("==>", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        runs.append(load_results(out / name))
    label = f"HSTU ({' '.join(args.overrides)})" if args.overrides else "HSTU (ID only)"
    table = mean_std_table(
        {"most popular": [r["popularity_test"] for r in runs], label: [r["test"] for r in runs]}
    )
    print(table)
    (out / "results.md").write_text(table + "\n")
    fields = []
    for key in ("hr@10", "ndcg@10", "mrr"):
        values = [r["test"][key] for r in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        fields.append(f"hstu_{key.replace('@', '')}={statistics.fmean(values):.4f}±{std:.4f}")
    pop = statistics.fmean(r["popularity_test"]["hr@10"] for r in runs)
    print(f"RESULT dataset=ml100k seeds={len(runs)} {' '.join(fields)} popularity_hr10={pop:.4f}")


if __name__ == "__main__":
    main()
