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


@dataclass(frozen=True)
class Cropped:
    """A worker's result: its task (carrying the layout back) and the crops made for it."""

    task: CropTask
    crops: torch.Tensor

    def pin_memory(self) -> Cropped:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        # Pin the crops' own memory order: (u, S, S, 3) for CPU crops, seen as (u, 3, S, S) again.
        return Cropped(self.task, self.crops.permute(0, 2, 3, 1).pin_memory().permute(0, 3, 1, 2))


class BatchMaker:
    """Crops a task's images (on the CPU with PIL, or on ``crop_device``) and assembles the batch:
    crops from the worker, everything else from the task, in the main process."""

    def __init__(self, images: ImageTable, input_size: int, mix_type: str, decode_cache: bool,
                 crop_device: str | None = None, shared: bool = True):
        source = ImageSource(images, decode_cache or bool(crop_device), shared=shared and not crop_device)
        self.cropper = DeviceCropper(source, input_size, crop_device) if crop_device else \
            CpuCropper(source, input_size)
        self.labels = torch.from_numpy(images.labels)
        self.mix_type = mix_type

    def crop(self, task: CropTask, shared: bool = False) -> Cropped | CropFailure:
        try:
            return Cropped(task, self.cropper.crop(task.samples, task.coords, task.flips, shared=shared))
        except (ImageError, CropError) as exc:
            return CropFailure(f"epoch {task.epoch} batch {task.batch}: {exc}")

    def assemble(self, result: Cropped) -> Batch:
        task = result.task
        partners = None if task.partners is None else torch.from_numpy(task.partners)
        sample_labels = self.labels[torch.from_numpy(task.samples)]
        return Batch(
            epoch=task.epoch, batch=task.batch, rows=task.rows, batch_rows=task.batch_rows, crops=result.crops,
            own=None if task.own is None else torch.from_numpy(task.own), partners=partners,
            targets=self.labels[torch.from_numpy(task.row_samples)],
            partner_targets=None if partners is None else sample_labels[partners],
            soft_labels=torch.tensor(task.soft_labels, dtype=torch.float32),
            mix_type=self.mix_type, mix_lam=task.mix_lam, mix_bbox=task.mix_bbox,
        )


class _CropDataset(Dataset):
    """Map-style dataset for the DataLoader's workers: its 'index' is a :class:`CropTask`."""

    def __init__(self, maker: BatchMaker):
        self.maker = maker

    def __len__(self) -> int:
        return len(self.maker.labels)

    def __getitem__(self, task: CropTask) -> Cropped | CropFailure:
        # In a worker process the crops are made in shared memory: handing them over copies nothing.
        return self.maker.crop(task, shared=get_worker_info() is not None)


def _keep(item):
    return item


def make_batches(tasks: Iterator[CropTask], maker: BatchMaker, positions: Iterator[tuple[int, int]], workers: int,
                 prefetch_factor: int = 2, pin_memory: bool = False) -> Iterator[Batch]:
    """The batches of ``tasks``, in order, cropped by ``workers`` processes (0: in this one, as do
    device crops). Each must come back at the next of ``positions``: a result out of order, or one
    that failed, is a :class:`StreamError`."""
    if workers == 0 or isinstance(maker.cropper, DeviceCropper):
        results = map(maker.crop, tasks)
    else:
        # The tasks go through the sampler slot (batch_size=None): the DataLoader keeps their order.
        # Its own generator: iterating a DataLoader draws a seed, which must not move the global RNG.
        results = DataLoader(_CropDataset(maker), batch_size=None, sampler=tasks, num_workers=workers,
                             collate_fn=_keep, prefetch_factor=prefetch_factor, pin_memory=pin_memory,
                             generator=torch.Generator())
    for result in results:
        if isinstance(result, CropFailure):
            raise StreamError(result.message)
        position = next(positions, None)
        if (result.task.epoch, result.task.batch) != position:
            raise StreamError(f"a worker returned epoch {result.task.epoch} batch {result.task.batch} where "
                              f"{'nothing' if position is None else f'epoch {position[0]} batch {position[1]}'} "
                              f"belongs")
        yield maker.assemble(result)


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
        shared = workers > 0 and not crop_device  # worker processes read the cache
        if crop_device:
            decode_cache, self.decode_cache_note = True, f"decoded cache on {crop_device}: every image decoded once"
        else:
            mode = "auto" if decode_cache is None else "on" if decode_cache else "off"
            decode_cache, self.decode_cache_note = decode_cache_choice(mode, self.images, local_ranks, shared)
        self.maker = BatchMaker(self.images, m.input_size, m.mix_type, decode_cache, crop_device, shared)
        self.cropped_fraction = 1.0  # share of the batches' rows this rank cropped, measured while iterating

    def __len__(self) -> int:
        return (self.end_epoch - self.start_epoch) * self.manifest.batches_per_epoch

    def _tasks(self) -> Iterator[CropTask]:
        for record in self.shard_set.batches(self.start_epoch, self.end_epoch):
            yield plan_task(record, self.manifest.batch_size, self.rank, self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        m = self.manifest
        positions = ((e, b) for e in range(self.start_epoch, self.end_epoch) for b in range(m.batches_per_epoch))
        cropped = total = 0
        for batch in make_batches(self._tasks(), self.maker, positions, self.workers, self.prefetch_factor,
                                  self.pin_memory):
            cropped, total = cropped + batch.crops.shape[0], total + batch.batch_rows
            self.cropped_fraction = cropped / total
            yield batch


def batch_at(shard_set: shards.ShardSet, epoch: int, batch: int) -> Batch:
    """One batch, out of the stream's order (reads that epoch's label records up to it), cropped in
    this process: what ``inspect`` draws."""
    m = shard_set.manifest
    if not (0 <= epoch < m.epochs and 0 <= batch < m.batches_per_epoch):
        raise ValueError(f"epoch {epoch} batch {batch} outside the set's [0, {m.epochs}) x [0, {m.batches_per_epoch})")
    maker = BatchMaker(load_images(shard_set), m.input_size, m.mix_type, decode_cache=False)
    tasks = (plan_task(r, m.batch_size) for r in shard_set.batches(epoch, epoch + 1) if r.batch == batch)
    return next(make_batches(tasks, maker, iter([(epoch, batch)]), workers=0))
