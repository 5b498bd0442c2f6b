"""The ML-100K demo config's first training steps reproduce the loss curve kept in tests/reference/.

Guards the whole training path (data, sharded tables, HSTU, loss, optimizers) against silent changes in the
math. Regenerate the file deliberately with `REGENERATE_REFERENCE=1 pytest tests/test_reference_curve.py`
when a change is meant to alter training, and say why in the commit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards.prepare import prepare
from trainer.config import JobConfig
from trainer.config_io import load_config

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "tests" / "reference" / "ml100k_loss.json"
STEPS = 12


@pytest.mark.multiprocess
def test_ml100k_loss_curve_matches_reference(tmp_path):
    config = REPO / "launch" / "configs" / "ml100k.toml"
    data = load_config(JobConfig, config, [f"data.root={tmp_path}"]).data
    prepare(dataclasses.replace(data, overwrite=True))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(REPO / "launch" / "train.py"), "--config", str(config), f"data.root={tmp_path}"]
    cmd += [f"run.output_root={tmp_path / 'runs'}", f"train.max_steps={STEPS}", "metrics.log_every_steps=1"]
    cmd += ["checkpoint.resume=never"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "runs" / "ml100k" / "results.json").read_text())
    losses = [loss for _, loss in results["train_loss"]]
    if os.environ.get("REGENERATE_REFERENCE"):
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps({"steps": STEPS, "train_loss": losses}, indent=2) + "\n")
    reference = json.loads(REFERENCE.read_text())["train_loss"]
    assert len(losses) == len(reference) == STEPS
    assert losses == pytest.approx(reference, rel=0.02), "ML-100K training diverged from the reference curve"
    assert losses[-1] < losses[0]
