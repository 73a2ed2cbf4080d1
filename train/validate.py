"""Validation on an ImageFolder with the original transforms, sharded over ranks and reduced."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from .distributed import DistEnv, sum_across_ranks
from .kd import topk_correct
from .mix import MEAN, STD


def val_loader(val_dir: str, input_size: int, batch_size: int, workers: int, env: DistEnv) -> DataLoader:
    """Resize(256)+CenterCrop(224) at S=224, scaled as 256/224 for other sizes; batch B/4."""
    transform = T.Compose([T.Resize(round(input_size * 256 / 224)), T.CenterCrop(input_size),
                           T.ToTensor(), T.Normalize(mean=list(MEAN), std=list(STD))])
    dataset = ImageFolder(val_dir, transform)
    shard = Subset(dataset, range(env.rank, len(dataset), env.world_size))
    return DataLoader(shard, batch_size=max(1, batch_size // 4), shuffle=False, num_workers=workers)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str, env: DistEnv) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 (percent) over the whole validation set."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1, top-5, rows
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        out = model(images)
        top1, top5 = topk_correct(out, targets, (1, 5))
        loss_sum = F.cross_entropy(out, targets, reduction="sum")
        counts = torch.stack([loss_sum.double(), top1.double(), top5.double()]).cpu()
        totals += torch.cat([counts, torch.tensor([len(targets)], dtype=torch.float64)])
    totals = sum_across_ranks(totals.to(device), env).cpu()
    rows = max(totals[3].item(), 1.0)
    model.train()
    return {"val/loss": totals[0].item() / rows, "val/top1": 100 * totals[1].item() / rows,
            "val/top5": 100 * totals[2].item() / rows}
