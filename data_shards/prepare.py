"""`prepare(config) -> Path`: raw files to a complete dataset directory, published by rename.

Stages: a source reader validates lines into Parquet (skips counted by reason), DuckDB dedups, filters and
assembles sequences out of core, shards are streamed into a temporary sibling directory, the manifest is
written last, and the directory is renamed into place. A failure at any point removes the temporary directory,
so `<root>/<name>/` is never partial: it is the complete new dataset, or the old one (overwrite; absent for
the instant between the two renames of `publish_folder`), or does not exist.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from data_shards.config import DataConfig
from data_shards.io import DataError, SkipStats
from data_shards.manifest import FORMAT_VERSION, write_manifest
from data_shards.preprocess import connect, preprocess, write_id_maps
from data_shards.shards import write_item_shards, write_sequence_shards
from data_shards.sources import get_source

log = logging.getLogger("data_shards")


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its finished children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def publish_folder(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` folder to `final`; an existing `final` is replaced only when `overwrite`.

    A new `final` appears in one rename. Replacing takes two (old aside, new in): between them `final` is
    briefly absent, and if the second fails the old folder is renamed back, so `final` is never partial.
    """
    if not final.exists():
        os.rename(tmp, final)
        return
    if not overwrite:
        raise DataError(f"{final} already exists: set data.overwrite=true to replace it, or pick data.name")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        try:
            os.rename(old, final)
        except OSError as err:
            raise DataError(f"replacing {final} failed and its old copy is left at {old}: {err}") from err
        raise
    shutil.rmtree(old, ignore_errors=True)


def prepare(cfg: DataConfig) -> Path:
    """Build `<cfg.root>/<cfg.name>/` from the raw files named in `cfg`; returns its path."""
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    root = Path(cfg.root)
    final = root / cfg.name
    if final.exists() and not cfg.overwrite:
        raise DataError(f"{final} already exists: set data.overwrite=true to replace it, or pick data.name")
    root.mkdir(parents=True, exist_ok=True)
    scratch_parent = Path(cfg.temp_dir) if cfg.temp_dir else root
    scratch_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.tmp-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the published dataset gets normal permissions
    work = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.work-", dir=scratch_parent))
    stats = SkipStats()
    timings: dict[str, float] = {}
    try:
        log.info("reading %s input ...", cfg.source)
        src = get_source(cfg.source)(cfg, work, stats)
        timings["validate_s"] = time.perf_counter() - t0
        timings["validate_cpu_s"] = cpu_seconds() - cpu0
        log.info("validated input in %.1fs; %s", timings["validate_s"], stats.summary())

        t1 = time.perf_counter()
        con = connect(cfg, work)
        try:
            proc = preprocess(con, cfg, src, work, stats)
            write_id_maps(con, tmp)
        finally:
            con.close()
        timings["preprocess_s"] = time.perf_counter() - t1
        timings["preprocess_cpu_s"] = cpu_seconds() - cpu0 - timings["validate_cpu_s"]

        t2 = time.perf_counter()
        counts = proc.counts

        # the item shards are written here while the worker processes write the sequence shards
        def items() -> list[dict]:
            return write_item_shards(proc.items, tmp / "items", items_per_shard=cfg.items_per_shard)

        seq_shards, item_shards = write_sequence_shards(
            proc.sequences, proc.users, tmp / "sequences", num_users=counts["kept_users"],
            users_per_shard=cfg.users_per_shard, workers=cfg.threads,
            meanwhile=items,
        )  # fmt: skip
        timings["shards_s"] = time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - t0
        timings["total_cpu_s"] = cpu_seconds() - cpu0
        timings["shards_cpu_s"] = (
            timings["total_cpu_s"] - timings["validate_cpu_s"] - timings["preprocess_cpu_s"]
        )
        counts["items_with_empty_text"] = src.items_with_empty_text
        skipped = stats.to_dict()
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": cfg.source,
            "config": dataclasses.asdict(cfg),
            "inputs": [i.to_dict() for i in src.inputs],
            "counts": counts,
            "skipped": skipped["counts"],
            "skipped_examples": skipped["examples"],
            "kcore_rounds": proc.kcore_rounds,
            "sequence_length": proc.sequence_length,
            "num_users": counts["kept_users"],
            "num_items": counts["kept_items"],
            "num_interactions": counts["kept_interactions"],
            "split": cfg.split,
            "max_seq_len": cfg.max_seq_len,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "shards": {"sequences": seq_shards, "items": item_shards},
        }
        write_manifest(tmp, manifest)
        publish_folder(tmp, final, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "raw: %s users, %s items, %s interactions | kept: %s users, %s items, %s interactions",
        f"{counts['raw_users']:,}", f"{counts['raw_items']:,}", f"{counts['raw_interactions']:,}",
        f"{counts['kept_users']:,}", f"{counts['kept_items']:,}", f"{counts['kept_interactions']:,}",
    )  # fmt: skip
    log.info("%s", stats.summary())
    log.info(
        "wrote %s (%d sequence shards, %d item shards) in %.1fs",
        final, len(seq_shards), len(item_shards), timings["total_s"],
    )  # fmt: skip
    return final
