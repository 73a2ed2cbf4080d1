"""One batch as the stream delivers it: uint8 crops plus what turns them into the model's input."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fkd_shards import shards

from .mix import apply_mix, normalize
from .plan import BatchPlan


@dataclass
class Batch:
    """One rank's slice of one labelled batch (the whole batch when ``world_size`` is 1), delivered:
    its :class:`BatchPlan` (the record, the rows, the crops' layout) with the crops made for it.

    ``crops`` are uint8, before normalisation and mixing; :meth:`model_input` normalises and mixes
    them with their partners, giving exactly what the original trainer's model saw. Crops made on
    the CPU are channels-last in memory (PIL's own pixel order: no transpose per image on the CPU).
    """

    plan: BatchPlan
    crops: torch.Tensor  # uint8 (u, 3, S, S), any layout: every image the slice needs, each cropped once
    targets: torch.Tensor  # int64 (m,): hard labels (the class of each row's own image)
    partner_targets: torch.Tensor | None  # int64 (m,): the class of each row's mix partner; None without mix
    soft_labels: torch.Tensor  # float32 (m, C): the stored labels of the slice's rows
    mix_type: str

    @property
    def record(self) -> shards.BatchRecord:
        """The batch record this batch was made from (all rows, not only the slice's)."""
        return self.plan.record

    @property
    def epoch(self) -> int:
        return self.plan.record.epoch

    @property
    def batch(self) -> int:
        return self.plan.record.batch

    @property
    def rows(self) -> range:
        """The slice's rows within the full batch."""
        return self.plan.rows

    @property
    def batch_rows(self) -> int:
        """n, the full batch's row count."""
        return self.plan.record.size

    @property
    def mix_lam(self) -> float | None:
        return self.plan.record.mix_lam

    @property
    def mix_bbox(self) -> tuple[int, int, int, int] | None:
        return self.plan.record.mix_bbox

    @property
    def own(self) -> torch.Tensor | None:
        """int64 (m,): the slice's rows in ``crops``; None when all, in order."""
        return None if self.plan.own is None else torch.from_numpy(self.plan.own)

    @property
    def partners(self) -> torch.Tensor | None:
        """int64 (m,): each row's mix partner in ``crops``; None without mix."""
        return None if self.plan.partners is None else torch.from_numpy(self.plan.partners)

    @property
    def images(self) -> torch.Tensor:
        """uint8 (m, 3, S, S): the slice's crops, not normalised, not mixed."""
        own = self.own
        return self.crops if own is None else self.crops[own]

    def model_input(self, device: str | torch.device = "cpu",
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """float32 (m, 3, S, S) on ``device``: normalised, then mixed; contiguous NCHW, or
        channels-last with ``memory_format=torch.channels_last``. The layout changes no value."""
        # Made contiguous in uint8, before any arithmetic: the same float32 operations then run on
        # the same values whatever the crops' layout was.
        crops = to_device(self.crops, device).contiguous(memory_format=memory_format)
        normalized = normalize(crops)
        own, partners = self.own, self.partners
        x = normalized if own is None else normalized[to_device(own, device)]
        if partners is not None and len(self.rows):
            x = apply_mix(x, normalized[to_device(partners, device)], self.mix_type, self.mix_lam, self.mix_bbox)
        return x.contiguous(memory_format=memory_format)  # indexing may pick another layout


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without the host waiting for the device: a copy to CUDA from
    ordinary (pageable) memory waits for the device to finish, so the host side is pinned first
    (small tensors come from torch's cache of pinned blocks; the stream pins crops as it delivers
    them). Elsewhere a plain ``.to``."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
