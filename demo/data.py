"""The demo's data: scikit-learn's 8x8 digits (shipped inside the package), split three ways and
written as ImageFolder trees of JPEGs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_SIZE = 32  # the 8x8 digits are upscaled to this many pixels


@dataclass(frozen=True)
class DigitSplits:
    teacher: tuple[np.ndarray, np.ndarray]  # uint8 (n, 32, 32) images, int64 labels
    distilled: tuple[np.ndarray, np.ndarray]
    held_out: tuple[np.ndarray, np.ndarray]


def load_splits(per_class: int, held_out: int, seed: int = 0) -> DigitSplits:
    """``per_class`` images of each digit form the small 'distilled' set, ``held_out`` images the
    validation set, and the rest train the teacher."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([_upscale(x) for x in digits.images])
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    val, rest = order[:held_out], order[held_out:]
    distilled = np.concatenate([rest[labels[rest] == c][:per_class] for c in range(10)])
    teacher = np.setdiff1d(rest, distilled)
    return DigitSplits((images[teacher], labels[teacher]), (images[distilled], labels[distilled]),
                       (images[val], labels[val]))


def _upscale(digit: np.ndarray) -> np.ndarray:
    img = Image.fromarray((digit * (255 / 16)).astype(np.uint8), "L")
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


def write_image_folder(root: str, images: np.ndarray, labels: np.ndarray) -> None:
    """SRe2L's naming: ``new{c:03d}/class{c:03d}_id{i:03d}.jpg``, RGB JPEGs."""
    counts: dict[int, int] = {}
    for image, label in zip(images, labels):
        c = int(label)
        i = counts.get(c, 0)
        counts[c] = i + 1
        folder = os.path.join(root, f"new{c:03d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image, "L").convert("RGB").save(os.path.join(folder, f"class{c:03d}_id{i:03d}.jpg"))
