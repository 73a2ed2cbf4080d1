"""``fkd-convert``: command line of the converter (``convert``, plus ``verify`` and ``inspect``).

Only the standard library is imported until the arguments are parsed, so that ``--help`` and
argument errors answer at once (torch takes seconds to import).
"""

from __future__ import annotations

import argparse
import sys

from fkd_shards.common.cli import parse_size, run_command
from fkd_shards.common.ranges import add_ranged
from fkd_shards.common.text import escape
from fkd_shards.common.version import VERSION

PROG = "fkd-convert"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Pack an SRe2L relabel output and its synthetic images into ordered, verifiable "
                    "WebDataset shards plus a manifest (a local directory or an s3://, gs://, https:// "
                    "prefix). Other commands: 'fkd-convert verify LOCATION' re-hashes every shard; "
                    "'fkd-convert inspect LOCATION' summarises a set.",
        epilog="Example: fkd-convert --train-dir syn_data/ --fkd-path FKD_soft_label/ --output shards/")
    p.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    data = p.add_argument_group("input")
    data.add_argument("--train-dir", required=True, metavar="DIR",
                      help="ImageFolder of the synthetic images (class folders, any image names)")
    data.add_argument("--fkd-path", required=True, metavar="DIR",
                      help="the relabel output: epoch_<e>/batch_<b>.tar files")
    add_ranged(data, "--input-size", default=None, metavar="S",
                      help="crop size in px the relabel step used (224 for ImageNet); default: inferred "
                           "when every image has one square size, else required")
    add_ranged(data, "--fkd-seed", default=42, metavar="SEED",
                      help="seed of the relabel step's sampler (default: 42, SRe2L's)")
    add_ranged(data, "--epochs", default=None, metavar="E",
                      help="convert only the first E epochs (default: all)")
    out = p.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="LOCATION", help="directory or URL of the shard set")
    out.add_argument("--shard-size", type=parse_size, default=parse_size("64MB"), metavar="SIZE",
                     help="start a new shard past this size (default: 64MB; a reader holds about two "
                          "label shards in memory)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace a shard set written there before (only the files its manifest or "
                          "progress file names are removed)")
    out.add_argument("--label-codec", default="raw", metavar="CODEC",
                     help="raw (bit-exact, default), int8 (per-row affine) or topk:K (the K largest logits)")
    add_ranged(out, "--codec-temperature", default=20.0, metavar="T",
                     help="training temperature whose softmax mass topk:K keeps for the other classes "
                          "(default: 20)")
    checks = p.add_argument_group("checks")
    add_ranged(checks, "--min-alignment", default=None, metavar="R",
                        help="refuse the set when an epoch's replay alignment (share of rows whose teacher "
                             "argmax is the image's class or its mix partner's) is below R; default: a "
                             "quarter of the way from chance to 1; 0 accepts any alignment")
    _check_teacher_flags(checks)
    system = p.add_argument_group("system")
    add_ranged(system, "--workers", key="fkd-convert --workers", default=8, metavar="N",
                        help="threads reading files ahead (default: 8)")
    system.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_teacher_flags(group) -> None:
    group.add_argument("--check-teacher", nargs=2, metavar=("MODEL", "WEIGHTS"), default=None,
                       help="prove that the images are the ones the labels were computed from: recompute a few "
                            "batches with the relabel teacher (a torchvision name or timm:NAME, and its weights "
                            "file) on the stored model input and compare with the stored labels; the result goes "
                            "into the manifest (without it, images are matched by class only)")
    add_ranged(group, "--check-batches", default=4, metavar="K",
                       help="batches --check-teacher recomputes, spread over the epochs (default: 4)")


def _verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} verify", description="Re-read and re-hash every shard of a set "
                                "against its manifest; with --check-teacher, also recompute a few batches.")
    p.add_argument("location", help="directory or URL of the shard set")
    _check_teacher_flags(p)
    args = p.parse_args(argv)
    from fkd_shards import shards

    s = shards.ShardSet(args.location)
    s.verify()
    total = sum(x.bytes for x in s.manifest.shards)
    print(f"{escape(args.location)}: OK, {len(s.manifest.shards)} shards, {total / 1e6:.1f} MB verified")
    if args.check_teacher:
        from .teacher_check import check_teacher, load_check_teacher

        m = s.manifest
        check_teacher(s, load_check_teacher(*args.check_teacher, input_size=m.input_size, width=m.soft_label_width,
                                            batches=args.check_batches))
    else:
        print(f"images: proven {s.manifest.label_source()}")
    return 0


def _inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} inspect", description="Summarise a shard set from its manifest "
                                "(for a picture of a batch: fkd-train inspect).")
    p.add_argument("location", help="directory or URL of the shard set")
    args = p.parse_args(argv)
    from fkd_shards import shards

    manifest = shards.ShardSet(args.location).manifest
    print(f"location        {escape(args.location)}")
    print(manifest.describe())
    return 0


def _convert(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from fkd_shards import shards

    from .pipeline import ConvertOptions, convert

    options = ConvertOptions(
        train_dir=args.train_dir, fkd_path=args.fkd_path, output=args.output, input_size=args.input_size,
        fkd_seed=args.fkd_seed, epochs=args.epochs, shard_bytes=args.shard_size, workers=args.workers,
        overwrite=args.overwrite, min_alignment=args.min_alignment, progress=not args.no_progress,
        label_codec=args.label_codec, codec_temperature=args.codec_temperature,
        check_teacher=None if args.check_teacher is None else tuple(args.check_teacher),
        check_batches=args.check_batches,
    )
    manifest = convert(options)
    n = len(manifest.shards)
    total = sum(s.bytes for s in manifest.shards)
    print(f"wrote {n} shards ({total / 1e6:.1f} MB) and {shards.MANIFEST_NAME} to {escape(options.output)}: "
          f"N={manifest.num_images}, S={manifest.input_size}, B={manifest.batch_size}, E={manifest.epochs}, "
          f"mix={manifest.mix_type}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0, 1 for bad input (one line on stderr), 2 for bad
    flags (argparse's usage message), 130 when interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = {"verify": _verify, "inspect": _inspect}.get(argv[0] if argv else "", None)
    return run_command(PROG, lambda: command(argv[1:]) if command else _convert(argv), _user_errors,
                       "interrupted; no manifest written, so nothing is taken for a complete set")


def _user_errors() -> tuple[type, ...]:
    """Errors about the input, the output or the machine, as opposed to bugs (which keep their traceback)."""
    from fkd_shards import shards

    from .errors import ConvertError

    return ConvertError, shards.ManifestError, shards.ShardError, shards.ResumeError, OSError
