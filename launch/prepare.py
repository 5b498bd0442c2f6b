"""Prepare one dataset: `python launch/prepare.py --config launch/configs/<name>.toml [data.k=v ...]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.io import DataError
from data_shards.prepare import prepare
from trainer.config import JobConfig
from trainer.config_io import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="TOML job config (its [data] section is used)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.overwrite=true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(JobConfig, args.config, args.overrides)
        prepare(cfg.data)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
