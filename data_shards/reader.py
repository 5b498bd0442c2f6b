"""Training-side reader: sequence shards -> `SequenceBatch`es, split by rank (and worker), resumable.

Shards are assigned round-robin to ranks from the manifest (no process group needed, so no WebDataset
nodesplitter question), then to DataLoader workers. Every rank yields the same number of batches: the rank
with the most rows sets the count, and the others pad their last batch(es) with weight-0 copies of a real row,
so a collective in the training step never waits on a rank that ran out.
Only .npy (allow_pickle=False), .json and
.txt members are decoded; anything else in a shard is an error.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from data_shards.batch import SequenceBatch
from data_shards.io import DataError
from data_shards.manifest import MANIFEST, load_manifest, verify_shards

Split = Literal["train", "valid", "test", "all"]
"""train: next item at every position; valid/test: the held-out item; all: the whole history, no target
(what recommendation reads)."""


def _decode(name: str, data: bytes) -> Any:
    ext = name.rsplit(".", 1)[-1]
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    if ext == "txt":
        return data.decode("utf-8")
    raise DataError(f"unexpected member {name!r}: only .npy, .json and .txt are decoded (no pickle)")


def iter_samples(
    shard: str | Path, *, remedy: str = "verify it or prepare the dataset again"
) -> Iterator[dict[str, Any]]:
    """Samples of one WebDataset tar: ``{"__key__": key, "<ext>": decoded, ...}`` (members grouped by key).

    An unreadable tar or undecodable member is a DataError naming the shard and ending with `remedy`.
    """
    sample: dict[str, Any] = {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:  # plain or gzipped
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                fh = tar.extractfile(member)
                try:
                    sample[ext] = _decode(base, fh.read() if fh else b"")
                except DataError as err:
                    raise DataError(f"{shard}: {err}; {remedy}") from err
                except ValueError as err:  # a pickled .npy, bad JSON, text that is not UTF-8
                    raise DataError(f"{shard}: member {base!r} cannot be decoded ({err}); {remedy}") from err
    except (tarfile.TarError, EOFError) as err:
        raise DataError(f"{shard}: unreadable shard ({err}); {remedy}") from err
    if sample:
        yield sample


def iter_sequences(dataset_dir: str | Path) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Every user's full sequence in index order: ``(user, items, timestamps, ratings)``."""
    manifest = load_manifest(dataset_dir)
    for entry in manifest["shards"]["sequences"]:
        for s in iter_samples(Path(dataset_dir) / entry["path"]):
            yield s["meta.json"]["user"], s["items.npy"], s["timestamps.npy"], s["ratings.npy"]


class ItemText(NamedTuple):
    """One item of the item-text shards (unpacks as ``item, item_id, text``)."""

    item: int  # index 1..N
    item_id: str  # original id
    text: str  # may be empty


def iter_item_texts(
    dataset_dir: str | Path, *, ranges: list[tuple[int, int]] | None = None, verify: bool = False
) -> Iterator[ItemText]:
    """Items in index order from `items/items-*.tar`: all of them, or those in one of the half-open `ranges`.

    Shard i holds the items after those of shards < i, so shards that cannot overlap `ranges` are skipped
    unread. Keys must run 1..N in order and match each shard's count; `verify` sha256-checks the shards read.
    """
    dataset_dir = Path(dataset_dir)
    where = dataset_dir / MANIFEST
    manifest = load_manifest(dataset_dir)

    def wanted(lo: int, hi: int) -> bool:
        return ranges is None or any(a < hi and lo < b for a, b in ranges)

    shards, first = [], 1  # (entry, first item) of the shards to read
    for entry in manifest["shards"].get("items", []):
        if wanted(first, first + int(entry["num_samples"])):
            shards.append((entry, first))
        first += int(entry["num_samples"])
    if first - 1 != manifest["num_items"]:
        raise DataError(
            f"{where}: item-text shards (shards.items) hold {first - 1} items but num_items is "
            f"{manifest['num_items']}; prepare the dataset again"
        )
    if verify:
        verify_shards(dataset_dir, "items", paths=[entry["path"] for entry, _ in shards])
    for entry, first in shards:
        file, n = dataset_dir / entry["path"], int(entry["num_samples"])
        if not file.is_file():
            raise DataError(f"{where}: item-text shard {file} is missing; prepare the dataset again")
        expected = first
        for s in iter_samples(file):
            key = f"{file}:{s['__key__']}"
            try:
                item = int(s["__key__"])
            except ValueError as err:
                raise DataError(f"{key}: key is not an item index") from err
            if item != expected:
                raise DataError(
                    f"{key}: expected item {expected} here (item-text shards must list items 1..N in order)"
                )
            expected += 1
            if ranges is not None and not any(a <= item < b for a, b in ranges):
                continue
            meta = s.get("meta.json", {})
            if meta.get("item", item) != item:
                raise DataError(f"{key}: meta.json says item {meta['item']}, the key says {item}")
            yield ItemText(item=item, item_id=str(meta.get("item_id", item)), text=s.get("text.txt", ""))
        if expected != first + n:
            raise DataError(f"{file}: holds {expected - first} items but the manifest says {n}")


class _ShardStream(torch.utils.data.IterableDataset):
    """Rows of a list of shards, in order, shuffled within each shard; split across DataLoader workers."""

    def __init__(self, root: Path, shards: list[str], seeds: list[int] | None) -> None:
        self.root, self.shards, self.seeds = root, shards, seeds

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in range(wid, len(self.shards), nw):
            rows = [
                (s["meta.json"]["user"], s["items.npy"], s["timestamps.npy"])
                for s in iter_samples(self.root / self.shards[k])
            ]
            order = (
                np.random.default_rng(self.seeds[k]).permutation(len(rows))
                if self.seeds is not None
                else range(len(rows))
            )
            for i in order:
                yield rows[i]


NO_TRUNCATION = 1 << 30
"""A max_seq_len that keeps whole histories: evaluation excludes all of them, the model reads the tail."""


class SequenceLoader:
    """Iterable of `SequenceBatch` for one rank; `len()` is the same on every rank (see the module doc)."""

    def __init__(
        self,
        dataset_dir: str | Path,
        *,
        split: Split,
        batch_size: int,
        max_seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        protocol: Literal["loo3", "paper"] = "loo3",
        verify: bool = False,
        num_workers: int = 0,
    ) -> None:
        if split not in ("train", "valid", "test", "all"):
            raise ValueError(f"split must be train, valid, test or all, got {split!r}")
        if protocol not in ("loo3", "paper"):
            raise ValueError(f"protocol must be loo3 or paper, got {protocol!r}")
        if protocol == "paper" and split == "valid":
            raise ValueError(
                "the paper protocol has no validation split (train on all but the last, test the last)"
            )
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"batch_size and max_seq_len must be >= 1, got {batch_size}, {max_seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.root = Path(dataset_dir)
        self.manifest = load_manifest(self.root)
        shards = self.manifest["shards"]["sequences"]
        if world_size > len(shards):
            raise DataError(
                f"{self.root}: {len(shards)} sequence shard(s) cannot feed {world_size} ranks; prepare the "
                "dataset with a smaller data.users_per_shard (at least one shard per rank)"
            )
        self.split, self.protocol = split, protocol
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self._shards = [s["path"] for s in shards[rank::world_size]]
        rows = [sum(s["num_samples"] for s in shards[r::world_size]) for r in range(world_size)]
        self.num_rows = rows[rank]
        self._num_batches = max(math.ceil(n / batch_size) for n in rows)
        min_len = self.manifest["sequence_length"]["min"]
        if min_len < (4 if protocol == "loo3" else 3):
            raise DataError(
                f"{self.root}: shortest sequence has {min_len} items, too few for protocol {protocol}"
            )
        if verify:
            verify_shards(self.root, "sequences", paths=self._shards)
        self.epoch = 0
        self.batches_yielded = 0

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next iteration uses (and start it from the beginning)."""
        self.epoch = epoch
        self.batches_yielded = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume exactly: the next iteration skips the batches already yielded in that epoch."""
        self.epoch = int(state["epoch"])
        self.batches_yielded = int(state["batches_yielded"])

    def _rows(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        shards, seeds = list(self._shards), None
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank])
            shards = [shards[i] for i in rng.permutation(len(shards))]
            seeds = [int(x) for x in rng.integers(0, 2**63 - 1, size=len(shards))]
        stream = _ShardStream(self.root, shards, seeds)
        if self.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=min(self.num_workers, len(shards)),
                collate_fn=lambda x: x,
            )
            yield from loader
        else:
            yield from stream

    def _sample(self, items: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, ...]:
        """(inputs, their timestamps, their query times, targets) of one user's sequence."""
        n, m = len(items), self.max_seq_len
        if self.split == "train":
            end = n - 2 if self.protocol == "loo3" else n - 1
            return items[: end - 1][-m:], ts[: end - 1][-m:], ts[1:end][-m:], items[1:end][-m:]
        if self.split == "all":
            return items[-m:], ts[-m:], np.append(ts[1:], ts[-1:])[-m:], items[:0]
        pos = n - 2 if self.split == "valid" else n - 1
        return items[:pos][-m:], ts[:pos][-m:], ts[1 : pos + 1][-m:], items[pos : pos + 1]

    def _collate(self, rows: list[tuple[int, np.ndarray, np.ndarray]], num_real: int) -> SequenceBatch:
        parts = [self._sample(items, ts) for _, items, ts in rows]
        weights = np.zeros(len(rows), dtype=np.float32)
        weights[:num_real] = 1.0
        return SequenceBatch(
            users=torch.tensor([u for u, _, _ in rows], dtype=torch.int64),
            weights=torch.from_numpy(weights),
            lengths=torch.tensor([len(p[0]) for p in parts], dtype=torch.int64),
            item_ids=torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.int64)),
            timestamps=torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64)),
            query_times=torch.from_numpy(np.concatenate([p[2] for p in parts]).astype(np.int64)),
            targets=torch.from_numpy(np.concatenate([p[3] for p in parts]).astype(np.int64)),
        )

    def _batches(self) -> Iterator[SequenceBatch]:
        buf: list[tuple[int, np.ndarray, np.ndarray]] = []
        last = None
        produced = 0
        for row in self._rows():
            buf.append(row)
            last = row
            if len(buf) == self.batch_size:
                yield self._collate(buf, len(buf))
                produced += 1
                buf = []
        if last is None:
            raise DataError(f"{self.root}: rank {self.rank} read no rows from its shards {self._shards}")
        while produced < self._num_batches:
            real = len(buf)
            buf.extend([last] * (self.batch_size - real))
            yield self._collate(buf, real)
            produced += 1
            buf = []

    def __iter__(self) -> Iterator[SequenceBatch]:
        skip = self.batches_yielded
        for i, batch in enumerate(self._batches()):
            if i < skip:
                continue
            self.batches_yielded = i + 1
            yield batch
        self.epoch += 1
        self.batches_yielded = 0
