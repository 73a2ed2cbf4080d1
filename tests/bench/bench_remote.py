"""Benchmark of streaming label shards from local servers: HTTP (a static server in a thread) and
S3 (moto's server), both on 127.0.0.1, against the local directory; and the memory read-ahead costs.

    python tests/bench/bench_remote.py [--images 2000] [--epochs 8] [--shard-size 16MB]

Not a test: it prints a table and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import tracemalloc

from fkd_shards import shards
from fkd_shards.common.cli import parse_size
from fkd_shards.convert import ConvertOptions, convert
from tests.servers import StaticServer

from common import make_fixture, now, print_table


def _stream(location: str, read_ahead: int) -> tuple[float, float]:
    s = shards.ShardSet(location, read_ahead=read_ahead)
    label_bytes = sum(x.bytes for x in s.manifest.shards_of("labels"))
    tracemalloc.start()  # traces Python objects and numpy buffers, on every thread
    start = now()
    for _ in s.batches():
        pass
    seconds = now() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return label_bytes / 1e6 / seconds, peak / 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--shard-size", type=parse_size, default=parse_size("16MB"))
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    a = p.parse_args()
    root = os.path.join(a.workdir, f"convert-{a.images}-{a.epochs}-256-1000")
    train_dir, fkd_path, _ = make_fixture(root, images=a.images, classes=100, size=224, batch_size=256,
                                          epochs=a.epochs, width=1000)
    local = os.path.join(root, f"shards-remote-{a.shard_size}")
    if not os.path.exists(os.path.join(local, "manifest.json")):
        convert(ConvertOptions(train_dir, fkd_path, local, input_size=224, shard_bytes=a.shard_size, overwrite=True,
                               progress=False), log=lambda *_: None)
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(local + "/", "bench/set/", recursive=True)
    http = StaticServer(local)
    rows = []
    try:
        for name, location in (("local directory", local), ("HTTP, 127.0.0.1", http.url),
                               ("S3 (moto), 127.0.0.1", "s3://bench/set")):
            for ahead in ((0,) if location == local else (0, 1)):
                rate, peak = _stream(location, ahead)
                rows.append([name, ahead if location != local else "-", f"{rate:.0f}", f"{peak:.0f}"])
    finally:
        http.stop()
        moto.stop()
    label_shards = shards.ShardSet(local).manifest.shards_of("labels")
    labels = sum(x.bytes for x in label_shards)
    # Label shards never span epochs, so an epoch smaller than --shard-size gives smaller shards.
    print_table(f"streaming {labels / 1e6:.1f} MB of label shards ({len(label_shards)} shards of "
                f"{labels / len(label_shards) / 1e6:.1f} MB on average; --shard-size {a.shard_size / 1e6:.0f} MB), "
                f"records decoded, {os.cpu_count()} CPUs", ["source", "read-ahead shards", "MB/s",
                                                             "peak traced MB while streaming"], rows)


if __name__ == "__main__":
    main()
