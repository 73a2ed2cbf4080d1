"""Crop boxes: how a record's float32 coords ``(top/H, left/W, height/H, width/W)`` become pixels.

Every reader and writer uses these, so that a box is judged the same way where it is written,
checked and cropped. The box is computed in doubles from the float32 coords and each edge is
rounded to the nearest integer, ties to even, exactly as PIL's ``Image.crop`` rounds a float box
(Python's ``round``). The products land just below or above whole numbers, so truncating instead
(``int()``, a floor) would pick other pixels in most batches.
"""

from __future__ import annotations

import numpy as np

# A relabel step draws its boxes inside the image, so top + height and left + width are at most 1
# up to the float32 rounding of the two fractions (about 1.2e-7). 1e-6 leaves room for that and
# still rounds to no pixel outside any image under 500,000 pixels a side.
OUTSIDE_SLACK = 1e-6


def pixel_boxes(coords: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """int64 (u, 4): the integer boxes ``(left, top, right, bottom)`` PIL crops for float32 coords
    (u, 4) on images of the given sizes."""
    c = coords.astype(np.float64)
    top = c[:, 0] * heights
    left = c[:, 1] * widths
    # The far edges are left + width and top + height, added in doubles before rounding, as PIL
    # receives them; np.rint rounds ties to even like Python's round.
    edges = np.stack([left, top, left + c[:, 3] * widths, top + c[:, 2] * heights], axis=1)
    return np.rint(edges).astype(np.int64).reshape(-1, 4)


def empty_boxes(boxes: np.ndarray) -> np.ndarray:
    """bool (u,): the boxes with no pixel (zero width or height once rounded)."""
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


def reaching_outside(coords: np.ndarray) -> np.ndarray:
    """bool (u,): the coords whose box reaches past the image's bottom or right edge."""
    c = coords.astype(np.float64)
    return (c[:, 0] + c[:, 2] > 1 + OUTSIDE_SLACK) | (c[:, 1] + c[:, 3] > 1 + OUTSIDE_SLACK)
