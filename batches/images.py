"""The synthetic images of a shard set, held in memory, and the one source of their pixels.

:func:`load_images` reads the image shards once (verified, then parsed) into an :class:`ImageTable`:
encoded bytes, class labels and sizes. :class:`ImageSource` hands out RGB pixels with one method,
:meth:`ImageSource.rgb`. With ``cache`` it decodes each image the first time any process asks for it,
into one buffer in shared memory that every crop worker sees: training starts at once, and after the
first epoch no image is decoded again. Without it, every call decodes (as the original trainer does).
Decoding is deterministic, so both give the same pixels.
"""

from __future__ import annotations

import io
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fkd_shards import shards
from fkd_shards.common.text import escape, first_line
from fkd_shards.common.threads import available_cpus
from fkd_shards.shards import format as fmt


class ImageError(ValueError):
    """An image whose bytes do not decode, or decode to another size than recorded."""


@dataclass(frozen=True)
class ImageTable:
    """Every image of a set: encoded bytes, class label and (height, width), by sample index."""

    encoded: list[bytes]
    labels: np.ndarray  # int64 (N,)
    shapes: np.ndarray  # int64 (N, 2): (height, width)
    paths: list[str]

    @property
    def pixel_bytes(self) -> int:
        """Bytes of all images decoded to RGB: H*W*3 each."""
        return int((self.shapes[:, 0] * self.shapes[:, 1] * 3).sum())

    def __len__(self) -> int:
        return len(self.encoded)


def load_images(shard_set: shards.ShardSet) -> ImageTable:
    """Read the image shards (each verified before it is parsed). Sizes come from the records;
    sets written before sizes were recorded have them read from each image's header."""
    encoded, labels, shapes, paths = [], [], [], []
    for record in shard_set.images():
        encoded.append(record.data)
        labels.append(record.label)
        paths.append(record.path)
        shapes.append((record.height, record.width) if record.height else header_size(record.data, record.index))
    return ImageTable(encoded, np.asarray(labels, dtype=np.int64), np.asarray(shapes, dtype=np.int64).reshape(-1, 2),
                      paths)


def upscale_note(shapes: np.ndarray, input_size: int) -> str | None:
    """One line when the crop size exceeds every image's longest side (``shapes``: (N, 2) heights and
    widths): every crop is then upscaled. Legitimate, but a wrong ``--input-size`` looks the same."""
    if len(shapes) and input_size > int(shapes.max()):
        return (f"note: crop size S={input_size} is larger than every image (the longest side is "
                f"{int(shapes.max())} px): every crop is upscaled")
    return None


def header_size(data: bytes, index: int) -> tuple[int, int]:
    """(height, width) from an image's header; nothing is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except UnidentifiedImageError:
        raise ImageError(f"image {index}: not a known image format") from None
    except Exception as exc:  # PIL raises many types for bytes that are not an image
        raise ImageError(f"image {index}: not a readable image ({first_line(exc, 120)})") from None
    if width * height > fmt.MAX_IMAGE_PIXELS:
        raise ImageError(f"image {index}: {width}x{height} is more than {fmt.MAX_IMAGE_PIXELS} pixels")
    return height, width


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """uint8 (H, W, 3): the image opened by content and converted to RGB first, as ImageFolder's
    loader does (palette, 1-bit and alpha images resize differently if converted later)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size[0] * img.size[1] > fmt.MAX_IMAGE_PIXELS:
                raise ValueError(f"{img.size[0]}x{img.size[1]} is more than {fmt.MAX_IMAGE_PIXELS} pixels")
            # convert("RGB") of an RGB image is a plain copy: skipped, the same pixels.
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageError(f"{name}: cannot decode (not a known image format)") from None
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... for broken image data
        raise ImageError(f"{name}: cannot decode ({first_line(exc, 120)})") from None


def shared_bytes(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 tensor in shared memory, allocated lazily (pages appear when written):
    forked workers see every later write, and spawned ones receive it without a copy. Falls back to
    moving an ordinary tensor into shared memory (one copy) where torch lacks ``_new_shared``."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return torch.zeros(max(1, nbytes), dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(max(1, nbytes)))


def shared_memory_free() -> int | None:
    """Bytes free in /dev/shm, where shared tensors live on Linux (a container's is often 64 MB), or
    None where there is none to ask."""
    try:
        info = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return info.f_bavail * info.f_frsize


# x86 keeps stores in program order as other cores see them (TSO), and loads too: a worker that
# sees image k's ready flag also sees its pixels, written before the flag.
_ORDERED_STORES = ("x86_64", "amd64", "i386", "i686", "x86")


class ImageSource:
    """RGB pixels of images ``0..N-1`` by sample index, decoded on demand; see the module docstring."""

    def __init__(self, table: ImageTable, cache: bool, *, shared: bool = True, crop_device: str | None = None,
                 note: str = ""):
        """``shared``: the cache lives in shared memory, for worker processes; without workers it is
        ordinary memory (which /dev/shm's size does not limit). ``crop_device``: the device whose
        crops read these pixels (they are then all decoded and copied there), or None for the CPU.
        ``note``: a line that says how the pixels are kept and why (see :func:`open_pixels`)."""
        self.table = table
        self.cache = cache
        self.shared = shared and cache
        self.crop_device = crop_device
        self.note = note
        sizes = table.shapes[:, 0] * table.shapes[:, 1] * 3
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.buffer = self.ready = None
        if cache:
            allocate = shared_bytes if shared else (lambda n: torch.zeros(max(1, n), dtype=torch.uint8))
            self.buffer = allocate(int(self.offsets[-1]))
            self.ready = allocate(len(table))  # 1 once image k's pixels are in place
            if shared and platform.machine().lower() not in _ORDERED_STORES:
                # Another process may see the flag before the pixels where stores are not kept in
                # order (Arm, POWER): decode everything now, before any worker starts.
                self.decode_all()

    def __len__(self) -> int:
        return len(self.table)

    def rgb(self, k: int) -> np.ndarray:
        """uint8 (H, W, 3), C-contiguous: a view into the shared cache, or a fresh decode."""
        if not self.cache:
            return self._decode(k)
        height, width = self.table.shapes[k]
        start, stop = self.offsets[k], self.offsets[k + 1]
        pixels = self.buffer.numpy()[start:stop]
        ready = self.ready.numpy()
        if not ready[k]:
            # Two processes may decode the same image at once: both write the same bytes, and the
            # flag is set only after the pixels are in place.
            pixels[:] = self._decode(k).reshape(-1)
            ready[k] = 1
        return pixels.reshape(height, width, 3)

    def name(self, k: int) -> str:
        """How messages name image ``k``: its index and its path in the original image folder."""
        return f"image {k} ({escape(self.table.paths[k])})"

    def _decode(self, k: int) -> np.ndarray:
        pixels = decode_rgb(self.table.encoded[k], self.name(k))
        if pixels.shape[:2] != tuple(self.table.shapes[k]):
            raise ImageError(f"{self.name(k)} decodes to {pixels.shape[1]}x{pixels.shape[0]}, its record says "
                             f"{self.table.shapes[k][1]}x{self.table.shapes[k][0]}")
        return pixels

    def decode_all(self, threads: int | None = None) -> None:
        """Fill the whole cache now, on ``threads`` threads (PIL decodes without the GIL)."""
        assert self.cache, "decode_all needs the cache"
        with ThreadPoolExecutor(threads or available_cpus()) as pool:
            list(pool.map(self.rgb, range(len(self))))


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def decode_cache_choice(mode: str, table: ImageTable, local_ranks: int, shared: bool = True) -> tuple[bool, str]:
    """Whether to keep decoded pixels (``mode`` on, off, or auto: when they fit half the available
    memory, shared by the ``local_ranks`` processes on this node, each holding its own copy, and,
    for worker processes (``shared``), the free space of /dev/shm), and a line that says which and why.
    ``on`` with pixels that /dev/shm cannot hold is an :class:`ImageError`: writing past a full
    /dev/shm would crash the workers."""
    pixel_bytes, ranks = table.pixel_bytes, max(1, local_ranks)
    if mode == "off":
        return False, "decoded cache off: every crop decodes its image"
    budget, limit = (available_memory() or 0) // (2 * ranks), "half the available memory, per local rank"
    shm = shared_memory_free() if shared else None
    if shm is not None and shm // ranks < pixel_bytes:
        if mode == "on":
            raise ImageError(f"--decode-cache on: {pixel_bytes / 1e9:.2f} GB of pixels per rank do not fit the "
                             f"{shm / 1e9:.2f} GB free in /dev/shm; make it larger (docker: --shm-size), or use "
                             f"--decode-cache off")
        budget, limit = shm // ranks, "the free space of /dev/shm, per local rank"
    if mode == "auto" and pixel_bytes > budget:
        return False, (f"decoded cache off: {pixel_bytes / 1e9:.2f} GB of pixels would exceed {budget / 1e9:.2f} GB "
                       f"({limit}); every crop decodes its image")
    return True, (f"decoded cache: {len(table)} images, {pixel_bytes / 1e6:.1f} MB of pixels, each decoded on first "
                  f"use into memory the crop workers share")


def open_pixels(table: ImageTable, *, mode: str = "auto", workers: int = 0, crop_device: str | None = None,
                local_ranks: int = 1) -> ImageSource:
    """The pixel source of ``table``, the decoded cache decided once, here: ``mode`` (auto, on,
    off) for crops made by ``workers`` processes (0: this one), by ``local_ranks`` processes per
    node each with its own copy; with ``crop_device`` every image is decoded once (the device crops
    read the whole set). The source's ``note`` says what was chosen and why."""
    if crop_device:
        return ImageSource(table, True, shared=False, crop_device=crop_device,
                           note=f"decoded cache on {crop_device}: every image decoded once")
    shared = workers > 0  # worker processes read the cache: it lives in shared memory
    cache, note = decode_cache_choice(mode, table, local_ranks, shared)
    return ImageSource(table, cache, shared=shared, note=note)
