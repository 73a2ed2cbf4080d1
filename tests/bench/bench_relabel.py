"""Benchmark of fkd-relabel: how close to teacher-bound it runs.

    python tests/bench/bench_relabel.py [--images 512] [--batch-size 64] [--epochs 2] [--workers 0 2]
        [--teacher resnet18] [--size 224] [--device cpu]

Runs fkd-relabel end to end (reading and checking images, writing image shards, drawing, cropping in
workers, the teacher, writing label shards) and, on the same batches, the teacher forward alone on
model inputs prepared beforehand. The ratio says how much of the run is the teacher: 1.0 would be
perfectly teacher-bound. Not a test: nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torchvision

from common import make_fixture, now, print_table


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    a = p.parse_args()
    from fkd_shards import shards
    from fkd_shards.batches.stream import BatchStream
    from fkd_shards.relabel.cli import main as relabel_main

    root = os.path.join(a.workdir, f"relabel-{a.images}-{a.size}")
    train_dir, _, _ = make_fixture(root, images=a.images, classes=a.classes, size=a.size, batch_size=a.batch_size,
                                   epochs=1, width=a.classes)
    torch.manual_seed(0)
    teacher = torchvision.models.get_model(a.teacher, num_classes=a.classes).eval()
    weights = os.path.join(root, "teacher.pth")
    torch.save(teacher.state_dict(), weights)
    rows = []
    for workers in a.workers:
        out = os.path.join(root, f"shards-{workers}")
        shutil.rmtree(out, ignore_errors=True)
        start = now()
        code = relabel_main(["--train-dir", train_dir, "--output", out, "--teacher", a.teacher, weights,
                             "--batch-size", str(a.batch_size), "--epochs", str(a.epochs), "--input-size",
                             str(a.size), "--min-alignment", "0", "-j", str(workers), "--device", a.device,
                             "--no-progress"])
        seconds = now() - start
        assert code == 0
        # The teacher alone, on the very model inputs of the same batches.
        inputs = [b.model_input(a.device) for b in BatchStream(shards.ShardSet(out), workers=0)]
        teacher.to(a.device)
        with torch.no_grad():
            teacher(inputs[0])
            _sync(a.device)
            start = now()
            for x in inputs:
                teacher(x)
            _sync(a.device)
        alone = now() - start
        images = a.images * a.epochs
        rows.append([workers, f"{images / seconds:.0f}", f"{images / alone:.0f}", f"{alone / seconds:.2f}",
                     f"{seconds:.1f}"])
    print_table(f"fkd-relabel: {a.images} images of {a.size} px, {a.teacher} teacher, B={a.batch_size}, {a.epochs} "
                f"epochs, {a.device}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
                ["workers", "relabel images/s (whole run)", "teacher alone images/s", "teacher share",
                 "whole run s"], rows)


if __name__ == "__main__":
    main()
