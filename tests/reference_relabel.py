"""A written-out reference of SRe2L's relabel step (``relabel/generate_soft_label.py`` with its
``utils_fkd`` transforms), built from torchvision's own transforms and independent of the code under
test: per image RandomResizedCrop's ``get_params`` on torch's global generator, the integer-box
crop and bilinear resize, a flip drawn with ``torch.rand(1) < 0.5``, ToTensor, Normalize; per batch
the stacked tensor mixed (CutMix or Mixup, numpy's global generator for lambda and the box), the
teacher run once, its output saved (as ``half()`` with fp16) in the six-item list."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from torch.utils.data import RandomSampler
from torchvision.datasets import ImageFolder


def _rand_bbox(size: int, lam: float) -> list:
    cut = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(size * cut), int(size * cut)
    cx, cy = np.random.randint(size), np.random.randint(size)
    return [np.clip(cx - cut_w // 2, 0, size), np.clip(cy - cut_h // 2, 0, size),
            np.clip(cx + cut_w // 2, 0, size), np.clip(cy + cut_h // 2, 0, size)]


@torch.no_grad()
def write_sre2l_relabel(train_dir: str, fkd_path: str, teacher: torch.nn.Module, *, epochs: int, batch_size: int,
                        input_size: int, mix_type: str, fkd_seed: int = 42, seed: int = 0,
                        scale=(0.08, 1.0), fp16: bool = True) -> None:
    dataset = ImageFolder(train_dir)
    generator = torch.Generator()
    generator.manual_seed(fkd_seed)
    sampler = RandomSampler(dataset, generator=generator)
    torch.manual_seed(seed)
    np.random.seed(seed)  # SRe2L's --seed leaves numpy unseeded; a reproducible reference seeds it
    normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    teacher.eval()
    for epoch in range(epochs):
        order = list(sampler)
        os.makedirs(os.path.join(fkd_path, f"epoch_{epoch}"), exist_ok=True)
        for b in range(math.ceil(len(order) / batch_size)):
            rows = order[b * batch_size:(b + 1) * batch_size]
            coords, flips, images = [], [], []
            for k in rows:
                img = dataset.loader(dataset.samples[k][0])
                i, j, h, w = T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
                coords.append([i / img.height, j / img.width, h / img.height, w / img.width])
                crop = F.resized_crop(img, i, j, h, w, [input_size, input_size], T.InterpolationMode.BILINEAR)
                flip = bool(torch.rand(1) < 0.5)
                flips.append(flip)
                images.append(normalize(F.to_tensor(F.hflip(crop) if flip else crop)))
            x = torch.stack(images)
            mix_index = lam = bbox = None
            if mix_type in ("cutmix", "mixup"):
                mix_index = torch.randperm(len(rows))
                lam = np.random.beta(1.0, 1.0) if mix_type == "cutmix" else np.random.beta(0.8, 0.8)
            if mix_type == "cutmix":
                bbox = _rand_bbox(input_size, lam)
                x1, y1, x2, y2 = bbox
                x[:, :, x1:x2, y1:y2] = x[mix_index, :, x1:x2, y1:y2]
            elif mix_type == "mixup":
                x = lam * x + (1 - lam) * x[mix_index]
            out = teacher(x)
            torch.save([torch.FloatTensor(coords), torch.tensor(flips), mix_index, lam, bbox,
                        out.half() if fp16 else out], os.path.join(fkd_path, f"epoch_{epoch}", f"batch_{b}.tar"))
