"""Item-embedding emission: `embed_items(config)` (distributed encoder inference) and `import_vectors(...)`.

Both write the shard format of `data_shards/embedding_shards.py`. Work is split by output shard (fixed item
ranges of `items_per_shard`, shard s on rank s % world_size), so every item is embedded exactly once and the
files do not depend on the number of ranks. Items with empty text get a zero vector (counted).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_shards.embedding_shards import (
    MANIFEST,
    EmbeddingShardError,
    read_dataset_manifest,
    shard_name,
    write_embedding_shard,
    write_embedding_shards,
    write_manifest,
)
from data_shards.id_maps import read_id_map
from data_shards.pairs import resolve_path
from data_shards.reader import iter_item_texts
from data_shards.shards import sha256_file
from modules.blair import (
    BlairEncoder,
    EncoderError,
    declared_max_length,
    default_pooling,
    load_encoder,
    weights_sha256,
)
from trainer.config_io import ConfigError
from trainer.distributed import World, init_distributed, logger, setup_logging


def _dataset_dir(config) -> Path:
    """embed.dataset_dir, else <data.root>/<data.name> when the job has a [data] section."""
    if config.embed.dataset_dir:
        return Path(resolve_path(config.embed.dataset_dir))
    data = getattr(config, "data", None)
    if data is not None and getattr(data, "root", None) and getattr(data, "name", None):
        return Path(data.root) / data.name
    raise ValueError("embed.dataset_dir is not set (and the job has no [data] root/name to derive it from)")


def _output_dir(config) -> Path:
    if config.embed.output_dir:
        return Path(config.embed.output_dir)
    return Path(config.run.output_root) / config.run.name / "embeddings"


def shard_ranges(num_items: int, items_per_shard: int) -> list[tuple[int, int]]:
    """Half-open item ranges [lo, hi) of the output shards, covering 1..num_items."""
    return [(lo, min(lo + items_per_shard, num_items + 1)) for lo in range(1, num_items + 1, items_per_shard)]


@torch.no_grad()
def encode_texts(
    encoder: BlairEncoder,
    tokenizer,
    texts: list[str],
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> np.ndarray:
    """Pooled float32 vectors [n, dim] for non-empty `texts`; batches are formed by length (deterministic)."""
    order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
    out: np.ndarray | None = None
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            vec = encoder.encode(enc["input_ids"], enc["attention_mask"]).float()
        if out is None:
            out = np.zeros((len(texts), vec.shape[1]), dtype=np.float32)
        out[idx] = vec.cpu().numpy()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def embed_items(config) -> dict[str, Any]:
    """Embed every item text of the dataset with a local encoder; rank 0 writes the manifest. Returns it."""
    cfg = config.embed
    world: World = init_distributed()
    if not world.is_main:
        import transformers

        transformers.logging.set_verbosity_error()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    started = time.perf_counter()
    dataset_dir = _dataset_dir(config)
    out_dir = _output_dir(config)
    manifest, manifest_sha = read_dataset_manifest(dataset_dir)
    num_items = int(manifest["num_items"])

    encoder_path = resolve_path(cfg.encoder_path)
    loaded = _load_encoder_or_config_error(encoder_path, with_mlm_head=False)
    declared_pooling, declared_norm = default_pooling(encoder_path)
    pooling = declared_pooling if cfg.pooling == "auto" else cfg.pooling
    normalize = declared_norm if cfg.normalize == "auto" else cfg.normalize == "yes"
    encoder = BlairEncoder(loaded.model, pooling=pooling).to(world.device).eval()
    max_length = cfg.max_length
    declared = declared_max_length(encoder_path)
    if declared is not None and declared < max_length:
        logger.info(
            "embed: %s declares max_seq_length %d: using it instead of %d", encoder_path, declared, max_length
        )
        max_length = declared
    tokenizer = loaded.tokenizer
    dim = int(loaded.model.config.hidden_size)

    ranges = shard_ranges(num_items, cfg.items_per_shard)
    mine = [(s, r) for s, r in enumerate(ranges) if s % world.world_size == world.rank]
    if world.is_main and world.world_size > len(ranges):
        logger.warning(
            "embed: %d ranks but only %d shard(s) of %d items: some ranks idle (lower embed.items_per_shard)",
            world.world_size,
            len(ranges),
            cfg.items_per_shard,
        )
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob("emb-*.tar"), out_dir / MANIFEST]:
            stale.unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
    logger.info(
        "embed: %d items of %s with %s (pooling %s, normalize %s, max_length %d): %d shard(s), %d rank(s)",
        num_items,
        dataset_dir,
        encoder_path,
        pooling,
        normalize,
        max_length,
        len(ranges),
        world.world_size,
    )

    texts: dict[int, str] = {}
    for item in iter_item_texts(dataset_dir, ranges=[r for _, r in mine]):
        if item.item in texts:
            raise EmbeddingShardError(
                f"{dataset_dir}: item {item.item} appears twice in the item-text shards"
            )
        texts[item.item] = item.text
    entries, num_empty = [], 0
    for s, (lo, hi) in mine:
        ids = np.arange(lo, hi, dtype=np.int64)
        missing = [int(i) for i in ids if int(i) not in texts]
        if missing:
            raise EmbeddingShardError(
                f"{dataset_dir}: items {missing[:5]} have no entry in items/items-*.tar"
            )
        shard_texts = [texts[int(i)].strip() for i in ids]
        nonempty = [i for i, t in enumerate(shard_texts) if t]
        emb = np.zeros((len(ids), dim), dtype=np.float32)
        if nonempty:
            vec = encode_texts(
                encoder,
                tokenizer,
                [shard_texts[i] for i in nonempty],
                batch_size=cfg.batch_size,
                max_length=max_length,
                device=world.device,
            )
            if normalize:
                vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
            emb[nonempty] = vec
        num_empty += len(ids) - len(nonempty)
        entries.append(write_embedding_shard(out_dir / shard_name(s), ids, emb, block_size=cfg.block_size))
        logger.info("embed: shard %d (items %d..%d) written", s, lo, hi - 1)

    gathered: list[Any] = [(entries, num_empty)]
    if dist.is_initialized():
        gathered = [None] * world.world_size
        dist.all_gather_object(gathered, (entries, num_empty))
    result: dict[str, Any] = {}
    if world.is_main:
        all_entries = [e for part, _ in gathered for e in part]
        result = write_manifest(
            out_dir,
            all_entries,
            encoder={
                "name": cfg.name or "/".join(Path(encoder_path).resolve().parts[-2:]),
                "path": str(Path(encoder_path).resolve()),
                "sha256": weights_sha256(encoder_path),
            },
            pooling=pooling,
            normalized=normalize,
            dim=dim,
            num_items=num_items,
            num_empty_text=sum(n for _, n in gathered),
            dataset={"path": str(dataset_dir.resolve()), "manifest_sha256": manifest_sha},
            extra={"max_length": max_length, "world_size": world.world_size},
        )
        logger.info(
            "embed: %d items (%d with empty text -> zero vector), dim %d, %.1fs -> %s",
            num_items,
            result["num_empty_text"],
            dim,
            time.perf_counter() - started,
            out_dir,
        )
    if dist.is_initialized():
        dist.barrier()
    return result


# --------------------------------------------------------------------------- precomputed vectors


def _read_vectors(
    path: Path, *, ids_path: str, id_column: str, vector_column: str
) -> tuple[list[str], np.ndarray]:
    name = path.name.lower()
    if ".parquet" in name:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for col in (id_column, vector_column):
            if col not in table.column_names:
                raise EmbeddingShardError(
                    f"{path}: column {col!r} not found; columns are {table.column_names}"
                )
        ids = [str(x) for x in table.column(id_column).to_pylist()]
        vectors = np.asarray(table.column(vector_column).to_pylist(), dtype=np.float32)
    elif name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as npz:
            if "ids" not in npz or "vectors" not in npz:
                raise EmbeddingShardError(f"{path}: a .npz needs arrays 'ids' and 'vectors', has {list(npz)}")
            ids = [str(x) for x in npz["ids"].tolist()]
            vectors = np.asarray(npz["vectors"], dtype=np.float32)
    elif name.endswith(".npy"):
        if not ids_path:
            raise EmbeddingShardError(
                f"{path}: a .npy of vectors needs embed.ids_path (one item id per line)"
            )
        vectors = np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
        ids = Path(ids_path).read_text(encoding="utf-8").splitlines()
    else:
        raise EmbeddingShardError(
            f"{path}: unsupported vectors file; use .parquet, .npz or .npy (+ ids_path)"
        )
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise EmbeddingShardError(
            f"{path}: need one vector per id, got {len(ids)} ids and vectors of shape {vectors.shape} "
            "(ragged vector lengths also end up here)"
        )
    if not np.isfinite(vectors).all():
        raise EmbeddingShardError(f"{path}: vectors contain NaN or inf")
    return ids, vectors


def import_vectors(
    dataset_dir: str | Path,
    vectors_path: str | Path,
    out_dir: str | Path,
    *,
    ids_path: str = "",
    id_column: str = "item_id",
    vector_column: str = "embedding",
    missing: str = "error",
    name: str = "",
    items_per_shard: int = 100_000,
    block_size: int = 1024,
) -> dict[str, Any]:
    """Write embedding shards from a file of vectors keyed by ORIGINAL item id (e.g. a hosted embedding API).

    Ids are mapped through the dataset's item_ids.txt. Catalog items absent from the file are an error
    (or zero vectors with missing="zero"); ids not in the catalog are ignored and counted.
    """
    dataset_dir, vectors_path, out_dir = Path(dataset_dir), Path(vectors_path), Path(out_dir)
    if not vectors_path.is_file():
        raise EmbeddingShardError(f"vectors file not found: {vectors_path} (embed.vectors_path)")
    manifest, manifest_sha = read_dataset_manifest(dataset_dir)
    num_items = int(manifest["num_items"])
    catalog = read_id_map(dataset_dir, "item", num_items).to_pylist()
    ids, vectors = _read_vectors(
        vectors_path, ids_path=ids_path, id_column=id_column, vector_column=vector_column
    )
    row_of: dict[str, int] = {}
    for row, key in enumerate(ids):
        if key in row_of:
            raise EmbeddingShardError(
                f"{vectors_path}: item id {key!r} appears more than once (rows {row_of[key]}, {row})"
            )
        row_of[key] = row
    rows = np.array([row_of.get(key, -1) for key in catalog], dtype=np.int64)
    absent = np.flatnonzero(rows < 0)
    num_extra = len(ids) - int((rows >= 0).sum())
    if len(absent) == num_items:
        raise EmbeddingShardError(
            f"{vectors_path}: none of its {len(ids)} ids matches the catalog's item ids (e.g. catalog "
            f"{catalog[:3]}, file {ids[:3]}); the file belongs to another dataset or uses another id column"
        )
    if len(absent) and missing == "error":
        examples = [catalog[i] for i in absent[:5]]
        raise EmbeddingShardError(
            f"{vectors_path}: {len(absent)} of {num_items} catalog items have no vector (e.g. {examples}); "
            "embed them too, or set embed.missing=zero to give them zero vectors"
        )
    emb = np.zeros((num_items, vectors.shape[1]), dtype=np.float32)
    present = rows >= 0
    emb[present] = vectors[rows[present]]
    norms = np.linalg.norm(emb[present], axis=1)
    normalized = bool(np.allclose(norms, 1.0, atol=1e-3))
    result = write_embedding_shards(
        out_dir,
        np.arange(1, num_items + 1, dtype=np.int64),
        emb,
        encoder={
            "name": name or vectors_path.stem,
            "path": str(vectors_path.resolve()),
            "sha256": {vectors_path.name: sha256_file(vectors_path)},
        },
        pooling="precomputed",
        normalized=normalized,
        num_items=num_items,
        num_empty_text=len(absent),
        dataset={"path": str(dataset_dir.resolve()), "manifest_sha256": manifest_sha},
        items_per_shard=items_per_shard,
        block_size=block_size,
        extra={"num_missing_vectors": len(absent), "num_ids_not_in_catalog": num_extra},
    )
    logger.info(
        "imported %d vectors (dim %d) from %s: %d catalog items without one, %d ids not in the catalog -> %s",
        num_items - len(absent),
        vectors.shape[1],
        vectors_path,
        len(absent),
        num_extra,
        out_dir,
    )
    return result


def import_vectors_from_config(config) -> dict[str, Any]:
    """`import_vectors` driven by the [embed] section (single process)."""
    setup_logging(0)
    cfg = config.embed
    return import_vectors(
        _dataset_dir(config),
        resolve_path(cfg.vectors_path),
        _output_dir(config),
        ids_path=cfg.ids_path,
        id_column=cfg.id_column,
        vector_column=cfg.vector_column,
        missing=cfg.missing,
        name=cfg.name,
        items_per_shard=cfg.items_per_shard,
        block_size=cfg.block_size,
    )


def check_same_rows(dir_a: str | Path, dir_b: str | Path, *, atol: float = 1e-3) -> float:
    """Max |a - b| over all rows of two embedding dirs of the same catalog (raises if shapes differ)."""
    from data_shards.embedding_shards import load_embedding_rows, read_embedding_manifest

    na = read_embedding_manifest(dir_a)["num_items"]
    nb = read_embedding_manifest(dir_b)["num_items"]
    if na != nb:
        raise EmbeddingShardError(f"{dir_a} has {na} items, {dir_b} has {nb}")
    a = load_embedding_rows(dir_a, 0, na + 1).astype(np.float32)
    b = load_embedding_rows(dir_b, 0, nb + 1).astype(np.float32)
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    if not math.isfinite(diff) or diff > atol:
        raise EmbeddingShardError(f"{dir_a} and {dir_b} differ by up to {diff} (> {atol})")
    return diff


def _load_encoder_or_config_error(path: str, *, with_mlm_head: bool):
    """load_encoder, with its errors reported as config errors (the path came from the config)."""
    try:
        return load_encoder(path, with_mlm_head=with_mlm_head)
    except EncoderError as err:
        raise ConfigError(f"{err} (check {path!r} in the config)") from err
