"""WebDataset shard writing: ustar tars (mtime 0, so shards are reproducible byte for byte), plain or gzipped
(`.tar.gz`, gzip header mtime 0 and no file name), hashed while written, one sample per user (sequences) or
per item (texts).

The tar headers and .npy payloads are built directly (their layout is fixed), which is several times faster
than `tarfile`/`np.save` per member; `tests/test_data_shards.py` checks both against the standard readers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow.parquet as pq

log = logging.getLogger("data_shards")
T = TypeVar("T")
PARALLEL_MIN_USERS = 50_000  # below this, starting worker processes costs more than it saves

_BLOCK = 512
_GZIP_CHUNK = 1 << 20  # uncompressed bytes handed to zlib at once
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


def npy_header(descr: str, n: int) -> bytes:
    """The `np.save` (format 1.0) header of a 1-D array of `n` elements of dtype `descr` (e.g. ``<i8``)."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({n},), }}"
    pad = 64 - (10 + len(header) + 1) % 64
    header_b = (header + " " * (pad % 64) + "\n").encode("latin-1")
    return b"\x93NUMPY\x01\x00" + len(header_b).to_bytes(2, "little") + header_b


class TarShardWriter:
    """Writes members to one tar file and hashes every byte written to disk (the manifest sha256 is of those).

    With `gzip_level` (1-9) the tar stream is gzip-compressed as written: one deflate stream with a fixed
    10-byte header (mtime 0, no file name, OS "unknown"), so the same members give the same bytes.
    """

    def __init__(self, path: Path, *, gzip_level: int | None = None) -> None:
        if gzip_level is not None and not 1 <= gzip_level <= 9:
            raise ValueError(f"gzip_level must be 1..9, got {gzip_level}")
        self.path = path
        self._fh = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        self._sha = hashlib.sha256()
        self.num_samples = 0
        self._deflate = None
        if gzip_level is not None:
            self._deflate = zlib.compressobj(gzip_level, zlib.DEFLATED, -zlib.MAX_WBITS)
            self._crc, self._size = 0, 0
            self._pending: list[bytes | memoryview] = []
            self._pending_bytes = 0
            xfl = 2 if gzip_level == 9 else 4 if gzip_level == 1 else 0  # as Python's gzip module sets it
            self._out(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl, 255]))

    def _out(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._sha.update(data)

    def _write(self, data: bytes | memoryview) -> None:
        """Append raw tar bytes (gzipped: buffered, then compressed ~1 MiB at a time, fewer zlib calls)."""
        if self._deflate is None:
            self._out(data)
            return
        self._pending.append(data)
        self._pending_bytes += memoryview(data).nbytes
        if self._pending_bytes >= _GZIP_CHUNK:
            self._compress()

    def _compress(self) -> None:
        data = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        out = self._deflate.compress(data)
        if out:
            self._out(out)

    def add(self, name: str, data: bytes) -> None:
        pad = (-len(data)) % _BLOCK
        self._write(tar_header(name.encode("utf-8"), len(data)) + data + b"\0" * pad)

    def close(self) -> dict:
        self._write(_END)
        if self._deflate is not None:
            self._compress()
            self._out(self._deflate.flush() + struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        self._fh.close()
        return {"path": self.path.name, "sha256": self._sha.hexdigest(), "num_samples": self.num_samples}


_SEQ_MEMBERS = ((b".items.npy", "<i8"), (b".timestamps.npy", "<i8"), (b".ratings.npy", "<f4"))
_META_SUFFIX = b".meta.json"
_CHUNK_USERS = 4096  # users per in-memory tar chunk (a few MB)


def _json_str(s: str) -> str:
    """`json.dumps(s)`, with a fast path for the usual printable-ASCII ids."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return '"' + s + '"'
    return json.dumps(s)


def _digits(values: np.ndarray, width: int, base: int) -> np.ndarray:
    """ASCII digits of non-negative `values` in `base`, zero-padded to `width`: shape (len(values), width)."""
    powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers % base + 48).astype(np.uint8)


def _headers(users: np.ndarray, suffix: bytes, sizes: np.ndarray) -> np.ndarray:
    """`tar_header(f"{user:09d}" + suffix, size)` for every row, built at once: shape (len(users), 512)."""
    if len(users) and (users.min() < 0 or users.max() >= 10**9):
        raise ValueError("tar member keys must be 0 .. 999,999,999 (9 digits)")
    hdr = np.tile(np.frombuffer(tar_header(b"0" * 9 + suffix, 0), dtype=np.uint8), (len(users), 1))
    hdr[:, 0:9] = _digits(users, 9, 10)
    hdr[:, 124:135] = _digits(sizes, 11, 8)
    hdr[:, 148:156] = 32  # the checksum is computed with its own field as spaces
    chksum = hdr.sum(axis=1, dtype=np.int64)
    hdr[:, 148:154] = _digits(chksum, 6, 8)
    hdr[:, 154] = 0
    return hdr


def _padded(sizes: np.ndarray) -> np.ndarray:
    return (sizes + _BLOCK - 1) // _BLOCK * _BLOCK


def _sequence_tar_chunk(
    lo: int, counts: np.ndarray, columns: tuple[np.ndarray, ...], uids: list[str]
) -> np.ndarray:
    """The tar bytes (no end marker) of users ``lo, lo+1, ...`` with `counts` events each, vectorised.

    Per user: items.npy, timestamps.npy, ratings.npy, meta.json, each a 512-byte header and a payload padded
    to 512 bytes; every header and payload therefore starts at a 512-byte boundary, so the npy data of each
    user can be scattered with aligned int64/float32 views of one buffer.
    """
    num = len(counts)
    users = np.arange(lo, lo + num, dtype=np.int64)
    metas = [b'{"user": %d, "user_id": %s}' % (lo + k, _json_str(uid).encode()) for k, uid in enumerate(uids)]
    meta_len = np.fromiter(map(len, metas), dtype=np.int64, count=num)
    uniq, inverse = np.unique(counts, return_inverse=True)
    npy_heads = {}
    sizes = []
    for _, descr in _SEQ_MEMBERS:
        heads = [npy_header(descr, int(n)) for n in uniq]
        if {len(h) for h in heads} != {128}:
            raise RuntimeError(f"unexpected npy header length for counts {uniq.tolist()}")
        npy_heads[descr] = np.frombuffer(b"".join(heads), dtype=np.uint8).reshape(len(uniq), 128)
        sizes.append(128 + counts * np.dtype(descr).itemsize)
    sizes.append(meta_len)
    spans = [_BLOCK + _padded(s) for s in sizes]
    user_bytes = sum(spans)
    starts = np.zeros(num + 1, dtype=np.int64)
    np.cumsum(user_bytes, out=starts[1:])
    buf = np.zeros(int(starts[-1]), dtype=np.uint8)
    blocks = buf.reshape(-1, _BLOCK)
    row_first = np.zeros(num, dtype=np.int64)
    np.cumsum(counts[:-1], out=row_first[1:])
    row_local = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(row_first, counts)
    member_start = starts[:-1].copy()
    for m, (suffix, descr) in enumerate(_SEQ_MEMBERS):
        blocks[member_start // _BLOCK] = _headers(users, suffix, sizes[m])
        payload = member_start + _BLOCK
        blocks[payload // _BLOCK, :128] = npy_heads[descr][inverse]
        col = columns[m]
        view = buf.view(col.dtype)
        view[np.repeat((payload + 128) // col.itemsize, counts) + row_local] = col
        member_start = member_start + spans[m]
    blocks[member_start // _BLOCK] = _headers(users, _META_SUFFIX, meta_len)
    meta_first = np.zeros(num, dtype=np.int64)
    np.cumsum(meta_len[:-1], out=meta_first[1:])
    total = int(meta_len.sum())
    dest = np.repeat(member_start + _BLOCK - meta_first, meta_len) + np.arange(total, dtype=np.int64)
    buf[dest] = np.frombuffer(b"".join(metas), dtype=np.uint8)
    return buf


def _write_sequence_shard(args: tuple[str, str, str, int, int, int]) -> dict:
    seq_parquet, users_parquet, out_path, shard, lo, hi = args
    filters = [("user", ">=", lo), ("user", "<=", hi)]
    table = pq.read_table(seq_parquet, filters=filters, use_threads=False)
    utable = pq.read_table(users_parquet, filters=filters, use_threads=False)
    row_users = table["user"].to_numpy()
    columns = (
        table["item"].to_numpy().astype("<i8", copy=False),
        table["ts"].to_numpy().astype("<i8", copy=False),
        table["rating"].to_numpy().astype("<f4", copy=False),
    )
    users = utable["user"].to_numpy()
    uids = utable["user_id"].to_pylist()
    offsets = np.searchsorted(row_users, np.arange(lo, hi + 2), side="left")
    counts = np.diff(offsets)
    if (
        len(users) != hi - lo + 1
        or (len(users) and (users[0] != lo or users[-1] != hi))
        or (np.diff(row_users) < 0).any()
        or (counts <= 0).any()
        or offsets[-1] != len(row_users)
    ):
        raise RuntimeError(f"shard {shard}: expected users {lo}..{hi}, each with events, sorted")
    writer = TarShardWriter(Path(out_path))
    for a in range(0, len(users), _CHUNK_USERS):
        b = min(a + _CHUNK_USERS, len(users))
        r0, r1 = offsets[a], offsets[b]
        chunk = _sequence_tar_chunk(lo + a, counts[a:b], tuple(c[r0:r1] for c in columns), uids[a:b])
        writer._write(memoryview(chunk))
    writer.num_samples = len(users)
    return writer.close()


def write_sequence_shards(parquet: Path, users: Path, out_dir: Path, *, num_users: int, users_per_shard: int,
                          workers: int, meanwhile: Callable[[], T] | None = None,
                          ) -> tuple[list[dict], T | None]:  # fmt: skip
    """Shard k holds users ``k*users_per_shard+1 ..``; shards are written by `workers` processes.

    `parquet`: flat rows (user, item, ts, rating) sorted by user, then time; `users`: (user, user_id).
    `meanwhile` runs in this process once the workers have started (forked before any thread it may start);
    returns the shard entries and its result.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for shard, lo in enumerate(range(1, num_users + 1, users_per_shard)):
        hi = min(lo + users_per_shard - 1, num_users)
        tasks.append((str(parquet), str(users), str(out_dir / f"seq-{shard:06d}.tar"), shard, lo, hi))
    t0 = time.perf_counter()
    results: list[dict] = []
    side = None
    if workers <= 1 or len(tasks) == 1 or num_users < PARALLEL_MIN_USERS:
        for t in tasks:
            results.append(_write_sequence_shard(t))
        side = meanwhile() if meanwhile is not None else None
    else:
        # fork (spawn would re-import the caller's __main__, e.g. torch): the DuckDB connection is closed by
        # now, and the children only read Parquet single-threaded; with fork every worker starts at the first
        # submit, before `meanwhile` runs
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            futures = [pool.submit(_write_sequence_shard, t) for t in tasks]
            side = meanwhile() if meanwhile is not None else None
            for i, fut in enumerate(futures, start=1):
                results.append(fut.result())
                if i % 50 == 0 or i == len(tasks):
                    log.info("sequence shards: %d/%d (%.1fs)", i, len(tasks), time.perf_counter() - t0)
    for r in results:
        r["path"] = f"{out_dir.name}/{r['path']}"
    return results, side


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
