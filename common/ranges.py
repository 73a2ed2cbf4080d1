"""One table of the accepted range of every numeric flag of every tool: the argparse type that checks
a value before any work is done (argparse's one usage line and exit status 2), the range ``--help``
shows beside the flag, and the same check for callers of the Python API.

Where two tools share a flag name they share its range; a tool whose flag means something narrower
has its own row (``fkd-convert --workers``). Bounds are the largest values that still make sense on
one machine or one run, not the largest a type can hold: ``--batch-size 10**12`` is a typo, and
allocating for it would end in a traceback.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

from .distributed import MAX_TIMEOUT_MIN
from .threads import MAX_THREADS

MAX_EPOCHS = 100_000  # of labels a tool writes; SRe2L-family recipes use up to 1,000
MAX_INPUT_SIZE = 2048  # px; a crop this size already takes 12 MB per image
MAX_BATCH_SIZE = 1 << 16  # rows of one batch; the field uses 16 to 1,024
MAX_WORKERS = 256  # worker processes or threads of any command; more only contend for the same cores
MAX_CHECK_BATCHES = 10_000  # batches --check-teacher recomputes, and a manifest's teacher_check may list
MAX_SEED = 2**32 - 1  # torch's CPU generator keeps 32 bits: seeds 0 and 2**32 would draw the same


@dataclass(frozen=True)
class Range:
    """[low, high] (``(low, high]`` when ``open_low``), of integers or finite floats."""

    low: float
    high: float
    integer: bool = True
    open_low: bool = False

    def words(self) -> str:
        def shown(v: float) -> str:
            return str(v) if self.integer else f"{v:g}"

        return f"{'(' if self.open_low else '['}{shown(self.low)}, {shown(self.high)}]"

    def holds(self, value: float) -> bool:
        if self.integer and (not isinstance(value, int) or isinstance(value, bool)):
            return False
        if isinstance(value, float) and not math.isfinite(value):  # NaN compares false with everything
            return False
        return (self.low < value if self.open_low else self.low <= value) and value <= self.high


RANGES: dict[str, Range] = {
    "--batch-size": Range(1, MAX_BATCH_SIZE),
    "--epochs": Range(1, MAX_EPOCHS),
    "--start-epoch": Range(0, MAX_EPOCHS - 1),
    "--input-size": Range(1, MAX_INPUT_SIZE),
    "--seed": Range(0, MAX_SEED),
    "--fkd-seed": Range(0, 2**64 - 1),  # replays the original's torch.Generator, which takes 64 bits
    "--val-every": Range(1, MAX_EPOCHS),
    "--gradient-accumulation-steps": Range(1, MAX_BATCH_SIZE),
    "--learning-rate": Range(0, 1e3, integer=False),
    "--adamw-lr": Range(0, 1e3, integer=False),
    "--momentum": Range(0, 1, integer=False),
    "--weight-decay": Range(0, 1e3, integer=False),
    "--adamw-weight-decay": Range(0, 1e3, integer=False),
    "--temperature": Range(0, 1e4, integer=False, open_low=True),
    "--codec-temperature": Range(0, 1e4, integer=False, open_low=True),
    "--keep-topk": Range(1, 1 << 20),
    "--workers": Range(0, MAX_WORKERS),
    "fkd-convert --workers": Range(1, MAX_WORKERS),  # threads reading files: at least one
    "--threads": Range(1, MAX_THREADS),
    "--min-alignment": Range(0, 1, integer=False),
    "--min-replay-alignment": Range(0, 1, integer=False),
    "--teacher-chunks": Range(1, MAX_BATCH_SIZE),
    "--crop-scale": Range(0, 1, integer=False, open_low=True),
    "--check-batches": Range(1, MAX_CHECK_BATCHES),
    "--dist-timeout": Range(1, MAX_TIMEOUT_MIN),
    "--columns": Range(1, 1024),
    "--batch": Range(0, MAX_EPOCHS * MAX_BATCH_SIZE),  # fkd-train inspect EPOCH BATCH
}


class Ranged:
    """The argparse ``type`` of a flag in :data:`RANGES`: parses, then checks the range."""

    def __init__(self, key: str):
        self.key, self.range = key, RANGES[key]
        self.__name__ = "integer" if self.range.integer else "number"  # argparse names the type in its errors

    def __call__(self, text: str) -> int | float:
        try:
            value = int(text) if self.range.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if self.range.integer else 'a number'}: "
                                             f"{text[:40]!r}") from None
        if not self.range.holds(value):
            raise argparse.ArgumentTypeError(f"must be in {self.range.words()}, got {text[:40]}")
        return value


def add_ranged(group, *names: str, key: str | None = None, **kwargs) -> argparse.Action:
    """``group.add_argument(*names, ...)`` for a flag of :data:`RANGES` (``key``: its row, by default
    the last name): its type checks the range, and its help ends with it."""
    key = key or names[-1]
    kwargs["help"] = f"{kwargs.get('help', '')} (range {RANGES[key].words()})".lstrip()
    return group.add_argument(*names, type=Ranged(key), **kwargs)


def check_range(key: str, value: float | None, error: Callable[[str], Exception]) -> None:
    """For the Python API: ``error(message)`` is raised unless ``value`` (None: not given) is in range."""
    if value is not None and not RANGES[key].holds(value):
        raise error(f"{key.split()[-1]} must be in {RANGES[key].words()}, got {value}")
