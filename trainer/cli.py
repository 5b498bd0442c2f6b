"""Command line shared by every entry point: `--config FILE` plus trailing `section.key=value` overrides."""

from __future__ import annotations

import argparse
import faulthandler
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from data_shards.embedding_shards import EmbeddingShardError
from data_shards.io import DataError
from modules.blair import EncoderError
from trainer.config import JobConfig
from trainer.config_io import ConfigError, load_config
from trainer.monitor import TrainingDiverged

T = TypeVar("T")


def parse_job_config(
    description: str,
    argv: Sequence[str] | None = None,
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[JobConfig, argparse.Namespace]:
    """Parse the command line into the resolved JobConfig (and any extra flags the entry point added)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Any config value can be overridden after the flags, e.g. train.lr=3e-4 model.num_blocks=2",
    )
    parser.add_argument("--config", required=True, help="TOML file under launch/configs/")
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value (or --section.key=value)")
    args, unknown = parser.parse_known_args(argv)
    overrides = list(args.overrides) + [u for u in unknown if "=" in u]
    strays = [u for u in unknown if "=" not in u]
    if strays:
        parser.error(f"unrecognised arguments: {' '.join(strays)}")
    return load_config(JobConfig, args.config, overrides), args


def run_main(main: Callable[[], T]) -> T:
    """Run an entry point; user errors (config, data, embeddings, encoder, a diverged run) end with one line
    and exit 2.

    A native crash (an abort or segfault in a C++ library) prints every thread's Python stack first, so a
    rank that dies under torchrun says where it was.
    """
    faulthandler.enable(all_threads=True)
    try:
        return main()
    except (ConfigError, DataError, EmbeddingShardError, EncoderError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
