"""``fkd-train`` (also ``python -m fkd_shards.train``): parse, check against the shard set, train.
Subcommands: ``inspect`` (summary and a picture of a batch), ``report`` (a table over finished
runs), ``export`` (a plain weights file from a checkpoint).

Only the standard library is imported until the arguments are parsed, so that ``--help`` and flag
errors answer at once (torch takes seconds to import).
"""

from __future__ import annotations

import argparse
import os
import sys

from fkd_shards.common.cli import run_command
from fkd_shards.common.ranges import add_ranged
from fkd_shards.common.text import escape

from .config import build_parser
from .report import FORMATS

PROG = "fkd-train"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0, 1 for bad input or a failed run (one line on
    stderr), 2 for bad flags (argparse's usage message), 130 when interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"inspect": _inspect, "report": _report, "export": _export}
    command = commands.get(argv[0] if argv else "")
    return run_command(PROG, lambda: command(argv[1:]) if command else _train(argv), _user_errors, "interrupted")


def _train(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.train_dir or args.fkd_path:
        raise _config_error("--train-dir/--fkd-path are replaced by --shards: run fkd-convert --train-dir DIR "
                            "--fkd-path DIR --output SHARDS first")
    if not args.shards:
        raise _config_error("--shards LOCATION is required (a shard set written by fkd-convert or fkd-relabel)")
    from fkd_shards import shards
    from fkd_shards.common import distributed

    from .config import resolve_students, wandb_api_key
    from .loop import train

    env = distributed.from_environment()
    shard_set = shards.ShardSet(args.shards, cache_dir=args.cache_dir, cache_labels=args.cache_labels)
    configs = resolve_students(args, shard_set.manifest, env)
    if args.keep_topk != 1000 and env.is_main:
        print(f"{PROG}: note: --keep-topk is accepted for compatibility and unused, as in train_FKD.py")
    distributed.init(env, configs[0].device, configs[0].dist_timeout)
    try:
        train(configs, shard_set, wandb_api_key(args))
    finally:
        distributed.shutdown(env)
    return 0


def _inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} inspect", description="Summarise a shard set; with --batch and "
                                "--out, draw that batch as the model sees it (after crop, flip and mix).")
    p.add_argument("location", help="directory or URL of the shard set")
    add_ranged(p, "--batch", nargs=2, metavar=("EPOCH", "BATCH"), help="the batch to draw")
    p.add_argument("--out", metavar="PNG", help="picture to write (with --batch)")
    add_ranged(p, "--columns", default=8, help="images per row of the picture (default: 8)")
    args = p.parse_args(argv)
    if (args.batch is None) != (args.out is None):
        p.error("--batch and --out go together")
    if args.out is not None:
        _check_picture_path(args.out)
    from fkd_shards import shards

    shard_set = shards.ShardSet(args.location)
    print(f"location        {escape(args.location)}")
    print(shard_set.manifest.describe())
    if args.batch:
        from fkd_shards.batches.stream import batch_at

        from .grid import render_batch, save_png

        epoch, number = args.batch
        m = shard_set.manifest
        if not (0 <= epoch < m.epochs and 0 <= number < m.batches_per_epoch):
            raise _config_error(f"--batch {epoch} {number}: outside the set's epochs [0, {m.epochs}) and batches "
                                f"[0, {m.batches_per_epoch})")
        batch = batch_at(shard_set, epoch, number)
        save_png(render_batch(batch, columns=args.columns), args.out)
        print(f"wrote {escape(args.out)}: epoch {epoch} batch {number}, {len(batch.rows)} images")
    return 0


def _check_picture_path(path: str, flag: str = "--out") -> None:
    """A picture is a PNG: it may replace an earlier picture, never a file of another kind."""
    if not path.lower().endswith(".png"):
        raise _config_error(f"{flag} {path}: the picture is a PNG; name it *.png")
    if os.path.lexists(path):
        try:
            with open(path, "rb") as f:
                is_png = f.read(8) == b"\x89PNG\r\n\x1a\n"
        except OSError:
            is_png = False
        if not is_png:
            raise _config_error(f"{flag} {path}: exists and is not a PNG; choose another name")


def _report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} report", description="One table over finished runs: runs that "
                                "differ only in --seed are grouped, with the mean and sample standard deviation of "
                                "their final and best top-1, and n.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output directories of fkd-train runs: one run, the "
                   "directory of several students (students.json), or a directory holding runs")
    p.add_argument("--format", default="markdown", choices=FORMATS,
                   help="markdown (default; pastes into a README as it is), text, csv (one number per cell), json")
    p.add_argument("--csv", action="store_true", help=argparse.SUPPRESS)  # before --format existed
    p.add_argument("--plot", metavar="PNG", help="also draw the table as a bar chart with error bars (a PNG)")
    args = p.parse_args(argv)
    if args.plot is not None:
        _check_picture_path(args.plot, "--plot")
    from .report import render, table

    rows = table(args.runs)
    print(render(rows, "csv" if args.csv else args.format))
    if args.plot is not None:
        from .plot import plot_table

        plot_table(rows, args.plot)
        print(f"wrote {escape(args.plot)}", file=sys.stderr)
    return 0


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} export", description="Write the model weights of a checkpoint as "
                                "a plain state dict, which torchvision/timm models load directly.")
    p.add_argument("checkpoint", help="a run directory (its model_best.pth.tar, else its checkpoint.pth.tar), or a "
                   "checkpoint or weights file")
    p.add_argument("out", help="weights file to write (refused if it exists)")
    args = p.parse_args(argv)
    if os.path.lexists(args.out):
        raise _config_error(f"{args.out}: exists; choose another name")
    from .checkpoint import export_weights

    said = export_weights(args.checkpoint, args.out)
    print(f"wrote {escape(args.out)}: {said}; model.load_state_dict(torch.load(PATH))")
    return 0


def _config_error(message: str) -> Exception:
    from .config import ConfigError

    return ConfigError(message)


def _user_errors() -> tuple[type, ...]:
    """Errors about the input, the flags, the environment or the machine, as opposed to bugs (which
    keep their traceback)."""
    from fkd_shards import shards
    from fkd_shards.batches.device_crop import DeviceMemoryError
    from fkd_shards.batches.images import ImageError
    from fkd_shards.batches.stream import StreamError
    from fkd_shards.common.device import DeviceError
    from fkd_shards.common.distributed import DistError
    from fkd_shards.common.threads import ThreadsError
    from fkd_shards.models.build import ModelError
    from fkd_shards.models.weights import WeightsError

    from .config import ConfigError
    from .loop import TrainingError
    from .metrics import MetricsError
    from .report import ReportError
    from .rundir import RunDirError
    from .validate import ValidationError

    return (ConfigError, DeviceError, DeviceMemoryError, ThreadsError, ModelError, WeightsError, DistError, ImageError,
            TrainingError,
            MetricsError, ReportError, RunDirError, StreamError, ValidationError, shards.ManifestError,
            shards.ShardError, OSError)
