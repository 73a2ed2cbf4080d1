"""What the relabel step draws, from generators derived from (seed, epoch, batch).

SRe2L's relabel step draws, per image of a batch in order, a RandomResizedCrop box (torchvision's
``get_params``: up to 10 tries of an area fraction U(scale) and a log-uniform aspect ratio, then the
top-left corner; else a centre crop) and a horizontal flip (p = 0.5); then, per batch, one partner
permutation and a mix lambda (CutMix: Beta(1, 1) and a box cut from it; Mixup: Beta(0.8, 0.8)).

Here every batch has its own generators, derived with numpy's ``SeedSequence`` from the entropy
``[seed, epoch, batch]``: ``spawn`` gives three independent children, in this order,

1. a ``torch.Generator`` for the crops and flips, in image order (crop, then flip, per image),
2. a ``torch.Generator`` for the partner permutation (``torch.randperm``),
3. a ``numpy.random.Generator`` (PCG64) for lambda and the CutMix box centre,

each torch generator seeded with the first 64-bit word of its child's state. So any batch can be
drawn alone, and the draws do not depend on worker processes, ranks, or where a run was resumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fkd_shards.shards import format as fmt

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
MIX_BETA = {fmt.MIX_CUTMIX: 1.0, fmt.MIX_MIXUP: 0.8}  # the Beta(a, a) lambda is drawn from


@dataclass(frozen=True)
class BatchDraws:
    """One batch's draws, as a batch record stores them."""

    coords: np.ndarray  # float32 (n, 4): (top/H, left/W, height/H, width/W)
    flips: np.ndarray  # bool (n,)
    mix_index: np.ndarray | None  # int64 (n,)
    mix_lam: float | None
    mix_bbox: tuple[int, int, int, int] | None


def generators(seed: int, epoch: int, batch: int) -> tuple[torch.Generator, torch.Generator, np.random.Generator]:
    """The three generators of (seed, epoch, batch): crops and flips, permutation, lambda and box."""
    crops, permutation, mix = np.random.SeedSequence([seed, epoch, batch]).spawn(3)
    return (torch.Generator().manual_seed(int(crops.generate_state(1, np.uint64)[0])),
            torch.Generator().manual_seed(int(permutation.generate_state(1, np.uint64)[0])),
            np.random.Generator(np.random.PCG64(mix)))


def crop_box(height: int, width: int, scale: tuple[float, float], g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) in whole pixels, as ``RandomResizedCrop.get_params`` draws it."""
    area = height * width
    # The log-ratio bounds and the exp are float32 tensors in torchvision: the same here, so that
    # a seeded generator gives torchvision's boxes exactly.
    log_lo, log_hi = (float(v) for v in torch.log(torch.tensor(RATIO)))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=g)).item()
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    # Ten misses: the largest centred crop whose aspect ratio is within the range.
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def cutmix_box(size: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """SRe2L's ``rand_bbox`` for an (n, 3, size, size) batch: side ``int(size * sqrt(1 - lam))``,
    centre uniform, clipped to the image; ``(bbx1, bby1, bbx2, bby2)``, bbx indexing height."""
    cut = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(size * cut), int(size * cut)
    cx, cy = int(rng.integers(size)), int(rng.integers(size))
    return (int(np.clip(cx - cut_w // 2, 0, size)), int(np.clip(cy - cut_h // 2, 0, size)),
            int(np.clip(cx + cut_w // 2, 0, size)), int(np.clip(cy + cut_h // 2, 0, size)))


def draw_batch(shapes: np.ndarray, seed: int, epoch: int, batch: int, *, scale: tuple[float, float], mix_type: str,
               input_size: int) -> BatchDraws:
    """The draws of one batch whose images have ``shapes`` (n, 2) = (height, width), in row order."""
    crops, permutation, mix = generators(seed, epoch, batch)
    coords = np.empty((len(shapes), 4), dtype=np.float32)
    flips = np.empty(len(shapes), dtype=bool)
    for r, (height, width) in enumerate(shapes.tolist()):
        top, left, h, w = crop_box(height, width, scale, crops)
        # Divided in doubles, stored as float32, as the relabel step stores them.
        coords[r] = (top / height, left / width, h / height, w / width)
        flips[r] = bool(torch.rand(1, generator=crops).item() < 0.5)
    if mix_type == fmt.MIX_NONE:
        return BatchDraws(coords, flips, None, None, None)
    mix_index = torch.randperm(len(shapes), generator=permutation).numpy().astype(np.int64)
    lam = float(mix.beta(MIX_BETA[mix_type], MIX_BETA[mix_type]))
    bbox = cutmix_box(input_size, lam, mix) if mix_type == fmt.MIX_CUTMIX else None
    return BatchDraws(coords, flips, mix_index, lam, bbox)
