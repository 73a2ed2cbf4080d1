"""The sampler replay: which images form each batch of each epoch (SRE2L-FACTS section 3)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import RandomSampler


def epoch_orders(num_images: int, fkd_seed: int, epochs: int) -> Iterator[np.ndarray]:
    """Yield, for epochs 0..epochs-1, the sample order (int64 ``(N,)``) the relabel step used.

    One generator, seeded once; the public ``RandomSampler`` iterated to exhaustion once per
    epoch, so the generator state carries over exactly as in the original.
    """
    generator = torch.Generator()
    generator.manual_seed(fkd_seed)
    sampler = RandomSampler(range(num_images), generator=generator)
    for _ in range(epochs):
        # list() runs the sampler to exhaustion: stopping after N items would skip the
        # generator draw it makes after the last index.
        yield np.asarray(list(sampler), dtype=np.int64)
