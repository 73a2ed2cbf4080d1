"""Validation on an ImageFolder with the original transforms, sharded over ranks and reduced.

Before training, every file's image header is parsed (:func:`val_loader`): a file that is not an
image is named at start-up. An image whose header parses but whose pixels do not decode does not
crash a worker with a traceback: the dataset marks it, and :func:`evaluate` raises one line naming
the file (after the epoch's checkpoint is written); under torchrun every rank raises it, whichever
rank met the file.

Under torchrun the students' batch-norm running statistics differ by rank (buffers are not
broadcast while training); :func:`rank0_buffers` lends every rank rank 0's for the evaluation, so
that the reported top-1 is that of the model rank 0 saves.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from fkd_shards.batches.mix import MEAN, STD
from fkd_shards.common.distributed import DistEnv, agreed, sum_across_ranks
from fkd_shards.common.files import FileReadError, open_regular, read_bounded, refuse_directory_loops
from fkd_shards.common.text import first_line

from .kd import topk_correct

MAX_VAL_IMAGE_BYTES = 256 * 2**20


class ValidationError(ValueError):
    """The validation folder cannot be used; the message names the folder or the file."""


def _load_rgb(path: str) -> Image.Image:
    """A validation image: a regular file (a FIFO would block the loader), bounded, decoded to RGB."""
    data = read_bounded(path, MAX_VAL_IMAGE_BYTES)
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class _CheckedFolder(ImageFolder):
    """ImageFolder whose unreadable images come back as a marker: target ``-(index + 1)``."""

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except Exception:  # PIL's errors for a broken file; the reason is found again in evaluate
            return torch.zeros(3, self.size, self.size), -(index + 1)


def val_loader(val_dir: str, classes: list[str], input_size: int, batch_size: int, workers: int,
               env: DistEnv) -> DataLoader:
    """Resize(256)+CenterCrop(224) at S=224, scaled as 256/224 for other sizes; batch B/4. The class
    folders must be the shard set's."""
    transform = T.Compose([T.Resize(round(input_size * 256 / 224)), T.CenterCrop(input_size),
                           T.ToTensor(), T.Normalize(mean=list(MEAN), std=list(STD))])
    try:
        refuse_directory_loops(val_dir)
        dataset = _CheckedFolder(val_dir, transform, loader=_load_rgb)
    except FileReadError as exc:
        raise ValidationError(str(exc)) from None
    except (OSError, ValueError) as exc:  # torchvision: a missing folder, a class folder without images
        raise ValidationError(f"{val_dir}: not a usable image folder ({first_line(exc)})") from None
    dataset.size = input_size
    if dataset.classes != classes:
        raise ValidationError(f"{val_dir}: class folders differ from the shard set's classes")
    shard = Subset(dataset, range(env.rank, len(dataset), env.world_size))
    _check_headers([dataset.samples[k][0] for k in shard.indices])
    # Its own generator: iterating a DataLoader draws a seed, which must not move the global RNG
    # (dropout, resume parity) by whether an epoch validates.
    return DataLoader(shard, batch_size=max(1, batch_size // 4), shuffle=False, num_workers=workers,
                      generator=torch.Generator())


def _check_headers(paths: list[str]) -> None:
    """Each file opens as a regular file within the size bound and its image header parses (the
    pixels are decoded only when validating): a broken file is named before the first epoch trains,
    not after it. One that passes this and still fails to decode is named after its epoch's checkpoint."""
    for path in paths:
        try:
            fd, size = open_regular(path)
            with os.fdopen(fd, "rb") as f:
                if size > MAX_VAL_IMAGE_BYTES:
                    raise ValueError(f"{size} bytes, more than {MAX_VAL_IMAGE_BYTES}")
                # PIL reads what the header needs (a large ICC profile, a TIFF index at the end), no pixels.
                with Image.open(f) as img:
                    img.size  # noqa: B018
        except FileReadError as exc:
            raise ValidationError(str(exc)) from None
        except Exception as exc:  # PIL raises many types for bytes that are not an image
            raise ValidationError(f"{path}: unreadable image ({first_line(exc, 150)})") from None


def evaluate(model: nn.Module, loader: DataLoader, device: str, env: DistEnv) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 (percent) over the whole validation set."""
    return evaluate_many([model], loader, device, env)[0]


@torch.no_grad()
def evaluate_many(models: list[nn.Module], loader: DataLoader, device: str, env: DistEnv) -> list[dict[str, float]]:
    """:func:`evaluate` for several models on one pass over the validation set: each batch is
    decoded once and every model scores it, each summing exactly as it would alone."""
    for model in models:
        model.eval()
    totals = [torch.zeros(4, dtype=torch.float64) for _ in models]  # loss sum, top-1, top-5, rows
    try:
        with agreed(env, device):  # an unreadable image on one rank stops them all, none waits below
            _score(models, loader, device, totals)
    finally:
        for model in models:
            model.train()
    results = []
    for total in totals:
        total = sum_across_ranks(total.to(device), env).cpu()
        rows = max(total[3].item(), 1.0)
        results.append({"val/loss": total[0].item() / rows, "val/top1": 100 * total[1].item() / rows,
                        "val/top5": 100 * total[2].item() / rows})
    return results


def _score(models: list[nn.Module], loader: DataLoader, device: str, totals: list[torch.Tensor]) -> None:
    """Add each model's loss sum, top-1 and top-5 hits and rows over this rank's share to ``totals``."""
    for images, targets in loader:
        if (targets < 0).any():
            _raise_unreadable(loader, int(-targets[targets < 0][0]) - 1)
        images, targets = images.to(device), targets.to(device)
        for model, total in zip(models, totals):
            out = model(images)
            top1, top5 = topk_correct(out, targets, (1, 5))
            loss_sum = F.cross_entropy(out, targets, reduction="sum")
            counts = torch.stack([loss_sum.double(), top1.double(), top5.double()]).cpu()
            total += torch.cat([counts, torch.tensor([len(targets)], dtype=torch.float64)])


@contextmanager
def rank0_buffers(models: list[nn.Module], env: DistEnv) -> Iterator[None]:
    """Rank 0's buffers (batch-norm running statistics) in every rank's ``models`` while the block
    runs, each rank's own back afterwards: evaluation scores the saved model, training goes on as
    it would have. A plain run: nothing changes."""
    if not env.active:
        yield
        return
    import torch.distributed as dist

    own = [[buffer.detach().clone() for buffer in model.buffers()] for model in models]
    for model in models:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for model, kept in zip(models, own):
                for buffer, value in zip(model.buffers(), kept):
                    buffer.copy_(value)


def _raise_unreadable(loader: DataLoader, index: int) -> None:
    path = loader.dataset.dataset.samples[index][0]
    try:
        _load_rgb(path)
        reason = "unreadable image"
    except Exception as exc:  # the reason the worker's load failed, found again here
        reason = f"unreadable image ({first_line(exc, 150)})"
    raise ValidationError(f"{path}: {reason}")
