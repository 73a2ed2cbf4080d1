"""The per-image path of the original trainer, bit for bit (SRE2L-FACTS section 4, steps 1-4)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_rgb(data: bytes) -> Image.Image:
    """Open encoded image bytes by content and convert to RGB first, as ImageFolder's loader does."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def crop_resize_flip(img: Image.Image, coords: np.ndarray, flip: bool, size: int) -> np.ndarray:
    """Crop the stored box, resize to (size, size) with PIL bilinear, flip; uint8 HWC.

    The box is computed in Python floats from the float32 coords; PIL rounds each edge to the
    nearest integer. Truncating instead would pick other pixels in most batches.
    """
    width, height = img.size
    top = float(coords[0]) * height
    left = float(coords[1]) * width
    box_h = float(coords[2]) * height
    box_w = float(coords[3]) * width
    out = img.crop((left, top, left + box_w, top + box_h)).resize((size, size), Image.BILINEAR)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)
