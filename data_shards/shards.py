"""WebDataset shard writing: plain ustar tars (mtime 0, so shards are reproducible byte for byte), hashed
while written, one sample per user (sequences) or per item (texts).

The tar headers and .npy payloads are built directly (their layout is fixed), which is several times faster
than `tarfile`/`np.save` per member; `tests/test_data_shards.py` checks both against the standard readers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

log = logging.getLogger("data_shards")
PARALLEL_MIN_USERS = 50_000  # below this, starting worker processes costs more than it saves

_BLOCK = 512
_END = b"\0" * (2 * _BLOCK)
_MODE_UID_GID = b"0000644\0" + b"0000000\0" + b"0000000\0"
_MTIME = b"00000000000\0"
_TAIL = (
    b"0"
    + b"\0" * 100
    + b"ustar\x0000"
    + b"\0" * 32
    + b"\0" * 32
    + b"\0" * 8
    + b"\0" * 8
    + b"\0" * 155
    + b"\0" * 12
)
_CONST_SUM = sum(_MODE_UID_GID) + sum(_MTIME) + sum(_TAIL) + 8 * 32  # chksum field counted as spaces


def tar_header(name: bytes, size: int) -> bytes:
    """A ustar header for a regular file `name` (<= 100 bytes) of `size` bytes, mode 0644, mtime 0."""
    if len(name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size_field = b"%011o\0" % size
    chksum = _CONST_SUM + sum(name) + sum(size_field)
    return name.ljust(100, b"\0") + _MODE_UID_GID + size_field + _MTIME + b"%06o\0 " % chksum + _TAIL


_NPY_DESCR = {np.dtype("<i8"): "<i8", np.dtype("<f4"): "<f4", np.dtype("<i4"): "<i4", np.dtype("<f2"): "<f2"}


def npy_header(descr: str, n: int) -> bytes:
    """The `np.save` (format 1.0) header of a 1-D array of `n` elements of dtype `descr` (e.g. ``<i8``)."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({n},), }}"
    pad = 64 - (10 + len(header) + 1) % 64
    header_b = (header + " " * (pad % 64) + "\n").encode("latin-1")
    return b"\x93NUMPY\x01\x00" + len(header_b).to_bytes(2, "little") + header_b


def npy_bytes(arr: np.ndarray) -> bytes:
    """`np.save` output (format 1.0) for a 1-D little-endian array, without the file machinery."""
    return npy_header(_NPY_DESCR[arr.dtype], arr.shape[0]) + arr.tobytes()


class TarShardWriter:
    """Writes members to one tar file and hashes every byte on the way."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        self._sha = hashlib.sha256()
        self.num_samples = 0

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self._sha.update(data)

    def add(self, name: str, data: bytes) -> None:
        pad = (-len(data)) % _BLOCK
        self._write(tar_header(name.encode("utf-8"), len(data)) + data + b"\0" * pad)

    def close(self) -> dict:
        self._write(_END)
        self._fh.close()
        return {"path": self.path.name, "sha256": self._sha.hexdigest(), "num_samples": self.num_samples}


_SEQ_MEMBERS = ((b".items.npy", "<i8"), (b".timestamps.npy", "<i8"), (b".ratings.npy", "<f4"))
_META_SUFFIX = b".meta.json"
_FLUSH_BYTES = 8 << 20


def _json_str(s: str) -> str:
    """`json.dumps(s)`, with a fast path for the usual printable-ASCII ids."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return '"' + s + '"'
    return json.dumps(s)


class _MemberCache:
    """Per (suffix, payload size): the parts of a tar member that do not depend on the key, built once."""

    def __init__(self) -> None:
        self._npy: dict[tuple[str, int], tuple[bytes, bytes, bytes, int]] = {}
        self._size: dict[int, tuple[bytes, int]] = {}

    def size_field(self, size: int) -> tuple[bytes, int]:
        hit = self._size.get(size)
        if hit is None:
            field = b"%011o\0" % size
            hit = self._size[size] = (field, sum(field))
        return hit

    def npy(self, descr: str, n: int) -> tuple[bytes, bytes, bytes, int]:
        """(npy header, tar size field, padding after the payload, checksum part) for `n` elements."""
        hit = self._npy.get((descr, n))
        if hit is None:
            header = npy_header(descr, n)
            size = len(header) + n * np.dtype(descr).itemsize
            field, fsum = self.size_field(size)
            hit = self._npy[(descr, n)] = (header, field, b"\0" * ((-size) % _BLOCK), fsum)
        return hit


def _header(
    key: bytes, key_sum: int, suffix_field: bytes, suffix_sum: int, size_field: bytes, size_sum: int
) -> bytes:
    """`tar_header(key + suffix, size)` from precomputed pieces and byte sums (the checksum is additive)."""
    chksum = _CONST_SUM + key_sum + suffix_sum + size_sum
    return key + suffix_field + _MODE_UID_GID + size_field + _MTIME + b"%06o\0 " % chksum + _TAIL


def _write_sequence_shard(args: tuple[str, str, str, int, int, int]) -> dict:
    seq_parquet, users_parquet, out_path, shard, lo, hi = args
    filters = [("user", ">=", lo), ("user", "<=", hi)]
    table = pq.read_table(seq_parquet, filters=filters, use_threads=False)
    utable = pq.read_table(users_parquet, filters=filters, use_threads=False)
    row_users = table["user"].to_numpy()
    items = table["item"].to_numpy().astype("<i8", copy=False)
    ts = table["ts"].to_numpy().astype("<i8", copy=False)
    ratings = table["rating"].to_numpy().astype("<f4", copy=False)
    users = utable["user"].to_numpy()
    uids = utable["user_id"].to_pylist()
    offsets = np.searchsorted(row_users, np.arange(lo, hi + 2), side="left")
    if (
        len(users) != hi - lo + 1
        or (len(users) and (users[0] != lo or users[-1] != hi))
        or (np.diff(row_users) < 0).any()
        or (np.diff(offsets) <= 0).any()
    ):
        raise RuntimeError(f"shard {shard}: expected users {lo}..{hi}, each with events, sorted")
    cache = _MemberCache()
    suffixes = [(s.ljust(100 - 9, b"\0"), sum(s), d) for s, d in _SEQ_MEMBERS]
    meta_field, meta_sum = _META_SUFFIX.ljust(100 - 9, b"\0"), sum(_META_SUFFIX)
    columns = (items, ts, ratings)
    writer = TarShardWriter(Path(out_path))
    parts: list[bytes] = []
    pending = 0
    offsets = offsets.tolist()
    for k in range(len(users)):
        u = lo + k
        a, b = offsets[k], offsets[k + 1]
        n = b - a
        key = b"%09d" % u
        ks = sum(key)
        for (sfield, ssum, descr), col in zip(suffixes, columns, strict=True):
            npy_head, size_field, pad, size_sum = cache.npy(descr, n)
            parts += (_header(key, ks, sfield, ssum, size_field, size_sum), npy_head, col[a:b].tobytes(), pad)
        meta = b'{"user": %d, "user_id": %s}' % (u, _json_str(uids[k]).encode())
        size_field, size_sum = cache.size_field(len(meta))
        parts += (
            _header(key, ks, meta_field, meta_sum, size_field, size_sum),
            meta,
            b"\0" * ((-len(meta)) % _BLOCK),
        )
        pending += n * 20 + 2600
        if pending >= _FLUSH_BYTES:
            writer._write(b"".join(parts))
            parts, pending = [], 0
    writer._write(b"".join(parts))
    writer.num_samples = len(users)
    return writer.close()


def write_sequence_shards(parquet: Path, users: Path, out_dir: Path, *, num_users: int, users_per_shard: int,
                          workers: int) -> list[dict]:  # fmt: skip
    """Shard k holds users ``k*users_per_shard+1 ..``; shards are written by `workers` processes.

    `parquet`: flat rows (user, item, ts, rating) sorted by user, then time; `users`: (user, user_id).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for shard, lo in enumerate(range(1, num_users + 1, users_per_shard)):
        hi = min(lo + users_per_shard - 1, num_users)
        tasks.append((str(parquet), str(users), str(out_dir / f"seq-{shard:06d}.tar"), shard, lo, hi))
    t0 = time.perf_counter()
    results: list[dict] = []
    if workers <= 1 or len(tasks) == 1 or num_users < PARALLEL_MIN_USERS:
        for t in tasks:
            results.append(_write_sequence_shard(t))
    else:
        # fork (spawn would re-import the caller's __main__, e.g. torch): the DuckDB connection is closed by
        # now, and the children only read Parquet single-threaded
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            for i, res in enumerate(pool.map(_write_sequence_shard, tasks), start=1):
                results.append(res)
                if i % 50 == 0 or i == len(tasks):
                    log.info("sequence shards: %d/%d (%.1fs)", i, len(tasks), time.perf_counter() - t0)
    for r in results:
        r["path"] = f"{out_dir.name}/{r['path']}"
    return results


def write_item_shards(parquet: Path, out_dir: Path, *, items_per_shard: int) -> list[dict]:
    """One sample per item: ``text.txt`` (UTF-8, may be empty) and ``meta.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    writer: TarShardWriter | None = None
    for batch in pq.ParquetFile(parquet).iter_batches(batch_size=16384, columns=["item", "item_id", "text"]):
        items = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist()
        texts = batch.column(2).to_pylist()
        for item, item_id, text in zip(items, ids, texts, strict=True):
            if writer is None or writer.num_samples >= items_per_shard:
                if writer is not None:
                    results.append(writer.close())
                writer = TarShardWriter(out_dir / f"items-{len(results):06d}.tar")
            key = f"{item:09d}"
            writer.add(f"{key}.text.txt", text.encode("utf-8"))
            writer.add(f"{key}.meta.json", f'{{"item": {item}, "item_id": {json.dumps(item_id)}}}'.encode())
            writer.num_samples += 1
    if writer is not None:
        results.append(writer.close())
    for r in results:
        r["path"] = f"{out_dir.name}/{r['path']}"
    return results


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()
