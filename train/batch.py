"""One batch as the stream delivers it: uint8 crops plus what turns them into the model's input."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mix import apply_mix, normalize


@dataclass
class Batch:
    """One rank's slice of one labelled batch (the whole batch when ``world_size`` is 1).

    ``crops`` are uint8, before normalisation and mixing; :meth:`model_input` normalises and mixes
    them with their partners, giving exactly what the original trainer's model saw. Crops made on
    the CPU are channels-last in memory (PIL's own pixel order: no transpose per image on the CPU).
    """

    epoch: int
    batch: int
    rows: range  # the slice's rows within the full batch
    batch_rows: int  # n, the full batch's row count
    crops: torch.Tensor  # uint8 (u, 3, S, S), any layout: every image the slice needs, each cropped once
    own: torch.Tensor | None  # int64 (m,): the slice's rows in ``crops``; None when all, in order
    partners: torch.Tensor | None  # int64 (m,): each row's mix partner in ``crops``; None without mix
    targets: torch.Tensor  # int64 (m,): hard labels (the class of each row's own image)
    partner_targets: torch.Tensor | None  # int64 (m,): the class of each row's mix partner; None without mix
    soft_labels: torch.Tensor  # float32 (m, C)
    mix_type: str
    mix_lam: float | None
    mix_bbox: tuple[int, int, int, int] | None

    @property
    def images(self) -> torch.Tensor:
        """uint8 (m, 3, S, S): the slice's crops, not normalised, not mixed."""
        return self.crops if self.own is None else self.crops[self.own]

    def model_input(self, device: str | torch.device = "cpu",
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """float32 (m, 3, S, S) on ``device``: normalised, then mixed; contiguous NCHW, or
        channels-last with ``memory_format=torch.channels_last``. The layout changes no value."""
        # Made contiguous in uint8, before any arithmetic: the same float32 operations then run on
        # the same values whatever the crops' layout was.
        crops = self.crops.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        normalized = normalize(crops)
        x = normalized if self.own is None else normalized[self.own.to(device)]
        if self.partners is not None and len(self.rows):
            x = apply_mix(x, normalized[self.partners.to(device)], self.mix_type, self.mix_lam, self.mix_bbox)
        return x.contiguous(memory_format=memory_format)  # indexing may pick another layout
