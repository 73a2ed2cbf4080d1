"""How every command ends: 0; 1 with one line on stderr for a user's mistake or a failed run; 130
when interrupted. Bugs keep their traceback."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from collections.abc import Callable

from .distributed import DEFAULT_TIMEOUT_MIN, RankFailed, agreed_elsewhere
from .ranges import add_ranged
from .text import error_line


def run_command(prog: str, command: Callable[[], int], user_errors: Callable[[], tuple[type, ...]],
                interrupted: str) -> int:
    """Run ``command``; errors of the types ``user_errors()`` names (looked up only when one occurs,
    so that importing a command line stays cheap) become ``prog: error: ...`` on one line."""
    for stream in (sys.stdout, sys.stderr):
        # A path the terminal's encoding cannot show (PYTHONIOENCODING=ascii) is printed escaped, not
        # a UnicodeEncodeError after the work is done.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        return command()
    except KeyboardInterrupt as exc:
        if _rank() == 0:  # Ctrl-C reaches every rank of a torchrun job: one line is enough
            print(f"{prog}: {str(exc) or interrupted}", file=sys.stderr)  # an exception is always truthy
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; further prints (and the exit's flush) would fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{prog}: standard output was closed by its reader; stopped", file=sys.stderr)
        return 1
    except MemoryError:
        print(error_line(prog, "out of memory"), file=sys.stderr)
        return 1
    except Exception as exc:
        if not isinstance(exc, (RankFailed, *user_errors())):
            raise
        if not agreed_elsewhere(exc):  # under torchrun, an error all ranks raise together is said once
            # Said by the rank that met it alone (torchrun then stops the others): name the rank.
            alone = f"rank {_rank()} of {os.environ['WORLD_SIZE']}: " if _rank() and os.environ.get(
                "WORLD_SIZE") and not isinstance(exc, RankFailed) else ""
            print(error_line(prog, f"{alone}{exc}"), file=sys.stderr)
        return 1


def _rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``512MB`` -> 512000000; decimal (KB, MB, GB) and binary (KiB, MiB, GiB) units."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64MB, 1GiB, 100000)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def add_cuda_flags(group) -> None:
    """The flags both training and labelling take for CUDA precision and torchrun."""
    group.add_argument("--tf32", action="store_true", help="TF32 for float32 matrix products and convolutions on "
                       "CUDA (faster, about 10 mantissa bits; default off: true float32, which torch does not "
                       "default to for convolutions)")
    group.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time and pick each convolution's "
                       "algorithm (faster after the first batches; the choice may differ run to run)")
    add_ranged(group, "--dist-timeout", default=DEFAULT_TIMEOUT_MIN,
                       metavar="MIN", help="under torchrun, minutes a rank waits for the others in a collective "
                       f"(default: {DEFAULT_TIMEOUT_MIN}; rank 0 alone prepares a large set before the first one)")
