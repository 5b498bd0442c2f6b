"""Robust line readers for messy raw logs: gzip-aware, tolerant of truncation, and counting every skip.

Every reader takes a `SkipStats` and records each line it cannot use under a reason (``malformed_json``,
``non_utf8``, ``truncated_gzip``...) with the first few ``file:line`` examples,
so nothing is dropped silently.
The block reader (`iter_line_blocks`) also hashes the raw file bytes as it reads them, so the manifest's input
sha256 costs no second pass.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
READ_BYTES = 4 << 20


class DataError(ValueError):
    """A fatal data problem (missing file, nothing left after filtering...); the message says what to do."""


@dataclass
class SkipStats:
    """Counts of skipped records by reason, with the first `max_examples` ``file:line: detail`` per reason."""

    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: str | os.PathLike, line_no: int, detail: str = "", n: int = 1) -> None:
        """Record `n` skipped records for `reason`; keep an example if there are fewer than `max_examples`."""
        self.counts[reason] += n
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            where = f"{path}:{line_no}" if line_no > 0 else str(path)
            examples.append(f"{where}: {detail}" if detail else where)

    def add(self, reason: str, n: int) -> None:
        """Count `n` records dropped for `reason` by a bulk step (e.g. k-core), without examples."""
        if n:
            self.counts[reason] += n

    def merge(self, other: SkipStats) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            mine = self.examples.setdefault(reason, [])
            mine.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(mine))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: v for k, v in sorted(self.examples.items()) if v},
        }

    def summary(self) -> str:
        """Human-readable lines: one per reason with its count and examples."""
        if not self.counts:
            return "skipped: nothing"
        lines = [f"skipped {self.total:,} record(s):"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason}: {n:,}")
            lines.extend(f"      e.g. {ex}" for ex in self.examples.get(reason, [])[:3])
        return "\n".join(lines)


@dataclass
class FileInfo:
    """What the manifest records about an input file (filled in as the file is read)."""

    path: str
    bytes: int = 0
    sha256: str = ""
    lines: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256, "lines": self.lines}


def check_file(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as a Path, or raise DataError naming what the file is for."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p} (check that path in your config)")
    return p


def iter_line_blocks(
    path: str | os.PathLike,
    stats: SkipStats,
    *,
    block_bytes: int = 8 << 20,
    info: FileInfo | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(first_line_no, block)``: blocks of whole lines (1-based line numbers), gzip or plain.

    Gzip is detected by its magic bytes, multi-member files are followed, and a truncated or corrupt stream
    ends the file with a ``truncated_gzip``/``corrupt_gzip`` skip (its partial last line counted as
    ``truncated_line``) instead of an exception.
    `info`, if given, receives the byte size, sha256 and line count.
    """
    path = Path(path)
    hasher = hashlib.sha256()
    size = 0
    line_no = 1
    pending = b""
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        gz = head == GZIP_MAGIC
        dec = zlib.decompressobj(wbits=31) if gz else None
        broken = False
        while True:
            raw = fh.read(READ_BYTES)
            if not raw:
                break
            size += len(raw)
            hasher.update(raw)
            if broken:
                continue
            if dec is not None:
                try:
                    data = dec.decompress(raw)
                    while dec.eof and dec.unused_data:
                        rest = dec.unused_data
                        dec = zlib.decompressobj(wbits=31)
                        data += dec.decompress(rest)
                except zlib.error as err:
                    # the last good line is the last whole one still pending (yielded below)
                    last = line_no + pending.count(b"\n") - 1
                    where = "after this line" if last > 0 else "from its start"
                    stats.skip("corrupt_gzip", path, last, f"stream unreadable {where} ({err})")
                    broken = True
                    data = b""
            else:
                data = raw
            if not data:
                continue
            pending += data
            if len(pending) >= block_bytes:
                cut = pending.rfind(b"\n") + 1
                if cut > 0:
                    block, pending = pending[:cut], pending[cut:]
                    yield line_no, block
                    line_no += block.count(b"\n")
        truncated = dec is not None and not broken and not dec.eof
        if pending:
            cut = pending.rfind(b"\n") + 1
            if cut > 0:
                yield line_no, pending[:cut]
                line_no += pending[:cut].count(b"\n")
        if truncated:
            stats.skip("truncated_gzip", path, line_no, "compressed stream ends early; reading stopped here")
        if pending:
            tail = pending[cut:]
            if tail.strip():
                if truncated or broken:
                    stats.skip("truncated_line", path, line_no, "partial last line of a damaged .gz")
                else:
                    yield line_no, tail + b"\n"
                    line_no += 1
    if info is not None:
        info.bytes = size
        info.sha256 = hasher.hexdigest()
        info.lines = line_no - 1


def count_newlines(data: bytes | memoryview) -> int:
    """Number of ``\\n`` bytes (numpy is ~1.5x faster than `bytes.count` and takes a memoryview)."""
    return int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == 10))


def iter_line_spans(
    path: str | os.PathLike, *, block_bytes: int = 8 << 20, info: FileInfo | None = None
) -> Iterator[tuple[int, int, int, bytes | None]]:
    """Plain (not gzip) files: yield ``(first_line_no, offset, length, data)`` for blocks of whole lines.

    The blocks are not copied out (readers re-read their span, possibly in another process): `data` is None,
    except for a last line without a newline, given as bytes with one added (a whitespace-only tail is
    dropped, as in `iter_line_blocks`). `info`, if given, receives the byte size, sha256 and line count.
    """
    hasher = hashlib.sha256()
    line_no, offset = 1, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            want = block_bytes
            while True:  # a line longer than the block: read more
                raw = os.pread(fd, want, offset)
                eof = len(raw) < want
                cut = raw.rfind(b"\n") + 1
                if cut or eof:
                    break
                want *= 2
            if not raw:
                break
            if cut:
                view = memoryview(raw)[:cut]
                hasher.update(view)
                yield line_no, offset, cut, None
                line_no += count_newlines(view)
                offset += cut
            if eof:
                tail = raw[cut:]
                if tail:
                    hasher.update(tail)
                    offset += len(tail)
                    if tail.strip():
                        yield line_no, offset - len(tail), len(tail), tail + b"\n"
                        line_no += 1
                break
    finally:
        os.close(fd)
    if info is not None:
        info.bytes = offset
        info.sha256 = hasher.hexdigest()
        info.lines = line_no - 1


def iter_lines(
    path: str | os.PathLike, stats: SkipStats, *, info: FileInfo | None = None
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_no, raw_line)`` without the line ending; blank lines are counted as ``blank_line``."""
    for first, block in iter_line_blocks(path, stats, info=info):
        for i, line in enumerate(block.split(b"\n")[:-1]):
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                stats.skip("blank_line", path, first + i)
                continue
            yield first + i, line


def decode_line(line: bytes, path: str | os.PathLike, line_no: int, stats: SkipStats) -> str | None:
    """UTF-8 decode a raw line, or count it as ``non_utf8`` and return None."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = line[err.start : err.start + 1]
        stats.skip("non_utf8", path, line_no, f"byte {bad!r} at column {err.start}")
        return None


def parse_json_line(line: bytes, path: str | os.PathLike, line_no: int, stats: SkipStats) -> dict | None:
    """Parse one JSON object line; count ``non_utf8``, ``malformed_json`` or ``not_an_object`` on failure."""
    text = decode_line(line, path, line_no, stats)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: a decode error, or an int of > 4300 digits
        stats.skip("malformed_json", path, line_no, str(err)[:80])
        return None
    if not isinstance(obj, dict):
        stats.skip("not_an_object", path, line_no, f"got {type(obj).__name__}")
        return None
    return obj


def parse_literal_line(line: bytes, path: str | os.PathLike, line_no: int, stats: SkipStats) -> dict | None:
    """Parse one Python-literal dict line (Steam dumps) with `ast.literal_eval` (never `eval`)."""
    text = decode_line(line, path, line_no, stats)
    if text is None:
        return None
    try:
        obj = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        stats.skip("malformed_literal", path, line_no, f"{type(err).__name__}: {str(err)[:60]}")
        return None
    if not isinstance(obj, dict):
        stats.skip("not_an_object", path, line_no, f"got {type(obj).__name__}")
        return None
    return obj


def iter_json_records(
    path: str | os.PathLike, stats: SkipStats, *, info: FileInfo | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_no, dict)`` for each valid JSON-object line of a JSONL file (.gz or plain)."""
    for line_no, line in iter_lines(path, stats, info=info):
        obj = parse_json_line(line, path, line_no, stats)
        if obj is not None:
            yield line_no, obj


def iter_literal_records(
    path: str | os.PathLike, stats: SkipStats, *, info: FileInfo | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_no, dict)`` for each valid Python-literal dict line (Steam's format; .gz or plain)."""
    for line_no, line in iter_lines(path, stats, info=info):
        obj = parse_literal_line(line, path, line_no, stats)
        if obj is not None:
            yield line_no, obj


def get_str(rec: dict, key: str, path: str | os.PathLike, line_no: int, stats: SkipStats) -> str | None:
    """A non-empty string field (ints are accepted as ids and converted), else a counted skip and None."""
    value = rec.get(key)
    if value is None:
        stats.skip(f"missing_field:{key}", path, line_no)
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        stats.skip(f"wrong_type:{key}", path, line_no, f"expected a string, got {type(value).__name__}")
        return None
    value = value.strip()
    if not value:
        stats.skip(f"empty_field:{key}", path, line_no)
        return None
    return value


def get_number(rec: dict, key: str, path: str | os.PathLike, line_no: int, stats: SkipStats) -> float | None:
    """A numeric field (bools and strings are wrong types), else a counted skip and None; NaN and infinities
    are returned as they are, for the caller's range check. An int too large for a float is a wrong type,
    as Arrow's float64 parse of the same line makes it."""
    value = rec.get(key)
    if value is None:
        stats.skip(f"missing_field:{key}", path, line_no)
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        stats.skip(f"wrong_type:{key}", path, line_no, f"expected a number, got {type(value).__name__}")
        return None
    try:
        return float(value)
    except OverflowError:
        stats.skip(
            f"wrong_type:{key}", path, line_no, f"a {value.bit_length()}-bit integer overflows a float"
        )
        return None


def text_of(value: Any) -> str:
    """Flatten a metadata value (string, nested lists or dicts, numbers) into one clean string.

    Walked with an explicit stack, not recursion, so any nesting `json.loads` accepts flattens without a
    RecursionError.
    """
    if isinstance(value, str):
        return " ".join(value.split())
    parts: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, str):
            if text := " ".join(v.split()):
                parts.append(text)
        elif isinstance(v, int | float):
            parts.append(str(v))
        elif isinstance(v, list | tuple):
            stack.extend(reversed(v))
        elif isinstance(v, dict):
            stack.extend(reversed(v.values()))
    return " ".join(parts)
