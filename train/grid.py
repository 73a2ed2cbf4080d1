"""A PNG grid of one batch as the model sees it (crop, flip, mix applied; de-normalised): a title,
a legend, and per image its hard label, its mix partner's label and the teacher's top-1 class."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from fkd_shards.batches.batch import Batch
from fkd_shards.batches.mix import MEAN, STD
from fkd_shards.common.files import write_atomically

LINE_PX = 14


def _legend(batch: Batch, size: int) -> list[str]:
    lines = [f"epoch {batch.epoch} batch {batch.batch}: {len(batch.rows)} images, {size}x{size} px, mix "
             f"{batch.mix_type}" + (f", lambda {batch.mix_lam:.3f}" if batch.mix_lam is not None else "")]
    if batch.mix_bbox is not None:
        x1, y1, x2, y2 = batch.mix_bbox
        area = (x2 - x1) * (y2 - y1) / (size * size)
        lines.append(f"CutMix box [bbx1, bby1, bbx2, bby2] = {list(batch.mix_bbox)}: rows {x1}:{x2}, columns {y1}:{y2} "
                     f"(outlined) come from the partner: {area:.0%} of the image")
        lines.append("lambda is SRe2L's raw Beta(1,1) draw; the box is cut from it and clipped at the image edge, so "
                     "the pasted area is not 1 - lambda")
    elif batch.mix_lam is not None:
        lines.append(f"Mixup: each image is {batch.mix_lam:.3f} x itself + {1 - batch.mix_lam:.3f} x its partner")
    partner = "  p: mix partner's class" if batch.partner_targets is not None else ""
    lines.append(f"y: the image's class{partner}  t: teacher's top-1 (stored soft label)  red: t is not y"
                 + (" nor p" if partner else ""))
    return lines


def render_batch(batch: Batch, tile: int = 96, columns: int = 8) -> Image.Image:
    """The grid: legend lines, then one tile per row of the batch with its caption."""
    x = batch.model_input("cpu")
    size = x.shape[-1]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    teacher = batch.soft_labels.argmax(dim=1).tolist()
    targets = batch.targets.tolist()
    partners = batch.partner_targets.tolist() if batch.partner_targets is not None else None
    legend = _legend(batch, size)
    rows = max(1, -(-len(pixels) // columns))
    top_px = LINE_PX * len(legend) + 4
    width = max(columns * tile, 6 * max(len(line) for line in legend) + 4)
    canvas = Image.new("RGB", (width, top_px + rows * (tile + LINE_PX)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(legend):
        draw.text((2, 1 + k * LINE_PX), line, fill="black")
    scale = tile / size
    for k, image in enumerate(pixels):
        left, top = (k % columns) * tile, top_px + (k // columns) * (tile + LINE_PX)
        canvas.paste(Image.fromarray(np.ascontiguousarray(image)).resize((tile, tile), Image.NEAREST), (left, top))
        if batch.mix_bbox is not None:
            x1, y1, x2, y2 = batch.mix_bbox  # x indexes rows (height), y columns (width)
            if x2 > x1 and y2 > y1:
                draw.rectangle((left + y1 * scale, top + x1 * scale, left + y2 * scale - 1, top + x2 * scale - 1),
                               outline="yellow")
        known = {targets[k]} | ({partners[k]} if partners else set())
        caption = f"y={targets[k]}" + (f" p={partners[k]}" if partners else "") + f" t={teacher[k]}"
        draw.text((left + 2, top + tile + 1), caption, fill="black" if teacher[k] in known else "red")
    return canvas


def save_png(image: Image.Image, path: str) -> None:
    """Write through a temporary name and a rename."""
    write_atomically(path, lambda f: image.save(f, format="PNG"))
