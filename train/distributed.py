"""The torchrun environment: rank, world size, process group; one ``is_main`` flag gates output."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def from_environment() -> DistEnv:
    """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK (a plain run is rank 0 of 1)."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init(env: DistEnv, device: str) -> str:
    """Start the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if device.startswith("cuda"):
        device = f"cuda:{env.local_rank}" if env.active else device
        torch.cuda.set_device(torch.device(device))
    if env.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def shutdown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Element-wise sum over ranks (identity in a plain run)."""
    if env.active:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
