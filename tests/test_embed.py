"""Embedding shards: format round trip and verification, distributed emission (1 rank == 2 ranks), imports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "blair"))

import blair_helpers as H

from data_shards.embedding_shards import (
    EmbeddingShardError,
    load_embedding_rows,
    read_embedding_manifest,
    write_embedding_shards,
)
from data_shards.io import DataError
from data_shards.reader import ItemText, iter_item_texts
from modules.blair import BlairEncoder, load_encoder, weights_sha256
from trainer.embed import import_vectors

ENCODER = {"name": "test", "path": "/nowhere", "sha256": {}}


def _write(tmp_path: Path, n: int = 10, dim: int = 4) -> tuple[Path, np.ndarray]:
    emb = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    out = tmp_path / "emb"
    write_embedding_shards(
        out,
        np.arange(1, n + 1),
        emb,
        encoder=ENCODER,
        pooling="cls",
        normalized=False,
        num_items=n,
        items_per_shard=4,
        block_size=3,
    )
    return out, emb


def test_shards_round_trip_range_reads_and_padding_row(tmp_path):
    out, emb = _write(tmp_path)
    manifest = read_embedding_manifest(out, verify=True)
    assert [(s["first_item"], s["last_item"], s["num_samples"]) for s in manifest["shards"]] == [
        (1, 4, 2),
        (5, 8, 2),
        (9, 10, 1),
    ]
    full = load_embedding_rows(out, 0, 11)
    assert full.dtype == np.float16 and full.shape == (11, 4)
    assert not full[0].any()  # row 0 = padding
    np.testing.assert_array_equal(full[1:], emb.astype(np.float16))
    (out / "emb-000000.tar").unlink()  # a range inside shard 1 must not need shard 0
    np.testing.assert_array_equal(load_embedding_rows(out, 5, 9), emb[4:8].astype(np.float16))
    with pytest.raises(EmbeddingShardError, match=r"emb-000000\.tar is missing"):
        load_embedding_rows(out, 3, 6)
    with pytest.raises(EmbeddingShardError, match="outside"):
        load_embedding_rows(out, 5, 12)


def test_manifest_verification_catches_corruption_and_gaps(tmp_path):
    out, _ = _write(tmp_path)
    shard = out / "emb-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    read_embedding_manifest(out, verify=False)
    with pytest.raises(EmbeddingShardError, match="sha256"):
        read_embedding_manifest(out, verify=True)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"][1]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EmbeddingShardError, match=r"leaves items 5..8 out"):
        read_embedding_manifest(out)
    manifest["shards"].insert(1, dict(manifest["shards"][0]))
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EmbeddingShardError, match="overlaps"):
        load_embedding_rows(out, 0, 3)
    with pytest.raises(EmbeddingShardError, match="not found"):
        read_embedding_manifest(tmp_path / "nothing")


def _dataset(tmp_path: Path) -> tuple[Path, list[str]]:
    texts = [f"{c} {g} love this" for c in H.COLORS[:4] for g in H.GARMENTS[:3]] + ["white scarf"]
    texts[4] = "   "  # empty after stripping: zero vector, counted
    return H.make_item_dataset(tmp_path / "ds", texts, shard_sizes=[7, 6]), texts


def test_item_text_reader_checks_order(tmp_path):
    ds, texts = _dataset(tmp_path)
    got = list(iter_item_texts(ds, ranges=[(3, 5), (9, 11)]))
    assert [t.item for t in got] == [3, 4, 9, 10] and got[0].text == texts[2] and got[0].item_id == "orig3"
    assert list(iter_item_texts(ds))[12] == ItemText(13, "orig13", "white scarf")  # no ranges: all items
    (ds / "items" / "items-000000.tar").unlink()  # items 8..13 live in shard 1 only
    assert [t.item for t in iter_item_texts(ds, ranges=[(8, 14)], verify=True)] == list(range(8, 14))
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["shards"]["items"].reverse()
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="in order"):
        list(iter_item_texts(ds, ranges=[(1, 14)]))  # shard 1 (items 8..) is now read first


@pytest.mark.multiprocess
def test_embedding_on_two_ranks_equals_one_rank(tmp_path):
    ds, texts = _dataset(tmp_path)
    encoder = H.make_tiny_bert(tmp_path / "st", sentence_transformers_mean=True)
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"emb{nproc}"
        H.torchrun(
            "embed.py",
            [
                "--config",
                str(_embed_toml(tmp_path, ds, encoder, outs[nproc])),
                "embed.items_per_shard=4",
                "embed.block_size=3",
                "embed.batch_size=3",
            ],
            nproc=nproc,
        )
    one, two = (read_embedding_manifest(outs[n], verify=True) for n in (1, 2))
    assert one["num_items"] == 13 and one["num_empty_text"] == 1 and one["dim"] == 32
    assert one["pooling"] == "mean" and one["normalized"] is True  # read from modules.json / 1_Pooling
    assert one["max_length"] == 16  # sentence_bert_config.json caps the configured 32
    assert one["encoder"]["sha256"] == weights_sha256(encoder) and one["encoder"]["sha256"]
    assert one["dataset"]["manifest_sha256"] and len(one["shards"]) == 4 and two["world_size"] == 2
    # Shards are the unit of work and are batched the same way on any world size: identical bytes.
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    a, b = load_embedding_rows(outs[1], 0, 14), load_embedding_rows(outs[2], 0, 14)
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-3)
    assert not a[0].any() and not a[5].any()  # padding row and the empty-text item
    # Each row equals the text encoded alone (no batching/padding effects), mean-pooled and normalised.
    loaded = load_encoder(encoder, with_mlm_head=False)
    model = BlairEncoder(loaded.model, pooling="mean").eval()
    for item in (1, 7, 13):
        tok = loaded.tokenizer([texts[item - 1]], return_tensors="pt")
        with torch.no_grad():
            ref = torch.nn.functional.normalize(model.encode(tok["input_ids"], tok["attention_mask"]), dim=-1)
        np.testing.assert_allclose(a[item].astype(np.float32), ref[0].numpy(), atol=2e-3)


def _embed_toml(tmp_path: Path, ds: Path, encoder: Path, out: Path) -> Path:
    path = tmp_path / f"embed_{out.name}.toml"
    path.write_text(
        f'[run]\nname = "e"\noutput_root = "{tmp_path}"\n'
        f'[embed]\ndataset_dir = "{ds}"\nencoder_path = "{encoder}"\noutput_dir = "{out}"\nmax_length = 32\n'
    )
    return path


def test_import_vectors_parquet_npz_npy_and_id_mismatch(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds, _ = _dataset(tmp_path)
    rng = np.random.default_rng(1)
    ids = [f"orig{i}" for i in range(13, 0, -1)] + ["not_in_catalog"]  # any order, one extra id
    vecs = rng.normal(size=(14, 6)).astype(np.float32)
    pq.write_table(pa.table({"item_id": ids, "embedding": vecs.tolist()}), tmp_path / "v.parquet")
    m = import_vectors(ds, tmp_path / "v.parquet", tmp_path / "out_pq", name="api-model", items_per_shard=5)
    assert m["num_items"] == 13 and m["dim"] == 6 and m["num_ids_not_in_catalog"] == 1 and not m["normalized"]
    rows = load_embedding_rows(tmp_path / "out_pq", 0, 14, verify=True)
    np.testing.assert_allclose(rows[1], vecs[12], atol=1e-2)  # orig1 is the 13th row of the file
    np.testing.assert_allclose(rows[13], vecs[0], atol=1e-2)
    np.savez(tmp_path / "v.npz", ids=np.array(ids), vectors=vecs)
    import_vectors(ds, tmp_path / "v.npz", tmp_path / "out_npz")
    np.save(tmp_path / "v.npy", vecs)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    import_vectors(ds, tmp_path / "v.npy", tmp_path / "out_npy", ids_path=str(tmp_path / "ids.txt"))
    for other in ("out_npz", "out_npy"):
        np.testing.assert_array_equal(load_embedding_rows(tmp_path / other, 0, 14), rows)
    # Ids that do not match the catalog are a clear error; a partial file needs missing="zero".
    np.savez(tmp_path / "wrong.npz", ids=np.array([str(i) for i in range(13)]), vectors=vecs[:13])
    with pytest.raises(EmbeddingShardError, match="none of its 13 ids matches the catalog"):
        import_vectors(ds, tmp_path / "wrong.npz", tmp_path / "out_wrong")
    np.savez(tmp_path / "part.npz", ids=np.array(ids[:10]), vectors=vecs[:10])
    with pytest.raises(EmbeddingShardError, match="3 of 13 catalog items have no vector"):
        import_vectors(ds, tmp_path / "part.npz", tmp_path / "out_part")
    m = import_vectors(ds, tmp_path / "part.npz", tmp_path / "out_part", missing="zero")
    assert m["num_missing_vectors"] == 3 and not load_embedding_rows(tmp_path / "out_part", 1, 4).any()
    np.savez(tmp_path / "dup.npz", ids=np.array(["orig1", "orig1"]), vectors=vecs[:2])
    with pytest.raises(EmbeddingShardError, match="more than once"):
        import_vectors(ds, tmp_path / "dup.npz", tmp_path / "out_dup")
