"""The ordered batch stream: every batch exactly as the teacher labelled it, through public DataLoader API.

Label records are read in order in the main process. Each becomes a small crop task (no soft
labels) that the DataLoader hands to its worker processes; the DataLoader returns results in task
order, and every result carries its (epoch, batch), which is checked against the record it belongs
to before the batch is yielded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fkd_shards import shards

from .crop import crop_resize_flip, decode_rgb
from .decoded import DecodedImages, available_cpus, cache_budget, image_shapes
from .mix import apply_mix, normalize
from .resample import crop_resize_flip_batch, needs_pil, pil_boxes


class StreamError(RuntimeError):
    """A batch that came back from the workers misaligned with its label record."""


@dataclass(frozen=True)
class CropTask:
    """What a worker needs for one batch slice: the images to crop and where they go."""

    epoch: int
    batch: int
    samples: np.ndarray  # int64 (u,): sample index of each crop to make
    coords: np.ndarray  # float32 (u, 4)
    flips: np.ndarray  # bool (u,)


@dataclass(frozen=True)
class CropResult:
    epoch: int
    batch: int
    crops: torch.Tensor  # uint8 (u, 3, S, S), channels-last in memory (u, S, S, 3)

    def pin_memory(self) -> CropResult:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        pinned = self.crops.permute(0, 2, 3, 1).pin_memory()  # the (u, S, S, 3) memory, contiguous
        return CropResult(self.epoch, self.batch, _channels_last_view(pinned))


def _channels_last_view(hwc: torch.Tensor) -> torch.Tensor:
    """(u, S, S, 3) -> the same memory seen as (u, 3, S, S)."""
    return hwc.permute(0, 3, 1, 2)


@dataclass
class Batch:
    """One rank's slice of one labelled batch (the whole batch when ``world_size`` is 1).

    ``images`` are uint8 crops before normalisation and mixing; ``model_input()`` normalises and
    mixes them with their partners, giving exactly what the original trainer's model saw. Crops made
    on the CPU are channels-last in memory (PIL's own pixel order: no transpose per image on the CPU).
    """

    epoch: int
    batch: int
    rows: range  # the slice's rows within the full batch
    batch_rows: int  # n, the full batch's row count
    crops: torch.Tensor  # uint8 (u, 3, S, S), any layout: every image the slice needs, each cropped once
    own: torch.Tensor | None  # int64 (m,): the slice's rows in ``crops``; None when all, in order
    partners: torch.Tensor | None  # int64 (m,): each row's mix partner in ``crops``; None without mix
    targets: torch.Tensor  # int64 (m,)
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
        crops = self.crops.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        normalized = normalize(crops)
        x = normalized if self.own is None else normalized[self.own.to(device)]
        if self.partners is not None and len(self.rows):
            x = apply_mix(x, normalized[self.partners.to(device)], self.mix_type, self.mix_lam, self.mix_bbox)
        return x.contiguous(memory_format=memory_format)  # indexing may pick another layout


def slice_rows(batch_size: int, batch_rows: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s rows of a batch: ``[rank*B/K, (rank+1)*B/K)`` cut to the batch's rows."""
    per_rank = batch_size // world_size
    start = min(rank * per_rank, batch_rows)
    return range(start, min(start + per_rank, batch_rows))


def _decode_once(encoded: list[bytes], decode_cache: bool | None) -> tuple[DecodedImages | None, str]:
    """The decoded cache if asked for, or, with ``None`` (auto), if it fits :func:`cache_budget`;
    and a line that says which and why."""
    if decode_cache is False:
        return None, "decoded cache off: every crop decodes its image"
    shapes = image_shapes(encoded)
    nbytes = int((shapes[:, 0] * shapes[:, 1] * 3).sum())
    budget = cache_budget()
    if decode_cache is None and nbytes > budget:
        return None, (f"decoded cache off: {nbytes / 1e9:.2f} GB of pixels would exceed "
                      f"{budget / 1e9:.2f} GB (half the available memory, per local rank); "
                      f"every crop decodes its image")
    decoded = DecodedImages(encoded, shapes, available_cpus())
    return decoded, (f"decoded cache: {len(decoded)} images, {nbytes / 1e6:.1f} MB shared by the crop "
                     f"workers ({nbytes / max(1, len(decoded)) / 1e3:.1f} KB per image)")


class _CropDataset(Dataset):
    """Map-style dataset whose 'index' is a :class:`CropTask`. Holds the images in memory: decoded
    once (``decoded``), or encoded and decoded again for every crop, as the original does."""

    def __init__(self, encoded: list[bytes] | None, decoded: DecodedImages | None, input_size: int):
        self.encoded = encoded
        self.decoded = decoded
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.decoded if self.decoded is not None else self.encoded)

    def __getitem__(self, task: CropTask) -> CropResult:
        size = self.input_size
        # HWC per image, as PIL hands pixels out (the device makes the batch NCHW). In a worker
        # process the batch is allocated in shared memory: handing it over copies nothing.
        crops = torch.empty((len(task.samples), size, size, 3), dtype=torch.uint8)
        if get_worker_info() is not None:
            crops.share_memory_()
        out = crops.numpy()
        for k, sample in enumerate(task.samples):
            flip = bool(task.flips[k])
            if self.decoded is not None:
                out[k] = self.decoded.crop_resize_flip(sample, task.coords[k], flip, size)
            else:
                out[k] = crop_resize_flip(decode_rgb(self.encoded[sample]), task.coords[k], flip, size)
        return CropResult(task.epoch, task.batch, _channels_last_view(crops))


def _keep(result: CropResult) -> CropResult:
    return result


class _Tasks:
    """An iterable of crop tasks for the DataLoader's sampler slot; remembers what is in flight."""

    def __init__(self, records: Iterator[shards.BatchRecord], plan):
        self.records = records
        self.plan = plan
        self.in_flight: deque = deque()

    def __iter__(self) -> Iterator[CropTask]:
        for record in self.records:
            task, layout = self.plan(record)
            self.in_flight.append((record, layout))
            yield task


class BatchStream:
    """Batches of epochs ``[start_epoch, end_epoch)`` in (epoch, batch) order, for rank ``rank`` of
    ``world_size``. Images are read from the image shards once, at construction, and kept in memory;
    with ``decode_cache`` they are also decoded once, into memory the workers share (H*W*3 bytes each):
    the same pixels, without a JPEG decode per crop. ``None`` (the default) decodes once when the
    pixels fit :func:`train.decoded.cache_budget`; ``decode_cache_note`` says which was chosen.
    With ``crop_device`` (e.g. ``"cuda"``) the decoded images are also copied to that device and
    every batch is cropped, resized and flipped there in one go (:mod:`train.resample`), bit-identical
    to PIL; crops taller than the output size are made by PIL on the CPU. No worker processes are used.
    """

    def __init__(self, location: str | shards.ShardSet, start_epoch: int = 0, end_epoch: int | None = None,
                 workers: int = 2, rank: int = 0, world_size: int = 1, prefetch_factor: int = 2,
                 decode_cache: bool | None = None, cache_dir: str | None = None, cache_labels: bool = False,
                 pin_memory: bool = False, crop_device: str | None = None):
        if isinstance(location, shards.ShardSet):
            self.shards = location
        else:
            self.shards = shards.ShardSet(location, cache_dir=cache_dir, cache_labels=cache_labels)
        m = self.manifest = self.shards.manifest
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
        encoded, labels = [], []
        for image in self.shards.images():
            encoded.append(image.data)
            labels.append(image.label)
        decoded, self.decode_cache_note = _decode_once(encoded, True if crop_device else decode_cache)
        self._dataset = _CropDataset(None if decoded else encoded, decoded, m.input_size)
        self._device_pixels = decoded.buffer.to(crop_device) if crop_device else None
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.decoded_fraction = 1.0  # share of a batch's rows this rank crops, measured while iterating

    def __len__(self) -> int:
        return (self.end_epoch - self.start_epoch) * self.manifest.batches_per_epoch

    def get(self, epoch: int, batch: int) -> Batch:
        """One batch, out of the stream's order (reads that epoch's label records up to it)."""
        if not 0 <= batch < self.manifest.batches_per_epoch:
            raise ValueError(f"batch {batch} outside [0, {self.manifest.batches_per_epoch})")
        for record in self.shards.batches(epoch, epoch + 1):
            if record.batch == batch:
                task, (rows, own_pos, partner_pos, _) = self._plan(record)
                return self._batch(record, self._dataset[task].crops, rows, own_pos, partner_pos)
        raise AssertionError("unreachable: the reader checks that every batch is present")

    def _plan(self, record: shards.BatchRecord):
        """The crop task of this rank's slice: its rows plus their mix partners, each cropped once."""
        rows = slice_rows(self.manifest.batch_size, record.size, self.rank, self.world_size)
        own = np.arange(rows.start, rows.stop, dtype=np.int64)
        partners = record.mix_index[own] if record.mix_index is not None else own[:0]
        needed, inverse = np.unique(np.concatenate([own, partners]), return_inverse=True)
        task = CropTask(record.epoch, record.batch, record.indices[needed], record.coords[needed],
                        record.flips[needed])
        return task, (rows, inverse[: len(own)], inverse[len(own):], len(needed))

    def __iter__(self) -> Iterator[Batch]:
        tasks = _Tasks(self.shards.batches(self.start_epoch, self.end_epoch), self._plan)
        if self._device_pixels is not None:
            results = (CropResult(t.epoch, t.batch, self._crop_on_device(t)) for t in tasks)
        elif self.workers == 0:
            results = map(self._dataset.__getitem__, tasks)
        else:
            results = DataLoader(self._dataset, batch_size=None, sampler=tasks, num_workers=self.workers,
                                 collate_fn=_keep, prefetch_factor=self.prefetch_factor,
                                 pin_memory=self.pin_memory)
        cropped = total = 0
        for result in results:
            record, (rows, own_pos, partner_pos, needed) = tasks.in_flight.popleft()
            if (result.epoch, result.batch) != (record.epoch, record.batch):
                raise StreamError(f"worker returned epoch {result.epoch} batch {result.batch} for "
                                  f"epoch {record.epoch} batch {record.batch}")
            cropped, total = cropped + needed, total + record.size
            self.decoded_fraction = cropped / total
            yield self._batch(record, result.crops, rows, own_pos, partner_pos)

    def _crop_on_device(self, task: CropTask) -> torch.Tensor:
        decoded, size = self._dataset.decoded, self.manifest.input_size
        shapes = decoded.shapes[task.samples]
        boxes = pil_boxes(task.coords, shapes[:, 1], shapes[:, 0])
        by_pil = needs_pil(boxes, size)
        crops = torch.empty((len(task.samples), 3, size, size), dtype=torch.uint8,
                            device=self._device_pixels.device)
        fast = np.nonzero(~by_pil)[0]
        if len(fast):
            crops[torch.as_tensor(fast)] = crop_resize_flip_batch(
                self._device_pixels, decoded.offsets, decoded.shapes, task.samples[fast], boxes[fast],
                task.flips[fast], size)
        for k in np.nonzero(by_pil)[0]:
            hwc = decoded.crop_resize_flip(task.samples[k], task.coords[k], bool(task.flips[k]), size)
            crops[int(k)] = torch.tensor(hwc, device=crops.device).permute(2, 0, 1)
        return crops

    def _batch(self, record: shards.BatchRecord, crops: torch.Tensor, rows: range,
               own_pos: np.ndarray, partner_pos: np.ndarray) -> Batch:
        identity = len(own_pos) == len(crops) and np.array_equal(own_pos, np.arange(len(crops)))
        sample = torch.from_numpy(record.indices[rows.start:rows.stop])
        return Batch(
            epoch=record.epoch, batch=record.batch, rows=rows, batch_rows=record.size, crops=crops,
            own=None if identity else torch.from_numpy(own_pos),
            partners=torch.from_numpy(partner_pos) if record.mix_index is not None else None,
            targets=self.labels[sample],
            soft_labels=torch.from_numpy(record.soft_labels[rows.start:rows.stop]).float(),
            mix_type=self.manifest.mix_type, mix_lam=record.mix_lam, mix_bbox=record.mix_bbox,
        )
