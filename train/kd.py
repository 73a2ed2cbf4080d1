"""The pure pieces of the loop: KD loss, LR schedule, parameter groups, accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(logits: torch.Tensor, soft_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """KLDivLoss(batchmean)(log_softmax(logits/T), softmax(soft/T)); no T*T factor.

    logits, soft_labels: (m, C) float32. Returns a scalar: the sum over rows divided by m.
    """
    log_p = F.log_softmax(logits / temperature, dim=1)
    q = F.softmax(soft_labels / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean")


def lr_factor(epoch: int, epochs: int, cosine: bool) -> float:
    """LambdaLR factor for ``epoch``: ``0.5*(1+cos(pi*e/E))`` or ``1 - e/E``; 0 past E."""
    if epoch > epochs:
        return 0.0
    if cosine:
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 1.0 - epoch / epochs


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay for parameters named ``*weight*`` with ndim > 1; none for biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if "weight" in name and param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """Rows whose target is among the top-k logits, for each k (k capped at C); 0-dim tensors on
    the logits' device, so that counting does not wait for the device."""
    kmax = min(max(ks), logits.shape[1])
    hits = logits.topk(kmax, dim=1).indices == targets.view(-1, 1)
    return [hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks]
