"""``convert()``: an ImageFolder plus an SRe2L relabel directory in, a verified shard set out."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from fkd_shards import shards
from fkd_shards.batches.images import upscale_note
from fkd_shards.common.files import within
from fkd_shards.common.prefetch import ordered_map
from fkd_shards.common.ranges import check_range
from fkd_shards.common.version import VERSION
from fkd_shards.shards import format as fmt
from fkd_shards.shards.alignment import batch_hits, chance_rate, implausible_batches
from fkd_shards.shards.alignment import threshold as alignment_threshold
from fkd_shards.shards.boxes import empty_boxes, pixel_boxes

from .errors import ConvertError
from .imagefolder import ImageFolderListing, image_size, list_image_folder, read_checked_image
from .replay import epoch_orders
from .sre2l import RelabelBatch, RelabelLayout, load_batch, read_file, read_sizes, scan_layout
from .teacher_check import DEFAULT_BATCHES, check_teacher, load_check_teacher

DEFAULT_SHARD_BYTES = 64 * 10**6


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert and how; mirrors the ``fkd-convert`` flags."""

    train_dir: str
    fkd_path: str
    output: str
    input_size: int | None = None  # None: inferred from the images when they share one square size
    fkd_seed: int = 42
    epochs: int | None = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    workers: int = 1
    overwrite: bool = False
    min_alignment: float | None = None  # None: the default threshold (a quarter from chance to 1)
    progress: bool = True
    label_codec: str = fmt.CODEC_RAW
    codec_temperature: float = 20.0
    check_teacher: tuple[str, str] | None = None  # (MODEL, WEIGHTS): prove the images with the relabel teacher
    check_batches: int = DEFAULT_BATCHES


def check_options(o: ConvertOptions) -> shards.codecs.Codec:
    """Flag values that cannot work, before any file is read; returns the label codec."""
    for key, value in (("--input-size", o.input_size), ("--fkd-seed", o.fkd_seed), ("--epochs", o.epochs),
                       ("fkd-convert --workers", o.workers), ("--check-batches", o.check_batches)):
        check_range(key, value, ConvertError)
    return label_storage(o.label_codec, o.codec_temperature, o.min_alignment)


def label_storage(label_codec: str, codec_temperature: float, min_alignment: float | None) -> shards.codecs.Codec:
    """The label codec of ``--label-codec``/``--codec-temperature``, and ``--min-alignment`` checked
    (fkd-convert's and fkd-relabel's flags alike)."""
    check_range("--min-alignment", min_alignment, ConvertError)
    check_range("--codec-temperature", codec_temperature, ConvertError)
    try:
        return shards.codecs.parse(label_codec, codec_temperature)
    except shards.CodecError as exc:
        raise ConvertError(f"--label-codec: {exc}") from None


def check_output_apart(output: str, inputs: dict[str, str | None]) -> None:
    """A local output may not be an input or lie inside one (shards written into the image folder
    would become a class; into the relabel directory, stray entries)."""
    if not shards.io.is_local(output):
        return
    for flag, path in inputs.items():
        if path and within(shards.io.local_path(output), path):
            raise ConvertError(f"--output {output}: is, or is inside, {flag} {path}; choose another directory")


def infer_input_size(folder: ImageFolderListing, log) -> int:
    """The crop size when every image is the same square size (SRe2L's 224, CIFAR's 32, ...)."""
    sizes = {image_size(path) for path, _ in folder.samples}
    if len(sizes) == 1:
        (height, width), = sizes
        if height == width:
            log(f"input size S={height} inferred from the images (all {height}x{width}; "
                f"--input-size sets it)")
            return height
    shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:4]) + (" ..." if len(sizes) > 4 else "")
    raise ConvertError(f"{folder.root}: images are not all one square size ({shown}): give the crop size with "
                       f"--input-size")


def convert(options: ConvertOptions, log=print) -> shards.Manifest:
    """Convert and return the written manifest; raises :class:`ConvertError` for bad input.

    Nothing complete-looking is left behind on failure: shards are removed and no manifest written.
    """
    o = options
    codec = check_options(o)
    check_output_apart(o.output, {"--train-dir": o.train_dir, "--fkd-path": o.fkd_path})
    folder = list_image_folder(o.train_dir)
    layout = scan_layout(o.fkd_path)
    input_size = o.input_size or infer_input_size(folder, log)
    first, batch_size = read_sizes(layout, input_size, len(folder.samples), o.train_dir)
    num_images = len(folder.samples)
    epochs = layout.epochs if o.epochs is None else o.epochs
    if not epochs <= layout.epochs:
        raise ConvertError(f"{o.fkd_path}: --epochs {epochs} asked, the relabel output holds {layout.epochs}")
    width = first.soft_labels.shape[1]
    if width < len(folder.classes):
        raise ConvertError(f"{layout.batch_path(0, 0)}: soft labels have {width} classes, "
                           f"fewer than the {len(folder.classes)} class folders")
    mixed = first.mix_type != fmt.MIX_NONE
    threshold = alignment_threshold(o.min_alignment, len(folder.classes), mixed)
    teacher = None if o.check_teacher is None else load_check_teacher(
        *o.check_teacher, input_size=input_size, width=width, batches=o.check_batches)
    log(f"fkd-convert: N={num_images} images, {len(folder.classes)} classes, S={input_size}, B={batch_size}, "
        f"{layout.batches_per_epoch} batches x {epochs} epochs, mix={first.mix_type}, "
        f"soft labels {first.soft_labels.dtype}[{width}], fkd seed {o.fkd_seed}")
    labels = np.asarray(folder.labels, dtype=np.int64)
    with ThreadPoolExecutor(o.workers) as pool:
        with shards.ShardSetWriter(o.output, o.shard_bytes, o.overwrite, codec) as writer:
            shapes = _write_images(writer, pool, folder, o)
            note = upscale_note(shapes, input_size)
            if note:
                log(f"fkd-convert: {note}")
            writer.end_images()
            started = time.perf_counter()
            job = ReplayCheck(layout=layout, labels=labels, shapes=shapes, first=first, batch_size=batch_size,
                              num_images=num_images, epochs=epochs, input_size=input_size, threshold=threshold,
                              threshold_given=o.min_alignment is not None, num_classes=len(folder.classes),
                              fkd_seed=o.fkd_seed)
            alignment, label_bytes = _write_labels(writer, pool, job, o, log)
            seconds = max(time.perf_counter() - started, 1e-9)
            log(f"labels: {label_bytes / 1e6:.1f} MB of batch files in {seconds:.2f} s "
                f"({label_bytes / 1e6 / seconds:.1f} MB/s, {o.workers} worker(s))")
            manifest = writer.finish(shards.Manifest(
                num_images=num_images, batch_size=batch_size, num_classes=len(folder.classes),
                soft_label_width=width, epochs=epochs, input_size=input_size,
                mix_type=first.mix_type, fkd_seed=o.fkd_seed, classes=list(folder.classes),
                soft_label_dtype=str(first.soft_labels.dtype), shards=[],
                alignment=[round(a, 6) for a in alignment], created_by=f"fkd-convert {VERSION}",
                label_codec=codec.spec,
                label_codec_temperature=None if codec.spec == fmt.CODEC_RAW else o.codec_temperature,
                min_alignment=round(threshold, 6),
            ), check=None if teacher is None else (
                lambda staged: replace(staged.manifest, teacher_check=check_teacher(staged, teacher, log))))
    if teacher is None:
        log("images matched to the labels by class only (replay alignment, which another set of the same classes "
            "and images per class also passes); --check-teacher MODEL WEIGHTS proves them")
    return manifest


def _write_images(writer: shards.ShardSetWriter, pool, folder: ImageFolderListing, o: ConvertOptions) -> np.ndarray:
    """Every image in sample order; returns their (height, width), int64 (N, 2)."""
    paths = [path for path, _ in folder.samples]
    shapes = np.zeros((len(paths), 2), dtype=np.int64)
    checked = ordered_map(pool, read_checked_image, paths, ahead=8 * o.workers)
    bar = tqdm(zip(checked, folder.samples), total=len(paths), desc="images", unit="img",
               disable=not o.progress, file=sys.stderr)
    for index, ((data, height, width), (path, label)) in enumerate(bar):
        writer.add_image(shards.ImageRecord(index=index, label=label, data=data, height=height, width=width,
                                            path=folder.relative_path(path)))
        shapes[index] = height, width
    return shapes


@dataclass(frozen=True)
class ReplayCheck:
    """What reading an SRe2L relabel output in order checks each batch file against."""

    layout: RelabelLayout  # the relabel output's files
    labels: np.ndarray  # int64 (N,): each image's class rank
    shapes: np.ndarray  # int64 (N, 2): (height, width) of every image
    first: RelabelBatch  # batch 0 of epoch 0, which every other batch must agree with
    batch_size: int  # B
    num_images: int  # N
    epochs: int  # epochs to read, from 0
    input_size: int  # S, the relabel step's crop size
    threshold: float  # an epoch's alignment below this is refused
    threshold_given: bool  # the threshold's flag was given (else the default threshold), for the message
    num_classes: int  # class folders
    fkd_seed: int  # seed of the sampler replay
    threshold_flag: str = "--min-alignment"  # the flag that sets the threshold, for the messages


class RelabelReader:
    """Every batch file of a relabel output, in order, read ahead on a pool's threads, unpickled and
    checked in the calling thread (torch's safe-globals allowlist is process-wide): unique bytes,
    consistent with batch 0, crops with pixels, and the replay check per epoch. After a full pass,
    ``alignment`` holds each epoch's rate and ``digest`` the SHA-256 over every file's."""

    def __init__(self, check: ReplayCheck, pool, ahead: int):
        self.check, self.pool, self.ahead = check, pool, ahead
        self.alignment: list[float] = []
        self.file_bytes = 0
        self._digest = hashlib.sha256()

    @property
    def digest(self) -> str:
        return self._digest.hexdigest()

    def batches(self) -> Iterator[tuple[str, int, int, np.ndarray, RelabelBatch]]:
        """(path, epoch, batch, sample indices, checked batch) of every batch of every epoch."""
        job, layout = self.check, self.check.layout
        paths = [layout.batch_path(e, b) for e in range(job.epochs) for b in range(layout.batches_per_epoch)]
        contents = ordered_map(self.pool, read_file, paths, ahead=self.ahead)
        orders = epoch_orders(job.num_images, job.fkd_seed, job.epochs)
        seen: dict[int, str] = {}  # 128 bits of each file's SHA-256 -> its path
        for epoch in range(job.epochs):
            order = next(orders)
            counts = []  # (hits, rows) per batch
            for b in range(layout.batches_per_epoch):
                path = layout.batch_path(epoch, b)
                data = next(contents)
                sha = hashlib.sha256(data).digest()
                _check_unique(path, sha, seen)
                self._digest.update(sha)
                batch = load_batch(path, job.input_size, data)
                _check_consistent(path, batch, job.first, fmt.batch_rows(job.num_images, job.batch_size, b))
                indices = order[b * job.batch_size:(b + 1) * job.batch_size]
                _check_crops(path, batch.coords, indices, job.shapes)
                # float32 argmax: numpy's float16 argmax is 4x slower; the same first maximum wins.
                argmax = batch.soft_labels.astype(np.float32).argmax(axis=1)
                counts.append((batch_hits(job.labels, indices, argmax, batch.mix_index), batch.size))
                self.file_bytes += batch.file_bytes
                yield path, epoch, b, indices, batch
            self.alignment.append(sum(hits for hits, _ in counts) / job.num_images)
            _check_alignment(epoch, self.alignment[-1], job)
            _check_batches_belong(epoch, counts, self.alignment[-1], job)


def _write_labels(writer, pool, job: ReplayCheck, o: ConvertOptions, log) -> tuple[list[float], int]:
    """Every batch file, checked by :class:`RelabelReader`, as a batch record."""
    reader = RelabelReader(job, pool, ahead=4 * o.workers)
    started = time.perf_counter()
    with tqdm(total=job.epochs * job.layout.batches_per_epoch, desc="labels", unit="batch", disable=not o.progress,
              file=sys.stderr) as bar:
        for path, epoch, b, indices, batch in reader.batches():
            try:
                writer.add_batch(shards.BatchRecord(
                    epoch=epoch, batch=b, indices=indices, coords=batch.coords, flips=batch.flips,
                    mix_index=batch.mix_index, mix_lam=batch.mix_lam, mix_bbox=batch.mix_bbox,
                    soft_labels=batch.soft_labels))
            except shards.CodecError as exc:
                raise ConvertError(f"{path}: --label-codec {o.label_codec}: {exc}") from None
            bar.update(1)
            bar.set_postfix_str(f"{reader.file_bytes / 1e6 / max(time.perf_counter() - started, 1e-9):.1f} MB/s")
    report_alignment(reader.alignment, job, log)
    return reader.alignment, reader.file_bytes


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


def _check_crops(path: str, coords: np.ndarray, indices: np.ndarray, shapes: np.ndarray) -> None:
    """A box that rounds to no pixel on its image could not be cropped when training reaches it."""
    boxes = pixel_boxes(coords, shapes[indices, 0], shapes[indices, 1])
    empty = empty_boxes(boxes)
    if empty.any():
        k = int(np.argmax(empty))
        height, width = shapes[indices[k]]
        raise ConvertError(f"{path}: the crop box of row {k} rounds to {boxes[k].tolist()} on its {width}x{height} "
                           f"image (sample {int(indices[k])}): no pixels")


def _check_unique(path: str, sha256: bytes, seen: dict[int, str]) -> None:
    """Every batch of the relabel step draws its own crops, so two files with the same bytes are a
    copy or a link standing in for a lost batch: its labels would be trained on the wrong crops."""
    key = int.from_bytes(sha256[:16], "big")
    if key in seen:
        raise ConvertError(f"{path}: the same bytes as {seen[key]}; a copied or linked batch file stands in for "
                           f"a batch of its own")
    seen[key] = path


def _check_batches_belong(epoch: int, counts: list[tuple[int, int]], rate: float, job: ReplayCheck) -> None:
    """Within an epoch that passed the replay check, a batch far below the epoch's rate holds another
    batch's labels (swapped or renamed files). Off with ``--min-alignment 0``, like the epoch check."""
    if job.threshold <= 0:
        return
    chance = chance_rate(job.num_classes, job.first.mix_type != fmt.MIX_NONE)
    flagged = implausible_batches(counts, rate, chance)
    if flagged:
        b = flagged[0]
        hits, rows = counts[b]
        raise ConvertError(f"{job.layout.batch_path(epoch, b)}: replay alignment {hits / rows:.3f} in an epoch at "
                           f"{rate:.3f} (less likely than 1e-12 by chance): another batch's file, swapped or "
                           f"renamed? ({job.threshold_flag} 0 accepts any alignment)")


def _check_alignment(epoch: int, rate: float, job: ReplayCheck) -> None:
    """An epoch whose replay check falls below the threshold stops the conversion: its soft labels
    belong to other images than the replay says (wrong seed, folder or image count)."""
    if rate >= job.threshold:
        return
    how = job.threshold_flag if job.threshold_given else "the default threshold, a quarter of the way from chance to 1"
    raise ConvertError(f"{job.layout.root}: epoch {epoch}'s replay alignment {rate:.3f} is below {job.threshold:.3f} "
                       f"({how}): wrong --fkd-seed, --train-dir or image count? ({job.threshold_flag} 0 accepts "
                       f"any alignment, e.g. for an untrained teacher)")


def report_alignment(alignment: list[float], job: ReplayCheck, log) -> None:
    """One line: the replay check's rate per epoch, chance, and the threshold."""
    mean = sum(alignment) / len(alignment)
    chance = chance_rate(job.num_classes, job.first.mix_type != fmt.MIX_NONE)
    shown = ", ".join(f"{a:.3f}" for a in alignment[:8]) + (" ..." if len(alignment) > 8 else "")
    log(f"replay alignment (teacher argmax = image class or mix partner's): mean {mean:.3f} "
        f"per epoch [{shown}], chance {chance:.3f}, accepted at >= {job.threshold:.3f}")
