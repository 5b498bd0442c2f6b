"""Emit one frozen fp16 vector per item into embedding shards (any local encoder), or import precomputed ones.

    torchrun --standalone --nproc-per-node=2 launch/embed.py --config launch/configs/ml100k.toml \\
        embed.encoder_path=runs/blair_demo/encoder embed.output_dir=runs/ml100k_blair_emb
    python launch/embed.py --config launch/configs/ml100k.toml embed.source=vectors \\
        embed.vectors_path=openai_vectors.parquet embed.output_dir=runs/ml100k_openai_emb
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.cli import parse_job_config, run_main
from trainer.distributed import destroy_distributed
from trainer.embed import embed_items, import_vectors_from_config


def main() -> None:
    config, _ = parse_job_config("Write item-embedding shards for a prepared dataset.")
    if config.embed.source == "vectors":
        import_vectors_from_config(config)
        return
    try:
        embed_items(config)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    run_main(main)
