"""Label codecs on a relabel output: bytes per batch, size ratio to raw, and the KL divergence of the
training target at temperature T (mean and max per image).

    python tests/bench/bench_codecs.py --fkd-path FKD_soft_label/ [--epochs 2] [-T 20]
    python tests/bench/bench_codecs.py            # a generated fixture (random logits, 1,000 classes)

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from fkd_shards.convert.codec_cost import measure
from fkd_shards.convert.sre2l import load_batch, scan_layout

from common import make_fixture, print_table

CODECS = ["raw", "int8", "topk:100", "topk:50", "topk:10"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fkd-path", default=None, help="a relabel output (default: a generated fixture)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of batch files to measure")
    p.add_argument("-T", "--temperature", type=float, default=20.0)
    p.add_argument("--codecs", nargs="+", default=CODECS)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    a = p.parse_args()
    fkd_path = a.fkd_path
    if fkd_path is None:
        root = os.path.join(a.workdir, "convert-2000-8-256-1000")
        _, fkd_path, _ = make_fixture(root, images=2000, classes=100, size=224, batch_size=256, epochs=8,
                                      width=1000)
    layout = scan_layout(fkd_path)
    sizes = {c: [] for c in a.codecs}
    kls = {c: [] for c in a.codecs}
    width = None
    for epoch in range(min(a.epochs, layout.epochs)):
        for b in range(layout.batches_per_epoch):
            soft = load_batch(layout.batch_path(epoch, b), input_size=10**6).soft_labels
            width = soft.shape[1]
            for codec in a.codecs:
                size, kl = measure(codec, soft, a.temperature)
                sizes[codec].append(size / len(soft))
                kls[codec].append(kl)
    raw = np.mean(sizes["raw"]) if "raw" in sizes else None
    rows = []
    for codec in a.codecs:
        per_image = np.mean(sizes[codec])
        kl = np.concatenate(kls[codec])
        rows.append([codec, f"{per_image:.0f}", f"{raw / per_image:.1f}x" if raw else "-",
                     f"{kl.mean():.2e}", f"{kl.max():.2e}"])
    print_table(f"label codecs on {fkd_path}: {width} classes, T={a.temperature:g}",
                ["codec", "bytes per image", "smaller than raw", "mean KL", "max KL"], rows)


if __name__ == "__main__":
    main()
