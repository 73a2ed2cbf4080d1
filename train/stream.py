"""The ordered batch stream: every batch exactly as the teacher labelled it, through the public
DataLoader API.

Label records are read (verified, checked) in order in the main process; each becomes a
:class:`.plan.CropTask` that carries its own layout and soft labels. The DataLoader hands the tasks
to its worker processes through the sampler slot and returns the finished batches in task order.
The stream checks every batch's (epoch, batch) against the order it must come in: a misaligned
batch is an error, never a silent wrong label.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fkd_shards import shards

from .batch import Batch
from .crop import CpuCropper, CropError
from .device_crop import DeviceCropper
from .images import ImageError, ImageSource, ImageTable, decode_cache_choice, load_images
from .plan import CropTask, plan_task


class StreamError(RuntimeError):
    """A batch that cannot be made (an image that does not decode, an empty crop box) or that came
    back out of order; the message says which."""


@dataclass(frozen=True)
class CropFailure:
    """What a worker returns instead of raising: a one-line reason (a worker's exception would reach
    the main process wrapped in a traceback)."""

    message: str


class _Batches(Dataset):
    """Map-style dataset whose 'index' is a :class:`CropTask` and whose item is the finished batch."""

    def __init__(self, cropper: CpuCropper | DeviceCropper, labels: torch.Tensor, mix_type: str):
        self.cropper, self.labels, self.mix_type = cropper, labels, mix_type

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, task: CropTask) -> Batch | CropFailure:
        try:
            crops = self.cropper.crop(task.samples, task.coords, task.flips, shared=get_worker_info() is not None)
        except (ImageError, CropError) as exc:
            return CropFailure(f"epoch {task.epoch} batch {task.batch}: {exc}")
        partners = None if task.partners is None else torch.from_numpy(task.partners)
        return Batch(
            epoch=task.epoch, batch=task.batch, rows=task.rows, batch_rows=task.batch_rows, crops=crops,
            own=None if task.own is None else torch.from_numpy(task.own),
            partners=partners, targets=self.labels[torch.from_numpy(task.row_samples)],
            partner_targets=None if partners is None else self.labels[torch.from_numpy(task.samples)][partners],
            soft_labels=torch.tensor(task.soft_labels, dtype=torch.float32),
            mix_type=self.mix_type, mix_lam=task.mix_lam, mix_bbox=task.mix_bbox,
        )


def _keep(item):
    return item


class BatchStream:
    """Batches of epochs ``[start_epoch, end_epoch)`` of ``shard_set`` in (epoch, batch) order, for
    rank ``rank`` of ``world_size``.

    Images are read from the image shards once (``images``, or at construction) and kept in
    memory. ``decode_cache``: keep each image's decoded pixels after its first use, in memory the
    workers share (True), decode for every crop (False), or decide by the memory available (None;
    ``decode_cache_note`` says what was chosen). ``crop_device`` (e.g. ``"cuda"``): crop, resize
    and flip there, bit-identical to PIL, instead of in worker processes.
    """

    def __init__(self, shard_set: shards.ShardSet, start_epoch: int = 0, end_epoch: int | None = None,
                 workers: int = 2, rank: int = 0, world_size: int = 1, *, images: ImageTable | None = None,
                 decode_cache: bool | None = None, crop_device: str | None = None, pin_memory: bool = False,
                 prefetch_factor: int = 2, local_ranks: int = 1):
        self.shard_set = shard_set
        m = self.manifest = shard_set.manifest
        self.start_epoch = start_epoch
        self.end_epoch = m.epochs if end_epoch is None else end_epoch
        if not 0 <= start_epoch <= self.end_epoch <= m.epochs:
            raise ValueError(f"epochs [{start_epoch}, {self.end_epoch}) outside the set's [0, {m.epochs})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if m.batch_size % world_size:
            raise ValueError(f"batch size {m.batch_size} is not divisible by world size {world_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch_factor = prefetch_factor
        self.images = images if images is not None else load_images(shard_set)
        if crop_device:
            decode_cache, self.decode_cache_note = True, f"decoded cache on {crop_device}: every image decoded once"
        elif decode_cache is None:
            decode_cache, self.decode_cache_note = decode_cache_choice("auto", self.images, local_ranks)
        else:
            self.decode_cache_note = decode_cache_choice("on" if decode_cache else "off", self.images, local_ranks)[1]
        source = ImageSource(self.images, decode_cache)
        cropper = DeviceCropper(source, m.input_size, crop_device) if crop_device else CpuCropper(source, m.input_size)
        self._dataset = _Batches(cropper, torch.from_numpy(self.images.labels), m.mix_type)
        self.crop_device = crop_device
        self.cropped_fraction = 1.0  # share of the batches' rows this rank cropped, measured while iterating

    def __len__(self) -> int:
        return (self.end_epoch - self.start_epoch) * self.manifest.batches_per_epoch

    def _tasks(self) -> Iterator[CropTask]:
        for record in self.shard_set.batches(self.start_epoch, self.end_epoch):
            yield plan_task(record, self.manifest.batch_size, self.rank, self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        tasks = self._tasks()
        if self.crop_device or self.workers == 0:
            results = map(self._dataset.__getitem__, tasks)
        else:
            results = DataLoader(self._dataset, batch_size=None, sampler=tasks, num_workers=self.workers,
                                 collate_fn=_keep, prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory)
        m = self.manifest
        expected = ((e, b) for e in range(self.start_epoch, self.end_epoch) for b in range(m.batches_per_epoch))
        cropped = total = 0
        for result in results:
            if isinstance(result, CropFailure):
                raise StreamError(result.message)
            position = next(expected, None)
            if (result.epoch, result.batch) != position:
                raise StreamError(f"a worker returned epoch {result.epoch} batch {result.batch} where epoch "
                                  f"{position[0]} batch {position[1]} belongs")
            cropped, total = cropped + result.crops.shape[0], total + result.batch_rows
            self.cropped_fraction = cropped / total
            yield result


def batch_at(shard_set: shards.ShardSet, epoch: int, batch: int) -> Batch:
    """One batch, out of the stream's order (reads that epoch's label records up to it), cropped in
    this process: what ``inspect`` draws."""
    m = shard_set.manifest
    if not 0 <= epoch < m.epochs:
        raise ValueError(f"epoch {epoch} outside [0, {m.epochs})")
    if not 0 <= batch < m.batches_per_epoch:
        raise ValueError(f"batch {batch} outside [0, {m.batches_per_epoch})")
    images = load_images(shard_set)
    dataset = _Batches(CpuCropper(ImageSource(images, cache=False), m.input_size), torch.from_numpy(images.labels),
                       m.mix_type)
    for record in shard_set.batches(epoch, epoch + 1):
        if record.batch == batch:
            result = dataset[plan_task(record, m.batch_size)]
            if isinstance(result, CropFailure):
                raise StreamError(result.message)
            return result
    raise AssertionError("unreachable: the reader checks that every batch is present")
