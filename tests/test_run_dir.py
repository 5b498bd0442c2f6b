"""Run folders belong to one job: a second job under the same run.name is stopped with a fix."""

from __future__ import annotations

import pytest

from trainer.config_io import ConfigError
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
