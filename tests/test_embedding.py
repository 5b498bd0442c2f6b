"""Item embedding: fusion modes, zero text contribution for padding, one function for any id set."""

from __future__ import annotations

import pytest
import torch

from modules.config import ModelConfig
from modules.item_embedding import ID_TABLE, TEXT_TABLE, ItemEmbedding
from modules.text_transform import apply_text_transform, fit_text_transform, text_moments

from test_text_transform import naive_text_transform


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


def _naive_fused(emb: ItemEmbedding, ids: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """TextFusion's formula written out item by item in float64 from the module's own weights.

    none: e; add: e + W_p t + b_p; concat: W_p [e; t] + b_p; gate: p = W_p t + b_p,
    g = sigmoid(W_g [e; p] + b_g), g e + (1 - g) p. The padding id 0 has t = 0 whatever its row holds,
    and in `add` no projection term at all.
    """
    mode = emb.fusion.mode
    e_id = emb.id_collection.embeddings[ID_TABLE].weight.detach().double()
    if mode != "none":
        w_p = emb.fusion.projection.weight.detach().double()
        b_p = emb.fusion.projection.bias.detach().double()
    if mode == "gate":
        w_g = emb.fusion.gate.weight.detach().double()
        b_g = emb.fusion.gate.bias.detach().double()
    rows = []
    for i in ids.reshape(-1).tolist():
        e = e_id[i]
        if mode == "none":
            rows.append(e)
            continue
        t = torch.zeros_like(text[i]) if i == 0 else text[i]
        if mode == "add":
            rows.append(e if i == 0 else e + w_p @ t + b_p)
        elif mode == "concat":
            rows.append(w_p @ torch.cat([e, t]) + b_p)
        else:
            p = w_p @ t + b_p
            g = 1.0 / (1.0 + torch.exp(-(w_g @ torch.cat([e, p]) + b_g)))
            rows.append(g * e + (1.0 - g) * p)
    return torch.stack(rows).reshape(*ids.shape, -1)


def _loaded_embedding(fusion: str, *, text_fp16: bool = False) -> tuple[ItemEmbedding, torch.Tensor | None]:
    """6 items, d=8, text_dim=12; padding row 0 deliberately non-zero, item 4 without text (zero row)."""
    torch.manual_seed(0)
    emb = ItemEmbedding(
        num_items=6, config=ModelConfig(embedding_dim=8, text_dim=12, fusion=fusion), text_fp16=text_fp16
    )
    if fusion == "none":
        return emb, None
    text = torch.randn(7, 12)
    text[4] = 0
    emb.load_text_rows(0, text)
    return emb, text.to(torch.float16 if text_fp16 else torch.float32).double()


@pytest.mark.parametrize(
    ("fusion", "text_fp16"),
    [
        ("none", False),
        ("add", False),
        ("add", True),
        ("concat", False),
        ("concat", True),
        ("gate", False),
        ("gate", True),
    ],
)
def test_fusion_values_match_naive_formula(fusion, text_fp16):
    emb, text = _loaded_embedding(fusion, text_fp16=text_fp16)
    ids = torch.tensor([[3, 0, 1], [4, 6, 3]])
    expected = _naive_fused(emb, ids, text)
    torch.testing.assert_close(emb(ids), expected.float())
    id_rows, text_rows = emb.lookup(ids.reshape(-1))
    torch.testing.assert_close(emb.fuse(id_rows, text_rows, ids.reshape(-1)), expected.reshape(6, 8).float())


@pytest.mark.parametrize("fusion", ["add", "concat", "gate"])
@pytest.mark.parametrize("mode", ["center", "whiten"])
def test_fusion_of_transformed_text_matches_naive_formula(fusion, mode):
    """text_transform rewrites the frozen table (as sharding.model.transform_text_table does per rank);
    the fused vectors are then the fusion formula applied to the naively transformed rows."""
    emb, text = _loaded_embedding(fusion)
    text[0] = 0  # the transform treats zero rows as padding; a real table has a zero padding row
    emb.load_text_rows(0, text.float())
    weight = emb.text_collection.embeddings[TEXT_TABLE].weight
    mean, matrix = fit_text_transform(text_moments(weight, with_outer=mode == "whiten"), mode)
    with torch.no_grad():
        weight.copy_(apply_text_transform(weight, mean, matrix))
    transformed = torch.from_numpy(naive_text_transform(text.numpy(), mode))
    ids = torch.tensor([0, 1, 4, 6])
    torch.testing.assert_close(emb(ids), _naive_fused(emb, ids, transformed).float())
