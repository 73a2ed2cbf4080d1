"""``fkd-relabel`` (also ``python -m fkd_shards.relabel``, and under torchrun): label the synthetic
images with one or several teachers and write the shard set directly.

Only the standard library is imported until the arguments are parsed, so that ``--help`` and flag
errors answer at once.
"""

from __future__ import annotations

import argparse
import sys

from fkd_shards.common.cli import add_cuda_flags, parse_size, run_command
from fkd_shards.common.ranges import add_ranged
from fkd_shards.common.text import escape
from fkd_shards.common.version import VERSION

PROG = "fkd-relabel"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Label synthetic images with one or several teachers, SRe2L's relabel step with the family's "
                    "knobs as flags, and write a shard set that fkd-train reads.",
        epilog="Examples:\n"
               "  fkd-relabel --train-dir syn/ --output shards/ --teacher resnet18 r18.pth --batch-size 1024 "
               "--epochs 300\n"
               "  fkd-relabel --train-dir syn/ --output shards/ --teacher resnet18 r18.pth --teacher mobilenet_v2 "
               "mb2.pth --batch-size 1024 --epochs 300 --bn-mode train --teacher-chunks 2\n"
               "  fkd-relabel --train-dir syn/ --output shards/ --teacher resnet50 r50.pth --replay FKD_soft_label/ "
               "--input-size 224\n"
               "Several GPUs: torchrun --nproc-per-node=8 -m fkd_shards.relabel ...")
    p.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    data = p.add_argument_group("input")
    data.add_argument("--train-dir", required=True, metavar="DIR", help="ImageFolder of the synthetic images")
    add_ranged(data, "--batch-size", default=None, metavar="B", help="relabel batch size (required unless "
                      "--replay)")
    add_ranged(data, "--epochs", default=None, metavar="E", help="epochs of labels (required unless "
                      "--replay)")
    add_ranged(data, "--input-size", default=None, metavar="S", help="crop size in px; default: inferred "
                      "when every image has one square size (with --replay, give the relabel step's crop size: "
                      "its files do not record it)")
    add_ranged(data, "--fkd-seed", default=42, metavar="SEED", help="seed of the sampler that orders the "
                      "images of each epoch (default: 42, SRe2L's)")
    data.add_argument("--replay", default=None, metavar="FKD_PATH", help="take order, crops, flips and mix from this "
                      "SRe2L relabel output (epoch_<e>/batch_<b>.tar) and compute new soft labels")
    teach = p.add_argument_group("teachers")
    teach.add_argument("--teacher", nargs=2, action="append", default=[], metavar=("MODEL", "WEIGHTS"),
                       help="torchvision model name (or timm:NAME) and a weights file or torchvision weights name; "
                            "repeat for an ensemble")
    teach.add_argument("--teacher-mix", default="mean", metavar="mean|W1,W2,...", help="stored logits = sum of "
                       "w_i * z_i; mean: 1/n each (default); explicit weights are used as given, not normalised")
    teach.add_argument("--bn-mode", default="eval", choices=["eval", "train"], help="train: batch norm on the "
                       "statistics of the forwarded chunk, running statistics untouched (default: eval)")
    add_ranged(teach, "--teacher-chunks", default=1, metavar="K", help="forward each batch in K "
                       "consecutive chunks (2: half-batches, as CV-DD, FADRM, HALD with --bn-mode train; default: 1)")
    teach.add_argument("--amp", default="off", choices=["off", "bf16"], help="teacher forward in bf16 autocast "
                       "(default: off)")
    drawn = p.add_argument_group("draws (not with --replay)")
    drawn.add_argument("--mix-type", default=None, choices=["cutmix", "mixup", "none"], help="batch mix (default: "
                       "cutmix)")
    add_ranged(drawn, "--crop-scale", nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="RandomResizedCrop area range (default: 0.08 1.0; EDC: 0.5 1.0)")
    add_ranged(drawn, "--seed", default=None, help="seed of every draw (default: 0)")
    out = p.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="LOCATION", help="directory or URL of the shard set")
    out.add_argument("--label-dtype", default="float16", choices=["float16", "float32"], help="stored logits' "
                     "dtype (default: float16, SRe2L's --use-fp16)")
    out.add_argument("--label-codec", default="raw", metavar="CODEC", help="raw (default), int8 or topk:K")
    add_ranged(out, "--codec-temperature", default=20.0, metavar="T", help="temperature topk:K keeps "
                     "the tail mass for (default: 20)")
    out.add_argument("--shard-size", type=parse_size, default=parse_size("64MB"), metavar="SIZE",
                     help="start a new shard past this size (default: 64MB)")
    out.add_argument("--overwrite", action="store_true", help="replace a set written there before")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run (the same flags, the same "
                     "teachers and images); with nothing written yet, the run starts")
    add_ranged(out, "--min-alignment", default=None, metavar="R", help="refuse when an epoch's share of "
                     "rows whose new labels' argmax is the image's class or its partner's is below R (default: a "
                     "quarter of the way from chance to 1; 0 accepts any, e.g. for an untrained teacher)")
    add_ranged(out, "--min-replay-alignment", default=None, metavar="R", help="the same for the soft "
                     "labels of --replay's own files, checked before any label is computed (default: a quarter of "
                     "the way from chance to 1; 0 accepts any)")
    system = p.add_argument_group("system")
    system.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    add_ranged(system, "-j", "--workers", default=8, metavar="N", help="crop worker processes (default: 8)")
    system.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ranged(system, "--threads", default=None, metavar="N", help="torch's compute threads (default: "
                        "OMP_NUM_THREADS if set, else the CPUs left after the crop workers, at least 1)")
    add_cuda_flags(system)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0, 1 for bad input (one line on stderr), 2 for bad flags, 130 when interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _run(args), _user_errors,
                       "interrupted; no manifest written; finished shards are kept: continue with --resume")


def _run(args: argparse.Namespace) -> int:
    from fkd_shards.common import distributed

    from .options import RelabelOptions
    from .pipeline import relabel

    options = RelabelOptions(
        train_dir=args.train_dir, output=args.output, teachers=tuple(tuple(t) for t in args.teacher),
        teacher_mix=args.teacher_mix, batch_size=args.batch_size, epochs=args.epochs, input_size=args.input_size,
        mix_type=args.mix_type, crop_scale=tuple(args.crop_scale) if args.crop_scale else None, bn_mode=args.bn_mode,
        teacher_chunks=args.teacher_chunks, seed=args.seed, fkd_seed=args.fkd_seed, label_dtype=args.label_dtype,
        label_codec=args.label_codec, codec_temperature=args.codec_temperature, device=args.device,
        workers=args.workers, amp=args.amp, resume=args.resume, replay=args.replay, shard_bytes=args.shard_size,
        overwrite=args.overwrite, min_alignment=args.min_alignment, min_replay_alignment=args.min_replay_alignment,
        progress=not args.no_progress, threads=args.threads, tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark,
        dist_timeout=args.dist_timeout,
    )
    manifest = relabel(options, distributed.from_environment())
    if manifest is not None:
        total = sum(s.bytes for s in manifest.shards)
        print(f"wrote {len(manifest.shards)} shards ({total / 1e6:.1f} MB) and manifest.json to {escape(args.output)}: "
              f"N={manifest.num_images}, S={manifest.input_size}, B={manifest.batch_size}, E={manifest.epochs}, "
              f"mix={manifest.mix_type}")
    return 0


def _user_errors() -> tuple[type, ...]:
    from fkd_shards import shards
    from fkd_shards.batches.stream import StreamError
    from fkd_shards.common.device import DeviceError
    from fkd_shards.common.distributed import DistError
    from fkd_shards.common.threads import ThreadsError
    from fkd_shards.convert.errors import ConvertError
    from fkd_shards.models.teachers import TeacherError

    from .errors import RelabelError

    return (RelabelError, TeacherError, ConvertError, DeviceError, ThreadsError, DistError, StreamError,
            shards.ManifestError, shards.ShardError, shards.ResumeError, shards.OutputExistsError, OSError)
