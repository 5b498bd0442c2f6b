"""launch/train.py end to end on tiny synthetic data: real torchrun worlds over gloo, real DCP checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from data_shards.config import DataConfig
from data_shards.manifest import load_manifest
from data_shards.prepare import prepare
from data_shards.reader import NO_TRUNCATION, SequenceLoader, iter_sequences
from modules.metrics import rank_metrics
from modules.model import GenerativeRecommender
from sharding.model import local_item_vectors
from trainer.config import JobConfig
from trainer.config_io import ConfigError, load_config
from trainer.distributed import World, destroy_distributed, init_distributed
from trainer.hstu_trainer import FAULT_INJECTION_ENV, HSTUTrainer, train
from trainer.item_frequency import target_log_q, train_target_counts
from trainer.monitor import TrainingDiverged

from _runs import REPO, free_port, make_tiny_dataset, random_text_embeddings, torchrun, write_config
from test_text_transform import naive_text_transform

TRAIN = str(REPO / "launch" / "train.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("train_data"))


def _results(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / "results.json").read_text())


def _model_tensors(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(checkpoint, out)
    state = torch.load(out, weights_only=False)
    flat = {}
    for group, values in state.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    flat[f"{group}.{key}"] = value
    return flat


@pytest.mark.multiprocess
def test_two_rank_training_loss_falls(tmp_path, dataset):
    cfg = write_config(tmp_path, dataset, "falls", '\n[checkpoint]\nresume = "never"\n')
    torchrun(["--standalone", "--nproc-per-node=2", TRAIN, "--config", str(cfg), "train.max_steps=24"])
    results = _results(tmp_path, "falls")
    losses = [loss for _, loss in results["train_loss"]]
    assert len(losses) == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, f"loss did not fall: first {first:.3f} last {last:.3f}"
    assert results["world_size"] == 2
    for key in ("hr@10", "ndcg@10", "mrr"):  # the model learned more than item popularity
        assert results["test"][key] > results["popularity_test"][key], key
    run = tmp_path / "runs" / "falls"
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 24
    assert list((run / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"


@pytest.mark.multiprocess
def test_sigkilled_worker_resumes_to_identical_parameters(tmp_path, dataset):
    extra = "\n[checkpoint]\ninterval_steps = 5\nkeep_last = 5\n"
    common = ["--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0"]
    # A separate rendezvous store per restart round: with the shared one, restarted workers can read the
    # previous round's gloo addresses (pytorch/pytorch#135712).
    fresh_store = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    for name, env, restarts in (("straight", {}, "0"), ("killed", {FAULT_INJECTION_ENV: "1:10"}, "1")):
        cfg = write_config(tmp_path, dataset, name, extra)
        proc = torchrun(
            [*common, f"--max-restarts={restarts}", TRAIN, "--config", str(cfg), "train.max_steps=20"],
            env={**fresh_store, **env},
        )
        if name == "killed":
            assert "step-000000010" in proc.stdout + proc.stderr, "the restarted workers did not resume"
    straight = _model_tensors(tmp_path / "runs/straight/checkpoints/step-000000020", tmp_path / "a.pt")
    killed = _model_tensors(tmp_path / "runs/killed/checkpoints/step-000000020", tmp_path / "b.pt")
    assert straight.keys() == killed.keys() and len(straight) > 5
    for key in straight:
        assert torch.equal(straight[key], killed[key]), f"{key} differs after the restart"
    assert _results(tmp_path, "straight")["test"] == _results(tmp_path, "killed")["test"]


@pytest.mark.multiprocess
def test_two_agents_multi_node_rendezvous(tmp_path, dataset):
    cfg = write_config(tmp_path, dataset, "multinode", '\n[checkpoint]\nresume = "never"\n')
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=multinode-test",
        TRAIN,
        "--config",
        str(cfg),
        "train.max_steps=6",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ]
    agents.append(
        subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    for agent, output in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, output[-4000:]
    results = _results(tmp_path, "multinode")
    assert results["world_size"] == 2 and results["steps"] == 6


def test_bf16_autocast_trains_in_process(tmp_path, dataset):
    """One process (no torchrun): bf16 mixed precision on the CPU gives finite, falling losses."""
    cfg = load_config(
        JobConfig,
        write_config(tmp_path, dataset, "bf16"),
        ["train.precision=bf16", "train.max_steps=12", "checkpoint.resume=never"],
    )
    results = train(cfg)
    losses = [loss for _, loss in results["train_loss"]]
    assert all(np.isfinite(losses)) and sum(losses[-3:]) < sum(losses[:3])
    assert results["test"]["ndcg@10"] > results["popularity_test"]["ndcg@10"]


def test_max_steps_mid_epoch_starts_no_untrained_batch(tmp_path, dataset, monkeypatch):
    """Stopping at train.max_steps mid-epoch feeds the pipeline exactly those steps: no batch beyond the last
    step is read or has its input all-to-all started (and left un-waited when the process group goes)."""
    pulled = []
    model_batches = HSTUTrainer._model_batches

    def counted(self, batches, *, epoch, first):
        for batch in model_batches(self, batches, epoch=epoch, first=first):
            pulled.append(epoch)
            yield batch

    monkeypatch.setattr(HSTUTrainer, "_model_batches", counted)
    cfg = load_config(
        JobConfig,
        write_config(tmp_path, dataset, "max_steps"),
        ["train.max_steps=3", "checkpoint.resume=never"],
    )
    results = train(cfg)
    assert results["steps"] == 3 and pulled == [0, 0, 0]


def _in_process(tmp_path: Path, dataset: Path, name: str, overrides: list[str]) -> dict:
    return train(load_config(JobConfig, write_config(tmp_path, dataset, name), overrides))


def test_in_batch_loss_is_corrected_by_each_items_share_of_the_training_targets(tmp_path, dataset):
    """loss.kind=in_batch: log q is each item's share of the targets training reads (the last 20 of each
    user's train split, loo3), counted by each rank over its own shards; training with it lowers the loss."""
    num_items = int(load_manifest(dataset)["num_items"])
    want = torch.zeros(num_items + 1, dtype=torch.int64)
    for _, items, _, _ in iter_sequences(dataset):
        want += torch.bincount(
            torch.from_numpy(items[1 : len(items) - 2][-20:]).long(), minlength=num_items + 1
        )
    kw = dict(num_items=num_items, max_seq_len=20, protocol="loo3")
    for world_size in (1, 3):
        got = sum(
            train_target_counts(dataset, **kw, rank=r, world_size=world_size) for r in range(world_size)
        )
        assert torch.equal(got, want)
    world = World(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    torch.testing.assert_close(target_log_q(dataset, **kw, world=world), torch.log(want / want.sum()).float())
    cfg = load_config(
        JobConfig,
        write_config(tmp_path, dataset, "in_batch"),
        ["loss.kind=in_batch", "train.max_steps=12", "checkpoint.resume=never"],
    )
    losses = [loss for _, loss in train(cfg)["train_loss"]]
    assert all(np.isfinite(losses)) and sum(losses[-3:]) < sum(losses[:3])


def test_evaluation_excludes_history_beyond_the_model_window(tmp_path, dataset):
    """The model reads the last data.max_seq_len items, but every item the user had is out of the ranking."""
    window = 4
    cfg = load_config(
        JobConfig,
        write_config(tmp_path, dataset, "window"),
        [f"data.max_seq_len={window}", f"model.max_seq_len={window}", "checkpoint.resume=never"],
    )
    world = init_distributed()
    trainer = HSTUTrainer(cfg, world)
    try:
        got = trainer._evaluate(trainer.test_loader)
        module = trainer.dmp.module
        module.eval()
        catalog = torch.nn.functional.normalize(local_item_vectors(module)[1].float(), dim=-1)
        loader = SequenceLoader(
            dataset, split="test", batch_size=cfg.eval.batch_size, max_seq_len=NO_TRUNCATION, shuffle=False
        )
        ranks, longer = [], 0
        for batch in loader:
            with torch.no_grad():
                queries = module.encode(trainer._eval_batch(batch.most_recent(window)))
            offsets = batch.offsets
            for row in range(batch.batch_size):
                if batch.weights[row] == 0:
                    continue
                history = batch.item_ids[offsets[row] : offsets[row + 1]]
                longer += len(history) > window
                scores = catalog @ queries[row]
                target = int(batch.targets[row])
                target_score = float(scores[target])
                scores[0] = scores[history] = scores[target] = float("-inf")
                ranks.append(1 + int((scores > target_score).sum()))
    finally:
        trainer.close()
        destroy_distributed()
    assert longer > 50, "the dataset must have histories longer than the model window"
    want = rank_metrics(torch.tensor(ranks), ks=cfg.eval.ks)
    assert got == pytest.approx(want, abs=1e-12)


def test_resume_takes_the_new_learning_rate(tmp_path, dataset):
    """`--resume auto train.lr=...` trains on with the new lr, not the checkpoint's scheduler base lr."""
    _in_process(tmp_path, dataset, "lr", ["train.max_steps=4"])
    overrides = ["train.max_steps=6", "train.lr=5e-4"]
    cfg = load_config(JobConfig, write_config(tmp_path, dataset, "lr"), overrides)
    world = init_distributed()
    trainer = HSTUTrainer(cfg, world)
    try:
        assert trainer.state["step"] == 4
        assert trainer.adamw.param_groups[0]["lr"] == pytest.approx(5e-4 * trainer._lr_factor(4))
        trainer.fit()
        assert trainer.scheduler.base_lrs == [5e-4]
        assert trainer.adamw.param_groups[0]["lr"] == pytest.approx(5e-4 * trainer._lr_factor(6))
    finally:
        trainer.close()
        destroy_distributed()


def test_early_stopped_run_stays_stopped_on_resume(tmp_path, dataset):
    """Re-running an early-stopped command (resume auto) only re-tests it; raising the patience goes on."""
    stop = ["eval.patience=1", "train.epochs=30"]
    first = _in_process(tmp_path, dataset, "early", stop)
    assert first["epochs"] < 30, "the run should have stopped early"
    again = _in_process(tmp_path, dataset, "early", stop)
    for key in ("steps", "history", "test"):
        assert again[key] == first[key], key
    more = _in_process(tmp_path, dataset, "early", ["eval.patience=3", "train.epochs=30"])
    assert more["steps"] > first["steps"]


def test_step_checkpoint_carries_the_evaluation_of_its_step(tmp_path, dataset):
    """A step checkpoint written just before validation is rewritten with that validation's result."""
    results = _in_process(tmp_path, dataset, "interval", ["train.max_steps=6", "checkpoint.interval_steps=3"])
    state = json.loads((tmp_path / "runs/interval/checkpoints/step-000000006/train_state.json").read_text())
    assert state["history"] == results["history"] and len(state["history"]) == 1
    assert state["best_metric"] == results["best_valid"] is not None


def test_paper_protocol_tests_the_final_model_without_selection(tmp_path, dataset):
    """data.split=paper has no validation split: no early stopping or best checkpoint chosen on the test."""
    overrides = ["data.split=paper", "train.epochs=2", "eval.patience=1"]
    results = _in_process(tmp_path, dataset, "paper", overrides)
    assert results["epochs"] == 2 and results["history"] == [] and results["best_valid"] is None
    assert not (tmp_path / "runs/paper/checkpoints/best").exists()


def test_diverged_loss_stops_training_with_a_clear_error(tmp_path, dataset):
    """A NaN loss stops the run (on every rank) instead of training on and ranking NaN scores."""
    overrides = ["sharding.learning_rate=1e38", "train.lr=1e30", "train.grad_clip=0.0", "train.max_steps=10"]
    with pytest.raises(TrainingDiverged, match=r"not finite at step \d+.*lower train\.lr"):
        _in_process(tmp_path, dataset, "nan", [*overrides, "checkpoint.resume=never"])


def test_missing_dataset_fails_fast_with_instructions(tmp_path):
    cfg = load_config(JobConfig, None, [f"data.root={tmp_path}", "data.name=absent", "model.fusion=none"])
    with pytest.raises(ConfigError, match=r"run `python launch/prepare\.py"):
        train(cfg)


def test_more_ranks_than_shards_fails_fast(tmp_path, dataset):
    data_config = DataConfig(**json.loads((dataset / "manifest.json").read_text())["config"])
    one_shard = prepare(dataclasses.replace(data_config, name="one_shard", users_per_shard=100_000))
    cfg = write_config(tmp_path, one_shard, "toomany")
    proc = torchrun(["--standalone", "--nproc-per-node=2", TRAIN, "--config", str(cfg)], check=False)
    assert proc.returncode != 0
    assert "1 sequence shards but the job has 2 ranks" in proc.stderr


def _embeddings(tmp_path: Path, dataset: Path, dim: int) -> tuple[Path, np.ndarray]:
    out = tmp_path / f"emb{dim}"
    return out, random_text_embeddings(out, dataset, dim)


def test_text_dimension_mismatch_fails_fast(tmp_path, dataset):
    emb_dir, _ = _embeddings(tmp_path, dataset, 32)
    cfg = load_config(
        JobConfig,
        write_config(tmp_path, dataset, "textdim"),
        ["model.fusion=add", "model.text_dim=64", f"train.text_embeddings={emb_dir}"],
    )
    with pytest.raises(ConfigError, match=r"holds 32-d vectors but model\.text_dim=64"):
        train(cfg)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("text_dtype", "text_transform"), [("fp32", "none"), ("fp16", "none"), ("fp32", "whiten")]
)
def test_text_fusion_two_ranks_keeps_loaded_text_table_frozen(tmp_path, dataset, text_dtype, text_transform):
    """The frozen table ends bit-identical to the loaded vectors, in the configured storage dtype; with a
    text transform, equal to the naive transform fitted over the whole catalog though each rank holds half."""
    emb_dir, vectors = _embeddings(tmp_path, dataset, 24)
    cfg = write_config(tmp_path, dataset, "fusion", '\n[checkpoint]\nresume = "never"\n')
    overrides = [
        "train.max_steps=8",
        "model.fusion=add",
        "model.text_dim=24",
        f"model.text_transform={text_transform}",
        f"train.text_embeddings={emb_dir}",
        f"sharding.text_dtype={text_dtype}",
    ]
    torchrun(["--standalone", "--nproc-per-node=2", TRAIN, "--config", str(cfg), *overrides])
    tensors = _model_tensors(tmp_path / "runs/fusion/checkpoints/step-000000008", tmp_path / "f.pt")
    (text_key,) = [k for k in tensors if k.startswith("model.") and "item_text_table" in k]
    table = tensors[text_key]
    assert table.dtype == {"fp32": torch.float32, "fp16": torch.float16}[text_dtype]
    assert torch.equal(table[0], torch.zeros(24, dtype=table.dtype)), "padding row must stay zero"
    if text_transform == "none":
        assert torch.equal(table[1:], torch.from_numpy(vectors).to(table.dtype)), (
            "text table changed or misloaded"
        )
    else:
        expected = naive_text_transform(vectors.astype(np.float64), text_transform)
        np.testing.assert_allclose(table[1:].numpy(), expected, atol=1e-6)
        fit = _results(tmp_path, "fusion")["text_transform_fit"]
        assert fit["num_vectors"] == len(vectors), "the fit must see every rank's rows"
        assert fit["mean_norm"] == pytest.approx(np.linalg.norm(vectors.astype(np.float64).mean(0)), rel=1e-9)
    (projection,) = [k for k in tensors if k.startswith("model.") and "fusion.projection.weight" in k]
    config = load_config(JobConfig, cfg, overrides)
    torch.manual_seed(config.run.seed)  # the initial dense weights, as trainer/model_setup.py draws them
    num_items = json.loads((dataset / "manifest.json").read_text())["num_items"]
    initial = GenerativeRecommender(num_items=num_items, config=config.model, device="meta")
    assert not torch.equal(tensors[projection], initial.item_embedding.fusion.projection.weight.detach()), (
        "the text projection did not train"
    )
