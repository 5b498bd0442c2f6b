"""Typed TOML configs: precedence, strict keys and types, the resolved config, every shipped config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import JobConfig
from trainer.config_io import ConfigError, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "launch" / "configs").glob("*.toml"))


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_command_line_beats_file_beats_defaults(tmp_path):
    path = _toml(tmp_path, "[train]\nlr = 0.01\nbatch_size = 64\n")
    cfg = load_config(JobConfig, path, ["train.lr=0.5", "--eval.ks=[5, 20]", "eval.metric=hr@5"])
    assert cfg.train.lr == 0.5 and cfg.train.batch_size == 64
    assert cfg.train.epochs == JobConfig().train.epochs
    assert cfg.eval.ks == [5, 20] and cfg.eval.metric == "hr@5"
    assert cfg.train.betas == (0.9, 0.98) and isinstance(cfg.train.betas, tuple)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("[train]\nlrr = 1.0\n", [], r"unknown config key\(s\) train\.lrr"),
        ("[trian]\nlr = 1.0\n", [], r"unknown config key\(s\) trian"),
        ("[train]\nbatch_size = 'big'\n", [], r"train\.batch_size must be an integer"),
        ("", ["model.fusion=sum"], r"model\.fusion='sum' is not one of"),
        ("", ["train.epochs=0"], r"train\.epochs must be >= 1"),
        ("[train\n", [], r"invalid TOML"),
        ("", ["train.lr"], r"must look like section\.key=value"),
        ("", ["train.betas=[0.9]"], r"train\.betas must hold 2 values"),
        ("", ["train.betas=[0.9, 'x']"], r"train\.betas\[1\] must be a number"),
    ],
)
def test_mistakes_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(JobConfig, _toml(tmp_path, text), overrides)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(JobConfig, tmp_path / "absent.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(JobConfig, None, ["model.num_blocks=3", "data.name=x"])
    save_config(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["num_blocks"] == 3 and saved["data"]["name"] == "x"
    again = load_config(JobConfig, _toml(tmp_path, f"[model]\nnum_blocks = {saved['model']['num_blocks']}\n"))
    assert again.model == cfg.model


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(JobConfig, path)
    assert cfg.run.name
    if "[model]" in path.read_text():  # training configs: the position tables cover the reader's histories
        assert cfg.model.max_seq_len == cfg.data.max_seq_len
