"""Sharded, atomic DCP checkpoints of the whole training state, with keep-last-K and a protected best.

Layout under `<run>/checkpoints/`: `step-000000120/` (DCP files + `train_state.json`), and `best/`
(the same, for the best validation epoch). Every rank writes its own shards into `<name>.tmp/`; after a
barrier rank 0 adds `train_state.json` and renames the folder, so a folder without `.tmp` is always
complete. A run that starts over, or continues from an explicit older checkpoint, first moves the
checkpoints that would outrank it to `<run>/checkpoints.previous/`. Multi-node runs need the run folder on a
filesystem every node sees.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch.distributed.checkpoint as dcp

from trainer.config_io import ConfigError
from trainer.distributed import World, barrier, broadcast_object, logger

_STEP_DIR = re.compile(r"^step-(\d{9})$")
TRAIN_STATE_FILE = "train_state.json"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass(kw_only=True)
class CheckpointConfig:
    """When to checkpoint and what to resume from."""

    interval_steps: int = 0
    """Also save every this many optimizer steps (0: only at each epoch's end and when training stops)."""
    keep_last: int = 2
    """Step checkpoints to keep; older ones are deleted. The best checkpoint is kept apart."""
    resume: str = "auto"
    """`auto`: continue from this run's newest complete checkpoint if any; `never`: start over (an earlier
    run's checkpoints are moved to `checkpoints.previous/`); or a checkpoint path to continue from."""

    def __post_init__(self) -> None:
        if self.interval_steps < 0:
            raise ConfigError("checkpoint.interval_steps must be >= 0")
        if self.keep_last < 1:
            raise ConfigError("checkpoint.keep_last must be >= 1")


class CheckpointManager:
    """Saves and restores `{name: Stateful}` with DCP plus a small JSON train state."""

    def __init__(self, folder: str | Path, *, world: World, keep_last: int) -> None:
        self._folder = Path(folder)
        self._world = world
        self._keep_last = keep_last
        if world.is_main:
            self._folder.mkdir(parents=True, exist_ok=True)
        barrier()

    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def _previous(self) -> Path:
        """Where `resolve_resume` sets aside checkpoints that must not outrank the run (one generation)."""
        return self._folder.with_name(f"{self._folder.name}.previous")

    def save(self, name: str, stateful: dict[str, Stateful], train_state: dict[str, Any]) -> Path:
        """Write checkpoint `name` ("step-000000120" or "best") atomically on every rank."""
        final = self._folder / name
        tmp = self._folder / f"{name}.tmp"
        if self._world.is_main and tmp.exists():
            shutil.rmtree(tmp)
        barrier()
        dcp.save({key: obj.state_dict() for key, obj in stateful.items()}, checkpoint_id=str(tmp))
        barrier()
        if self._world.is_main:
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=2) + "\n")
            if final.exists():
                old = self._folder / f"{name}.old"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            self._purge()
        barrier()
        return final

    @staticmethod
    def step_name(step: int) -> str:
        return f"step-{step:09d}"

    def _purge(self) -> None:
        steps = sorted(p for p in self._folder.iterdir() if _STEP_DIR.match(p.name))
        for stale in steps[: -self._keep_last]:
            shutil.rmtree(stale)
        for leftover in self._folder.glob("*.tmp"):
            shutil.rmtree(leftover)

    def latest(self) -> Path | None:
        """The newest complete step checkpoint (rank 0 decides; every rank gets the same answer)."""
        found = None
        if self._world.is_main and self._folder.is_dir():
            steps = sorted(
                p
                for p in self._folder.iterdir()
                if _STEP_DIR.match(p.name) and (p / TRAIN_STATE_FILE).is_file()
            )
            found = str(steps[-1]) if steps else None
        found = broadcast_object(found)
        return Path(found) if found else None

    def resolve_resume(self, resume: Literal["auto", "never"] | str) -> Path | None:
        """Turn `checkpoint.resume` into the folder to load (None: start fresh).

        Starting over, or continuing from an explicit checkpoint, sets aside this folder's checkpoints that
        are not behind the one loaded: newer steps (and a newer `best`) would otherwise outrank the
        continuing run in `latest()`, keep-last purging and the final test.
        """
        if resume == "auto":
            return self.latest()
        path = None
        if resume != "never":
            path = Path(resume)
            if not (path / TRAIN_STATE_FILE).is_file():
                raise ConfigError(f"checkpoint.resume={resume!r} is not a complete checkpoint folder")
            if self._previous.resolve() in path.resolve().parents:
                raise ConfigError(
                    f"checkpoint.resume={resume!r} lies in {self._previous}, which this run may replace: "
                    "move that checkpoint out of it first"
                )
        if self._world.is_main:
            self._set_aside(_resumed_step(self._folder, path))
        barrier()
        return path

    def _set_aside(self, resumed_step: int | None) -> None:
        """Move checkpoints newer than `resumed_step` (all, when None) into `<folder>.previous/`."""
        stale = [p for p in sorted(self._folder.iterdir()) if _is_newer(p, resumed_step)]
        if not stale:
            return
        previous = self._previous
        replaced = previous.exists()
        if replaced:
            shutil.rmtree(previous)
        previous.mkdir()
        for path in stale:
            path.rename(previous / path.name)
        logger.warning(
            "checkpoint.resume: moved %s from %s to %s%s so they cannot outrank this run's checkpoints; "
            "delete that folder when you no longer need it",
            ", ".join(p.name for p in stale),
            self._folder,
            previous,
            " (replacing what it held)" if replaced else "",
        )

    def load(self, path: str | Path, stateful: dict[str, Stateful]) -> dict[str, Any]:
        """Restore every object in place from `path`; returns the saved train state."""
        path = Path(path)
        state = {key: obj.state_dict() for key, obj in stateful.items()}
        dcp.load(state, checkpoint_id=str(path))
        for key, obj in stateful.items():
            obj.load_state_dict(state[key])
        logger.info("loaded checkpoint %s", path)
        return json.loads((path / TRAIN_STATE_FILE).read_text())


def _checkpoint_step(path: Path) -> int | None:
    """The training step a complete checkpoint folder holds (None: not a complete checkpoint)."""
    match = _STEP_DIR.match(path.name)
    if match:
        return int(match.group(1))
    state = path / TRAIN_STATE_FILE
    return int(json.loads(state.read_text())["step"]) if state.is_file() else None


def _resumed_step(folder: Path, path: Path | None) -> int | None:
    """The resumed checkpoint's step when it is one of `folder`'s (None: a fresh run, or another run's)."""
    if path is None or path.resolve().parent != folder.resolve():
        return None
    return _checkpoint_step(path)


def _is_newer(path: Path, resumed_step: int | None) -> bool:
    """A complete checkpoint (step folder or `best`) that the continuing run must not see."""
    step = _checkpoint_step(path)
    return step is not None and (resumed_step is None or step > resumed_step)
