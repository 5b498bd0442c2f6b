"""Run folders belong to one job (a second job under the same run.name is stopped with a fix), and a run
that starts over or goes back to an older checkpoint never mixes with the checkpoints it replaces."""

from __future__ import annotations

import pytest
import torch

from trainer.checkpoint import CheckpointManager
from trainer.config_io import ConfigError
from trainer.distributed import World
from trainer.run_dir import claim_run_dir, run_dir_owner


def test_a_run_folder_serves_one_job(tmp_path):
    run = tmp_path / "runs" / "amazon_video_games"
    assert run_dir_owner(run) is None
    claim_run_dir(run, "train", is_main=True)
    assert run_dir_owner(run) == "train"
    claim_run_dir(run, "train", is_main=False)  # a resumed train run, and every other rank, may use it
    with pytest.raises(ConfigError, match=r"holds a train run .* run\.name=amazon_video_games_blair"):
        claim_run_dir(run, "blair", is_main=True)
    assert run_dir_owner(run) == "train"


def test_only_rank_zero_creates_the_folder(tmp_path):
    claim_run_dir(tmp_path / "fresh", "blair", is_main=False)
    assert not (tmp_path / "fresh").exists()


def _checkpoints(folder, steps: list[int], best_step: int | None) -> CheckpointManager:
    """A CheckpointManager (world of one, no process group) over `folder` holding those checkpoints."""
    world = World(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    manager = CheckpointManager(folder, world=world, keep_last=2)
    model = torch.nn.Linear(2, 2)
    for step in steps:
        manager.save(CheckpointManager.step_name(step), {"model": model}, {"step": step})
    if best_step is not None:
        manager.save("best", {"model": model}, {"step": best_step})
    return manager


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path):
    """resume=never in a folder an earlier run used: its higher steps and its best must not outrank the new
    run (auto-resume of a restarted worker, keep-last purging, the final test), yet are not deleted."""
    folder = tmp_path / "run" / "checkpoints"
    _checkpoints(folder, [4000, 5000], best_step=5000)
    manager = _checkpoints(folder, [], best_step=None)
    assert manager.resolve_resume("never") is None
    assert _names(folder) == []
    assert _names(tmp_path / "run" / "checkpoints.previous") == ["best", "step-000004000", "step-000005000"]
    manager.save(CheckpointManager.step_name(10), {"model": torch.nn.Linear(2, 2)}, {"step": 10})
    assert manager.latest() == folder / "step-000000010"
    assert manager.resolve_resume("auto") == folder / "step-000000010"  # a torchrun restart continues it
    assert _names(tmp_path / "run" / "checkpoints.previous") == ["best", "step-000004000", "step-000005000"]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    folder = tmp_path / "checkpoints"
    manager = _checkpoints(folder, [100, 200], best_step=200)
    older = folder / "step-000000100"
    assert manager.resolve_resume(str(older)) == older
    assert _names(folder) == ["step-000000100"]
    assert _names(tmp_path / "checkpoints.previous") == ["best", "step-000000200"]
    manager.save(CheckpointManager.step_name(110), {"model": torch.nn.Linear(2, 2)}, {"step": 110})
    assert manager.latest() == folder / "step-000000110"
    # A best from before the resumed step is the continuing run's own: it stays.
    manager = _checkpoints(tmp_path / "again", [100, 200], best_step=50)
    manager.resolve_resume(str(tmp_path / "again" / "step-000000100"))
    assert _names(tmp_path / "again") == ["best", "step-000000100"]
    with pytest.raises(ConfigError, match=r"lies in .*again\.previous.*move that checkpoint out"):
        manager.resolve_resume(str(tmp_path / "again.previous" / "step-000000200"))
