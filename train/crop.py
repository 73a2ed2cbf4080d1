"""The per-image path of the original trainer, bit for bit (SRE2L-FACTS section 4, steps 1-4)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_rgb(data: bytes) -> Image.Image:
    """Open encoded image bytes by content and convert to RGB first, as ImageFolder's loader does."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def crop_box(coords: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """PIL's crop box ``(left, top, right, bottom)`` of the stored coords, in Python floats."""
    top = float(coords[0]) * height
    left = float(coords[1]) * width
    return left, top, left + float(coords[3]) * width, top + float(coords[2]) * height


def pil_crop_box(coords: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """The integer box PIL's ``crop`` uses: each edge of :func:`crop_box` rounded with ``round``."""
    x0, y0, x1, y1 = (round(v) for v in crop_box(coords, width, height))
    return x0, y0, x1, y1


def crop_resize_flip(img: Image.Image, coords: np.ndarray, flip: bool, size: int) -> np.ndarray:
    """Crop the stored box, resize to (size, size) with PIL bilinear, flip; uint8 HWC.

    The box is computed in Python floats from the float32 coords; PIL rounds each edge to the
    nearest integer. Truncating instead would pick other pixels in most batches.
    """
    out = img.crop(crop_box(coords, *img.size)).resize((size, size), Image.BILINEAR)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)
