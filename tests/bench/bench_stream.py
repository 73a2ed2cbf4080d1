"""Benchmark of the data path: the original's per-image path versus BatchStream, same data, same run.

    python tests/bench/bench_stream.py [--images 2000] [--epochs 2] [--batch-size 256] [--workers 0 1 2]

Each configuration runs in its own subprocess (clean peak RSS of the process tree, workers
included). Prints images/s, time to first batch, peak RSS and the ratio to the original at equal
workers; checks that both produce identical model inputs. Not a test: nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

from common import PeakTreeRss, make_fixture, now, print_table


def _run_one(a) -> dict:
    import torch

    torch.set_num_threads(1)
    root = os.path.join(a.workdir, f"stream-{a.images}-{a.epochs}-{a.batch_size}")
    train_dir, fkd_path, samples = make_fixture(root, images=a.images, classes=a.classes, size=224,
                                                batch_size=a.batch_size, epochs=a.epochs, width=a.width)
    num_batches = math.ceil(len(samples) / a.batch_size)
    with PeakTreeRss() as rss:
        start = now()
        if a.one == "original":
            from convert.replay import epoch_orders

            from original_path import original_batches

            orders = list(epoch_orders(len(samples), 42, a.epochs))
            tasks = [(e, b, orders[e][b * a.batch_size:(b + 1) * a.batch_size].tolist())
                     for e in range(a.epochs) for b in range(num_batches)]
            batches = (x for x, _, _ in original_batches(samples, fkd_path, tasks, 224, a.workers))
        else:
            from convert import ConvertOptions, convert
            from train.stream import BatchStream

            shard_dir = os.path.join(root, "shards")
            if not os.path.exists(os.path.join(shard_dir, "manifest.json")):
                convert(ConvertOptions(train_dir, fkd_path, shard_dir, overwrite=True, progress=False),
                        log=lambda *_: None)
            start = now()  # conversion is a one-off; the stream's own start-up (reading images) counts
            stream = BatchStream(shard_dir, workers=a.workers)
            batches = (b.model_input("cpu") for b in stream)
        first, count, checksum = None, 0, 0.0
        for x in batches:
            if first is None:
                first = now() - start
            count += x.shape[0]
            checksum += float(x.double().sum())
        seconds = now() - start
    return {"images_per_s": count / seconds, "first_batch_s": first, "peak_rss_mb": rss.peak / 1e6,
            "checksum": checksum, "images": count}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    p.add_argument("--one", choices=["original", "stream"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        a.workers = a.workers[0]
        print(json.dumps(_run_one(a)))
        return
    rows = []
    for workers in a.workers:
        results = {}
        for mode in ("original", "stream"):
            cmd = [sys.executable, __file__, "--one", mode, "--workers", str(workers),
                   "--images", str(a.images), "--classes", str(a.classes), "--epochs", str(a.epochs),
                   "--batch-size", str(a.batch_size), "--width", str(a.width), "--workdir", a.workdir]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
        same = results["original"]["checksum"] == results["stream"]["checksum"]
        for mode in ("original", "stream"):
            r = results[mode]
            ratio = r["images_per_s"] / results["original"]["images_per_s"]
            rows.append([mode, workers, f"{r['images_per_s']:.0f}", f"{ratio:.2f}x",
                         f"{r['first_batch_s']:.2f}", f"{r['peak_rss_mb']:.0f}", "yes" if same else "NO"])
    print_table(f"data path: {a.images} JPEGs 224px -> 224px crops, B={a.batch_size}, {a.epochs} epochs, "
                f"CutMix, {os.cpu_count()} CPUs (model input on CPU, no model)",
                ["path", "workers", "images/s", "vs original", "first batch s", "peak RSS MB",
                 "identical inputs"], rows)


if __name__ == "__main__":
    main()
