"""Crop, resize and flip for whole batches in torch, on the training device: the twin of
:mod:`.crop`, bit-identical to Pillow's fixed-point two-pass bilinear resampling
(``libImaging/Resample.c``) for crops that are not taller than the output.

Pillow computes per output pixel filter weights in double precision, normalises them, turns them into
fixed point with 22 fractional bits, resamples rows first (rounded and clipped to uint8), then
columns. The weights are computed here the same way (numpy float64, same operations, same order); the
integer sums run in int32 on the device, where integer arithmetic is exact. Pillow 13 resamples
columns first when a resize shrinks the height much more than the width (python-pillow/Pillow#9549),
so :class:`DeviceCropper` makes crops taller than the output with PIL (:mod:`.crop`) on the CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from fkd_shards.shards.boxes import pixel_boxes

from .batch import to_device
from .crop import check_boxes, crop_resize_flip
from .images import ImageSource

PRECISION_BITS = 32 - 8 - 2
HALF = 1 << (PRECISION_BITS - 1)


@functools.lru_cache(maxsize=8192)
def bilinear_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` (bilinear, box ``(0, in_size)``) and 8-bit normalisation:
    first input index (out_size,) and int64 fixed-point weights (out_size, ksize).

    Cached, as read-only arrays: a crop's tables depend only on its side and the output size, and a
    set's crops have a few hundred distinct sides, so after the first batches each is a lookup."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    inv = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    weights = np.zeros((out_size, ksize))
    total = np.zeros(out_size)
    for x in range(ksize):
        arg = np.abs(((x + xmin) - center + 0.5) * inv)
        w = np.where((arg < 1.0) & (x < xmax), 1.0 - arg, 0.0)
        weights[:, x] = w
        total = total + w  # in tap order, as Pillow sums
    safe = np.where(total == 0.0, 1.0, total)
    weights = np.where(total[:, None] != 0.0, weights / safe[:, None], weights)
    fixed = np.trunc(0.5 + weights * (1 << PRECISION_BITS)).astype(np.int64)
    xmin.flags.writeable = fixed.flags.writeable = False
    return xmin, fixed


def _stacked(tables: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(kk.shape[1] for _, kk in tables)
    starts = np.stack([start for start, _ in tables])
    weights = np.stack([np.pad(kk, ((0, 0), (0, width - kk.shape[1]))) for _, kk in tables])
    return starts, weights


@dataclass
class HostTables:
    """The host's share of a batch of device crops, made before the device is asked for anything:
    every index and weight in one int64 buffer (pinned for CUDA), and per chunk of crops the shapes
    of its arrays in that buffer and the rows its horizontal pass covers."""

    buffer: torch.Tensor
    chunks: list[tuple[list[tuple[int, ...]], int]]
    count: int
    size: int


def host_tables(offsets: np.ndarray, shapes: np.ndarray, *, samples: np.ndarray, boxes: np.ndarray,
                flips: np.ndarray, size: int, pin: bool, chunk: int = 32) -> HostTables:
    """:class:`HostTables` of PIL's crop, bilinear resize and flip of ``boxes`` of images ``samples``.

    ``offsets``/``shapes``: where each image's RGB pixels (H, W, 3) start in the flat pixel buffer and
    its (H, W); ``boxes``: from :func:`fkd_shards.shards.boxes.pixel_boxes`, none without pixels and
    none taller than ``size``. Pixels of a box reaching outside its image are black, as PIL's crop
    makes them."""
    arrays, chunks = [], []
    for start in range(0, len(samples), chunk):
        part = slice(start, start + chunk)
        made, rows = _tables(offsets[samples[part]], shapes[samples[part]], boxes[part], flips[part], size)
        arrays += made
        chunks.append(([a.shape for a in made], rows))
    flat = np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays]) if arrays else np.zeros(0, np.int64)
    buffer = torch.from_numpy(flat)
    return HostTables(buffer.pin_memory() if pin else buffer, chunks, len(samples), size)


def resample(flat: torch.Tensor, tables: HostTables) -> torch.Tensor:
    """uint8 (n, 3, size, size) on ``flat``'s device from prepared ``tables``: one copy of the
    tables, which does not wait for the device, then both resampling passes, chunk by chunk."""
    out = torch.empty((tables.count, 3, tables.size, tables.size), dtype=torch.uint8, device=flat.device)
    if not tables.count:
        return out
    pieces = iter(to_device(tables.buffer, flat.device).split(
        [math.prod(shape) for shapes, _ in tables.chunks for shape in shapes]))
    start = 0
    for shapes, rows in tables.chunks:
        count = shapes[0][0]
        out[start:start + count] = _resample(flat, [next(pieces).view(shape) for shape in shapes], rows, tables.size)
        start += count
    return out


def _tables(offsets, shapes, boxes, flips, size) -> tuple[list[np.ndarray], int]:
    """The host's share of one chunk of crops: source positions and fixed-point weights of both
    passes (numpy, as Pillow computes them), and the rows the horizontal pass covers."""
    heights, widths = shapes[:, 0], shapes[:, 1]
    crop_w, crop_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    x_start, x_weights = _stacked([bilinear_coefficients(int(w), size) for w in crop_w])
    y_start, y_weights = _stacked([bilinear_coefficients(int(h), size) for h in crop_h])
    tap_x = np.minimum(x_start[:, :, None] + np.arange(x_weights.shape[2]), (crop_w - 1)[:, None, None])
    tap_y = np.minimum(y_start[:, :, None] + np.arange(y_weights.shape[2]), (crop_h - 1)[:, None, None])
    arrays = [boxes[:, 0], boxes[:, 1], heights, widths, offsets, tap_x, x_weights, tap_y, y_weights, flips]
    return arrays, int(crop_h.max())


def _resample(flat, arrays, rows, size) -> torch.Tensor:
    device = flat.device
    left, top, heights, widths, offsets, tap_x, x_weights, tap_y, y_weights, flips = arrays
    n = len(left)
    # Horizontal pass over every row of each crop: (n, rows, size, 3), rounded and clipped to uint8.
    src_x = left[:, None, None] + tap_x                                   # (n, size, kx)
    src_y = top[:, None] + torch.arange(rows, device=device)              # (n, rows)
    inside = (((src_x >= 0) & (src_x < widths[:, None, None]))[:, None, :, :, None]
              & ((src_y >= 0) & (src_y < heights[:, None]))[:, :, None, None, None])
    index = (offsets[:, None, None, None, None]
             + (src_y[:, :, None, None, None] * widths[:, None, None, None, None]
                + src_x[:, None, :, :, None]) * 3
             + torch.arange(3, device=device))
    pixels = torch.where(inside, flat[torch.where(inside, index, 0)].to(torch.int32), 0)
    acc = (pixels * x_weights.to(torch.int32)[:, None, :, :, None]).sum(dim=3, dtype=torch.int32)
    horizontal = ((acc + HALF) >> PRECISION_BITS).clamp(0, 255)
    # Vertical pass: (n, size, size, 3).
    picked = horizontal[torch.arange(n, device=device)[:, None, None], tap_y]  # (n, size, ky, size, 3)
    acc = (picked * y_weights.to(torch.int32)[:, :, :, None, None]).sum(dim=2, dtype=torch.int32)
    result = ((acc + HALF) >> PRECISION_BITS).clamp(0, 255).to(torch.uint8)
    result = torch.where((flips != 0)[:, None, None, None], result.flip(2), result)
    return result.permute(0, 3, 1, 2)


@dataclass
class PreparedCrops:
    """A batch's crops as :meth:`DeviceCropper.prepare` leaves them: the tables of the crops the
    device makes and, when some are taller than the output, PIL's crops of those (uint8 (t, S, S, 3))
    and where every crop goes (the device's first, then PIL's)."""

    tables: HostTables
    by_pil: torch.Tensor | None = None
    where: torch.Tensor | None = None


class DeviceMemoryError(ValueError):
    """``--device-crops`` asked for more device memory than is free; the message says how much."""


class DeviceCropper:
    """Crops of a batch on ``device``: uint8 (u, 3, S, S) there. Every image is decoded once and
    copied to the device at construction; crops taller than the output (which Pillow 13 may
    resample columns first) are made by PIL on the CPU and copied over."""

    def __init__(self, source: ImageSource, size: int, device: str):
        source.decode_all()
        self.source, self.size = source, size
        need = source.buffer.numel() * source.buffer.element_size()
        shortage = f"--device-crops keeps every decoded image on {device}: {need / 1e9:.2f} GB"
        remedy = "crop on the CPU instead (leave out --device-crops)"
        if torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            if need > free:
                raise DeviceMemoryError(f"{shortage}, and {free / 1e9:.2f} GB are free there; {remedy}")
        try:
            self.pixels = source.buffer.to(device)
        except torch.OutOfMemoryError:
            raise DeviceMemoryError(f"{shortage}, more than it could allocate; {remedy}") from None

    def prepare(self, samples: np.ndarray, coords: np.ndarray, flips: np.ndarray) -> PreparedCrops:
        """The host's share of a batch's crops, asking nothing of the device: it can run a batch
        ahead, in another thread, while the device works (:func:`.stream.make_batches` does)."""
        shapes = self.source.table.shapes
        boxes = pixel_boxes(coords, shapes[samples, 0], shapes[samples, 1])
        check_boxes(boxes, samples)
        tall = boxes[:, 3] - boxes[:, 1] > self.size
        fast = np.nonzero(~tall)[0]
        pin = self.pixels.device.type == "cuda"
        tables = host_tables(self.source.offsets, shapes, samples=samples[fast], boxes=boxes[fast], flips=flips[fast],
                             size=self.size, pin=pin)
        if not tall.any():  # the usual case
            return PreparedCrops(tables)
        slow = np.nonzero(tall)[0]
        by_pil = torch.from_numpy(np.stack([crop_resize_flip(self.source.rgb(int(samples[k])), boxes[k],
                                                             bool(flips[k]), self.size) for k in slow]))
        where = torch.from_numpy(np.concatenate([fast, slow]))
        return PreparedCrops(tables, by_pil.pin_memory() if pin else by_pil, where.pin_memory() if pin else where)

    def finish(self, prepared: PreparedCrops) -> torch.Tensor:
        """The crops of a batch :meth:`prepare` made ready, on the device: uint8 (u, 3, S, S)."""
        made = resample(self.pixels, prepared.tables)
        if prepared.by_pil is None:  # no scatter, no further copy
            return made
        device = self.pixels.device
        crops = torch.empty((len(prepared.where), 3, self.size, self.size), dtype=torch.uint8, device=device)
        where = to_device(prepared.where, device)
        crops[where[:len(made)]] = made
        crops[where[len(made):]] = to_device(prepared.by_pil, device).permute(0, 3, 1, 2)
        return crops

    def crop(self, samples: np.ndarray, coords: np.ndarray, flips: np.ndarray, shared: bool = False) -> torch.Tensor:
        return self.finish(self.prepare(samples, coords, flips))
