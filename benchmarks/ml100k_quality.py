"""ML-100K quality over seeds: HSTU variants vs the popularity baseline, mean ± std and paired differences.

    python benchmarks/ml100k_quality.py [--seeds 1 2 3] [--nproc 2] [--output DIR] [--reuse]
        [--variant LABEL "section.key=value ..."]... [section.key=value ...]

Each (variant, seed) is a full `launch/train.py` run (early stopping on validation NDCG@10, test with the
best checkpoint) in DIR/<variant>/seed<N>. Without --variant there is one, named by the trailing overrides;
trailing overrides apply to every variant. With several, each is also compared seed by seed with the first
(same seed = same data order and negatives). --reuse keeps a finished run whose saved config equals the
one it would run. Prints markdown tables and ends with one RESULT line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.config import JobConfig  # noqa: E402
from trainer.config_io import from_dict, load_config, to_dict  # noqa: E402
from trainer.report import load_results, mean_std_table, paired_difference_table  # noqa: E402

CONFIG = "launch/configs/ml100k.toml"


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "hstu"


def _comparable(config: JobConfig) -> dict:
    """The config as JSON data, without where the run was written (a moved run folder is still the run)."""
    data = json.loads(json.dumps(to_dict(config)))
    for key in ("output_root", "name"):
        data["run"].pop(key)
    return data


def _finished(run_dir: Path, overrides: list[str]) -> bool:
    """True when run_dir holds results of the very config these overrides resolve to."""
    saved = run_dir / "config.json"
    if not (saved.is_file() and (run_dir / "results.json").is_file()):
        return False
    ran = from_dict(JobConfig, json.loads(saved.read_text()), source=str(saved))
    return _comparable(ran) == _comparable(load_config(JobConfig, REPO / CONFIG, overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--output", default="runs/ml100k_quality")
    parser.add_argument(
        "--variant",
        nargs=2,
        action="append",
        metavar=("LABEL", "OVERRIDES"),
        help='a named model, e.g. --variant "HSTU + MiniLM" "model.fusion=add model.text_dim=384 ..."',
    )
    parser.add_argument("--reuse", action="store_true", help="keep finished runs with the same config")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    args = parser.parse_args()
    out = Path(args.output)
    if args.variant:
        variants = {label: shlex.split(overrides) for label, overrides in args.variant}
    else:
        variants = {f"HSTU ({' '.join(args.overrides)})" if args.overrides else "HSTU (ID only)": []}
    if not (REPO / "data" / "ml100k" / "manifest.json").is_file():
        subprocess.run([sys.executable, "launch/prepare.py", "--config", CONFIG], cwd=REPO, check=True)

    results: dict[str, list[dict]] = {}
    for label, variant_overrides in variants.items():
        results[label] = []
        for seed in args.seeds:
            run = [f"run.output_root={out / _slug(label)}", f"run.name=seed{seed}", f"run.seed={seed}"]
            overrides = [*run, "checkpoint.resume=never", *variant_overrides, *args.overrides]
            run_dir = out / _slug(label) / f"seed{seed}"
            if args.reuse and _finished(REPO / run_dir, overrides):
                print(f"==> {label}, seed {seed}: reusing {run_dir}", flush=True)
            else:
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                cmd = [*launcher, f"--nproc-per-node={args.nproc}", "launch/train.py", "--config", CONFIG]
                print("==>", " ".join([*cmd, *overrides]), flush=True)
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                subprocess.run([*cmd, *overrides], cwd=REPO, check=True, env=env)
            results[label].append(load_results(REPO / run_dir))

    first = next(iter(results.values()))
    rows = {"most popular": [r["popularity_test"] for r in first]}
    rows |= {label: [r["test"] for r in runs] for label, runs in results.items()}
    report = [f"test metrics over seeds {' '.join(map(str, args.seeds))}\n", mean_std_table(rows)]
    if len(results) > 1:
        models = {label: rows[label] for label in results}
        report += ["", paired_difference_table(next(iter(variants)), models)]
        metric = first[0]["valid_metric"]
        valid = {label: [{metric: r["best_valid"]} for r in runs] for label, runs in results.items()}
        report += ["", f"validation {metric} at the best epoch:", ""]
        report += [paired_difference_table(next(iter(variants)), valid, (metric,))]
    text = "\n".join(report)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")

    fields = []
    for label, runs in results.items():
        for key in ("hr@10", "ndcg@10", "mrr"):
            values = [r["test"][key] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            fields.append(f"{_slug(label)}_{key.replace('@', '')}={statistics.fmean(values):.4f}±{std:.4f}")
    pop = statistics.fmean(r["popularity_test"]["hr@10"] for r in first)
    print(f"RESULT dataset=ml100k seeds={len(args.seeds)} {' '.join(fields)} popularity_hr10={pop:.4f}")


if __name__ == "__main__":
    main()
