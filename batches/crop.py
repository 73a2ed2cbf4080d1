"""Crop, resize and flip on the CPU with PIL, bit for bit the original trainer's per-image path
(crop the stored box, bilinear resize to S x S, horizontal flip), for a batch of images.

The integer box of each crop comes from :mod:`fkd_shards.shards.boxes` (PIL's rounding of the
float box, ties to even).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fkd_shards.shards.boxes import empty_boxes, pixel_boxes

from .images import ImageSource, shared_bytes


class CropError(ValueError):
    """A crop that cannot be made (a box that rounds to zero pixels)."""


def check_boxes(boxes: np.ndarray, samples: np.ndarray) -> None:
    """A box with no pixel (it rounds to zero width or height) cannot be resized: name it."""
    empty = empty_boxes(boxes)
    if empty.any():
        k = int(np.argmax(empty))
        raise CropError(f"the crop box of image {int(samples[k])} rounds to {boxes[k].tolist()}: no pixels")


def crop_resize_flip(rgb: np.ndarray, box: np.ndarray, flip: bool, size: int) -> np.ndarray:
    """PIL's crop of ``box``, bilinear resize to (size, size), flip; uint8 (size, size, 3).

    ``rgb`` is C-contiguous (H, W, 3). A box inside the image is handed to PIL as a region of the
    array (row stride W*3): no copy of the crop. A box reaching outside it takes PIL's own crop,
    which pads with black, as the original does (verified records never hold one: they refuse
    coords reaching outside the image).
    """
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    if 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height:
        flat = memoryview(rgb.reshape(-1))
        region = Image.frombuffer("RGB", (x1 - x0, y1 - y0), flat[(y0 * width + x0) * 3:], "raw", "RGB",
                                  width * 3, 1)
    else:
        region = Image.fromarray(rgb).crop((x0, y0, x1, y1))
    out = region.resize((size, size), Image.BILINEAR)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


class CpuCropper:
    """Crops of a batch on the CPU: uint8 (u, 3, S, S), channels-last in memory ((u, S, S, 3), PIL's
    own pixel order, so no transpose per image here; the device makes the batch NCHW)."""

    def __init__(self, source: ImageSource, size: int):
        self.source = source
        self.size = size

    def crop(self, samples: np.ndarray, coords: np.ndarray, flips: np.ndarray, shared: bool = False) -> torch.Tensor:
        """``shared``: allocate the batch in shared memory (in a worker process: handing it to the
        main process then copies nothing)."""
        shapes = self.source.table.shapes[samples]
        boxes = pixel_boxes(coords, shapes[:, 0], shapes[:, 1])
        check_boxes(boxes, samples)
        shape = (len(samples), self.size, self.size, 3)
        crops = shared_bytes(int(np.prod(shape))).view(shape) if shared else torch.empty(shape, dtype=torch.uint8)
        out = crops.numpy()
        for k, sample in enumerate(samples):
            out[k] = crop_resize_flip(self.source.rgb(int(sample)), boxes[k], bool(flips[k]), self.size)
        return crops.permute(0, 3, 1, 2)
