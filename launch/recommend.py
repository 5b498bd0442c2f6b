"""Write every user's top-K items from a trained run: one Parquet part per rank plus a manifest.

    torchrun --standalone --nproc-per-node=2 launch/recommend.py --config launch/configs/ml100k.toml \\
        run.output_root=runs/demo run.name=hstu recommend.k=20
    python launch/recommend.py --config launch/configs/ml100k.toml recommend.checkpoint=latest

The run folder (`run.output_root/run.name`) must hold a training run: its saved config.json fixes the dataset
and the model, the [recommend] section picks the checkpoint, K and where the lists go.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.cli import parse_job_config, run_main
from trainer.recommend import recommend


def main() -> None:
    config, _ = parse_job_config(
        "Recommend the top-K items for every user of a trained run (under torchrun)."
    )
    recommend(config)


if __name__ == "__main__":
    run_main(main)
