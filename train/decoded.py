"""Every image decoded once per run into one uint8 buffer that the crop workers share.

Decoding is deterministic, so cropping from the cached pixels is bit-identical to decoding again.
The buffer is a torch tensor: forked DataLoader workers share its pages without a copy (they only
read it); with the spawn or forkserver start method, torch moves it into shared memory once, when
the dataset is first sent to a worker. Size: H*W*3 bytes per image (150 KB at 224x224).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .crop import crop_resize_flip, decode_rgb, pil_crop_box


def image_shapes(encoded: list[bytes]) -> np.ndarray:
    """int64 (N, 2): (height, width) of each image, from its header (nothing is decoded)."""
    shapes = np.empty((len(encoded), 2), dtype=np.int64)
    for k, data in enumerate(encoded):
        with Image.open(io.BytesIO(data)) as img:
            shapes[k] = img.size[1], img.size[0]
    return shapes


def available_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cache_budget() -> int:
    """Bytes one process may give to a decoded cache: half the available memory, shared by the
    processes torchrun starts on this node (``LOCAL_WORLD_SIZE``), each of which holds its own."""
    available = available_memory() or 0
    return available // (2 * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


class DecodedImages:
    """RGB uint8 pixels of images ``0..N-1``; ``pixels(k)`` is an (H, W, 3) view.

    ``shapes`` (from :func:`image_shapes`) sizes the buffer up front; each image is decoded straight
    into its place, on ``threads`` threads (PIL decodes without the GIL).
    """

    def __init__(self, encoded: list[bytes], shapes: np.ndarray | None = None, threads: int | None = None):
        self.shapes = image_shapes(encoded) if shapes is None else shapes
        sizes = self.shapes[:, 0] * self.shapes[:, 1] * 3
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # Not share_memory_() here: that copies the whole buffer, and forked workers do not need it.
        self.buffer = torch.empty(int(self.offsets[-1]), dtype=torch.uint8)
        with ThreadPoolExecutor(threads or available_cpus()) as pool:
            list(pool.map(lambda k: self._decode_into(k, encoded[k]), range(len(encoded))))

    def _decode_into(self, k: int, data: bytes) -> None:
        pixels = np.asarray(decode_rgb(data))
        if pixels.shape[:2] != tuple(self.shapes[k]):  # the header promised another size
            raise ValueError(f"image {k} decodes to {pixels.shape[1]}x{pixels.shape[0]}, its header says "
                             f"{self.shapes[k][1]}x{self.shapes[k][0]}")
        self.buffer.numpy()[self.offsets[k]:self.offsets[k + 1]] = pixels.reshape(-1)

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def pixels(self, k: int) -> np.ndarray:
        h, w = self.shapes[k]
        return self.buffer.numpy()[self.offsets[k]:self.offsets[k + 1]].reshape(h, w, 3)

    def crop_resize_flip(self, k: int, coords: np.ndarray, flip: bool, size: int) -> np.ndarray:
        """:func:`train.crop.crop_resize_flip` of image ``k``, with the same result, uint8 (S, S, 3).

        PIL's crop rounds each edge with Python's ``round``; an in-bounds box is then an exact
        region, which PIL reads straight from the buffer (row stride W*3). A box reaching outside
        the image (PIL pads it) takes PIL's own crop.
        """
        height, width = (int(v) for v in self.shapes[k])
        x0, y0, x1, y1 = pil_crop_box(coords, width, height)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            return crop_resize_flip(Image.fromarray(self.pixels(k)), coords, flip, size)
        start = int(self.offsets[k]) + (y0 * width + x0) * 3
        flat = memoryview(self.buffer.numpy())
        region = Image.frombuffer("RGB", (x1 - x0, y1 - y0), flat[start:], "raw", "RGB", width * 3, 1)
        out = region.resize((size, size), Image.BILINEAR)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out)
