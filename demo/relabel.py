"""The teacher side of SRe2L as its own relabel script does it, small: a relabel output in the
ORIGINAL layout (``epoch_{e}/batch_{b}.tar``, a torch.save'd list of six items per batch), for
``fkd-demo --via-convert``, which shows fkd-convert on it (the default run uses fkd-relabel)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from torch.utils.data import BatchSampler, RandomSampler
from torchvision.datasets import ImageFolder

from fkd_shards.batches.mix import MEAN, STD


def _cutmix_box(size: int, lam: float, rng: np.random.Generator) -> list[np.int64]:
    """The CutMix box for a square ``size`` crop: numpy int64 values, as the original writes them."""
    cut = int(size * math.sqrt(1.0 - lam))
    cx, cy = rng.integers(size), rng.integers(size)
    edges = (cx - cut // 2, cy - cut // 2, cx + cut // 2, cy + cut // 2)
    return [np.int64(np.clip(v, 0, size)) for v in edges]


@torch.no_grad()
def write_relabel(train_dir: str, fkd_path: str, teacher: torch.nn.Module, *, epochs: int, batch_size: int,
                  input_size: int, fkd_seed: int = 42, data_seed: int = 0, scale=(0.35, 1.0)) -> None:
    """For every epoch and batch of the seeded sampler: crop boxes, flips, a CutMix configuration
    and the teacher's logits on the mixed crops, saved as the original relabel step does."""
    dataset = ImageFolder(train_dir)
    generator = torch.Generator().manual_seed(fkd_seed)
    batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)
    torch.manual_seed(data_seed)
    rng = np.random.default_rng(data_seed)
    normalize = T.Normalize(MEAN, STD)
    teacher.eval()
    for epoch in range(epochs):
        os.makedirs(os.path.join(fkd_path, f"epoch_{epoch}"), exist_ok=True)
        for b, indices in enumerate(batches):
            coords, flips, crops = [], [], []
            for k in indices:
                img = dataset.loader(dataset.samples[k][0])
                i, j, h, w = T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
                coords.append((i / img.size[1], j / img.size[0], h / img.size[1], w / img.size[0]))
                crop = F.resized_crop(img, i, j, h, w, [input_size, input_size], T.InterpolationMode.BILINEAR)
                flip = bool(torch.rand(1) < 0.5)
                flips.append(flip)
                crops.append(normalize(F.to_tensor(F.hflip(crop) if flip else crop)))
            images = torch.stack(crops)
            mix_index = torch.randperm(len(indices))
            lam = float(rng.beta(1.0, 1.0))
            bbox = _cutmix_box(input_size, lam, rng)
            x1, y1, x2, y2 = bbox
            images[:, :, x1:x2, y1:y2] = images[mix_index, :, x1:x2, y1:y2]
            logits = teacher(images)
            torch.save([torch.tensor(coords, dtype=torch.float32), torch.tensor(flips), mix_index, lam, bbox,
                        logits.half()], os.path.join(fkd_path, f"epoch_{epoch}", f"batch_{b}.tar"))
