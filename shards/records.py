"""Encoding and decoding of one image record and one batch record: msgpack and ``.npy``, never
pickle. Every decode checks every field before it is used: member names, types, ``.npy`` headers
(dtype and shape before any array is made), ranges, permutations and finiteness."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import msgpack
import numpy as np

from fkd_shards.common.text import shown

from . import format as fmt
from .boxes import reaching_outside
from .codecs import Codec, CodecError


class RecordError(ValueError):
    """A record whose members are missing, extra or malformed; the message names the field."""


@dataclass(frozen=True)
class ImageRecord:
    """One synthetic image: its sample index, class rank, original file bytes and, when recorded,
    its size in pixels."""

    index: int
    label: int
    data: bytes
    path: str = ""
    height: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class BatchRecord:
    """One relabelled batch. Row ``r`` of every array belongs to image ``indices[r]``."""

    epoch: int
    batch: int
    indices: np.ndarray  # int64 (n,)
    coords: np.ndarray  # float32 (n, 4): (top/H, left/W, height/H, width/W)
    flips: np.ndarray  # bool (n,)
    mix_index: np.ndarray | None  # int64 (n,), a permutation of range(n)
    mix_lam: float | None
    mix_bbox: tuple[int, int, int, int] | None  # (bbx1, bby1, bbx2, bby2); bbx indexes height
    soft_labels: np.ndarray  # (n, C), the codec's decoded dtype

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class BatchSpec:
    """What every batch record of a set must be, from its manifest."""

    num_images: int
    width: int  # soft-label width C
    input_size: int
    mix_type: str
    codec: Codec
    stored_dtype: str  # the soft labels' dtype before the codec


# ---- .npy ------------------------------------------------------------------------------------------

def encode_npy(array: np.ndarray) -> bytes:
    """One array as .npy bytes (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(name: str, data: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The array in .npy ``data``, refused unless its header says exactly ``dtype`` and ``shape``
    (C order) and the payload has exactly that many bytes. The header is read before anything is
    allocated, so a header claiming 10^12 elements costs nothing; the array is a read-only view."""
    view = memoryview(data)
    head = io.BytesIO(bytes(view[: 12 + fmt.MAX_NPY_HEADER]))
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            found_shape, fortran, found_dtype = np.lib.format.read_array_header_1_0(
                head, max_header_size=fmt.MAX_NPY_HEADER)
        elif version == (2, 0):
            found_shape, fortran, found_dtype = np.lib.format.read_array_header_2_0(
                head, max_header_size=fmt.MAX_NPY_HEADER)
        else:
            raise ValueError(f"npy version {version}")
    except Exception as exc:  # numpy raises ValueError, and others for hostile headers
        raise RecordError(f"{name}: not a valid .npy header ({str(exc).splitlines()[0][:100]})") from None
    if found_dtype != dtype or tuple(found_shape) != shape or (fortran and len(shape) > 1):
        raise RecordError(f"{name} is {found_dtype}{list(found_shape)}, expected {dtype}{list(shape)}")
    offset = head.tell()
    count = math.prod(shape)
    if len(view) - offset != count * dtype.itemsize:
        raise RecordError(f"{name}: {len(view) - offset} payload bytes for {dtype}{list(shape)}")
    return np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)


# ---- msgpack meta ----------------------------------------------------------------------------------

def encode_meta(meta: dict) -> bytes:
    return msgpack.packb(meta, use_bin_type=True)


def decode_meta(data: bytes | memoryview, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """A msgpack map with exactly ``keys`` (plus any of ``optional``)."""
    try:
        meta = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for malformed, deep or oversized input
        raise RecordError(f"meta.msgpack: not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise RecordError("meta.msgpack is not a map")
    missing = [k for k in keys if k not in meta]
    extra = [k for k in meta if k not in keys and k not in optional]
    if missing or extra:
        raise RecordError(f"meta.msgpack: missing {missing} or unknown {[str(k)[:40] for k in extra][:5]} keys")
    return meta


def _int(meta: dict, key: str, low: int, high: int) -> int:
    """An int (not a bool) in [low, high]."""
    value = meta[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RecordError(f"meta {key} is {shown(value)}, expected an integer in [{low}, {high}]")
    return value



# ---- image records ---------------------------------------------------------------------------------

def encode_image(record: ImageRecord) -> dict[str, bytes]:
    """Tar members (suffix -> bytes) of one image record."""
    meta = {"index": record.index, "label": record.label, "path": record.path}
    if record.height is not None:
        meta |= {"height": record.height, "width": record.width}
    return {fmt.IMAGE_BYTES: bytes(record.data), fmt.META: encode_meta(meta)}


def decode_image(members: dict[str, memoryview], index: int, num_classes: int) -> ImageRecord:
    """Inverse of :func:`encode_image`, checked: exactly the two members, the expected sample
    ``index``, a label among the classes, a sane recorded size, some image bytes."""
    _members(members, {fmt.IMAGE_BYTES, fmt.META})
    meta = decode_meta(members[fmt.META], fmt.IMAGE_META_KEYS, fmt.IMAGE_META_SIZE_KEYS)
    found = _int(meta, "index", 0, 2**62)
    if found != index:
        raise RecordError(f"holds image {found}, expected {index}")
    label = _int(meta, "label", 0, num_classes - 1)
    if not isinstance(meta["path"], str):
        raise RecordError("meta path is not a string")
    height = width = None
    if "height" in meta or "width" in meta:
        if not ("height" in meta and "width" in meta):
            raise RecordError("meta has only one of height and width")
        height = _int(meta, "height", 1, fmt.MAX_IMAGE_SIDE)
        width = _int(meta, "width", 1, fmt.MAX_IMAGE_SIDE)
    data = members[fmt.IMAGE_BYTES]
    if len(data) == 0:
        raise RecordError("image bytes are empty")
    return ImageRecord(index=found, label=label, data=bytes(data), path=meta["path"], height=height,
                       width=width)


# ---- batch records ---------------------------------------------------------------------------------

def encode_batch(record: BatchRecord, codec: Codec) -> dict[str, bytes]:
    """Tar members (suffix -> bytes) of one batch record, soft labels stored with ``codec``."""
    meta = {
        "epoch": record.epoch,
        "batch": record.batch,
        "n": record.size,
        "mix_lam": None if record.mix_lam is None else float(record.mix_lam),
        "mix_bbox": None if record.mix_bbox is None else [int(v) for v in record.mix_bbox],
    }
    members = {
        fmt.META: encode_meta(meta),
        fmt.INDICES + fmt.NPY: encode_npy(record.indices.astype(np.int64, copy=False)),
        fmt.COORDS + fmt.NPY: encode_npy(record.coords.astype(np.float32, copy=False)),
        fmt.FLIPS + fmt.NPY: encode_npy(record.flips.astype(np.bool_, copy=False)),
    }
    for name, array in codec.encode(record.soft_labels).items():
        members[name + fmt.NPY] = encode_npy(array)
    if record.mix_index is not None:
        members[fmt.MIX_INDEX + fmt.NPY] = encode_npy(record.mix_index.astype(np.int64, copy=False))
    return members


def decode_batch(members: dict[str, memoryview], spec: BatchSpec, epoch: int, batch: int, n: int) -> BatchRecord:
    """Inverse of :func:`encode_batch` for the record of (``epoch``, ``batch``) with ``n`` rows,
    checked against ``spec``; :class:`RecordError` names the first field that is wrong."""
    mixed = spec.mix_type != fmt.MIX_NONE
    layout = spec.codec.layout(spec.stored_dtype, spec.width)
    expected = {fmt.META, fmt.INDICES + fmt.NPY, fmt.COORDS + fmt.NPY, fmt.FLIPS + fmt.NPY}
    expected |= {name + fmt.NPY for name in layout}
    if mixed:
        expected.add(fmt.MIX_INDEX + fmt.NPY)
    _members(members, expected)
    meta = decode_meta(members[fmt.META], fmt.BATCH_META_KEYS)
    if (_int(meta, "epoch", 0, 2**31), _int(meta, "batch", 0, 2**31)) != (epoch, batch):
        raise RecordError(f"holds epoch {meta['epoch']} batch {meta['batch']}, expected epoch {epoch} batch {batch}")
    _int(meta, "n", n, n)

    def array(name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        return decode_npy(name, members[name + fmt.NPY], np.dtype(dtype), shape)

    indices = array(fmt.INDICES, np.int64, (n,))
    if n and (indices.min() < 0 or indices.max() >= spec.num_images):
        raise RecordError(f"indices outside [0, {spec.num_images})")
    coords = array(fmt.COORDS, np.float32, (n, 4))
    # Each value is a fraction of the image's height or width; a crop of zero height or width
    # has no pixels to resize.
    if not (np.isfinite(coords).all() and (coords >= 0).all() and (coords <= 1).all()):
        raise RecordError("coords not finite or outside [0, 1]")
    if n and not (coords[:, 2:] > 0).all():
        raise RecordError("coords hold a crop of zero height or width")
    outside = reaching_outside(coords)
    if outside.any():
        raise RecordError(f"coords of row {int(np.argmax(outside))} reach outside the image "
                          "(top + height or left + width above 1)")
    flips = array(fmt.FLIPS, np.bool_, (n,))
    mix_index = None
    if mixed:
        mix_index = array(fmt.MIX_INDEX, np.int64, (n,))
        if not np.array_equal(np.sort(mix_index), np.arange(n)):
            raise RecordError("mix_index is not a permutation of the batch rows")
    lam, bbox = _mix_values(meta, spec)
    arrays = {name: decode_npy(name, members[name + fmt.NPY], dtype, (n, *tail))
              for name, (dtype, tail) in layout.items()}
    try:
        soft = spec.codec.decode(arrays, spec.width)
    except CodecError as exc:
        raise RecordError(str(exc)) from None
    if not np.isfinite(soft).all():
        raise RecordError("soft labels hold a value that is not finite (NaN or inf)")
    return BatchRecord(epoch=epoch, batch=batch, indices=indices, coords=coords, flips=flips,
                       mix_index=mix_index, mix_lam=lam, mix_bbox=bbox, soft_labels=soft)


def _mix_values(meta: dict, spec: BatchSpec) -> tuple[float | None, tuple[int, int, int, int] | None]:
    lam, bbox = meta["mix_lam"], meta["mix_bbox"]
    if spec.mix_type == fmt.MIX_NONE:
        if lam is not None or bbox is not None:
            raise RecordError("mix_lam/mix_bbox present in a set without mix")
        return None, None
    if not isinstance(lam, float) or not 0.0 <= lam <= 1.0:  # NaN fails the comparison too
        raise RecordError(f"mix_lam is {shown(lam)}, expected a float in [0, 1]")
    if spec.mix_type == fmt.MIX_MIXUP:
        if bbox is not None:
            raise RecordError("mix_bbox present in a Mixup set")
        return lam, None
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in bbox):
        raise RecordError(f"mix_bbox is {shown(bbox)}, expected 4 integers")
    x1, y1, x2, y2 = bbox
    size = spec.input_size
    if not (0 <= x1 <= x2 <= size and 0 <= y1 <= y2 <= size):
        raise RecordError(f"mix_bbox {bbox} outside the {size}x{size} crop")
    return lam, (x1, y1, x2, y2)


def _members(members: dict, expected: set[str]) -> None:
    missing = sorted(expected - members.keys())
    extra = sorted(members.keys() - expected)
    if missing:
        raise RecordError(f"record lacks member(s) {', '.join(missing)}")
    if extra:
        raise RecordError(f"record has unexpected member(s) {', '.join(s[:40] for s in extra[:5])}")
