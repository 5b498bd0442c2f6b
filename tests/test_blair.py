"""BLaIR: encoder/loss units, pair sources, bad input, and a 2-rank DeepSpeed run under real torchrun."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "blair"))

import blair_helpers as H

from data_shards.io import DataError
from data_shards.pairs import PairsConfig, load_pairs
from modules.blair import (
    BlairEncoder,
    EncoderError,
    default_pooling,
    info_nce_loss,
    load_encoder,
    mask_tokens,
    mlm_loss,
    pool,
)


def test_pool_mean_ignores_padding_and_cls_takes_first():
    hidden = torch.arange(12.0).reshape(1, 4, 3).repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    mean = pool(hidden, mask, "mean")
    assert torch.allclose(mean[0], hidden[0, :2].mean(0)) and torch.allclose(mean[1], hidden[1].mean(0))


def test_info_nce_matches_hand_computation_and_masks_same_item():
    torch.manual_seed(0)
    q, k = torch.randn(2, 8), torch.randn(6, 8)  # 2 local queries vs 6 gathered keys (3 ranks x 2)
    labels = torch.tensor([2, 3])  # this is rank 1
    loss, logits = info_nce_loss(q, k, labels, temperature=0.05)
    ref = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).T / 0.05
    assert logits.shape == (2, 6) and torch.allclose(logits, ref, atol=1e-5)
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(ref, labels), atol=1e-5)
    groups_q, groups_k = torch.tensor([7, 8]), torch.tensor([1, 7, 7, 8, 2, 3])  # key 1 is query 0's item too
    masked_loss, masked = info_nce_loss(
        q, k, labels, temperature=0.05, query_groups=groups_q, key_groups=groups_k
    )
    assert masked[0, 1] < -1e30 and masked[0, 2] == logits[0, 2]  # the positive itself is never masked
    assert masked_loss <= loss + 1e-6


def test_mask_tokens_never_masks_special_or_padding():
    ids = torch.tensor([[2, 9, 10, 11, 12, 3, 0, 0]] * 64)
    att = (ids != 0).long()
    masked, labels = mask_tokens(
        ids,
        att,
        mask_token_id=4,
        vocab_size=20,
        special_ids=[0, 1, 2, 3, 4],
        probability=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    special = (ids == 0) | (ids == 2) | (ids == 3)
    assert (labels[special] == -100).all() and torch.equal(masked[special], ids[special])
    picked = labels != -100
    assert 0.3 < picked[~special].float().mean() < 0.7
    assert torch.equal(labels[picked], ids[picked])
    assert mlm_loss(torch.randn(picked.sum(), 20), labels[picked]).item() > 0


def test_tiny_bert_encoder_and_mlm_head(tmp_path):
    folder = H.make_tiny_bert(tmp_path / "bert")
    loaded = load_encoder(folder, with_mlm_head=True)
    enc = BlairEncoder(loaded.model, pooling="cls")
    tok = loaded.tokenizer(["red dress love", "blue coat"], padding=True, return_tensors="pt")
    q = enc.encode(tok["input_ids"], tok["attention_mask"])
    assert q.shape == (2, 32)
    masked, labels = mask_tokens(
        tok["input_ids"],
        tok["attention_mask"],
        mask_token_id=loaded.tokenizer.mask_token_id,
        vocab_size=len(loaded.tokenizer),
        special_ids=loaded.tokenizer.all_special_ids,
        probability=0.9,
        generator=torch.Generator().manual_seed(1),
    )
    logits, picked = enc.mlm_logits(masked, tok["attention_mask"], labels)
    assert (
        logits.shape == (int((labels != -100).sum()), len(loaded.tokenizer))
        and picked.shape[0] == logits.shape[0]
    )
    assert default_pooling(folder) == ("cls", False)
    st = H.make_tiny_bert(tmp_path / "st", sentence_transformers_mean=True)
    assert default_pooling(st) == ("mean", True)


def test_missing_encoder_and_mismatched_tokenizer_are_clear_errors(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(tmp_path / "nope", with_mlm_head=False)
    bad = H.make_tiny_bert(tmp_path / "bad", model_vocab=10)  # tokenizer has more tokens than embedding rows
    with pytest.raises(
        EncoderError, match=r"tokenizer has .* tokens but the model's input embedding has only 10"
    ):
        load_encoder(bad, with_mlm_head=False)


def test_table_pairs_filter_short_texts_and_keep_heldout_out_of_item_text(tmp_path):
    table = H.write_review_table(tmp_path / "reviews.csv")
    cfg = PairsConfig(
        reviews_path=str(table),
        item_column="item",
        item_columns=["Division Name", "Class Name"],
        profile_reviews_per_item=2,
        profile_columns=["Review Text"],
        profile_sort_column="helpful",
        eval_fraction=0.2,
        seed=3,
    )
    corpus = load_pairs(cfg)
    assert corpus.counts["items"] == 32 and corpus.counts["profile_reviews"] == 64
    # one review per item reads "too short": filtered and counted unless it was taken as a profile review
    assert 0 < corpus.stats.counts["review_too_short"] <= 32
    assert corpus.counts["pairs"] == 32 * 12 - 64 - corpus.stats.counts["review_too_short"]
    held = {t for _, t in corpus.eval}
    assert not any(t in item for t in held for item in corpus.item_texts)
    with pytest.raises(DataError, match="not found"):
        load_pairs(PairsConfig(reviews_path=str(tmp_path / "missing.csv")))
    with pytest.raises(DataError, match=r"column\(s\) \['nope', 'Department Name'\] not found"):
        load_pairs(PairsConfig(reviews_path=str(table), item_column="nope"))


def test_amazon_and_steam_pairs(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text(
        json.dumps(
            {
                "parent_asin": "A1",
                "title": "Wireless mouse",
                "features": ["2.4 GHz", "silent clicks"],
                "description": ["An ergonomic mouse for the office."],
            }
        )
        + "\n"
        + json.dumps({"parent_asin": "A2", "title": "Cable", "features": [], "description": []})
        + "\n"
        + "{broken\n"
    )
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "parent_asin": "A1",
                    "title": "Great mouse",
                    "text": "Quiet, precise and the battery lasts months.",
                },
                {"parent_asin": "A1", "title": "ok", "text": "fine"},
                {
                    "parent_asin": "A2",
                    "title": "Cable works",
                    "text": "Does what a cable should do, no complaints.",
                },
                {
                    "parent_asin": "A1",
                    "title": "Love it",
                    "text": "Best mouse I have owned, clicks are silent.",
                },
            ]
        )
        + "\n"
    )
    corpus = load_pairs(
        PairsConfig(source="amazon2023", reviews_path=str(reviews), meta_path=str(meta), eval_fraction=0.5)
    )
    assert corpus.item_keys == ["A1"] and corpus.counts["pairs"] == 2
    assert corpus.stats.counts["item_text_too_short"] == 1 and corpus.stats.counts["malformed_json"] == 1
    assert (
        corpus.stats.counts["review_too_short"] == 1
        and corpus.stats.counts["review_item_without_metadata"] == 1
    )
    games = tmp_path / "games.json"
    games.write_text(
        str(
            {
                "id": "10",
                "app_name": "Counter-Strike",
                "developer": "Valve",
                "genres": ["Action"],
                "tags": ["FPS", "Multiplayer"],
                "specs": ["Online PvP"],
            }
        )
        + "\n"
    )
    steam_reviews = tmp_path / "steam_reviews.json"
    steam_reviews.write_text(
        str(
            {"username": "u", "product_id": "10", "text": "Classic shooter, still the best team game around."}
        )
        + "\n"
        + str({"username": "v", "product_id": "10", "text": "Great multiplayer maps and tight gunplay."})
        + "\n"
    )
    steam = load_pairs(
        PairsConfig(source="steam", reviews_path=str(steam_reviews), meta_path=str(games), eval_fraction=0.5)
    )
    assert steam.item_texts == ["Counter-Strike | Valve | Action | FPS Multiplayer | Online PvP"]
    assert steam.counts["pairs"] == 2


@pytest.mark.multiprocess
def test_two_rank_deepspeed_run_cross_rank_negatives_and_resume(tmp_path):
    encoder = H.make_tiny_bert(tmp_path / "bert", hidden=64)
    table = H.write_review_table(tmp_path / "reviews.csv", reviews_per_item=10)
    config = tmp_path / "blair.toml"
    config.write_text(f"""
[run]
name = "tiny"
output_root = "{tmp_path / "runs"}"
seed = 1
[blair]
encoder_path = "{encoder}"
pooling = "mean"
max_length = 32
batch_size = 8
lr = 5e-3
warmup_ratio = 0.0
max_steps = 12
zero_stage = 2
log_every = 4
checkpoint_every = 8
eval_batch_size = 32
[blair.pairs]
source = "table"
reviews_path = "{table}"
item_column = "item"
item_columns = ["Division Name", "Class Name"]
review_columns = ["Review Text"]
profile_reviews_per_item = 1
profile_columns = ["Title"]
eval_fraction = 0.2
""")
    # First run stops at step 8 (a checkpoint), the second resumes from it and finishes the 12 steps.
    H.torchrun("blair.py", ["--config", str(config), "blair.max_steps=8"])
    run_dir = tmp_path / "runs" / "tiny"
    first = json.loads((run_dir / "results.json").read_text())
    assert first["logits_shape"] == [8, 16]  # local queries x GLOBAL keys: the other rank's negatives are in
    assert first["world_size"] == 2 and first["global_batch"] == 16 and first["steps"] == 8
    losses = first["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert first["mlm_head_initialised"] == []  # the tiny BERT was saved with its MLM head
    H.torchrun("blair.py", ["--config", str(config)])
    second = json.loads((run_dir / "results.json").read_text())
    assert second["steps"] == 12 and second["steps_this_run"] == 4
    assert second["before"] == first["before"]  # carried in the checkpoint, not re-measured
    assert second["losses"][:8] == losses
    assert second["recall@10_after"] >= second["recall@10_before"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "encoder" / "config.json").is_file() and (
        run_dir / "encoder" / "modules.json"
    ).is_file()
    assert default_pooling(run_dir / "encoder") == ("mean", True)
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()] == ["step00000012"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_run_saves_a_loadable_trained_encoder(tmp_path):
    encoder = H.make_tiny_bert(tmp_path / "bert", hidden=64)
    table = H.write_review_table(tmp_path / "reviews.csv", reviews_per_item=10)
    config = tmp_path / "z3.toml"
    config.write_text(f"""
[run]
name = "z3"
output_root = "{tmp_path / "runs"}"
[blair]
encoder_path = "{encoder}"
pooling = "mean"
max_length = 32
batch_size = 8
lr = 5e-3
max_steps = 4
zero_stage = 3
eval_before = false
[blair.pairs]
source = "table"
reviews_path = "{table}"
item_column = "item"
item_columns = ["Division Name", "Class Name"]
review_columns = ["Review Text"]
profile_reviews_per_item = 1
profile_columns = ["Title"]
""")
    H.torchrun("blair.py", ["--config", str(config)])
    result = json.loads((tmp_path / "runs" / "z3" / "results.json").read_text())
    assert (
        result["zero_stage"] == 3 and result["logits_shape"] == [8, 16] and result["recall@10_before"] is None
    )
    # ZeRO-3 partitions the weights; the saved folder must hold the gathered, trained ones.
    trained = load_encoder(tmp_path / "runs" / "z3" / "encoder", with_mlm_head=True)
    init = load_encoder(encoder, with_mlm_head=True)
    assert trained.missing_keys == []
    a, b = trained.model.state_dict(), init.model.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(
        a["bert.encoder.layer.0.attention.self.query.weight"],
        b["bert.encoder.layer.0.attention.self.query.weight"],
    )
