"""BLaIR contrastive pretraining (review text <-> item metadata) with DeepSpeed ZeRO.

torchrun --standalone --nproc-per-node=2 launch/blair.py --config launch/configs/blair_demo.toml
deepspeed --num_gpus 8 launch/blair.py --config launch/configs/amazon_video_games.toml \\
    run.name=amazon_video_games_blair blair.zero_stage=3

The Amazon and Steam configs carry a [blair] section (pairs prepared first by launch/blair_pairs.py); a
BLaIR run needs a run.name of its own, since the config's run folder belongs to launch/train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.blair import train_blair
from trainer.cli import parse_job_config, run_main
from trainer.distributed import destroy_distributed


def main() -> None:
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment carries the same.
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    config, _ = parse_job_config("Pretrain a BLaIR text encoder with DeepSpeed.", argv)
    try:
        train_blair(config)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    run_main(main)
