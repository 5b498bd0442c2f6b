"""Training throughput of launch/train.py on the ML-100K config at 1 and 2 ranks (torchrun, this machine).

    python benchmarks/train_throughput.py [--steps 40] [--ranks 1 2]

Each world trains `--steps` steps (no evaluation until the end, which is not timed) and reports what the
trainer measured over its training loop: steps/s, sequences/s and history tokens/s summed over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "launch" / "configs" / "ml100k.toml"


def run(ranks: int, steps: int, out: Path) -> dict:
    name = f"throughput_{ranks}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
        str(REPO / "launch" / "train.py"), "--config", str(CONFIG),
        f"run.name={name}", f"run.output_root={out}", f"train.max_steps={steps}",
        "train.epochs=1000", "eval.every_epochs=1000", "checkpoint.resume=never",
        "metrics.log_every_steps=1000",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads((out / name / "results.json").read_text())["throughput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if not (REPO / "data" / "ml100k" / "manifest.json").is_file():
        prepare = [sys.executable, str(REPO / "launch" / "prepare.py"), "--config", str(CONFIG)]
        subprocess.run(prepare, check=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            rows[ranks] = run(ranks, args.steps, Path(tmp))
    print(f"{'ranks':>5} {'steps/s':>9} {'sequences/s':>12} {'tokens/s':>10}")
    for ranks, r in rows.items():
        print(f"{ranks:>5} {r['steps_per_s']:>9.2f} {r['sequences_per_s']:>12.1f} {r['tokens_per_s']:>10.0f}")
    fields = " ".join(
        f"ranks{n}_sequences_per_s={r['sequences_per_s']:.1f} ranks{n}_tokens_per_s={r['tokens_per_s']:.0f}"
        for n, r in rows.items()
    )
    print(f"RESULT config=ml100k steps={args.steps} {fields}")


if __name__ == "__main__":
    main()
