"""What a label codec costs: stored bytes and the KL divergence of the training target it changes."""

from __future__ import annotations

import numpy as np

from fkd_shards.shards import codecs


def kl_rows(z: np.ndarray, z_coded: np.ndarray, temperature: float) -> np.ndarray:
    """KL(softmax(z/T) || softmax(z'/T)) per row, float64; z, z' (n, C)."""
    def log_softmax(x):
        x = x.astype(np.float64) / temperature
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    log_p, log_q = log_softmax(z), log_softmax(z_coded)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def measure(spec: str, soft: np.ndarray, temperature: float) -> tuple[int, np.ndarray]:
    """(stored payload bytes, per-row KL at ``temperature``) of one batch under ``spec``."""
    codec = codecs.parse(spec, temperature)
    arrays = codec.encode(soft)
    decoded = codec.decode(arrays, soft.shape[1])
    return sum(a.nbytes for a in arrays.values()), kl_rows(soft, decoded, temperature)
