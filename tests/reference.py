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


def reference_train(model, files: dict, samples: list, truth, *, epochs: int, size: int, mix_type: str,
                    temperature: float, steps: int, lr: float = 0.001, weight_decay: float = 0.01):
    """SRE2L-FACTS section 6 written out: AdamW with the two parameter groups, linear LambdaLR per
    epoch, per batch zero_grad + micro-batches of B/A (ceil(n/(B/A)) in the short last batch, still
    divided by A) + one step. Trains ``epochs`` epochs of ``truth`` in place."""
    import math

    import torch.nn as nn
    import torch.nn.functional as Fn
    from torch.optim.lr_scheduler import LambdaLR

    decay = [p for name, p in model.named_parameters() if "weight" in name and p.ndim > 1]
    no_decay = [p for name, p in model.named_parameters() if not ("weight" in name and p.ndim > 1)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    scheduler = LambdaLR(optimizer, lambda step: (1.0 - step / epochs) if step <= epochs else 0)
    kl = nn.KLDivLoss(reduction="batchmean")
    num_images, batch_size = len(samples), truth.batch_size
    num_batches = math.ceil(num_images / batch_size)
    small = batch_size // steps
    for epoch in range(epochs):
        model.train()
        for b in range(num_batches):
            images, _, soft = reference_batch(files, samples, truth.indices(epoch, b), epoch, b, size,
                                              mix_type)
            optimizer.zero_grad()
            accum = math.ceil(images.shape[0] / small) if b == num_batches - 1 else steps
            for k in range(accum):
                out = model(images[k * small:(k + 1) * small])
                target = Fn.softmax(soft[k * small:(k + 1) * small] / temperature, dim=1)
                loss = kl(Fn.log_softmax(out / temperature, dim=1), target) / steps
                loss.backward()
            optimizer.step()
        scheduler.step()
    return model
