"""Encoding and decoding of one image record and one batch record (msgpack and .npy, never pickle)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import msgpack
import numpy as np

from . import codecs
from . import format as fmt


class RecordError(ValueError):
    """A record whose members are missing or malformed."""


@dataclass(frozen=True)
class ImageRecord:
    """One synthetic image: its sample index, class rank and original file bytes."""

    index: int
    label: int
    data: bytes
    path: str = ""


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
    soft_labels: np.ndarray  # (n, C), stored dtype

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])


def encode_npy(array: np.ndarray) -> bytes:
    """Serialise one array as .npy bytes (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Parse .npy bytes; object arrays are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_meta(meta: dict) -> bytes:
    return msgpack.packb(meta, use_bin_type=True)


def decode_meta(data: bytes) -> dict:
    meta = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(meta, dict):
        raise RecordError("meta.msgpack is not a map")
    return meta


def encode_image(record: ImageRecord) -> dict[str, bytes]:
    """Tar members (suffix -> bytes) of one image record."""
    meta = {"index": record.index, "label": record.label, "path": record.path}
    return {fmt.IMAGE_BYTES: bytes(record.data), fmt.META: encode_meta(meta)}


def decode_image(members: dict[str, bytes]) -> ImageRecord:
    """Inverse of :func:`encode_image`."""
    _require(members, (fmt.IMAGE_BYTES, fmt.META))
    meta = decode_meta(members[fmt.META])
    return ImageRecord(
        index=int(meta["index"]), label=int(meta["label"]), data=members[fmt.IMAGE_BYTES],
        path=str(meta.get("path", "")),
    )


def encode_batch(record: BatchRecord, codec: str = codecs.RAW, temperature: float = 20.0) -> dict[str, bytes]:
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
        fmt.INDICES: encode_npy(record.indices.astype(np.int64, copy=False)),
        fmt.COORDS: encode_npy(record.coords),
        fmt.FLIPS: encode_npy(record.flips.astype(np.bool_, copy=False)),
    }
    for name, array in codecs.encode(codec, temperature, record.soft_labels).items():
        members[name + ".npy"] = encode_npy(array)
    if record.mix_index is not None:
        members[fmt.MIX_INDEX] = encode_npy(record.mix_index.astype(np.int64, copy=False))
    return members


def decode_batch(members: dict[str, bytes], codec: str = codecs.RAW, width: int | None = None) -> BatchRecord:
    """Inverse of :func:`encode_batch`; checks that every array has the record's row count.
    ``width`` (the soft-label width C) is needed by the ``topk`` codec."""
    stored = tuple(name + ".npy" for name in codecs.members(codec))
    _require(members, (fmt.META, fmt.INDICES, fmt.COORDS, fmt.FLIPS, *stored))
    meta = decode_meta(members[fmt.META])
    n = int(meta["n"])
    indices = decode_npy(members[fmt.INDICES])
    coords = decode_npy(members[fmt.COORDS])
    flips = decode_npy(members[fmt.FLIPS])
    arrays = {name: decode_npy(members[name + ".npy"]) for name in codecs.members(codec)}
    for name, array in arrays.items():
        if array.shape[:1] != (n,):
            raise RecordError(f"{name} has shape {array.shape}, expected {n} rows")
    soft = codecs.decode(codec, arrays, width)
    mix_index = decode_npy(members[fmt.MIX_INDEX]) if fmt.MIX_INDEX in members else None
    _check_shape("indices", indices, (n,), np.int64)
    _check_shape("coords", coords, (n, 4), np.float32)
    _check_shape("flips", flips, (n,), np.bool_)
    if soft.ndim != 2 or soft.shape[0] != n:
        raise RecordError(f"soft_labels has shape {soft.shape}, expected ({n}, C)")
    if mix_index is not None:
        _check_shape("mix_index", mix_index, (n,), np.int64)
    bbox = meta.get("mix_bbox")
    lam = meta.get("mix_lam")
    return BatchRecord(
        epoch=int(meta["epoch"]),
        batch=int(meta["batch"]),
        indices=indices,
        coords=coords,
        flips=flips,
        mix_index=mix_index,
        mix_lam=None if lam is None else float(lam),
        mix_bbox=None if bbox is None else tuple(int(v) for v in bbox),
        soft_labels=soft,
    )


def _require(members: dict[str, bytes], suffixes: tuple[str, ...]) -> None:
    missing = [s for s in suffixes if s not in members]
    if missing:
        raise RecordError(f"record lacks member(s) {', '.join(missing)}")


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...], dtype: type) -> None:
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise RecordError(
            f"{name} is {array.dtype}{list(array.shape)}, expected {np.dtype(dtype)}{list(shape)}"
        )
