"""The replay check against the data: how often the teacher's argmax is a row's class or its mix
partner's, and when a rate is too close to chance to trust the set."""

from __future__ import annotations

import numpy as np


def batch_hits(labels: np.ndarray, indices: np.ndarray, argmax: np.ndarray,
               mix_index: np.ndarray | None) -> int:
    """Rows whose stored-logit argmax equals the class of their image or of their mix partner.

    ``labels``: int (N,) class per sample; ``indices``: int (n,) samples of the batch;
    ``argmax``: int (n,) argmax of the soft labels; ``mix_index``: int (n,) or None.
    """
    own = labels[indices]
    hits = argmax == own
    if mix_index is not None:
        hits |= argmax == own[mix_index]
    return int(hits.sum())


def chance_rate(num_classes: int, mixed: bool) -> float:
    """The expected rate when rows and logits are unrelated (a wrong seed, folder or N)."""
    miss = 1.0 - 1.0 / num_classes
    return 1.0 - (miss * miss if mixed else miss)


def default_threshold(num_classes: int, mixed: bool) -> float:
    """A quarter of the way from chance to 1: below it a rate is too close to chance to trust (the
    default ``--min-alignment``)."""
    chance = chance_rate(num_classes, mixed)
    return chance + 0.25 * (1.0 - chance)


def near_chance(rate: float, num_classes: int, mixed: bool) -> bool:
    return rate < default_threshold(num_classes, mixed)
