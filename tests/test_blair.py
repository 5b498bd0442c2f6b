"""BLaIR: encoder/loss units, pair sources, bad input, and a 2-rank DeepSpeed run under real torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

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
from trainer.blair import FAULT_INJECTION_ENV, rank_mean
from trainer.distributed import World

from _runs import free_port


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


def test_mask_tokens_never_masks_special_or_padding_and_splits_80_10_10():
    ids = torch.tensor([[2, 9, 10, 11, 12, 3, 0, 0]] * 2000)
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
    assert 0.47 < picked[~special].float().mean() < 0.53
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(masked[~picked], ids[~picked])
    # Of the picked tokens 80% become [MASK], 10% a random token, 10% stay (a random draw may hit either).
    to_mask = (masked[picked] == 4).float().mean()
    kept = (masked[picked] == ids[picked]).float().mean()
    assert abs(to_mask - (0.8 + 0.1 / 20)) < 0.02 and abs(kept - (0.1 + 0.1 / 20)) < 0.02


def test_mlm_loss_is_cross_entropy_over_the_masked_positions_only():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 20, generator=gen)
    labels = torch.full((3, 5), -100)
    labels[0, 1], labels[2, 3], labels[2, 4] = 7, 0, 19
    picked = labels != -100
    want = torch.nn.functional.cross_entropy(logits[picked], labels[picked])
    assert torch.allclose(mlm_loss(logits, labels), want, rtol=1e-6, atol=0)
    assert mlm_loss(logits, torch.full((3, 5), -100)).item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor: no GPU here")
def test_rank_mean_runs_where_the_backend_has_no_cpu_collectives():
    """NCCL has no CPU collectives. A 'cuda:gloo' group maps only CUDA tensors to a backend, so a statistic
    reduced on the CPU fails here as under NCCL ("No backend type associated with device type cpu")."""
    dist.init_process_group(
        backend="cuda:gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        world = World(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cuda", 0))
        assert rank_mean(torch.tensor([1.0, 0.5], device=world.device), world) == [1.0, 0.5]
    finally:
        dist.destroy_process_group()


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
def test_two_rank_deepspeed_run_cross_rank_negatives_and_exact_resume(tmp_path):
    encoder = H.make_tiny_bert(tmp_path / "bert", hidden=64)
    # Dropout on: a resumed run must draw the same dropout masks as an uninterrupted one.
    bert_config = json.loads((encoder / "config.json").read_text())
    bert_config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (encoder / "config.json").write_text(json.dumps(bert_config))
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
    # An uninterrupted run, then one whose rank 1 is SIGKILLed after step 10: torchrun restarts the workers,
    # which resume from the step-8 checkpoint and must retrace steps 9-12 exactly.
    H.torchrun("blair.py", ["--config", str(config), "run.name=straight"])
    straight = json.loads((tmp_path / "runs" / "straight" / "results.json").read_text())
    assert straight["logits_shape"] == [8, 16]  # local queries x GLOBAL keys (the other rank's negatives)
    assert straight["world_size"] == 2 and straight["global_batch"] == 16 and straight["steps"] == 12
    losses = straight["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert straight["mlm_head_initialised"] == []  # the tiny BERT was saved with its MLM head
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0", "--max-restarts=1", str(H.REPO / "launch" / "blair.py"),
        "--config", str(config),
    ]  # fmt: skip
    # A separate rendezvous store per restart round (pytorch/pytorch#135712, as in tests/test_train.py).
    env = {**H.torchrun_env(), FAULT_INJECTION_ENV: "1:10", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(cmd, cwd=H.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "at step 8" in proc.stdout + proc.stderr, "the restarted workers did not resume from step 8"
    run_dir = tmp_path / "runs" / "tiny"
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["steps"] == 12 and resumed["steps_this_run"] == 4
    assert resumed["before"] == straight["before"]  # carried in the checkpoint, not re-measured
    assert resumed["batch_fingerprints"] == straight["batch_fingerprints"]
    assert resumed["losses"] == losses  # steps 9-12 included: same batches, masks, dropout and weights
    assert resumed["after"] == straight["after"]
    assert resumed["recall@10_after"] >= resumed["recall@10_before"]
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
