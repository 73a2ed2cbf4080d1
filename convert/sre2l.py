"""Reading SRe2L relabel output: the directory layout and one batch file, loaded safely and checked
(the six-item list of each ``epoch_{e}/batch_{b}.tar``, which despite its name is a ``torch.save``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from fkd_shards.common.files import FileMissingError, FileReadError, read_bounded
from fkd_shards.common.text import escape
from fkd_shards.common.torchfiles import TorchFileError, load_weights_only
from fkd_shards.shards import format as fmt
from fkd_shards.shards.boxes import reaching_outside

from .errors import ConvertError

# Canonical decimal numbers only: "epoch_02" or "batch_+1.tar" are not names the relabel step writes.
_EPOCH_DIR = re.compile(r"epoch_(0|[1-9]\d{0,8})")
_BATCH_FILE = re.compile(r"batch_(0|[1-9]\d{0,8})\.tar")
MAX_BATCH_FILE_BYTES = 2**31  # a 1024 x 100,000 float32 batch is 0.4 GB


def _numpy_safe_globals() -> list:
    """Exactly the numpy types a CutMix file's bbox (numpy.int64) or a numpy lambda needs.

    Registered under both the numpy>=2 and the numpy 1.x module names, since files written
    with either may be read.
    """
    scalar = np._core.multiarray.scalar
    return [
        scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype,
        np.dtypes.Int64DType, np.dtypes.Float64DType,
    ]


@dataclass(frozen=True)
class RelabelLayout:
    """The epochs and per-epoch batch count found under ``--fkd-path``."""

    root: str
    epochs: int
    batches_per_epoch: int

    def batch_path(self, epoch: int, batch: int) -> str:
        return os.path.join(self.root, f"epoch_{epoch}", f"batch_{batch}.tar")


@dataclass(frozen=True)
class RelabelBatch:
    """One batch file's content as numpy, plus what the converter needs to check it."""

    coords: np.ndarray
    flips: np.ndarray
    mix_index: np.ndarray | None
    mix_lam: float | None
    mix_bbox: tuple[int, int, int, int] | None
    soft_labels: np.ndarray
    file_bytes: int

    @property
    def size(self) -> int:
        return int(self.coords.shape[0])

    @property
    def mix_type(self) -> str:
        if self.mix_bbox is not None:
            return fmt.MIX_CUTMIX
        return fmt.MIX_MIXUP if self.mix_lam is not None else fmt.MIX_NONE


def scan_layout(root: str) -> RelabelLayout:
    """Find ``epoch_{e}/batch_{b}.tar``; every epoch must hold the same batches 0..nb-1, no gaps."""
    if not os.path.isdir(root):
        raise ConvertError(f"{root}: relabel directory not found")
    epochs = _numbered_entries(root, _EPOCH_DIR, "epoch_{}", want_dirs=True)
    if not epochs:
        raise ConvertError(f"{root}: no epoch_<e> directories (not an SRe2L relabel output)")
    layout_batches = None
    for epoch in range(len(epochs)):
        directory = os.path.join(root, f"epoch_{epoch}")
        batches = _numbered_entries(directory, _BATCH_FILE, "batch_{}.tar", want_dirs=False)
        if not batches:
            raise ConvertError(f"{directory}: no batch_<b>.tar files")
        if layout_batches is None:
            layout_batches = len(batches)
        elif len(batches) != layout_batches:
            extra_or_missing = "missing" if len(batches) < layout_batches else "extra"
            first = min(len(batches), layout_batches)
            raise ConvertError(
                f"{os.path.join(directory, f'batch_{first}.tar')}: {extra_or_missing} batch file "
                f"(epoch 0 has {layout_batches} batches, this epoch {len(batches)})"
            )
    return RelabelLayout(root, len(epochs), layout_batches)


def _numbered_entries(directory: str, pattern: re.Pattern, template: str, want_dirs: bool) -> list[int]:
    """Numbers 0..k-1 of the entries matching ``pattern``; a gap or a stray entry is an error."""
    numbers = []
    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        raise ConvertError(f"{directory}: cannot list ({exc.strerror})") from None
    for entry in entries:
        if entry.startswith("."):
            continue
        match = pattern.fullmatch(entry)
        path = os.path.join(directory, entry)
        if match is None or os.path.isdir(path) != want_dirs:
            raise ConvertError(f"{path}: unexpected entry in a relabel directory")
        numbers.append(int(match.group(1)))
    numbers.sort()
    for expected, found in enumerate(numbers):
        if found != expected:
            raise ConvertError(f"{os.path.join(directory, template.format(expected))}: missing (the numbering runs "
                               f"to {template.format(numbers[-1])}: one is lost, or one is extra)")
    return numbers


def read_file(path: str) -> bytes:
    """A batch file's bytes: a regular file of at most :data:`MAX_BATCH_FILE_BYTES`."""
    try:
        return read_bounded(path, MAX_BATCH_FILE_BYTES)
    except FileMissingError:
        raise ConvertError(f"{path}: missing") from None
    except FileReadError as exc:
        raise ConvertError(str(exc)) from None


def load_batch(path: str, input_size: int, data: bytes | None = None) -> RelabelBatch:
    """Load one relabel file (or its already-read bytes) with ``weights_only=True`` plus the numpy
    scalar types, and check it.

    Not thread-safe: torch's safe-globals allowlist is process-wide, so call it from one thread.
    """
    data = read_file(path) if data is None else data
    try:
        content = load_weights_only(data, path, _numpy_safe_globals())
    except TorchFileError as exc:
        raise ConvertError(str(exc)) from None
    return RelabelBatch(*_check_batch(path, content, input_size), file_bytes=len(data))


def _check_batch(path: str, content: object, input_size: int) -> tuple:
    def fail(message: str) -> None:
        raise ConvertError(f"{path}: {message}")

    if not isinstance(content, (list, tuple)) or len(content) != 6:
        fail("not an SRe2L relabel batch (expected a list of 6 items)")
    coords, flips, mix_index, lam, bbox, soft = content
    coords = _array(path, "coords", coords)
    flips = _array(path, "flip_status", flips)
    soft = _array(path, "soft_label", soft)
    if coords.ndim != 2 or coords.shape[1] != 4 or coords.dtype != np.float32:
        fail(f"coords is {coords.dtype}{list(coords.shape)}, expected float32 (n, 4)")
    n = coords.shape[0]
    if n == 0:
        fail("empty batch")
    if not np.all(np.isfinite(coords)) or coords.min() < 0 or coords.max() > 1:
        fail("coords outside [0, 1]")
    if not (coords[:, 2:] > 0).all():
        fail("coords hold a crop of zero height or width")
    outside = reaching_outside(coords)
    if outside.any():
        fail(f"coords of row {int(np.argmax(outside))} reach outside the image (top + height or left + width "
             "above 1)")
    if flips.shape != (n,) or flips.dtype != np.bool_:
        fail(f"flip_status is {flips.dtype}{list(flips.shape)}, expected bool ({n},)")
    if soft.ndim != 2 or soft.shape[0] != n or soft.shape[1] == 0 or soft.dtype not in (np.float16, np.float32):
        fail(f"soft_label is {soft.dtype}{list(soft.shape)}, expected float16/float32 ({n}, C)")
    if not np.isfinite(soft).all():
        row = int(np.argwhere(~np.isfinite(soft))[0][0])
        fail(f"soft_label row {row} holds a value that is not finite (NaN or inf)")
    if mix_index is not None:
        mix_index = _array(path, "mix_index", mix_index)
        if mix_index.shape != (n,) or mix_index.dtype.kind not in "iu":
            fail(f"mix_index is {mix_index.dtype}{list(mix_index.shape)}, expected integers ({n},)")
        if not np.array_equal(np.sort(mix_index), np.arange(n)):
            fail("mix_index is not a permutation of the batch rows")
        mix_index = mix_index.astype(np.int64)
    if lam is not None:
        if isinstance(lam, bool) or not isinstance(lam, (float, int, np.floating)):
            fail(f"mix_lam is {escape(type(lam).__name__)}, expected a float")
        lam = float(lam)
        if not 0.0 <= lam <= 1.0:
            fail(f"mix_lam {lam} outside [0, 1]")
    if bbox is not None:
        # Integers only (numpy's, as SRe2L's rand_bbox returns them, or Python's): int() would
        # silently truncate a float box.
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in bbox):
            fail("mix_bbox is not 4 integers")
        bbox = tuple(int(v) for v in bbox)
        x1, y1, x2, y2 = bbox
        if not (0 <= x1 <= x2 <= input_size and 0 <= y1 <= y2 <= input_size):
            fail(f"mix_bbox {list(bbox)} outside the {input_size}x{input_size} crop")
    if bbox is not None and (lam is None or mix_index is None):
        fail("mix_bbox without mix_index and mix_lam")
    if (lam is None) != (mix_index is None):
        fail("mix_index and mix_lam must both be present or both be None")
    return coords, flips, mix_index, lam, bbox, soft


def _array(path: str, name: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise ConvertError(f"{path}: {name} is bfloat16, which the shard format does not store")
        # weights_only loading still builds meta, sparse and quantized tensors, which hold no plain array
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            kind = ("quantized" if value.is_quantized else value.device.type if value.device.type != "cpu"
                    else str(value.layout).replace("torch.", ""))
            raise ConvertError(f"{path}: {name} is a {escape(kind)} tensor, expected a dense CPU tensor")
        value = value.detach().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise ConvertError(f"{path}: {name} is a {value.dtype} array, expected numbers")
        return value
    raise ConvertError(f"{path}: {name} is {escape(type(value).__name__)}, expected a tensor")


def read_sizes(layout: RelabelLayout, input_size: int, folder_images: int, train_dir: str) -> tuple[RelabelBatch, int]:
    """(batch 0 of epoch 0, B) with B and N taken from the first and the last batch of epoch 0, as
    the original does; N must be the image folder's ``folder_images``."""
    first = load_batch(layout.batch_path(0, 0), input_size)
    last = load_batch(layout.batch_path(0, layout.batches_per_epoch - 1), input_size)
    batch_size = first.size
    num_images = batch_size * (layout.batches_per_epoch - 1) + last.size
    if last.size > batch_size:
        raise ConvertError(
            f"{layout.batch_path(0, layout.batches_per_epoch - 1)}: {last.size} rows, more than "
            f"batch 0's {batch_size}"
        )
    assert fmt.batches_per_epoch(num_images, batch_size) == layout.batches_per_epoch
    if num_images != folder_images:
        raise ConvertError(f"{layout.root}: relabel output covers {num_images} images but {train_dir} holds "
                           f"{folder_images}")
    return first, batch_size
