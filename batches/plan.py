"""Which rows of a batch a rank trains on, which images it must crop for them, and how the crops go
back together: the :class:`BatchPlan` of a batch record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fkd_shards import shards
from fkd_shards.shards import format as fmt


def slice_rows(batch_size: int, batch_rows: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s rows of a batch: ``[rank*B/K, (rank+1)*B/K)`` cut to the batch's rows."""
    per_rank = batch_size // world_size
    start = min(rank * per_rank, batch_rows)
    return range(start, min(start + per_rank, batch_rows))


def last_batch_rows(batch_size: int, num_images: int) -> int:
    """The rows of each epoch's last batch: B, or fewer when B does not divide N."""
    return fmt.batch_rows(num_images, batch_size, fmt.batches_per_epoch(num_images, batch_size) - 1)


def micro_batch_sizes(batch_size: int, num_images: int, world_size: int, micro_rows: int) -> set[int]:
    """Every row count a forward pass sees: each rank's slice of a full batch and of the short last
    one, cut into micro-batches of ``micro_rows`` (empty slices left out)."""
    sizes = set()
    for rows in {fmt.batch_rows(num_images, batch_size, 0), last_batch_rows(batch_size, num_images)}:
        for rank in range(world_size):
            mine = len(slice_rows(batch_size, rows, rank, world_size))
            sizes |= {min(micro_rows, mine - start) for start in range(0, mine, micro_rows)}
    return sizes


def single_row_micro_batch(batch_size: int, num_images: int, world_size: int, steps: int) -> str | None:
    """Where a forward pass of a single row occurs with ``--gradient-accumulation-steps steps``, and
    which other values avoid it, said so that the user can act; None when none occurs."""
    per_rank = batch_size // world_size
    if 1 not in micro_batch_sizes(batch_size, num_images, world_size, per_rank // steps):
        return None
    where = (f"B / (ranks x --gradient-accumulation-steps) = {batch_size} / ({world_size} x {steps}) = 1 row"
             if per_rank // steps == 1 else
             f"the last batch of each epoch holds {last_batch_rows(batch_size, num_images)} row(s) "
             f"(N = {num_images}, B = {batch_size}), which leaves a micro-batch of 1 row")
    avoiding = [a for a in range(1, per_rank + 1)
                if per_rank % a == 0 and 1 not in micro_batch_sizes(batch_size, num_images, world_size, per_rank // a)]
    remedy = (f"--gradient-accumulation-steps {' or '.join(map(str, avoiding[:4]))} avoids it" if avoiding else
              "no --gradient-accumulation-steps avoids it: relabel with a batch size that leaves the last batch "
              "more rows, or choose a student without batch norm at this crop size")
    return f"{where}; {remedy}"


@dataclass(frozen=True)
class BatchPlan:
    """A batch as planned, in the main process: one rank's share of one batch record (the record
    itself, with its soft labels, stays here), the images to crop for it (its rows plus their mix
    partners, each once) and where each row and partner lands among the crops. Crop workers receive
    only :meth:`crop_request`; what comes back is assembled with the plan into a :class:`Batch`."""

    record: shards.BatchRecord
    rows: range  # this rank's rows of the batch
    samples: np.ndarray  # int64 (u,): sample index of each crop to make
    coords: np.ndarray  # float32 (u, 4)
    flips: np.ndarray  # bool (u,)
    own: np.ndarray | None  # int64 (m,): the rows' positions among the crops; None when they are all, in order
    partners: np.ndarray | None  # int64 (m,): each row's mix partner's position; None without mix

    @property
    def key(self) -> tuple[int, int]:
        """(epoch, batch): where the batch belongs in the stream."""
        return self.record.epoch, self.record.batch

    def crop_request(self) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
        """What a crop worker needs, and nothing else: (key, samples, coords, flips)."""
        return self.key, self.samples, self.coords, self.flips


def plan_batch(record: shards.BatchRecord, batch_size: int, rank: int = 0, world_size: int = 1) -> BatchPlan:
    """The plan of rank ``rank``'s slice of ``record``."""
    rows = slice_rows(batch_size, record.size, rank, world_size)
    own = np.arange(rows.start, rows.stop, dtype=np.int64)
    partners = record.mix_index[own] if record.mix_index is not None else own[:0]
    needed, inverse = np.unique(np.concatenate([own, partners]), return_inverse=True)
    own_pos, partner_pos = inverse[: len(own)], inverse[len(own):]
    identity = len(needed) == len(own) and np.array_equal(own_pos, np.arange(len(own)))
    return BatchPlan(
        record=record, rows=rows, samples=record.indices[needed], coords=record.coords[needed],
        flips=record.flips[needed], own=None if identity else own_pos,
        partners=partner_pos if record.mix_index is not None else None,
    )
