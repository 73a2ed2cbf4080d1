"""The demo's teacher: torchvision's resnet18 (as SRe2L's ImageNet teacher), trained from scratch on
the digits on the CPU with the views the relabel step will show it: random resized crops and flips."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from tqdm import tqdm

from fkd_shards.batches.mix import MEAN, STD

MODEL = "resnet18"


def to_model_input(gray_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (n, H, W) grey images -> normalised float (n, 3, size, size)."""
    x = gray_u8.float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _augment(x: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
    """Random resized crops and flips, per image: the views the relabel step will show the teacher."""
    out = []
    for image in x:
        i, j, h, w = T.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
        crop = TF.resized_crop(image, i, j, h, w, [size, size], antialias=True)
        out.append(TF.hflip(crop) if torch.rand(1) < 0.5 else crop)
    return torch.stack(out)


def train_teacher(images, labels, *, size: int, epochs: int, seed: int = 0,
                  scale: tuple[float, float] = (0.35, 1.0), progress: bool = True) -> torch.nn.Module:
    """A resnet18 for the 10 digits, trained ``epochs`` epochs; returned in eval mode."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(MODEL, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = to_model_input(torch.from_numpy(images), images.shape[1])
    y = torch.from_numpy(labels)
    for _ in tqdm(range(epochs), desc="teacher", unit="epoch", disable=not progress, file=sys.stderr):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(_augment(x[idx], size, scale)), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
