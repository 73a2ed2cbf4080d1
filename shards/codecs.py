"""Label codecs: how a batch record stores its soft labels (the teacher's logits), one class each.

- ``raw`` (default): the stored dtype, bit-exact (member ``soft_labels.npy``).
- ``int8``: per-row affine quantisation: ``z ~= lo + (q + 128) * step`` with ``q`` int8 (n, C),
  ``lo`` and ``step`` float32 (n,) (members ``soft_q``, ``soft_lo``, ``soft_step``).
- ``topk:K``: the K largest logits of each row (``soft_topk_values`` float16 (n, K),
  ``soft_topk_index`` uint16/int32 (n, K)) and one fill value per row for every other class
  (``soft_fill`` float32 (n,)), chosen so that the other classes keep their total softmax mass at
  the codec's temperature T: ``fill = T * log(mean(exp(z_rest / T)))``.

Decoded soft labels of ``int8`` and ``topk`` are float32. :func:`parse` turns a spec string into a
codec; every codec refuses to encode what it could not decode back to finite numbers.
"""

from __future__ import annotations

import math

import numpy as np

from . import format as fmt


class CodecError(ValueError):
    """A codec spec or parameter that cannot be used, or logits a codec cannot store."""


class Codec:
    """One way of storing (n, C) soft labels as named arrays."""

    name: str = ""

    @property
    def spec(self) -> str:
        return self.name

    def layout(self, stored_dtype: str, width: int) -> dict[str, tuple[np.dtype | tuple, tuple]]:
        """Per member (the array names a record of this codec holds, without ``.npy``): its dtype and
        its shape after the row count."""
        raise NotImplementedError

    def encode(self, soft: np.ndarray) -> dict[str, np.ndarray]:
        """Soft labels (n, C) -> named arrays to store."""
        raise NotImplementedError

    def decode(self, arrays: dict[str, np.ndarray], width: int) -> np.ndarray:
        """Named arrays (already checked against :meth:`layout`) -> (n, C) soft labels."""
        raise NotImplementedError

    def decoded_dtype(self, stored_dtype: str) -> str:
        return "float32"


class Raw(Codec):
    name = fmt.CODEC_RAW

    def layout(self, stored_dtype, width):
        return {fmt.SOFT_LABELS: (np.dtype(stored_dtype), (width,))}

    def encode(self, soft):
        return {fmt.SOFT_LABELS: soft}

    def decode(self, arrays, width):
        return arrays[fmt.SOFT_LABELS]

    def decoded_dtype(self, stored_dtype):
        return stored_dtype


class Int8(Codec):
    name = fmt.CODEC_INT8

    def layout(self, stored_dtype, width):
        f32 = np.dtype(np.float32)
        return {fmt.SOFT_Q: (np.dtype(np.int8), (width,)), fmt.SOFT_LO: (f32, ()), fmt.SOFT_STEP: (f32, ())}

    def encode(self, soft):
        z = soft.astype(np.float32)
        lo = z.min(axis=1)
        with np.errstate(over="ignore", invalid="ignore"):
            step = (z.max(axis=1) - lo) / np.float32(255)
        if not (np.isfinite(lo).all() and np.isfinite(step).all()):
            raise CodecError("int8: a row's logits span more than float32 holds; use raw")
        safe = np.where(step > 0, step, np.float32(1))
        q = np.clip(np.rint((z - lo[:, None]) / safe[:, None]), 0, 255) - 128
        return {fmt.SOFT_Q: q.astype(np.int8), fmt.SOFT_LO: lo, fmt.SOFT_STEP: step.astype(np.float32)}

    def decode(self, arrays, width):
        q = arrays[fmt.SOFT_Q].astype(np.float32) + np.float32(128)
        return arrays[fmt.SOFT_LO][:, None] + q * arrays[fmt.SOFT_STEP][:, None]


class TopK(Codec):
    name = fmt.CODEC_TOPK

    def __init__(self, k: int, temperature: float | None = None):
        self.k = k
        self.temperature = temperature

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.k}"

    def layout(self, stored_dtype, width):
        kept = min(self.k, width)
        return {fmt.SOFT_TOPK_VALUES: (np.dtype(np.float16), (kept,)),
                fmt.SOFT_TOPK_INDEX: (np.dtype(_index_dtype(width)), (kept,)),
                fmt.SOFT_FILL: (np.dtype(np.float32), ())}

    def encode(self, soft):
        t = self.temperature
        if t is None or not math.isfinite(t) or t <= 0:
            raise CodecError(f"topk needs a finite, positive codec temperature, got {t}")
        z = soft.astype(np.float32)
        width = z.shape[1]
        k = min(self.k, width)
        top = np.argsort(-z, axis=1, kind="stable")[:, :k]
        values = np.take_along_axis(z, top, axis=1)
        if k < width:
            rest = z.astype(np.float64)
            np.put_along_axis(rest, top, -np.inf, axis=1)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                scaled = rest / t
                peak = scaled.max(axis=1, keepdims=True)
                mean = np.exp(scaled - peak).sum(axis=1) / (width - k)
                fill = (t * (np.log(mean) + peak[:, 0])).astype(np.float32)
        else:
            fill = np.zeros(len(z), dtype=np.float32)
        with np.errstate(over="ignore"):
            stored = values.astype(np.float16)
        if not (np.isfinite(fill).all() and np.isfinite(stored).all()):
            raise CodecError(f"topk:{self.k} at temperature {t:g} does not give finite values for these "
                             f"logits (a logit beyond float16's range, or a temperature too small); use raw")
        return {fmt.SOFT_TOPK_VALUES: stored, fmt.SOFT_TOPK_INDEX: top.astype(_index_dtype(width)),
                fmt.SOFT_FILL: fill}

    def decode(self, arrays, width):
        values, index, fill = (arrays[fmt.SOFT_TOPK_VALUES], arrays[fmt.SOFT_TOPK_INDEX],
                               arrays[fmt.SOFT_FILL])
        index = index.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= width):
            raise CodecError(f"topk class index outside [0, {width})")
        out = np.repeat(fill[:, None], width, axis=1).astype(np.float32)
        np.put_along_axis(out, index, values.astype(np.float32), axis=1)
        return out


def _index_dtype(width: int) -> type:
    return np.uint16 if width <= np.iinfo(np.uint16).max + 1 else np.int32


def parse(spec: str, temperature: float | None = None) -> Codec:
    """``"raw"`` / ``"int8"`` / ``"topk:K"`` -> its codec; :class:`CodecError` naming what is allowed."""
    name, _, arg = str(spec).partition(":")
    if name == fmt.CODEC_RAW and not arg:
        return Raw()
    if name == fmt.CODEC_INT8 and not arg:
        return Int8()
    if name == fmt.CODEC_TOPK and arg.isdigit() and int(arg) > 0 and len(arg) < 10:
        return TopK(int(arg), temperature)
    raise CodecError(f"label codec {spec!r} is not supported (supported: raw, int8, topk:K)")
