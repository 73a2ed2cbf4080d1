"""Benchmark: time to the first batch, the original trainer's data path against BatchStream.

    python tests/bench/bench_first_batch.py [--images 2000 50000] [--size 224 32] [--workers 2]

Each configuration runs in a fresh process (imports excluded, everything after them included: the
original lists the ImageFolder, builds its DataLoader and loads the first batch file; BatchStream
opens the shard set, reads the image shards, and builds its first batch). The page cache is warm
(the first of 3 runs warms it; the fastest run is shown). Not a test: nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

from common import make_fixture, now, print_table


def _run_one(a) -> dict:
    import torch

    torch.set_num_threads(1)
    root = os.path.join(a.workdir, f"first-{a.images}-{a.size}")
    train_dir, fkd_path, _ = make_fixture(root, images=a.images, classes=a.classes, size=a.size,
                                          batch_size=a.batch_size, epochs=1, width=a.classes)
    if a.one == "original":
        from torchvision.datasets import ImageFolder

        from fkd_shards.convert.replay import epoch_orders

        from original_path import original_batches

        start = now()
        samples = ImageFolder(train_dir).samples  # the original trainer lists its folder at start-up
        order = next(epoch_orders(len(samples), 42, 1))
        tasks = [(0, b, order[b * a.batch_size:(b + 1) * a.batch_size].tolist())
                 for b in range(math.ceil(len(samples) / a.batch_size))]
        next(iter(original_batches(samples, fkd_path, tasks, a.size, a.workers, mix=False)))
    else:
        from fkd_shards import shards
        from fkd_shards.batches.stream import BatchStream
        from fkd_shards.convert import ConvertOptions, convert

        shard_dir = os.path.join(root, "shards")
        if not os.path.exists(os.path.join(shard_dir, "manifest.json")):
            convert(ConvertOptions(train_dir, fkd_path, shard_dir, input_size=a.size, overwrite=True,
                                   progress=False), log=lambda *_: None)
        start = now()
        next(iter(BatchStream(shards.ShardSet(shard_dir), workers=a.workers)))
    return {"first_batch_s": now() - start}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, nargs="+", default=[2000, 50000])
    p.add_argument("--size", type=int, nargs="+", default=[224, 32], help="image side per --images entry")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    p.add_argument("--one", choices=["original", "stream"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        a.images, a.size = a.images[0], a.size[0]
        print(json.dumps(_run_one(a)))
        return
    rows = []
    for images, size in zip(a.images, a.size):
        best = {}
        for mode in ("original", "stream"):
            cmd = [sys.executable, __file__, "--one", mode, "--images", str(images), "--size", str(size),
                   "--classes", str(a.classes), "--batch-size", str(a.batch_size), "--workers", str(a.workers),
                   "--workdir", a.workdir]
            runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                               .stdout.strip().splitlines()[-1]) for _ in range(a.repeats)]
            best[mode] = min(r["first_batch_s"] for r in runs)
        rows.append([images, f"{size}x{size}", a.workers, f"{best['original']:.2f}", f"{best['stream']:.2f}",
                     f"{best['stream'] / best['original']:.2f}x"])
    print_table(f"time to the first batch (B={a.batch_size}, {os.cpu_count()} CPUs, warm page cache, best of "
                f"{a.repeats})", ["images", "size", "workers", "original s", "BatchStream s", "vs original"], rows)


if __name__ == "__main__":
    main()
