"""`manifest.json`: what a dataset directory holds, where it came from, and how to check it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_shards.io import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check a dataset's manifest, or raise DataError saying how to make one."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} not found: {dataset_dir} is not a prepared dataset "
            "(run `python launch/prepare.py --config launch/configs/<name>.toml`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable manifest ({err}); prepare the dataset again") from err
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}; prepare it again"
        )
    return manifest


def verify_shards(dataset_dir: str | Path, kind: str = "sequences", paths: list[str] | None = None) -> None:
    """Check shards' sha256 (all of `kind`, or only `paths`) against the manifest; DataError on mismatch."""
    from data_shards.shards import sha256_file

    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    for entry in manifest["shards"][kind]:
        if paths is not None and entry["path"] not in paths:
            continue
        shard = dataset_dir / entry["path"]
        if not shard.is_file():
            raise DataError(f"{shard}: shard listed in the manifest is missing; prepare the dataset again")
        digest = sha256_file(shard)
        if digest != entry["sha256"]:
            raise DataError(
                f"{shard}: sha256 {digest[:16]}... does not match the manifest ({entry['sha256'][:16]}...): "
                "the shard is corrupted or was modified; prepare the dataset again"
            )
