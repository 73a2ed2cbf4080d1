"""``fkd-train`` (also ``python -m fkd_shards.train``): parse, check against the shard set, train."""

from __future__ import annotations

import argparse
import os
import sys

from fkd_shards import shards

from . import distributed
from .checkpoint import CheckpointError
from .config import ConfigError, build_parser, resolve
from .grid import render_batch, save_png
from .loop import train
from .metrics import WandbError
from .stream import BatchStream, StreamError


def inspect(argv: list[str]) -> int:
    """``fkd-train inspect LOCATION [--batch E B --out grid.png]``: summary, and a picture of a batch."""
    p = argparse.ArgumentParser(prog="fkd-train inspect", description="Summarise a shard set; with "
                                "--batch and --out, draw that batch as the model sees it.")
    p.add_argument("location")
    p.add_argument("--batch", type=int, nargs=2, metavar=("EPOCH", "BATCH"))
    p.add_argument("--out", help="PNG to write (with --batch)")
    p.add_argument("--columns", type=int, default=8)
    args = p.parse_args(argv)
    if (args.batch is None) != (args.out is None):
        p.error("--batch and --out go together")
    try:
        shard_set = shards.ShardSet(args.location)
        print(f"location        {args.location}")
        print(shard_set.manifest.describe())
        if args.batch:
            epoch, number = args.batch
            if not 0 <= epoch < shard_set.manifest.epochs:
                raise ConfigError(f"epoch {epoch} outside [0, {shard_set.manifest.epochs})")
            batch = BatchStream(shard_set, epoch, epoch + 1, workers=0).get(epoch, number)
            save_png(render_batch(batch, columns=args.columns), args.out)
            print(f"wrote {args.out}: epoch {epoch} batch {number}, {len(batch.rows)} images "
                  f"(y = hard label, t = teacher's top-1; red where they differ)")
    except (ConfigError, ValueError, shards.ManifestError, shards.ShardError, shards.LocationError,
            OSError) as exc:
        print(f"fkd-train inspect: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status. User errors print one line and return 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:
        return inspect(argv[1:])
    args = build_parser().parse_args(argv)
    env = distributed.from_environment()
    try:
        if args.train_dir or args.fkd_path:
            raise ConfigError("--train-dir/--fkd-path are replaced by --shards: run fkd-convert "
                              "--train-dir DIR --fkd-path DIR --output SHARDS first")
        if not args.shards:
            raise ConfigError("--shards LOCATION is required (a shard set written by fkd-convert)")
        shard_set = shards.ShardSet(args.shards, cache_dir=args.cache_dir, cache_labels=args.cache_labels)
        api_key = os.environ.get("WANDB_API_KEY") or args.wandb_api_key
        cfg = resolve(args, shard_set.manifest, api_key)
        if args.keep_topk != 1000 and env.is_main:
            print("fkd-train: note: --keep-topk is accepted for compatibility and unused, as in the original")
        device = distributed.init(env, cfg.device)
        try:
            train(cfg if device == cfg.device else _with_device(cfg, device), shard_set, env, api_key)
        finally:
            distributed.shutdown(env)
    except (ConfigError, CheckpointError, StreamError, WandbError, shards.ManifestError, shards.ShardError,
            shards.LocationError) as exc:
        print(f"fkd-train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fkd-train: interrupted; the last checkpoint is complete", file=sys.stderr)
        return 130
    return 0


def _with_device(cfg, device: str):
    from dataclasses import replace

    return replace(cfg, device=device)
