"""One run folder per job: a marker names the job that owns it, so jobs never mix checkpoints or results.

One TOML serves several jobs (prepare, blair, embed, train, recommend) and `run.output_root/run.name` names
the run folder of each; `launch/blair.py` and `launch/train.py` both write `checkpoints/`, `tensorboard/`
and `results.json` there, so running both under one name must be an error, not a silent overwrite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.config_io import ConfigError

JOB_FILE = "job.json"


def run_dir_owner(run_dir: Path) -> str | None:
    """The job that created `run_dir` (None: no marker, e.g. a new folder)."""
    path = run_dir / JOB_FILE
    if not path.is_file():
        return None
    return str(json.loads(path.read_text(encoding="utf-8"))["job"])


def claim_run_dir(run_dir: Path, job: str, *, is_main: bool) -> None:
    """Create `run_dir` for `job` (rank 0 writes the marker); a folder another job owns is a ConfigError."""
    owner = run_dir_owner(run_dir)
    if owner is not None and owner != job:
        raise ConfigError(
            f"{run_dir} holds a {owner} run (launch/{owner}.py); give this {job} job its own folder, "
            f"e.g. run.name={run_dir.name}_{job}"
        )
    if is_main and owner is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{JOB_FILE}.tmp"
        tmp.write_text(json.dumps({"job": job}) + "\n", encoding="utf-8")
        os.replace(tmp, run_dir / JOB_FILE)
