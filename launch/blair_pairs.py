"""Prepare BLaIR (review, item metadata) pair shards out of core, for training at full scale.

python launch/blair_pairs.py --config launch/configs/amazon_video_games.toml [blair.pairs.k=v ...]
torchrun --standalone --nproc-per-node=2 launch/blair.py --config <the same config>   # trains from them
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_shards.pair_shards import prepare_pairs
from trainer.cli import parse_job_config, run_main


def main() -> None:
    config, _ = parse_job_config(
        "Write BLaIR pair shards (blair.pairs.dataset_dir) from raw reviews + metadata."
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    prepare_pairs(config.blair.pairs)


if __name__ == "__main__":
    run_main(main)
