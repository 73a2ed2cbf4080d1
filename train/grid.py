"""A PNG grid of one batch as the model sees it (crop, flip, mix applied; de-normalised), each image
captioned with its hard label and the teacher's top-1 class."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from .mix import MEAN, STD
from .stream import Batch

CAPTION_PX = 14


def render_batch(batch: Batch, tile: int = 96, columns: int = 8) -> Image.Image:
    """The grid: a title line (epoch, batch, mix, lambda), then one tile per row of the batch."""
    x = batch.model_input("cpu")
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    teacher = batch.soft_labels.argmax(dim=1).tolist()
    targets = batch.targets.tolist()
    rows = max(1, -(-len(pixels) // columns))
    canvas = Image.new("RGB", (columns * tile, CAPTION_PX + rows * (tile + CAPTION_PX)), "white")
    draw = ImageDraw.Draw(canvas)
    title = f"epoch {batch.epoch} batch {batch.batch}: {batch.mix_type}"
    if batch.mix_lam is not None:
        title += f", lambda={batch.mix_lam:.3f}"
    if batch.mix_bbox is not None:
        title += f", box={list(batch.mix_bbox)}"
    draw.text((2, 1), title, fill="black")
    for k, image in enumerate(pixels):
        left, top = (k % columns) * tile, CAPTION_PX + (k // columns) * (tile + CAPTION_PX)
        enlarged = Image.fromarray(np.ascontiguousarray(image)).resize((tile, tile), Image.NEAREST)
        canvas.paste(enlarged, (left, top))
        colour = "black" if teacher[k] == targets[k] else "red"
        draw.text((left + 2, top + tile + 1), f"y={targets[k]} t={teacher[k]}", fill=colour)
    return canvas


def save_png(image: Image.Image, path: str) -> None:
    """Write through a temporary name and a rename."""
    temp = path + ".partial"
    image.save(temp, format="PNG")
    os.replace(temp, path)
