"""The torchrun environment: rank, world size, process group; one ``is_main`` flag gates output."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

from .text import escape, shown

MAX_PROCESSES = 1 << 20  # bound of every rank and size variable, far above any real job
WAIT_NOTE_S = 60.0  # seconds of rendezvous before a note says what it waits for


class DistError(ValueError):
    """A torchrun variable (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_PORT) that makes no
    sense, or one that a run of several processes needs and lacks."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def from_environment(environ: dict | None = None) -> DistEnv:
    """Read torchrun's variables (a plain run is rank 0 of 1); :class:`DistError` names a bad one."""
    environ = os.environ if environ is None else environ

    def read(name: str, default: int, low: int) -> int:
        text = environ.get(name)
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise DistError(f"environment variable {name}={text[:40]!r} is not an integer") from None
        if not low <= value < MAX_PROCESSES:
            raise DistError(f"environment variable {name}={shown(value, 30)} must be in [{low}, {MAX_PROCESSES})")
        return value

    world = read("WORLD_SIZE", 1, 1)
    rank = read("RANK", 0, 0)
    local_world = read("LOCAL_WORLD_SIZE", 1, 1)
    local_rank = read("LOCAL_RANK", 0, 0)
    if rank >= world:
        raise DistError(f"RANK={rank} is not below WORLD_SIZE={world}")
    if local_rank >= max(local_world, 1) and "LOCAL_WORLD_SIZE" in environ:
        raise DistError(f"LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world}")
    if world > 1:
        # The env:// rendezvous needs all four; torchrun sets them. Without one, torch's own error
        # is a traceback; with RANK unset, every process would think it is rank 0.
        missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
        if missing:
            raise DistError(f"WORLD_SIZE={world} asks for {world} processes, but {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not set (start the run with torchrun, "
                            f"which sets them)")
        if read("MASTER_PORT", 0, 1) > 65535:
            raise DistError(f"environment variable MASTER_PORT={environ['MASTER_PORT']} is not a port (1 to 65535)")
    return DistEnv(rank, world, local_rank, local_world)


def init(env: DistEnv, device: str) -> None:
    """Select this rank's GPU and start the process group (NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if env.active and not dist.is_initialized():
        # The rendezvous waits for every rank (30 minutes by default); say what it waits for when
        # it takes long, so that a rank that was never started is not a silent hang.
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        note = threading.Timer(WAIT_NOTE_S, lambda: print(
            f"rank {env.rank}: still waiting for the other {env.world_size - 1} rank(s) at {escape(where)} "
            f"(WORLD_SIZE={env.world_size}); is every process started?", file=sys.stderr, flush=True))
        note.daemon = True
        note.start()
        try:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        finally:
            note.cancel()


def shutdown(env: DistEnv) -> None:
    import torch.distributed as dist

    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(values, env: DistEnv):
    """Element-wise sum of a tensor over ranks (identity in a plain run)."""
    if env.active:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
