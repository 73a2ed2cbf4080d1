"""Label codecs: how a batch record stores its soft labels (the teacher's logits).

- ``raw`` (default): the stored dtype, bit-exact (member ``soft_labels.npy``).
- ``int8``: per-row affine quantisation: ``z ~= lo + (q + 128) * step`` with ``q`` int8 (n, C),
  ``lo`` and ``step`` float32 (n,) (members ``soft_q.npy``, ``soft_lo.npy``, ``soft_step.npy``).
- ``topk:K``: the K largest logits of each row (``soft_topk_values.npy`` float16 (n, K),
  ``soft_topk_index.npy`` uint16/int32 (n, K)) and one fill value per row for every other class
  (``soft_fill.npy`` float32 (n,)), chosen so that the other classes keep their total softmax mass
  at the codec's temperature T: ``fill = T * log(mean(exp(z_rest / T)))``.

Decoded soft labels of ``int8`` and ``topk`` are float32.
"""

from __future__ import annotations

import numpy as np

RAW = "raw"


def parse(spec: str) -> tuple[str, int | None]:
    """``"raw"`` / ``"int8"`` / ``"topk:K"`` -> (name, K or None); ValueError naming what is allowed."""
    name, _, arg = spec.partition(":")
    if name in ("raw", "int8") and not arg:
        return name, None
    if name == "topk" and arg.isdigit() and int(arg) > 0:
        return name, int(arg)
    raise ValueError(f"label codec {spec!r} is not supported (supported: raw, int8, topk:K)")


def encode(spec: str, temperature: float, soft: np.ndarray) -> dict[str, np.ndarray]:
    """Soft labels (n, C) -> named arrays to store (without the ``.npy`` suffix)."""
    name, k = parse(spec)
    if name == "raw":
        return {"soft_labels": soft}
    z = soft.astype(np.float32)
    if name == "int8":
        lo = z.min(axis=1)
        step = (z.max(axis=1) - lo) / np.float32(255)
        safe = np.where(step > 0, step, np.float32(1))
        q = np.clip(np.rint((z - lo[:, None]) / safe[:, None]), 0, 255) - 128
        return {"soft_q": q.astype(np.int8), "soft_lo": lo, "soft_step": step.astype(np.float32)}
    width = z.shape[1]
    k = min(k, width)
    top = np.argsort(-z, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(z, top, axis=1)
    rest = z.copy()
    np.put_along_axis(rest, top, -np.inf, axis=1)
    if k < width:
        scaled = rest / np.float32(temperature)
        peak = scaled.max(axis=1, keepdims=True)
        mean = np.exp(scaled - peak).sum(axis=1) / (width - k)
        fill = (temperature * (np.log(mean) + peak[:, 0])).astype(np.float32)
    else:
        fill = np.zeros(len(z), dtype=np.float32)
    index_dtype = np.uint16 if width <= np.iinfo(np.uint16).max + 1 else np.int32
    return {"soft_topk_values": values.astype(np.float16), "soft_topk_index": top.astype(index_dtype),
            "soft_fill": fill}


def decode(spec: str, arrays: dict[str, np.ndarray], width: int) -> np.ndarray:
    """Inverse of :func:`encode`: (n, C) soft labels (raw: stored dtype; others: float32)."""
    name, _ = parse(spec)
    if name == "raw":
        return arrays["soft_labels"]
    if name == "int8":
        q = arrays["soft_q"].astype(np.float32) + np.float32(128)
        return arrays["soft_lo"][:, None] + q * arrays["soft_step"][:, None]
    values, index, fill = arrays["soft_topk_values"], arrays["soft_topk_index"], arrays["soft_fill"]
    out = np.repeat(fill[:, None], width, axis=1).astype(np.float32)
    np.put_along_axis(out, index.astype(np.int64), values.astype(np.float32), axis=1)
    return out


def members(spec: str) -> tuple[str, ...]:
    """The array names a record of this codec holds."""
    name, _ = parse(spec)
    return {"raw": ("soft_labels",), "int8": ("soft_q", "soft_lo", "soft_step"),
            "topk": ("soft_topk_values", "soft_topk_index", "soft_fill")}[name]
