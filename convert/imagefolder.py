"""The synthetic image set: sample order and class labels exactly as torchvision's ImageFolder."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .errors import ConvertError


@dataclass(frozen=True)
class ImageFolderListing:
    """Class names in rank order and ``(path, label)`` per sample index."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]


def list_image_folder(root: str) -> ImageFolderListing:
    """List ``root`` with torchvision's own ImageFolder rules (no image is opened)."""
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        message = str(exc).splitlines()[0]
        message = message if len(message) <= 300 else message[:300] + " ..."
        raise ConvertError(f"{root}: not a usable image folder ({message})") from None
    except NotADirectoryError:
        raise ConvertError(f"{root}: not a directory") from None
    if not samples:
        raise ConvertError(f"{root}: no images found")
    return ImageFolderListing(root, classes, samples)


def read_checked_image(path: str) -> bytes:
    """The file's bytes, after checking that PIL decodes them completely."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ConvertError(f"{path}: unreadable image ({exc})") from None
    return data
