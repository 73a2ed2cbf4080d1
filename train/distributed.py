"""The torchrun environment: rank, world size, process group; one ``is_main`` flag gates output."""

from __future__ import annotations

import os
from dataclasses import dataclass


class DistError(ValueError):
    """A torchrun variable (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) that makes no sense."""


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
        if value < low:
            raise DistError(f"environment variable {name}={value} must be at least {low}")
        return value

    world = read("WORLD_SIZE", 1, 1)
    rank = read("RANK", 0, 0)
    local_world = read("LOCAL_WORLD_SIZE", 1, 1)
    local_rank = read("LOCAL_RANK", 0, 0)
    if rank >= world:
        raise DistError(f"RANK={rank} is not below WORLD_SIZE={world}")
    if local_rank >= max(local_world, 1) and "LOCAL_WORLD_SIZE" in environ:
        raise DistError(f"LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world}")
    return DistEnv(rank, world, local_rank, local_world)


def init(env: DistEnv, device: str) -> None:
    """Select this rank's GPU and start the process group (NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if env.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


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
