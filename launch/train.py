"""Train and evaluate HSTU (optionally fused with frozen text embeddings) on one dataset.

    torchrun --standalone --nproc-per-node=2 launch/train.py --config launch/configs/ml100k.toml
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        launch/train.py --config launch/configs/amazon_video_games.toml --resume auto
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.cli import parse_job_config, run_main
from trainer.hstu_trainer import train


def main() -> None:
    config, args = parse_job_config(
        "Train HSTU under torchrun (gloo on CPU, NCCL on GPUs).",
        add_arguments=lambda p: p.add_argument(
            "--resume", help="auto | never | a checkpoint folder (the same as checkpoint.resume=...)"
        ),
    )
    if args.resume:
        config.checkpoint.resume = args.resume
    train(config)


if __name__ == "__main__":
    run_main(main)
