"""The replay check against the data: how often the teacher's argmax is a row's class or its mix
partner's, and when a rate is too close to chance to trust the set."""

from __future__ import annotations

import math

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


def threshold(min_alignment: float | None, num_classes: int, mixed: bool) -> float:
    """The alignment a set must reach: ``--min-alignment`` when given, else :func:`default_threshold`."""
    return default_threshold(num_classes, mixed) if min_alignment is None else min_alignment


def lower_tail(hits: int, rows: int, rate: float) -> float:
    """P(X <= hits) for X ~ Binomial(rows, rate), summed in log space (exact for any batch size)."""
    if hits >= rows or rate <= 0.0:
        return 1.0
    if rate >= 1.0:
        return 0.0
    log_p, log_q = math.log(rate), math.log1p(-rate)
    terms = [math.lgamma(rows + 1) - math.lgamma(k + 1) - math.lgamma(rows - k + 1) + k * log_p + (rows - k) * log_q
             for k in range(hits + 1)]
    top = max(terms)
    return math.exp(top) * sum(math.exp(t - top) for t in terms)


def implausible_batches(counts: list[tuple[int, int]], rate: float, chance: float,
                        limit: float = 1e-12) -> list[int]:
    """Batches (as positions in ``counts``, pairs of hits and rows) whose own rate lies below the
    midpoint between chance and the epoch's ``rate`` and that the epoch's rate makes less likely
    than ``limit``: another batch's file (swapped or renamed) more likely than bad luck. Rows of a
    batch are not independent draws (the same teacher, batch-norm statistics), hence the
    midpoint and a limit far below one in the number of batch files any run has."""
    midpoint = (chance + rate) / 2
    return [i for i, (hits, rows) in enumerate(counts)
            if hits < midpoint * rows and lower_tail(hits, rows, rate) < limit]
