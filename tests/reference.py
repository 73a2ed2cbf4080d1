"""A written-out reference of what the original trainer's model sees (SRE2L-FACTS sections 4-5),
built from the relabel files and the image folder with torchvision's own transforms: independent of
the code under test."""

from __future__ import annotations

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image


def reference_batch(files: dict, samples: list, indices: list[int], epoch: int, batch: int, size: int,
                    mix_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model input float32 (n,3,S,S), hard targets (n,), float32 soft labels (n,C))."""
    coords, flips, mix_index, lam, bbox, soft = torch.load(files[(epoch, batch)], weights_only=False)
    to_tensor = T.ToTensor()
    normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    rows = []
    for r, k in enumerate(indices):
        img = Image.open(samples[k][0]).convert("RGB")
        i = coords[r][0].item() * img.size[1]
        j = coords[r][1].item() * img.size[0]
        h = coords[r][2].item() * img.size[1]
        w = coords[r][3].item() * img.size[0]
        img = F.resized_crop(img, i, j, h, w, [size, size], T.InterpolationMode.BILINEAR)
        if bool(flips[r]):
            img = F.hflip(img)
        rows.append(normalize(to_tensor(img)))
    images = torch.stack(rows)  # what default_collate produces
    if mix_type == "cutmix":
        bbx1, bby1, bbx2, bby2 = bbox
        images[:, :, bbx1:bbx2, bby1:bby2] = images[mix_index, :, bbx1:bbx2, bby1:bby2]
    elif mix_type == "mixup":
        images = lam * images + (1 - lam) * images[mix_index]
    targets = torch.tensor([samples[k][1] for k in indices])
    return images, targets, soft.float()
