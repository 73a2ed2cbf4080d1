"""A faithful re-implementation of the original trainer's data path, for benchmarks only.

Per batch: one full-pickle ``torch.load`` of the relabel file (as the original's patched fetcher
does); per image: PIL open of the JPEG file, RGB, crop/resize with torchvision, flip, ToTensor,
Normalize; the batch is stacked, then mixed in the main process. Only ever run on files the
benchmark generated itself.
"""

from __future__ import annotations

import os

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

_NORMALIZE = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
_TO_TENSOR = T.ToTensor()


class OriginalPath(Dataset):
    def __init__(self, samples: list, fkd_path: str, size: int):
        self.samples, self.fkd_path, self.size = samples, fkd_path, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, task):
        epoch, batch, indices = task
        path = os.path.join(self.fkd_path, f"epoch_{epoch}", f"batch_{batch}.tar")
        coords, flips, mix_index, lam, bbox, soft = torch.load(path, weights_only=False)
        rows = []
        for r, k in enumerate(indices):
            with open(self.samples[k][0], "rb") as f:
                img = Image.open(f).convert("RGB")
            i, j = coords[r][0].item() * img.size[1], coords[r][1].item() * img.size[0]
            h, w = coords[r][2].item() * img.size[1], coords[r][3].item() * img.size[0]
            img = F.resized_crop(img, i, j, h, w, [self.size, self.size], T.InterpolationMode.BILINEAR)
            if bool(flips[r]):
                img = F.hflip(img)
            rows.append(_NORMALIZE(_TO_TENSOR(img)))
        targets = torch.tensor([self.samples[k][1] for k in indices])
        return torch.stack(rows), targets, mix_index, lam, bbox, soft


def _keep(item):
    return item


def original_batches(samples, fkd_path, tasks, size: int, workers: int, mix: bool = True):
    """Yield model inputs (normalised, mixed float32) as the original trainer computes them; with
    ``mix=False``, the loader's raw items, as they leave the workers."""
    loader = DataLoader(OriginalPath(samples, fkd_path, size), batch_size=None, sampler=tasks,
                        num_workers=workers, collate_fn=_keep)
    if not mix:
        yield from loader
        return
    for images, targets, mix_index, lam, bbox, soft in loader:
        if bbox is not None:
            x1, y1, x2, y2 = bbox
            images[:, :, x1:x2, y1:y2] = images[mix_index, :, x1:x2, y1:y2]
        elif lam is not None:
            images = lam * images + (1 - lam) * images[mix_index]
        yield images, targets, soft.float()
