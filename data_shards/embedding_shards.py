"""Frozen item-embedding shards: writing, verifying and reading row ranges (what the HSTU trainer loads).

Layout of an embedding dir::

    manifest.json     {format_version, encoder {name, path, sha256}, pooling, normalized, dim, dtype,
                       num_items, num_empty_text, dataset {path, manifest_sha256},
                       shards: [{path, sha256, num_samples, num_items, first_item, last_item}]}
    emb-000000.tar    WebDataset; each sample is a BLOCK of consecutive items:
                      __key__ f"{first_item:09d}", ids.npy int64 [n], emb.npy float16 [n, dim]

Item indices run 1..num_items (0 is padding and is never stored). Shards cover disjoint item ranges and
together hold every item exactly once. Also here: the dataset-manifest check of the embedding job (which
reads item texts with `data_shards.reader.iter_item_texts`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from data_shards.io import DataError
from data_shards.manifest import load_manifest
from data_shards.reader import iter_samples
from data_shards.shards import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class EmbeddingShardError(DataError):
    """An embedding dir that is incomplete, inconsistent or corrupt; the message names the file."""


def shard_name(index: int) -> str:
    return f"emb-{index:06d}.tar"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_embedding_shard(
    path: str | Path, ids: np.ndarray, emb: np.ndarray, *, block_size: int = 1024
) -> dict[str, Any]:
    """Write one shard of consecutive items (`ids` sorted, no gaps) in blocks; return its manifest entry."""
    import webdataset as wds

    ids = np.asarray(ids, dtype=np.int64)
    emb = np.asarray(emb)
    if ids.ndim != 1 or emb.ndim != 2 or len(ids) != len(emb) or len(ids) == 0:
        raise EmbeddingShardError(
            f"{path}: need ids [n] and emb [n, dim] with n > 0, got {ids.shape}, {emb.shape}"
        )
    if np.any(np.diff(ids) != 1):
        raise EmbeddingShardError(f"{path}: a shard must hold consecutive item indices, got {ids[:5]}...")
    if ids[0] < 1:
        raise EmbeddingShardError(f"{path}: item indices start at 1 (0 is padding), got {ids[0]}")
    emb16 = emb.astype(np.float16)
    if not np.isfinite(emb16).all():
        raise EmbeddingShardError(f"{path}: embeddings contain NaN/inf (or overflow float16)")
    path = Path(path)
    num_samples = 0
    with wds.TarWriter(str(path), mtime=0.0) as sink:  # fixed mtime: identical runs, identical bytes
        for lo in range(0, len(ids), block_size):
            block_ids = ids[lo : lo + block_size]
            sink.write(
                {
                    "__key__": f"{int(block_ids[0]):09d}",
                    "ids.npy": _npy_bytes(block_ids),
                    "emb.npy": _npy_bytes(np.ascontiguousarray(emb16[lo : lo + block_size])),
                }
            )
            num_samples += 1
    return {
        "path": path.name,
        "sha256": sha256_file(path),
        "num_samples": num_samples,
        "num_items": len(ids),
        "first_item": int(ids[0]),
        "last_item": int(ids[-1]),
    }


def write_embedding_shards(
    out_dir: str | Path,
    ids: np.ndarray,
    emb: np.ndarray,
    *,
    encoder: dict[str, Any],
    pooling: str,
    normalized: bool,
    num_items: int,
    num_empty_text: int = 0,
    dataset: dict[str, Any] | None = None,
    items_per_shard: int = 100_000,
    block_size: int = 1024,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write all items (one process) as shards of `items_per_shard` plus the manifest; return the manifest.

    The distributed embedding job writes shards per rank with `write_embedding_shard` and then calls
    `write_manifest` on rank 0; this is the single-process path (imports of precomputed vectors, tests).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.argsort(ids, kind="stable")
    ids, emb = np.asarray(ids)[order], np.asarray(emb)[order]
    entries = []
    for index, lo in enumerate(range(0, len(ids), items_per_shard)):
        entries.append(
            write_embedding_shard(
                out_dir / shard_name(index),
                ids[lo : lo + items_per_shard],
                emb[lo : lo + items_per_shard],
                block_size=block_size,
            )
        )
    return write_manifest(
        out_dir,
        entries,
        encoder=encoder,
        pooling=pooling,
        normalized=normalized,
        dim=int(emb.shape[1]),
        num_items=num_items,
        num_empty_text=num_empty_text,
        dataset=dataset,
        extra=extra,
    )


def write_manifest(
    out_dir: str | Path,
    shards: list[dict[str, Any]],
    *,
    encoder: dict[str, Any],
    pooling: str,
    normalized: bool,
    dim: int,
    num_items: int,
    num_empty_text: int = 0,
    dataset: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check that `shards` cover items 1..num_items exactly once, then write manifest.json."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "encoder": encoder,
        "pooling": pooling,
        "normalized": bool(normalized),
        "dim": int(dim),
        "dtype": "float16",
        "num_items": int(num_items),
        "num_empty_text": int(num_empty_text),
        "dataset": dataset or {},
        "shards": sorted(shards, key=lambda s: s["first_item"]),
        **(extra or {}),
    }
    _check_coverage(manifest, where=str(Path(out_dir) / MANIFEST))
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return manifest


def _check_coverage(manifest: dict[str, Any], *, where: str) -> None:
    expected = 1
    for shard in manifest["shards"]:
        first, last, n = shard["first_item"], shard["last_item"], shard.get("num_items", 0)
        if n != last - first + 1:
            raise EmbeddingShardError(
                f"{where}: shard {shard['path']} claims {n} items for range {first}..{last}"
            )
        if first != expected:
            what = (
                "overlaps the previous shard"
                if first < expected
                else f"leaves items {expected}..{first - 1} out"
            )
            raise EmbeddingShardError(
                f"{where}: shard {shard['path']} starts at item {first} and {what}; every item 1..N must be "
                "present exactly once (re-run the embedding job into an empty folder)"
            )
        expected = last + 1
    if expected - 1 != manifest["num_items"]:
        raise EmbeddingShardError(
            f"{where}: shards cover items 1..{expected - 1} but num_items is {manifest['num_items']}"
        )


def read_embedding_manifest(emb_dir: str | Path, verify: bool = False) -> dict[str, Any]:
    """Load manifest.json, check its fields and item coverage; with `verify`, also every shard's sha256."""
    emb_dir = Path(emb_dir)
    path = emb_dir / MANIFEST
    if not path.is_file():
        raise EmbeddingShardError(
            f"{path} not found: {emb_dir} is not an embedding dir (write one with launch/embed.py)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EmbeddingShardError(f"{path}: invalid JSON ({err})") from err
    required = ("format_version", "encoder", "pooling", "normalized", "dim", "dtype", "num_items", "shards")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise EmbeddingShardError(f"{path}: missing field(s) {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise EmbeddingShardError(
            f"{path}: format_version {manifest['format_version']} is unsupported (expected {FORMAT_VERSION})"
        )
    if manifest["dtype"] != "float16":
        raise EmbeddingShardError(f"{path}: dtype must be float16, got {manifest['dtype']!r}")
    _check_coverage(manifest, where=str(path))
    if verify:
        for shard in manifest["shards"]:
            file = emb_dir / shard["path"]
            if not file.is_file():
                raise EmbeddingShardError(f"{path}: shard {file} is missing")
            digest = sha256_file(file)
            if digest != shard["sha256"]:
                raise EmbeddingShardError(
                    f"{file}: sha256 {digest[:12]}... differs from the manifest's {shard['sha256'][:12]}...; "
                    "the shard was modified or truncated (re-run the embedding job)"
                )
    return manifest


def load_embedding_rows(emb_dir: str | Path, start: int, stop: int, verify: bool = False) -> np.ndarray:
    """Rows for item indices start..stop-1 as float16 [stop-start, dim]; row 0 (padding) is zeros.

    Reads only the shards overlapping the range, so each rank can load its row-wise slice of the table.
    """
    emb_dir = Path(emb_dir)
    manifest = read_embedding_manifest(emb_dir, verify=False)
    num_items, dim = manifest["num_items"], manifest["dim"]
    if not 0 <= start <= stop <= num_items + 1:
        raise EmbeddingShardError(
            f"{emb_dir}: row range {start}..{stop - 1} is outside 0..{num_items} (the table has N + 1 rows)"
        )
    out = np.zeros((stop - start, dim), dtype=np.float16)
    filled = np.zeros(stop - start, dtype=bool)
    if start == 0:
        filled[0] = True
    lo = max(start, 1)
    for shard in manifest["shards"]:
        if shard["last_item"] < lo or shard["first_item"] >= stop:
            continue
        file = emb_dir / shard["path"]
        if not file.is_file():
            raise EmbeddingShardError(f"{emb_dir / MANIFEST}: shard {file} is missing")
        if verify and sha256_file(file) != shard["sha256"]:
            raise EmbeddingShardError(f"{file}: sha256 does not match the manifest; the shard was modified")
        for sample in iter_samples(file, remedy="truncated or corrupt: re-run the embedding job"):
            where = f"{file}:{sample['__key__']}"
            if "ids.npy" not in sample or "emb.npy" not in sample:
                members = sorted(k for k in sample if k != "__key__")
                raise EmbeddingShardError(f"{where}: sample lacks ids.npy/emb.npy (has {members})")
            ids, emb = sample["ids.npy"], sample["emb.npy"]
            if len(ids) == 0 or ids[-1] < lo or ids[0] >= stop:
                continue
            if emb.dtype != np.float16 or emb.shape != (len(ids), dim):
                raise EmbeddingShardError(
                    f"{where}: emb.npy is {emb.dtype}{emb.shape}, expected float16 [n, {dim}]"
                )
            keep = (ids >= lo) & (ids < stop)
            rows = ids[keep] - start
            if filled[rows].any():
                dup = int(ids[keep][filled[rows]][0])
                raise EmbeddingShardError(f"{where}: item {dup} appears more than once in {emb_dir}")
            out[rows] = emb[keep]
            filled[rows] = True
    if not filled.all():
        missing = np.flatnonzero(~filled)[:5] + start
        raise EmbeddingShardError(
            f"{emb_dir}: items {missing.tolist()}... of range {start}..{stop - 1} are in no shard; "
            "the embedding dir is incomplete (re-run the embedding job)"
        )
    return out


def read_dataset_manifest(dataset_dir: str | Path) -> tuple[dict[str, Any], str]:
    """The dataset's manifest (via `load_manifest`) and its sha256, recorded in the embedding manifest.

    Also checks what embedding needs beyond `load_manifest`: `num_items` and listed item-text shards.
    """
    manifest = load_manifest(dataset_dir)
    path = Path(dataset_dir) / MANIFEST
    if "num_items" not in manifest:
        raise EmbeddingShardError(f"{path}: missing field 'num_items'; re-run launch/prepare.py")
    if not manifest.get("shards", {}).get("items"):
        raise EmbeddingShardError(
            f"{path}: lists no item-text shards (shards.items); re-run launch/prepare.py"
        )
    return manifest, sha256_file(path)
