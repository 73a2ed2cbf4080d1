"""Benchmark of fkd-convert: label MB/s at 1 and 2 workers, and output bytes over input bytes.

    python tests/bench/bench_convert.py [--images 2000] [--epochs 8] [--batch-size 256] [--width 1000]

Not a test: it prints a table and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from fkd_shards.convert import ConvertOptions, convert

from common import make_fixture, now, print_table


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    a = p.parse_args()
    root = os.path.join(a.workdir, f"convert-{a.images}-{a.epochs}-{a.batch_size}-{a.width}")
    train_dir, fkd_path, _ = make_fixture(root, images=a.images, classes=a.classes, size=224,
                                          batch_size=a.batch_size, epochs=a.epochs, width=a.width)
    label_bytes, image_bytes = _dir_bytes(fkd_path), _dir_bytes(train_dir)
    rows = []
    for workers in (1, 2):
        output = os.path.join(root, f"shards-{workers}")
        lines = []
        start = now()
        convert(ConvertOptions(train_dir, fkd_path, output, input_size=224, workers=workers, overwrite=True,
                               progress=False),
                log=lines.append)
        seconds = now() - start
        label_line = next(x for x in lines if x.startswith("labels:"))
        label_rate = label_line.split("(")[1].split(" MB/s")[0]
        out_bytes = _dir_bytes(output)
        rows.append([workers, f"{seconds:.2f}", label_rate, f"{label_bytes / 1e6 / seconds:.1f}",
                     f"{out_bytes / (label_bytes + image_bytes):.3f}"])
        shutil.rmtree(output)
    print_table(f"fkd-convert: {a.images} JPEGs 224px ({image_bytes / 1e6:.1f} MB), {a.epochs} epochs x "
                f"B={a.batch_size}, {a.width} fp16 logits ({label_bytes / 1e6:.1f} MB of batch files), "
                f"{os.cpu_count()} CPUs",
                ["workers", "whole run s", "label MB/s (label phase)", "label MB/s (whole run)",
                 "output/input bytes"], rows)


if __name__ == "__main__":
    main()
