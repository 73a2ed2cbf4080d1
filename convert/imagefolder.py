"""The synthetic image set: sample order and class labels exactly as torchvision's ImageFolder."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fkd_shards.common.files import FileReadError, open_regular, read_bounded, refuse_directory_loops
from fkd_shards.common.text import first_line
from fkd_shards.shards import format as fmt

from .errors import ConvertError

MAX_IMAGE_FILE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ImageFolderListing:
    """Class names in rank order and ``(path, label)`` per sample index."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def relative_path(self, path: str) -> str:
        """``path`` relative to the root, as text that msgpack can store: bytes of a file name that
        are not UTF-8 are written as ``\\xNN`` escapes (the name is informational only)."""
        relative = os.path.relpath(path, self.root)
        return os.fsencode(relative).decode("utf-8", "backslashreplace")


def list_image_folder(root: str) -> ImageFolderListing:
    """List ``root`` with torchvision's own ImageFolder rules (no image is opened)."""
    try:
        refuse_directory_loops(root)
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise ConvertError(f"{root}: not a usable image folder ({first_line(exc)})") from None
    except NotADirectoryError:
        raise ConvertError(f"{root}: not a directory") from None
    except FileReadError as exc:
        raise ConvertError(str(exc)) from None
    except OSError as exc:
        raise ConvertError(f"{root}: cannot list ({exc.strerror or first_line(exc)})") from None
    if not samples:
        raise ConvertError(f"{root}: no images found")
    return ImageFolderListing(root, classes, samples)


def _open_checked(path: str, data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ConvertError(f"{path}: image has more than {2 * fmt.MAX_IMAGE_PIXELS} pixels") from None
    width, height = img.size
    if width * height > fmt.MAX_IMAGE_PIXELS or max(width, height) > fmt.MAX_IMAGE_SIDE:
        raise ConvertError(f"{path}: image is {width}x{height}, more than the {fmt.MAX_IMAGE_PIXELS} "
                           f"pixels accepted")
    return img


class _ImageErrors:
    """Turns what reading or decoding an image raises into one :class:`ConvertError` naming it."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, ConvertError):
            return False
        if isinstance(exc, FileReadError):
            raise ConvertError(str(exc)) from None
        if isinstance(exc, UnidentifiedImageError):  # its message shows the address of our in-memory file
            raise ConvertError(f"{self.path}: unreadable image (not an image format Pillow knows)") from None
        if isinstance(exc, (OSError, ValueError, SyntaxError, EOFError)):
            raise ConvertError(f"{self.path}: unreadable image ({first_line(exc, 150)})") from None
        return False


def read_checked_image(path: str) -> tuple[bytes, int, int]:
    """(bytes, height, width) of an image file, after checking that PIL decodes it completely."""
    with _ImageErrors(path):
        data = read_bounded(path, MAX_IMAGE_FILE_BYTES)
        with _open_checked(path, data) as img:
            img.load()
            width, height = img.size
    return data, height, width


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the image's header (nothing is decoded)."""
    with _ImageErrors(path):
        fd, _ = open_regular(path)
        with os.fdopen(fd, "rb") as f, _open_checked(path, f.read(1 << 20)) as img:
            width, height = img.size
    return height, width
