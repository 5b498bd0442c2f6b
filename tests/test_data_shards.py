"""Shard round trip, checksum verification, atomic publication, and fatal-error behaviour of the CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from test_data_preprocess import random_events, write_movielens_csv

import data_shards.prepare as prepare_mod
from data_shards.config import DataConfig
from data_shards.io import DataError
from data_shards.manifest import verify_shards
from data_shards.prepare import prepare
from data_shards.reader import SequenceLoader, iter_samples, iter_sequences
from data_shards.shards import TarShardWriter

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"


@pytest.fixture()
def raw(tmp_path) -> Path:
    return write_movielens_csv(tmp_path / "raw", random_events(5), 50)


def _cfg(tmp_path: Path, raw: Path, **kw) -> DataConfig:
    kw.setdefault("users_per_shard", 6)
    kw.setdefault("name", "ds")
    return DataConfig(root=str(tmp_path / "out"), interactions=str(raw), min_item_interactions=2, **kw)


def test_tar_writer_is_standard_tar(tmp_path):
    w = TarShardWriter(tmp_path / "x.tar")
    payloads = {"000000001.text.txt": "héllo".encode(), "000000001.meta.json": b'{"item": 1}', "a" * 90: b""}
    for name, data in payloads.items():
        w.add(name, data)
    entry = w.close()
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == payloads
    assert len(entry["sha256"]) == 64


def test_gzip_tar_writer_is_reproducible_and_read_like_plain(tmp_path):
    """gzip mode: a standard .tar.gz of exactly the plain tar's bytes, mtime 0, the same bytes every time,
    sha256 of the file on disk; iter_samples reads both; a cut-off .tar.gz is a DataError."""
    big = "".join(f"review {k}: héllo\n" for k in range(60_000)).encode()  # > the 1 MiB zlib chunk
    payloads = {"000000001.pair.json": '{"review": "héllo"}'.encode(), "000000002.pair.json": b'{"a": 2}',
                "000000003.item.txt": big}  # fmt: skip
    entries = []
    for name, level in (("plain.tar", None), ("a.tar.gz", 3), ("b.tar.gz", 3)):
        w = TarShardWriter(tmp_path / name, gzip_level=level)
        for member, data in payloads.items():
            w.add(member, data)
        w.num_samples = 3
        entries.append(w.close())
    raw = [(tmp_path / n).read_bytes() for n in ("plain.tar", "a.tar.gz", "b.tar.gz")]
    assert raw[1] == raw[2] and gzip.decompress(raw[1]) == raw[0]
    assert raw[1][4:8] == b"\0\0\0\0"  # gzip mtime 0
    assert entries[1]["sha256"] == hashlib.sha256(raw[1]).hexdigest() != entries[0]["sha256"]
    with tarfile.open(tmp_path / "a.tar.gz", "r:gz") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == payloads
    plain, gz = (list(iter_samples(tmp_path / n)) for n in ("plain.tar", "a.tar.gz"))
    assert plain == gz and gz[0]["pair.json"] == {"review": "héllo"} and gz[2]["item.txt"] == big.decode()
    (tmp_path / "cut.tar.gz").write_bytes(raw[1][: len(raw[1]) // 2])
    with pytest.raises(DataError, match=r"cut\.tar\.gz: unreadable shard"):
        list(iter_samples(tmp_path / "cut.tar.gz"))
    with pytest.raises(ValueError, match=r"gzip_level must be 1\.\.9"):
        TarShardWriter(tmp_path / "c.tar.gz", gzip_level=0)


def test_shard_round_trip(tmp_path, raw):
    out = prepare(_cfg(tmp_path, raw))
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["shards"]["sequences"]) >= 3 and m["inputs"][0]["path"] == str(raw)
    for kind in ("sequences", "items"):
        verify_shards(out, kind)
    seqs = list(iter_sequences(out))
    assert [u for u, *_ in seqs] == list(range(1, m["num_users"] + 1))
    assert sum(len(s) for _, s, _, _ in seqs) == m["num_interactions"]
    assert all(s.dtype == np.int64 and t.dtype == np.int64 and r.dtype == np.float32 for _, s, t, r in seqs)
    assert max(int(s.max()) for _, s, _, _ in seqs) == m["num_items"]
    # a real WebDataset reads the same samples (raw bytes; we never use its default decoders)
    first = out / m["shards"]["sequences"][0]["path"]
    ds = wds.WebDataset(str(first), shardshuffle=False, nodesplitter=wds.split_by_node)
    keys = [s["__key__"] for s in ds]
    assert keys == [s["__key__"] for s in iter_samples(first)]
    samples = list(ds)
    assert np.load(io.BytesIO(samples[0]["items.npy"]), allow_pickle=False).tolist() == seqs[0][1].tolist()
    for sample in samples:  # the hand-built .npy members are byte for byte what np.save writes
        for member in ("items.npy", "timestamps.npy", "ratings.npy"):
            buf = io.BytesIO()
            np.save(buf, np.load(io.BytesIO(sample[member]), allow_pickle=False))
            assert sample[member] == buf.getvalue()
    sample = samples[0]
    assert json.loads(sample["meta.json"]) == {
        "user": 1,
        "user_id": (out / "user_ids.txt").read_text().split()[0],
    }
    # the pipeline is deterministic: the same input gives byte-identical shards
    again = prepare(_cfg(tmp_path, raw, name="ds2"))
    m2 = json.loads((again / "manifest.json").read_text())
    assert [s["sha256"] for s in m2["shards"]["sequences"]] == [s["sha256"] for s in m["shards"]["sequences"]]


def test_corrupted_shard_is_detected(tmp_path, raw):
    out = prepare(_cfg(tmp_path, raw))
    m = json.loads((out / "manifest.json").read_text())
    shard = out / m["shards"]["sequences"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"seq-000001\.tar: sha256 .* does not match"):
        SequenceLoader(out, split="train", batch_size=4, max_seq_len=8, verify=True)
    with pytest.raises(DataError, match=r"seq-000001\.tar"):
        verify_shards(out)
    # the other rank of a 2-rank world does not hold shard 1 and verifies fine
    SequenceLoader(out, split="train", batch_size=4, max_seq_len=8, rank=0, world_size=2, verify=True)


def test_failure_midway_leaves_no_dataset(tmp_path, raw, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "write_item_shards", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(_cfg(tmp_path, raw))
    assert list((tmp_path / "out").iterdir()) == []  # no final dir, no temporary leftovers
    monkeypatch.undo()
    out = prepare(_cfg(tmp_path, raw))
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(prepare_mod, "write_item_shards", boom)
    with pytest.raises(RuntimeError):
        prepare(_cfg(tmp_path, raw, overwrite=True))
    assert (out / "manifest.json").read_bytes() == before  # the old dataset is untouched
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ds"]
    with pytest.raises(DataError, match="already exists"):
        prepare(_cfg(tmp_path, raw))


def test_failed_replace_puts_the_old_folder_back(tmp_path, monkeypatch):
    """If renaming the new folder into place fails, the old one is renamed back (a failed restore is a
    DataError naming where the old copy is), never stranded under a hidden name."""
    real_rename = prepare_mod.os.rename
    final, new = tmp_path / "ds", tmp_path / ".ds.tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new.mkdir()
    failing = {new}

    def rename(src, dst):
        if Path(src) in failing:
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(prepare_mod.os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        prepare_mod.publish_folder(new, final, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.tmp", "ds"] and (final / "old.txt").exists()
    old = tmp_path / f".ds.old-{prepare_mod.os.getpid()}"
    failing.add(old)
    with pytest.raises(
        DataError, match=re.escape(f"replacing {final} failed and its old copy is left at {old}")
    ):
        prepare_mod.publish_folder(new, final, overwrite=True)


def _cli(tmp_path: Path, toml: str, *overrides: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "job.toml"
    cfg.write_text(toml)
    return subprocess.run(
        [sys.executable, str(ROOT / "launch/prepare.py"), "--config", str(cfg), *overrides],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_fatal_errors(tmp_path):
    base = f'[data]\nroot = "{tmp_path / "out"}"\nname = "x"\nsource = "amazon2023"\n'
    res = _cli(tmp_path, base + f'interactions = "{tmp_path / "missing.jsonl"}"\nitems = "m.jsonl"\n')
    assert res.returncode == 2 and "Amazon reviews file not found" in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr
    res = _cli(tmp_path, base + 'interactions = "a"\nitems = "b"\nkcroe = "paper"\n')
    assert res.returncode == 2 and "unknown config key(s) data.kcroe" in res.stderr
    ok = base + f'interactions = "{FIX / "amazon/reviews.jsonl"}"\nitems = "{FIX / "amazon/meta.jsonl"}"\n'
    res = _cli(tmp_path, ok + 'kcore = "paper"\n')  # items >= 5: nothing survives the tiny fixture
    assert res.returncode == 2 and "nothing left after filtering" in res.stderr
    assert not (tmp_path / "out" / "x").exists() and list((tmp_path / "out").iterdir()) == []
    res = _cli(tmp_path, ok, "data.min_user_interactions=4", "data.min_item_interactions=0")
    assert res.returncode == 0, res.stderr
    assert (
        "malformed_json" in res.stderr and "reviews.jsonl:10" in res.stderr
    )  # console summary with file:line
    assert (tmp_path / "out" / "x" / "manifest.json").is_file()
