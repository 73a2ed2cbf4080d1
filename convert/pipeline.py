"""``convert()``: an ImageFolder plus an SRe2L relabel directory in, a verified shard set out."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from fkd_shards import shards

from .alignment import batch_hits, chance_rate, near_chance
from .errors import ConvertError
from .imagefolder import ImageFolderListing, list_image_folder, read_checked_image
from .parallel import ordered_map
from .relabel import RelabelBatch, infer_sizes, load_batch, read_file, scan_layout
from .replay import epoch_orders

VERSION = "0.1.0"


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert and how; mirrors the ``fkd-convert`` flags."""

    train_dir: str
    fkd_path: str
    output: str
    input_size: int = 224
    fkd_seed: int = 42
    epochs: int | None = None
    shard_bytes: int = 512 * 10**6
    workers: int = 1
    overwrite: bool = False
    min_alignment: float | None = None
    progress: bool = True
    label_codec: str = "raw"
    codec_temperature: float = 20.0


def convert(options: ConvertOptions, log=print) -> shards.Manifest:
    """Convert and return the written manifest; raises :class:`ConvertError` for bad input.

    Nothing complete-looking is left behind on failure: shards are removed and no manifest written.
    """
    o = options
    if o.input_size <= 0:
        raise ConvertError(f"--input-size must be positive, got {o.input_size}")
    try:
        shards.codecs.parse(o.label_codec)
    except ValueError as exc:
        raise ConvertError(f"--label-codec: {exc}") from None
    folder = list_image_folder(o.train_dir)
    layout = scan_layout(o.fkd_path)
    first = load_batch(layout.batch_path(0, 0), o.input_size)
    last = load_batch(layout.batch_path(0, layout.batches_per_epoch - 1), o.input_size)
    batch_size, num_images = infer_sizes(layout, first, last)
    if num_images != len(folder.samples):
        raise ConvertError(
            f"{o.fkd_path}: relabel output covers {num_images} images but {o.train_dir} holds "
            f"{len(folder.samples)}"
        )
    epochs = layout.epochs if o.epochs is None else o.epochs
    if not 0 < epochs <= layout.epochs:
        raise ConvertError(f"{o.fkd_path}: --epochs {epochs} asked, the relabel output holds {layout.epochs}")
    width = first.soft_labels.shape[1]
    if width < len(folder.classes):
        raise ConvertError(f"{layout.batch_path(0, 0)}: soft labels have {width} classes, "
                           f"fewer than the {len(folder.classes)} class folders")
    log(f"fkd-convert: N={num_images} images, {len(folder.classes)} classes, B={batch_size}, "
        f"{layout.batches_per_epoch} batches x {epochs} epochs, mix={first.mix_type}, "
        f"soft labels {first.soft_labels.dtype}[{width}], seed {o.fkd_seed}")

    labels = np.asarray(folder.labels, dtype=np.int64)
    pool = _label_pool(o.workers)
    try:
        with shards.ShardSetWriter(o.output, o.shard_bytes, o.overwrite, o.label_codec,
                                   o.codec_temperature) as writer:
            _write_images(writer, folder, o)
            started = time.perf_counter()
            alignment, label_bytes = _write_labels(writer, pool, layout, labels, first, batch_size,
                                                   num_images, epochs, o)
            seconds = time.perf_counter() - started
            log(f"labels: {label_bytes / 1e6:.1f} MB of batch files in {seconds:.2f} s "
                f"({label_bytes / 1e6 / seconds:.1f} MB/s, {o.workers} worker(s))")
            mixed = first.mix_type != "none"
            _report_alignment(alignment, len(folder.classes), mixed, o, log)
            manifest = writer.finish(shards.Manifest(
                num_images=num_images, batch_size=batch_size, num_classes=len(folder.classes),
                soft_label_width=width, epochs=epochs, input_size=o.input_size,
                mix_type=first.mix_type, fkd_seed=o.fkd_seed, classes=list(folder.classes),
                soft_label_dtype=str(first.soft_labels.dtype), shards=[],
                alignment=[round(a, 6) for a in alignment], created_by=f"fkd-convert {VERSION}",
                label_codec=o.label_codec,
                label_codec_temperature=None if o.label_codec == "raw" else o.codec_temperature,
            ))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return manifest


def _write_images(writer: shards.ShardSetWriter, folder: ImageFolderListing, o: ConvertOptions) -> None:
    paths = [path for path, _ in folder.samples]
    with ThreadPoolExecutor(max(1, o.workers)) as pool:
        data = ordered_map(pool, read_checked_image, paths, window=8 * max(1, o.workers))
        for index, (blob, (path, label)) in enumerate(
            tqdm(zip(data, folder.samples), total=len(paths), desc="images", unit="img",
                 disable=not o.progress, file=sys.stderr)
        ):
            writer.add_image(shards.ImageRecord(index=index, label=label, data=blob,
                                                path=os.path.relpath(path, folder.root)))


def _label_pool(workers: int) -> ThreadPoolExecutor | None:
    """Threads that read batch files ahead (I/O releases the GIL). Unpickling stays in the main
    thread: torch's allowlist is process-wide, and worker processes measured slower here, since
    their results must be copied back (see the README's benchmark)."""
    return ThreadPoolExecutor(workers) if workers > 1 else None


def _write_labels(writer, pool, layout, labels, first: RelabelBatch, batch_size: int, num_images: int,
                  epochs: int, o: ConvertOptions) -> tuple[list[float], int]:
    paths = [layout.batch_path(e, b) for e in range(epochs) for b in range(layout.batches_per_epoch)]
    alignment: list[float] = []
    started, total_bytes = time.perf_counter(), 0
    bar = tqdm(total=len(paths), desc="labels", unit="batch", disable=not o.progress, file=sys.stderr)
    try:
        contents = ordered_map(pool, read_file, paths, window=4 * max(1, o.workers))
        orders = epoch_orders(num_images, o.fkd_seed, epochs)
        for epoch in range(epochs):
            order = next(orders)
            hits = 0
            for b in range(layout.batches_per_epoch):
                path = layout.batch_path(epoch, b)
                batch = load_batch(path, o.input_size, next(contents))
                _check_consistent(path, batch, first, min(batch_size, num_images - b * batch_size))
                indices = order[b * batch_size:(b + 1) * batch_size]
                # float32 argmax: numpy's float16 argmax is 4x slower; the same first maximum wins.
                argmax = batch.soft_labels.astype(np.float32).argmax(axis=1)
                hits += batch_hits(labels, indices, argmax, batch.mix_index)
                writer.add_batch(shards.BatchRecord(
                    epoch=epoch, batch=b, indices=indices, coords=batch.coords, flips=batch.flips,
                    mix_index=batch.mix_index, mix_lam=batch.mix_lam, mix_bbox=batch.mix_bbox,
                    soft_labels=batch.soft_labels,
                ))
                total_bytes += batch.file_bytes
                bar.update(1)
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{total_bytes / 1e6 / elapsed:.1f} MB/s")
            alignment.append(hits / num_images)
    finally:
        bar.close()
    return alignment, total_bytes


def _check_consistent(path: str, batch: RelabelBatch, first: RelabelBatch, rows: int) -> None:
    if batch.size != rows:
        raise ConvertError(f"{path}: {batch.size} rows, expected {rows} from B and N")
    if batch.soft_labels.shape[1] != first.soft_labels.shape[1]:
        raise ConvertError(f"{path}: soft labels have {batch.soft_labels.shape[1]} classes, "
                           f"batch 0 of epoch 0 has {first.soft_labels.shape[1]}")
    if batch.soft_labels.dtype != first.soft_labels.dtype:
        raise ConvertError(f"{path}: soft labels are {batch.soft_labels.dtype}, "
                           f"batch 0 of epoch 0 has {first.soft_labels.dtype}")
    if batch.mix_type != first.mix_type:
        raise ConvertError(f"{path}: mix type {batch.mix_type}, batch 0 of epoch 0 has {first.mix_type}")


def _report_alignment(alignment: list[float], num_classes: int, mixed: bool, o: ConvertOptions, log) -> None:
    mean = sum(alignment) / len(alignment)
    chance = chance_rate(num_classes, mixed)
    shown = ", ".join(f"{a:.3f}" for a in alignment[:8]) + (" ..." if len(alignment) > 8 else "")
    log(f"replay alignment (teacher argmax = image class or mix partner's): mean {mean:.3f} "
        f"per epoch [{shown}], chance {chance:.3f}")
    if o.min_alignment is not None and min(alignment) < o.min_alignment:
        worst = int(np.argmin(alignment))
        raise ConvertError(f"{o.fkd_path}: epoch {worst} alignment {alignment[worst]:.3f} is below "
                           f"--min-alignment {o.min_alignment} (wrong --fkd-seed, train dir or image count?)")
    if any(near_chance(a, num_classes, mixed) for a in alignment):
        log(f"WARNING: alignment is near chance ({chance:.3f}): the images and the relabel output "
            f"probably do not match (wrong --fkd-seed, --train-dir or image count). "
            f"Use --min-alignment to make this an error.")
