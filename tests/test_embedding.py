"""Item embedding: fusion modes, zero text contribution for padding, one function for any id set."""

from __future__ import annotations

import pytest
import torch

from modules.config import ModelConfig
from modules.item_embedding import ID_TABLE, ItemEmbedding


@pytest.mark.parametrize("fusion", ["none", "add", "concat", "gate"])
def test_fusion_modes_shapes_and_text_frozen(fusion):
    cfg = ModelConfig(embedding_dim=8, text_dim=12, fusion=fusion)
    emb = ItemEmbedding(num_items=10, config=cfg)
    if fusion != "none":
        text = torch.randn(11, 12)
        text[0] = 0
        emb.load_text_rows(0, text)
    ids = torch.tensor([[0, 3], [10, 3]])
    out = emb(ids)
    assert out.shape == (2, 2, 8)
    torch.testing.assert_close(out[0, 1], out[1, 1])
    out.sum().backward()
    if emb.text_collection is not None:
        assert all(p.grad is None for p in emb.text_collection.parameters())


def test_add_is_paper_formula_and_padding_gets_no_text():
    cfg = ModelConfig(embedding_dim=8, text_dim=12, fusion="add")
    emb = ItemEmbedding(num_items=5, config=cfg)
    text = torch.randn(6, 12)
    text[0] = 0
    emb.load_text_rows(0, text)
    e_id = emb.id_collection.embeddings[ID_TABLE].weight
    ids = torch.tensor([0, 2, 5])
    expected = e_id[ids] + emb.fusion.projection(text[ids]) * (ids != 0)[:, None]
    torch.testing.assert_close(emb(ids), expected)
    torch.testing.assert_close(emb(torch.tensor([0]))[0], e_id[0])
