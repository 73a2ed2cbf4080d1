"""``--device-crops`` A/B inside one process: which of its two host-side measures pays.

    python tests/bench/bench_device_crops.py [--device cuda] [--steps 50]

Images/s of resnet18 training steps (B=256, 224 px, bf16 + channels-last and fp32) with device
crops, four ways: the filter tables computed per crop and the batch prepared in the consuming
thread; the tables cached by crop side; cached and prepared one batch ahead in a background thread
(what ships); and the first way again (drift between the runs). Skips cleanly without CUDA unless
``--device cpu`` is given (a smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from bench_gpu import _steps

from common import make_fixture, print_table


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_device_crops: CUDA is not available; skipping")
        return 0
    from fkd_shards.batches import device_crop, stream
    from fkd_shards.common.distributed import DistEnv
    from fkd_shards.convert import ConvertOptions, convert
    from fkd_shards.shards import ShardSet
    from fkd_shards.train.config import build_parser, resolve

    root = os.path.join(a.workdir, f"crops-{a.images}-{a.batch_size}")
    epochs = max(2, -(-(a.steps + a.warmup) * a.batch_size // a.images))
    train_dir, fkd_path, _ = make_fixture(root, images=a.images, classes=min(100, a.images // 4), size=224,
                                          batch_size=a.batch_size, epochs=epochs, width=1000)
    shard_dir = os.path.join(root, "shards")
    if not os.path.exists(os.path.join(shard_dir, "manifest.json")):
        convert(ConvertOptions(train_dir, fkd_path, shard_dir, input_size=224, overwrite=True, progress=False),
                log=lambda *_: None)
    shard_set = ShardSet(shard_dir)
    cached, ahead = device_crop.bilinear_coefficients, stream._one_ahead
    ways = (("per crop, in line", False, False), ("cached, in line", True, False),
            ("cached, one batch ahead (shipped)", True, True), ("per crop, in line (again)", False, False))
    rows = []
    try:
        for amp in ("bf16", "off"):
            flags = ["--shards", shard_dir, "--model", "resnet18", "--amp", amp, "--device", a.device]
            cfg = resolve(build_parser().parse_args(flags + (["--channels-last"] if amp == "bf16" else [])),
                          shard_set.manifest, DistEnv())
            for name, cache, one_ahead in ways:
                device_crop.bilinear_coefficients = cached if cache else cached.__wrapped__
                cached.cache_clear()
                stream._one_ahead = ahead if one_ahead else (lambda func, items: map(func, items))
                batches = iter(stream.BatchStream(shard_set, workers=0, crop_device=a.device))
                rate, _ = _steps(cfg, shard_set.manifest, batches, a.steps, a.warmup)
                rows.append(["bf16+channels_last" if amp == "bf16" else "fp32", name, f"{rate:.0f}"])
    finally:
        device_crop.bilinear_coefficients, stream._one_ahead = cached, ahead
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU (smoke run)"
    print_table(f"device crops, resnet18, batch {a.batch_size}, 224 px, {a.steps} steps after {a.warmup} "
                f"warm-up ({name})", ["precision", "filter tables, preparation", "img/s"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
