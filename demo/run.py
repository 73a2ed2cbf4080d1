"""``fkd-demo [OUT]``: a resnet18 teacher, fkd-relabel, fkd-train, and a comparison with the same
student trained on hard labels, on scikit-learn's bundled digits (``--via-convert``: the relabel
output in SRe2L's own layout, packed by fkd-convert)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fkd_shards.batches.stream import BatchStream
from fkd_shards.common.cli import run_command
from fkd_shards.common.distributed import DistEnv
from fkd_shards.common.text import escape
from fkd_shards.common.version import VERSION
from fkd_shards.convert.cli import main as convert_main
from fkd_shards.convert.errors import ConvertError
from fkd_shards.convert.pipeline import label_storage
from fkd_shards.models.build import ModelError, build_model
from fkd_shards.relabel.cli import main as relabel_main
from fkd_shards.shards import ShardSet
from fkd_shards.train.checkpoint import build_scheduler
from fkd_shards.train.cli import main as train_main
from fkd_shards.train.config import ConfigError, parse_students, resolve
from fkd_shards.train.config import build_parser as build_parser_of_train
from fkd_shards.train.loop import build_optimizer
from fkd_shards.train.report import report, table
from fkd_shards.train.validate import evaluate, val_loader

from .data import load_splits, write_image_folder
from .relabel import write_relabel
from .teacher import MODEL, train_teacher

DEFAULT_MODELS = ("resnet18", "mobilenet_v2")  # two small architectures, as a paper's table has several
MAX_PER_CLASS = 100  # of about 128 images per digit left after the held-out 500; the rest train the teacher


class DemoError(ValueError):
    """A flag out of range, an unusable OUT, or a stage that failed (its own message printed above)."""


def _step(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)


def train_hard_labels(shard_dir: str, val_dir: str, model_name: str, epochs: int) -> float:
    """The same student, batches, crops, mix, optimizer and schedule, but cross-entropy on the hard
    labels (CutMix-weighted by the pasted area) instead of the teacher's soft labels."""
    shard_set = ShardSet(shard_dir)
    m = shard_set.manifest
    args = build_parser_of_train().parse_args(["--shards", shard_dir, "--model", model_name, "--epochs", str(epochs),
                                               "--device", "cpu"])
    cfg = resolve(args, m, DistEnv())
    torch.manual_seed(0)
    model = build_model(model_name, m.soft_label_width, m.input_size)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, 0)
    size = m.input_size
    batches = iter(BatchStream(shard_set, end_epoch=epochs, workers=0))
    for _ in tqdm(range(epochs), desc="hard-label student", unit="epoch", file=sys.stderr):
        model.train()
        for _ in range(m.batches_per_epoch):
            b = next(batches)
            out = model(b.model_input("cpu"))
            x1, y1, x2, y2 = b.mix_bbox
            kept = 1.0 - (x2 - x1) * (y2 - y1) / (size * size)
            loss = kept * F.cross_entropy(out, b.targets) + (1 - kept) * F.cross_entropy(out, b.partner_targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    loader = val_loader(val_dir, m.classes, size, 256, 0, DistEnv())
    return evaluate(model, loader, "cpu", DistEnv())["val/top1"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fkd-demo", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    p.add_argument("out", nargs="?", default="fkd-demo-out", help="working directory (default: ./fkd-demo-out)")
    p.add_argument("--per-class", type=int, default=10, help="distilled images per digit (default: 10)")
    p.add_argument("--epochs", type=int, default=30, help="relabel and training epochs (default: 30)")
    p.add_argument("--teacher-epochs", type=int, default=12, help="teacher training epochs (default: 12)")
    p.add_argument("--batch-size", type=int, default=25, help="relabel batch size (default: 25)")
    p.add_argument("--input-size", type=int, default=24, help="crop size S in px (default: 24)")
    p.add_argument("--model", action="append", default=None, help="student, a torchvision.models name; repeat for "
                   "several, trained on one data pass (default: resnet18 and mobilenet_v2)")
    p.add_argument("--seeds", default="0,1", help="seeds of each student (default: 0,1)")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature (default: 4)")
    p.add_argument("--codecs", nargs="*", default=[], metavar="CODEC",
                   help="also train on labels stored with these codecs (e.g. int8 topk:3)")
    p.add_argument("--via-convert", action="store_true", help="write the relabel output in SRe2L's own pickle "
                   "layout and pack it with fkd-convert, instead of fkd-relabel writing the shards")
    return p


def run(a: argparse.Namespace) -> dict[str, float]:
    """Every stage in order; returns the held-out top-1 (percent) of teacher and students."""
    started = time.perf_counter()
    models = models_of(a)
    first = models[0].partition("@")[0]  # the model's name, without its own learning rate
    train_dir, val_dir = os.path.join(a.out, "train"), os.path.join(a.out, "val")
    splits = load_splits(a.per_class, held_out=500)
    write_image_folder(train_dir, *splits.distilled)
    write_image_folder(val_dir, *splits.held_out)
    _step(f"digits: {len(splits.teacher[1])} teacher images, {len(splits.distilled[1])} distilled "
          f"({a.per_class} per class) in {train_dir}, {len(splits.held_out[1])} held out in {val_dir}", started)
    teacher = train_teacher(*splits.teacher, size=a.input_size, epochs=a.teacher_epochs)
    teacher_path = os.path.join(a.out, "teacher.pth")
    torch.save(teacher.state_dict(), teacher_path)
    classes = sorted(os.listdir(val_dir))
    teacher_acc = evaluate(teacher, val_loader(val_dir, classes, a.input_size, 256, 0, DistEnv()), "cpu",
                           DistEnv())["val/top1"]
    _step(f"teacher ({MODEL}) trained: {teacher_acc:.1f}% on the held-out set; weights in {teacher_path}", started)
    by_codec = {}
    for codec in ["raw", *a.codecs]:
        suffix = "" if codec == "raw" else "-" + codec.replace(":", "")
        shard_dir = os.path.join(a.out, "shards" + suffix)
        if a.via_convert:
            _relabel_via_convert(a, train_dir, teacher, codec, shard_dir, started)
        else:
            _relabel(a, train_dir, teacher_path, codec, shard_dir)
        _step(f"{shard_dir}: soft labels ({codec}) written by {'fkd-convert' if a.via_convert else 'fkd-relabel'}",
              started)
        if codec == "raw":  # every student and seed, on one data pass
            by_codec[codec] = _soft_students(a, shard_dir, val_dir, os.path.join(a.out, "students"),
                                             models=models, seeds=a.seeds)
            _step("students on soft labels: " + ", ".join(f"{m} {v:.1f}%" for m, v in by_codec[codec].items())
                  + " (mean over seeds)", started)
        else:  # the first student alone
            by_codec[codec] = _soft_students(a, shard_dir, val_dir, os.path.join(a.out, "student-soft" + suffix),
                                             models=models[:1], seeds=a.seeds.split(",")[0])[first]
            _step(f"{first} on {codec} soft labels: {by_codec[codec]:.1f}%", started)
    hard_acc = train_hard_labels(os.path.join(a.out, "shards"), val_dir, first, a.epochs)
    _step(f"student on hard labels: {hard_acc:.1f}%; done", started)
    return {"teacher": teacher_acc, "soft": by_codec.pop("raw"), "hard": hard_acc, "codecs": by_codec,
            "teacher_images": len(splits.teacher[1]), "train_images": len(splits.distilled[1]),
            "held_out": len(splits.held_out[1])}


# A teacher trained for a few epochs (--teacher-epochs 1) may sit near chance; the demo shows what
# such a teacher gives rather than refusing it (fkd-relabel and fkd-convert still print the alignment).
_ANY_ALIGNMENT = ("--min-alignment", "0")


def _relabel(a: argparse.Namespace, train_dir: str, teacher_path: str, codec: str, shard_dir: str) -> None:
    """fkd-relabel through its CLI: the teacher labels every batch and the shards are written directly."""
    if relabel_main(["--train-dir", train_dir, "--output", shard_dir, "--teacher", MODEL, teacher_path,
                     "--batch-size", str(a.batch_size), "--epochs", str(a.epochs), "--input-size", str(a.input_size),
                     "--crop-scale", "0.35", "1.0", "--label-codec", codec, "--codec-temperature", str(a.temperature),
                     "--device", "cpu", "-j", "0", *_ANY_ALIGNMENT]) != 0:
        raise DemoError("fkd-relabel failed (its message is above)")


def _relabel_via_convert(a: argparse.Namespace, train_dir: str, teacher, codec: str, shard_dir: str,
                         started: float) -> None:
    """SRe2L's own layout (one pickle per batch), then fkd-convert through its CLI."""
    fkd_path = os.path.join(a.out, "fkd")
    if not os.path.exists(fkd_path):
        write_relabel(train_dir, fkd_path, teacher, epochs=a.epochs, batch_size=a.batch_size,
                      input_size=a.input_size)
        _step(f"relabel output written in the original SRe2L layout: {fkd_path}/epoch_*/batch_*.tar", started)
    if convert_main(["--train-dir", train_dir, "--fkd-path", fkd_path, "--output", shard_dir, "--input-size",
                     str(a.input_size), "--label-codec", codec, "--codec-temperature", str(a.temperature),
                     *_ANY_ALIGNMENT]) != 0:
        raise DemoError("fkd-convert failed (its message is above)")


def _soft_students(a: argparse.Namespace, shard_dir: str, val_dir: str, out_dir: str, *, models: list[str],
                   seeds: str) -> dict[str, float]:
    """fkd-train through its CLI, every model x seed on one data pass; the mean over seeds of each
    model's last held-out top-1."""
    if train_main(["--shards", shard_dir, "--output-dir", out_dir, *[f for m in models for f in ("--model", m)],
                   "--seeds", seeds, "-j", "0", "-T", str(a.temperature), "--val-dir", val_dir,
                   "--val-every", str(a.epochs), "--device", "cpu"]) != 0:
        raise DemoError("fkd-train failed (its message is above)")
    rows = table([out_dir])
    return {row["model"]: row["final_top1"]["mean"] for row in rows}


def models_of(a: argparse.Namespace) -> list[str]:
    """The students' architectures: every --model, or the default two."""
    return list(a.model or DEFAULT_MODELS)


def check_flags(a: argparse.Namespace) -> None:
    """Every flag in range before the first stage runs; :class:`DemoError` names the one that is not."""
    bounds = {"--per-class": (a.per_class, 1, MAX_PER_CLASS), "--epochs": (a.epochs, 1, 1000),
              "--teacher-epochs": (a.teacher_epochs, 1, 1000), "--batch-size": (a.batch_size, 1, 10 * MAX_PER_CLASS),
              "--input-size": (a.input_size, 8, 256)}
    for flag, (value, low, high) in bounds.items():
        if not low <= value <= high:
            raise DemoError(f"{flag} must be in [{low}, {high}], got {value}")
    if not (math.isfinite(a.temperature) and a.temperature > 0):
        raise DemoError(f"--temperature must be finite and positive, got {a.temperature}")
    for codec in a.codecs:
        try:
            label_storage(codec, a.temperature, None)
        except ConvertError as exc:
            raise DemoError(f"--codecs: {exc}") from None
    try:
        parse_students(models_of(a), None, a.seeds)  # seeds, rates, a (model, seed) twice
        for model in models_of(a):  # a name torchvision (or timm) does not know, or crops too small
            build_model(model.partition("@")[0], 10, a.input_size)
    except (ModelError, ConfigError) as exc:
        raise DemoError(str(exc)) from None
    if os.path.lexists(a.out) and not os.path.isdir(a.out):
        raise DemoError(f"{a.out}: exists and is not a directory; choose a new directory")
    if os.path.isdir(a.out) and os.listdir(a.out):
        raise DemoError(f"{a.out}: not empty; choose a new directory")


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0, 1 with one line for a bad flag or a failed stage, 2 for unknown flags, 130 when
    interrupted."""
    a = build_parser().parse_args(argv)
    return run_command("fkd-demo", lambda: _main(a), lambda: (DemoError, OSError),
                       f"interrupted; {escape(a.out)} holds the stages finished so far")


def _main(a: argparse.Namespace) -> int:
    check_flags(a)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    r = run(a)
    print(f"\nThe students, soft labels (fkd-train, T={a.temperature:g}), seeds {escape(a.seeds)}, on one data pass "
          f"(fkd-train report {escape(os.path.join(a.out, 'students'))}):")
    print(report([os.path.join(a.out, "students")]))
    print(f"\nHeld-out accuracy ({r['held_out']} digits, chance 10%), {r['train_images']} training images, "
          f"{a.epochs} epochs:")
    print("| model | top-1 % |\n|---|---|")
    print(f"| teacher ({MODEL}, trained on {r['teacher_images']} images) | {r['teacher']:.1f} |")
    for model, acc in r["soft"].items():
        print(f"| student {escape(model)}, soft labels, mean over seeds | {acc:.1f} |")
    first = escape(models_of(a)[0].partition("@")[0])
    for codec, acc in r["codecs"].items():
        print(f"| student {first}, soft labels stored as {escape(codec)} | {acc:.1f} |")
    print(f"| student {first}, the same batches, hard labels only | {r['hard']:.1f} |")
    return 0
