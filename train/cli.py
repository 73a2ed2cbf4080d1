"""``fkd-train`` (also ``python -m train``): parse, check against the shard set, train."""

from __future__ import annotations

import os
import sys

import shards

from . import distributed
from .checkpoint import CheckpointError
from .config import ConfigError, build_parser, resolve
from .loop import train
from .stream import StreamError


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status. User errors print one line and return 1."""
    args = build_parser().parse_args(argv)
    env = distributed.from_environment()
    try:
        if args.train_dir or args.fkd_path:
            raise ConfigError("--train-dir/--fkd-path are replaced by --shards: run fkd-convert "
                              "--train-dir DIR --fkd-path DIR --output SHARDS first")
        if not args.shards:
            raise ConfigError("--shards LOCATION is required (a shard set written by fkd-convert)")
        shard_set = shards.ShardSet(args.shards)
        api_key = os.environ.get("WANDB_API_KEY") or args.wandb_api_key
        cfg = resolve(args, shard_set.manifest, api_key)
        if args.keep_topk != 1000 and env.is_main:
            print("fkd-train: note: --keep-topk is accepted for compatibility and unused, as in the original")
        device = distributed.init(env, cfg.device)
        try:
            train(cfg if device == cfg.device else _with_device(cfg, device), shard_set, env, api_key)
        finally:
            distributed.shutdown(env)
    except (ConfigError, CheckpointError, StreamError, shards.ManifestError, shards.ShardError,
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
