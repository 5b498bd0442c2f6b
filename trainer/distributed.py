"""Process-group set-up, device choice and rank-0 logging for jobs launched by torchrun (or plain python)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("hstu_blair")


@dataclass(frozen=True, kw_only=True)
class World:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


def pick_device(local_rank: int) -> torch.device:
    """One GPU per local rank when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "set --nproc-per-node to at most the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed() -> World:
    """Initialise the default process group from torchrun's environment (a world of one without it)."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = pick_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict = {"device_id": device} if backend == "nccl" else {}
        if "MASTER_ADDR" not in os.environ:  # plain `python`: a world of one on a free local port
            kwargs["init_method"] = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    world = World(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
    )
    setup_logging(world.rank)
    return world


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def destroy_distributed() -> None:
    """Tear down the process groups, after freeing unreachable objects (models, optimizers, sharded tensors
    caught in reference cycles) that still hold them: left to interpreter shutdown, their gloo state was
    destroyed without a live interpreter, and a rank aborted at exit (SIGABRT, "terminate called")."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def setup_logging(rank: int) -> None:
    """INFO logs from rank 0, warnings and errors from every rank (prefixed with the rank)."""
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def maybe_inject_fault(env_var: str, rank: int, step: int) -> None:
    """Testing aid: `env_var` = "RANK:STEP" makes that rank SIGKILL itself after STEP, on a run's first
    attempt only (torchrun's restart then resumes it from its checkpoint)."""
    spec = os.environ.get(env_var)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kill_rank, kill_step = (int(x) for x in spec.split(":"))
    if rank == kill_rank and step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s object on every rank (the value itself when not distributed)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
