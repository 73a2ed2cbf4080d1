"""The ordered batch stream: every batch exactly as the teacher labelled it, through the public
DataLoader API.

A batch's way: the label shards' records are read (verified, checked) in order in the main process
(:meth:`ShardSet.batches`); each becomes a :class:`.plan.BatchPlan`, which stays in the main
process; crop workers receive only its :meth:`~.plan.BatchPlan.crop_request` (sample indices,
coords, flips) and return the crops; the plan and its crops are assembled into a :class:`.Batch`,
whose :meth:`~.Batch.model_input` is what the model sees. The stream checks every batch's (epoch,
batch) against the order it must come in: a misaligned batch is an error, never a silent wrong label.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fkd_shards import shards

from .batch import Batch
from .crop import CpuCropper, CropError
from .device_crop import DeviceCropper, PreparedCrops
from .images import ImageError, ImageSource, load_images, open_pixels
from .plan import BatchPlan, plan_batch


class StreamError(RuntimeError):
    """A batch that cannot be made (an image that does not decode, an empty crop box) or that came
    back out of order; the message says which."""


class BatchMaker:
    """Crops a plan's images (on the CPU with PIL, or on ``crop_device``) and assembles the batch:
    crops from the worker, everything else from the plan, in the main process."""

    def __init__(self, pixels: ImageSource, input_size: int, mix_type: str):
        self.cropper = DeviceCropper(pixels, input_size, pixels.crop_device) if pixels.crop_device else \
            CpuCropper(pixels, input_size)
        self.on_device = pixels.crop_device is not None
        self.labels = pixels.table.labels  # int64 (N,): each image's class
        self.mix_type = mix_type

    def crop(self, request: tuple, shared: bool = False) -> tuple[tuple[int, int], torch.Tensor | str]:
        """(key, crops) for a plan's :meth:`~.plan.BatchPlan.crop_request`, or (key, a one-line
        reason): a worker's exception would reach the main process wrapped in a traceback. The
        crops are handed over (u, S, S, 3), their memory order, so that pinning keeps it."""
        key, samples, coords, flips = request
        try:
            crops = self.cropper.crop(samples, coords, flips, shared=shared)
        except (ImageError, CropError) as exc:
            return key, f"epoch {key[0]} batch {key[1]}: {exc}"
        return key, crops.permute(0, 2, 3, 1)

    def prepare(self, request: tuple) -> tuple[tuple[int, int], PreparedCrops | str]:
        """Device crops in two halves: (key, the host's share of :meth:`crop`), or (key, a one-line reason)."""
        key, samples, coords, flips = request
        try:
            return key, self.cropper.prepare(samples, coords, flips)
        except (ImageError, CropError) as exc:
            return key, f"epoch {key[0]} batch {key[1]}: {exc}"

    def finish(self, prepared: tuple[tuple[int, int], PreparedCrops | str]
               ) -> tuple[tuple[int, int], torch.Tensor | str]:
        """The device's share: what :meth:`crop` returns, from what :meth:`prepare` returned."""
        key, work = prepared
        if isinstance(work, str):
            return key, work
        return key, self.cropper.finish(work).permute(0, 2, 3, 1)

    def assemble(self, plan: BatchPlan, crops: torch.Tensor) -> Batch:
        """The delivered batch: ``crops`` as :meth:`crop` handed them over, everything else from ``plan``."""
        record, rows = plan.record, slice(plan.rows.start, plan.rows.stop)
        # Indexed in numpy: fresh arrays (a record's own may be read-only views of a shard's bytes).
        partner_targets = None if plan.partners is None else torch.from_numpy(self.labels[plan.samples[plan.partners]])
        return Batch(
            plan=plan, crops=crops.permute(0, 3, 1, 2), targets=torch.from_numpy(self.labels[record.indices[rows]]),
            partner_targets=partner_targets,
            soft_labels=torch.tensor(record.soft_labels[rows], dtype=torch.float32),
            mix_type=self.mix_type,
        )


class _CropDataset(Dataset):
    """Map-style dataset for the DataLoader's workers: its 'index' is a plan's crop request."""

    def __init__(self, maker: BatchMaker):
        self.maker = maker

    def __getitem__(self, request: tuple) -> tuple[tuple[int, int], torch.Tensor | str]:
        # In a worker process the crops are made in shared memory: handing them over copies nothing.
        return self.maker.crop(request, shared=get_worker_info() is not None)


def _keep(item):
    return item


def _one_ahead(func, items: Iterator) -> Iterator:
    """``func`` of each of ``items``, in order, computed by a background thread one item ahead of
    the consumer: the host's share of the next batch runs while the device works on this one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fkd-device-crops") as pool:
        ahead = None
        for item in items:
            submitted = pool.submit(func, item)
            if ahead is not None:
                yield ahead.result()
            ahead = submitted
        if ahead is not None:
            yield ahead.result()


def make_batches(plans: Iterator[BatchPlan], maker: BatchMaker, positions: Iterator[tuple[int, int]], *,
                 workers: int, prefetch_factor: int = 2, pin_memory: bool = False) -> Iterator[Batch]:
    """The batches of ``plans``, in order, cropped by ``workers`` processes (0: in this one; device
    crops: their host share one batch ahead in a thread of this one). Each must come back at the
    next of ``positions``: a result out of order, or one that failed, is a :class:`StreamError`."""
    pending: deque[BatchPlan] = deque()  # the DataLoader runs ahead: plans wait here for their crops

    def requests():
        for plan in plans:
            pending.append(plan)
            yield plan.crop_request()

    if maker.on_device:
        results = map(maker.finish, _one_ahead(maker.prepare, requests()))
    elif workers == 0:
        results = map(maker.crop, requests())
    else:
        # The public API's way to hand each worker an item of our choosing, in order: the requests
        # go through the sampler slot (batch_size=None), and the DataLoader returns the results in
        # the sampler's order. Its own generator: iterating a DataLoader draws a seed, which must
        # not move the global RNG.
        results = DataLoader(_CropDataset(maker), batch_size=None, sampler=requests(), num_workers=workers,
                             collate_fn=_keep, prefetch_factor=prefetch_factor, pin_memory=pin_memory,
                             generator=torch.Generator())
    for key, crops in results:
        key = tuple(key)  # pinning turns tuples into lists in some torch versions
        if isinstance(crops, str):
            raise StreamError(crops)
        plan, position = pending.popleft(), next(positions, None)
        if key != position or plan.key != position:
            raise StreamError(f"a worker returned epoch {key[0]} batch {key[1]} where "
                              f"{'nothing' if position is None else f'epoch {position[0]} batch {position[1]}'} "
                              f"belongs")
        yield maker.assemble(plan, crops)


class BatchStream:
    """Batches of epochs ``[start_epoch, end_epoch)`` of ``shard_set`` in (epoch, batch) order, for
    rank ``rank`` of ``world_size``.

    ``pixels``: the images' pixel source, made once by the caller with :func:`.images.open_pixels`
    (which decides the decoded cache and the crop device). Without it, the image shards are read
    here and ``decode_cache`` decides: keep each image's decoded pixels after its first use, in
    memory the workers share (True), decode for every crop (False), or decide by the memory
    available (None; ``pixels.note`` says what was chosen); ``crop_device`` (e.g. ``"cuda"``): crop,
    resize and flip there, bit-identical to PIL, instead of in worker processes.
    """

    def __init__(self, shard_set: shards.ShardSet, start_epoch: int = 0, end_epoch: int | None = None, *,
                 workers: int = 2, rank: int = 0, world_size: int = 1, pixels: ImageSource | None = None,
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
        if pixels is None:
            mode = "auto" if decode_cache is None else "on" if decode_cache else "off"
            pixels = open_pixels(load_images(shard_set), mode=mode, workers=workers, crop_device=crop_device,
                                 local_ranks=local_ranks)
        elif decode_cache is not None or crop_device is not None:
            raise ValueError("decode_cache and crop_device are decided by open_pixels(); with pixels=, give neither")
        if workers and pixels.cache and not pixels.shared and not pixels.crop_device:
            raise ValueError("the pixels' cache is not in shared memory, which worker processes need: "
                             "open_pixels(..., workers=N)")
        self.pixels = pixels
        self.maker = BatchMaker(pixels, m.input_size, m.mix_type)
        self.cropped_fraction = 1.0  # share of the batches' rows this rank cropped, measured while iterating

    def __len__(self) -> int:
        return (self.end_epoch - self.start_epoch) * self.manifest.batches_per_epoch

    def _plans(self) -> Iterator[BatchPlan]:
        for record in self.shard_set.batches(self.start_epoch, self.end_epoch):
            yield plan_batch(record, self.manifest.batch_size, self.rank, self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        m = self.manifest
        positions = ((e, b) for e in range(self.start_epoch, self.end_epoch) for b in range(m.batches_per_epoch))
        cropped = total = 0
        for batch in make_batches(self._plans(), self.maker, positions, workers=self.workers,
                                  prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory):
            cropped, total = cropped + batch.crops.shape[0], total + batch.batch_rows
            self.cropped_fraction = cropped / total
            yield batch


def batch_at(shard_set: shards.ShardSet, epoch: int, batch: int) -> Batch:
    """One batch, out of the stream's order (reads that epoch's label records up to it), cropped in
    this process: what ``inspect`` draws."""
    return next(batches_at(shard_set, [(epoch, batch)]))


def batches_at(shard_set: shards.ShardSet, positions: list[tuple[int, int]]) -> Iterator[Batch]:
    """The batches at ``positions`` (sorted, each within the set), cropped in this process: the
    images are read once, and each epoch's label records up to its last wanted batch."""
    m = shard_set.manifest
    for epoch, batch in positions:
        if not (0 <= epoch < m.epochs and 0 <= batch < m.batches_per_epoch):
            raise ValueError(f"epoch {epoch} batch {batch} outside the set's [0, {m.epochs}) x "
                             f"[0, {m.batches_per_epoch})")
    if list(positions) != sorted(set(positions)):
        raise ValueError("positions must be distinct and in (epoch, batch) order")
    maker = BatchMaker(open_pixels(load_images(shard_set), mode="off"), m.input_size, m.mix_type)
    for epoch in sorted({e for e, _ in positions}):
        wanted = [b for e, b in positions if e == epoch]
        records = itertools.takewhile(lambda r, last=wanted[-1]: r.batch <= last, shard_set.batches(epoch, epoch + 1))
        plans = (plan_batch(r, m.batch_size) for r in records if r.batch in wanted)
        yield from make_batches(plans, maker, iter([(epoch, b) for b in wanted]), workers=0)
