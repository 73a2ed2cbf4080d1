"""The torchrun environment: rank, world size, process group; one ``is_main`` flag gates output."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from .text import escape, first_line, shown

MAX_PROCESSES = 1 << 20  # bound of every rank and size variable, far above any real job
WAIT_NOTE_S = 60.0  # seconds of rendezvous before a note says what it waits for
# How long a collective may wait for the other ranks. torch's defaults (10 minutes for NCCL, 30 for
# gloo) are shorter than rank 0's lone work on a large set (fkd-relabel writes every image shard and
# checks a replay before the first collective). A rank that dies is noticed sooner: torchrun ends
# the others when one exits, and every error is agreed (:func:`agreed`), so no rank waits for it.
DEFAULT_TIMEOUT_MIN = 120
MAX_TIMEOUT_MIN = 7 * 24 * 60
MESSAGE_BYTES = 1024  # an agreed error's message, as sent from the failing rank (UTF-8, cut to fit)


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


def init(env: DistEnv, device: str, timeout_min: int = DEFAULT_TIMEOUT_MIN) -> None:
    """Select this rank's GPU and start the process group (NCCL on CUDA, gloo on CPU), whose
    collectives wait ``timeout_min`` minutes for the other ranks."""
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
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                    timeout=timedelta(minutes=timeout_min))
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


def collective_device(device: str) -> str:
    """Where a collective's tensors live: NCCL moves CUDA tensors only, gloo CPU ones."""
    return device if device.startswith("cuda") else "cpu"


class RankFailed(Exception):
    """Another rank's error, agreed by every rank (:func:`agree`). Only rank 0 says it (``shown``)."""

    def __init__(self, message: str, *, shown: bool, kind: str):
        super().__init__(message)
        self.shown = shown
        self.kind = kind  # the failing rank's error's class name, for callers that defer some kinds


AGREED = "fkd_agreed_across_ranks"  # attribute set on a rank's own error once every rank knows it


def agreed_elsewhere(exc: BaseException) -> bool:
    """Whether ``exc`` is an error every rank raises together, said by rank 0, not by this rank."""
    return (isinstance(exc, RankFailed) and not exc.shown) or (getattr(exc, AGREED, False)
                                                              and os.environ.get("RANK", "0") not in ("", "0"))


def mark_agreed(exc: BaseException) -> BaseException:
    """Mark an error that every rank raises alike (found after a collective): rank 0 alone says it."""
    setattr(exc, AGREED, True)
    return exc


def agree(error: Exception | None, env: DistEnv, device: str) -> None:
    """A collective every rank calls with its error or None. If any rank failed, every rank raises:
    the lowest failing rank its own error, rank 0 a :class:`RankFailed` naming that rank and its
    message (when it is not rank 0 itself), the others a silent :class:`RankFailed`. Without this, a
    rank that raises alone leaves the others waiting in their next collective. A plain run: no-op."""
    if not env.active:
        return
    import torch
    import torch.distributed as dist

    on = collective_device(device)
    failing = torch.tensor([env.rank if error is not None else env.world_size], dtype=torch.int64, device=on)
    dist.all_reduce(failing, op=dist.ReduceOp.MIN)
    first = int(failing.item())
    if first == env.world_size:
        return
    message = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=on)
    if env.rank == first:
        text = f"{type(error).__name__}\n{first_line(error, MESSAGE_BYTES // 4)}".encode()[:MESSAGE_BYTES]
        message[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(on)
    dist.broadcast(message, src=first)
    if env.rank == first:
        raise mark_agreed(error)
    kind, _, text = bytes(message.cpu().numpy()).rstrip(b"\0").decode("utf-8", errors="replace").partition("\n")
    raise RankFailed(f"rank {first} of {env.world_size}: {text}", shown=env.is_main, kind=kind)


@contextmanager
def agreed(env: DistEnv, device: str) -> Iterator[None]:
    """Every rank runs the block, then all agree whether each succeeded (:func:`agree`): an error
    on any rank is raised on all of them, so none is left waiting in a collective."""
    try:
        yield
    except Exception as exc:
        agree(exc, env, device)
        raise
    agree(None, env, device)
