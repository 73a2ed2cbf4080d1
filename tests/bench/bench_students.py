"""Benchmark: K students in one fkd-train run against K runs of one student each, same set, same flags.

    python tests/bench/bench_students.py [--images 512] [--size 64] [--epochs 3] [--workers 2]
                                         [--models resnet18 mobilenet_v3_small] [--seeds 0,1]

Every run is a fresh ``fkd-train`` process on the CPU (start-up, reading and checking the shards,
decoding and cropping included), timed from outside. The one run of K students pays the data path
once; the K solo runs pay it K times. Prints the wall time of each, the images/s per student
(images of the set x epochs / wall time), the ratio of the summed solo times to the one run, and
whether every student's final weights equal its solo run's. Not a test: nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from common import make_fixture, now, print_table


def _train(flags: list[str], output: str) -> float:
    shutil.rmtree(output, ignore_errors=True)
    started = now()
    subprocess.run([sys.executable, "-m", "fkd_shards.train", *flags, "--output-dir", output], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return now() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    a = p.parse_args()
    from fkd_shards.convert import ConvertOptions, convert

    root = os.path.join(a.workdir, f"students-{a.images}-{a.size}-{a.epochs}")
    train_dir, fkd_path, _ = make_fixture(root, images=a.images, classes=a.classes, size=a.size,
                                          batch_size=a.batch_size, epochs=a.epochs, width=a.classes)
    shard_dir = os.path.join(root, "shards")
    if not os.path.exists(os.path.join(shard_dir, "manifest.json")):
        convert(ConvertOptions(train_dir, fkd_path, shard_dir, input_size=a.size, progress=False),
                log=lambda *_: None)
    common = ["--shards", shard_dir, "--device", "cpu", "-j", str(a.workers), "--epochs", str(a.epochs)]
    models = [flag for model in a.models for flag in ("--model", model)]
    seeds = [int(s) for s in a.seeds.split(",")]
    together = _train([*common, *models, "--seeds", a.seeds], os.path.join(root, "together"))
    rows, solo_total, same = [], 0.0, []
    images = a.images * a.epochs
    for model in a.models:
        for seed in seeds:
            name = f"{model}-seed{seed}"
            seconds = _train([*common, "--model", model, "--seed", str(seed)], os.path.join(root, "solo", name))
            solo_total += seconds
            mine = torch.load(os.path.join(root, "solo", name, "final_weights.pth"), weights_only=True)
            theirs = torch.load(os.path.join(root, "together", name, "final_weights.pth"), weights_only=True)
            same.append(all(torch.equal(mine[k], theirs[k]) for k in mine))
            rows.append([name, f"{seconds:.1f}", f"{images / seconds:.0f}", f"{images / together:.0f}",
                         "yes" if same[-1] else "NO"])
    count = len(rows)
    rows.append([f"all {count}", f"{solo_total:.1f} (sum)", f"{images * count / solo_total:.0f} (all students)",
                 f"{images * count / together:.0f} (all students)", "yes" if all(same) else "NO"])
    print_table(f"{count} students ({', '.join(a.models)} x seeds {a.seeds}), {a.images} images {a.size}px, "
                f"B={a.batch_size}, {a.epochs} epochs, -j {a.workers}, CPU; one run: {together:.1f} s, "
                f"{solo_total / together:.2f}x faster than {count} solo runs",
                ["student", "solo run s", "solo images/s", "in the one run images/s", "same final weights"], rows)


if __name__ == "__main__":
    main()
