"""``fkd-convert``: command line of the converter (``convert``, plus ``verify`` and ``inspect``)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from fkd_shards import shards

from .errors import ConvertError
from .pipeline import ConvertOptions, convert

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``512MB`` -> 512000000; decimal (KB, MB, GB) and binary (KiB, MiB, GiB) units."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MB, 1GiB, 100000)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fkd-convert",
        description="Pack an SRe2L relabel output and its synthetic images into ordered WebDataset "
                    "shards plus a manifest. Also: 'fkd-convert verify LOCATION', "
                    "'fkd-convert inspect LOCATION'.",
    )
    p.add_argument("--train-dir", required=True, help="ImageFolder of synthetic images")
    p.add_argument("--fkd-path", required=True, help="relabel output: epoch_<e>/batch_<b>.tar")
    p.add_argument("--output", required=True, help="output directory of the shard set")
    p.add_argument("--input-size", type=int, default=224, help="crop size S the relabel step used (px)")
    p.add_argument("--fkd-seed", type=int, default=42, help="seed of the relabel step's sampler")
    p.add_argument("--epochs", type=int, default=None, help="convert only the first E epochs")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("512MB"),
                   help="roll shards past this size (default 512MB)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes reading batch files (default: CPUs, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set")
    p.add_argument("--min-alignment", type=float, default=None,
                   help="fail when any epoch's replay alignment is below this rate (0..1)")
    p.add_argument("--label-codec", default="raw",
                   help="raw (bit-exact, default), int8 (per-row affine) or topk:K (K largest logits)")
    p.add_argument("--codec-temperature", type=float, default=20.0,
                   help="training temperature T that topk:K keeps the tail mass for (default 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fkd-convert verify",
                                description="Re-hash every shard of a set against its manifest.")
    p.add_argument("location")
    args = p.parse_args(argv)
    s = shards.ShardSet(args.location)
    s.verify()
    total = sum(x.bytes for x in s.manifest.shards)
    print(f"{args.location}: OK, {len(s.manifest.shards)} shards, {total / 1e6:.1f} MB verified")
    return 0


def _inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fkd-convert inspect", description="Summarise a shard set "
                                "(for a picture of a batch: fkd-train inspect).")
    p.add_argument("location")
    args = p.parse_args(argv)
    print(f"location        {args.location}")
    print(shards.ShardSet(args.location).manifest.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status. User errors print one line and return 2 (1 for data)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["verify"]:
            return _verify(argv[1:])
        if argv[:1] == ["inspect"]:
            return _inspect(argv[1:])
        args = build_parser().parse_args(argv)
        options = ConvertOptions(
            train_dir=args.train_dir, fkd_path=args.fkd_path, output=args.output,
            input_size=args.input_size, fkd_seed=args.fkd_seed, epochs=args.epochs,
            shard_bytes=args.shard_size, workers=max(1, args.workers), overwrite=args.overwrite,
            min_alignment=args.min_alignment, progress=not args.no_progress,
            label_codec=args.label_codec, codec_temperature=args.codec_temperature,
        )
        manifest = convert(options)
    except (ConvertError, shards.ManifestError, shards.ShardError, shards.LocationError,
            shards.OutputExistsError) as exc:
        print(f"fkd-convert: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fkd-convert: interrupted; no manifest written", file=sys.stderr)
        return 130
    n = len(manifest.shards)
    total = sum(s.bytes for s in manifest.shards)
    print(f"wrote {n} shards ({total / 1e6:.1f} MB) and {shards.MANIFEST_NAME} to {options.output}")
    return 0
