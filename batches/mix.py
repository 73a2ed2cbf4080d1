"""Normalisation and the batch-level mix, on any device (SRE2L-FACTS sections 4.5 and 5)."""

from __future__ import annotations

import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255, MEAN and STD as float32 tensors on ``device``, made once per device: building them per
    batch would copy from the host, and wait for the device, at every step. 255 is a tensor too:
    CUDA divides by a Python number as a multiplication by its reciprocal, which changes the last
    bit of some pixels; by a tensor it divides exactly, as the CPU does (measured on an H200)."""
    if device not in _CONSTANTS:
        _CONSTANTS[device] = (torch.tensor(255.0, dtype=torch.float32, device=device),
                              torch.tensor(MEAN, dtype=torch.float32, device=device).view(-1, 1, 1),
                              torch.tensor(STD, dtype=torch.float32, device=device).view(-1, 1, 1))
    return _CONSTANTS[device]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, S, S) -> float32, as ToTensor then Normalize compute it: ``/ 255``, ``- mean``, ``/ std``.

    Multiplying by reciprocals instead would change the last bits.
    """
    scale, mean, std = _constants(images.device)
    # In place on the fresh float copy: the same float32 operations, no temporaries.
    return images.float().div_(scale).sub_(mean).div_(std)


def apply_mix(x: torch.Tensor, partners: torch.Tensor, mix_type: str, lam: float | None,
              bbox: tuple[int, int, int, int] | None) -> torch.Tensor:
    """Mix normalised rows ``x`` with their normalised mix partners (row ``r`` of ``partners`` is
    the image at ``mix_index[r]``). CutMix pastes the partner's box into ``x`` in place (bbx indexes
    height, bby width); Mixup blends with the Python-float lambda exactly as the original does."""
    if mix_type == "none":
        return x
    if mix_type == "cutmix":
        x1, y1, x2, y2 = bbox
        x[:, :, x1:x2, y1:y2] = partners[:, :, x1:x2, y1:y2]
        return x
    if mix_type == "mixup":
        return lam * x + (1 - lam) * partners
    raise ValueError(f"unknown mix type {mix_type!r}")
