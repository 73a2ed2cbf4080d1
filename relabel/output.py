"""Where labelled batches go: the shard writer of rank 0, which also keeps the replay check (a
resumed run reads it back from the label shards it kept); and, under torchrun, the gathering of
every rank's logits to rank 0 (tensors only: nothing is unpickled between ranks)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from fkd_shards import shards
from fkd_shards.batches.images import ImageTable
from fkd_shards.common.distributed import DistEnv, agreed, collective_device
from fkd_shards.common.version import VERSION
from fkd_shards.convert.imagefolder import ImageFolderListing
from fkd_shards.shards import format as fmt
from fkd_shards.shards.alignment import batch_hits

from .errors import RelabelError
from .options import Plan, RelabelOptions

LABEL_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # --label-dtype: how the logits are stored


class LabelWriter:
    """Rank 0's output: image shards first, then one batch record after another; an epoch whose
    replay check falls below the threshold stops the run."""

    def __init__(self, o: RelabelOptions, plan: Plan, *, codec: shards.codecs.Codec, settings: dict, threshold: float,
                 width: int):
        self.o, self.plan, self.threshold, self.width = o, plan, threshold, width
        self.hits = [0] * plan.epochs  # per epoch: rows whose teacher argmax is their class or their partner's
        self.writer = shards.ShardSetWriter(o.output, o.shard_bytes, o.overwrite, codec, resumable=True,
                                            resume=o.resume, settings=settings)

    def start(self, table: ImageTable, say) -> int:
        """The first position (epoch * batches + batch) to label: after the last label shard a resumed
        writer kept. The image shards are written first, whole, unless they are complete already."""
        plan, writer = self.plan, self.writer
        done = [s for s in writer.completed if s.kind == fmt.LABELS_KIND]
        images_done = sum(s.count for s in writer.completed if s.kind == fmt.IMAGES_KIND)
        if images_done and images_done != plan.num_images:
            raise shards.ResumeError(f"{writer.output.where}: holds {images_done} of {plan.num_images} images; use "
                                     f"--overwrite to start again")
        if not images_done:
            for index in range(len(table)):
                writer.add_image(shards.ImageRecord(
                    index=index, label=int(table.labels[index]), data=table.encoded[index], path=table.paths[index],
                    height=int(table.shapes[index][0]), width=int(table.shapes[index][1])))
            writer.end_images()
        self._count_kept(table.labels)
        if done:
            say(f"fkd-relabel: continuing after {len(done)} finished label shard(s)")
        return 0 if not done else done[-1].epoch * plan.batches_per_epoch + done[-1].last + 1

    def _count_kept(self, labels: np.ndarray) -> None:
        """The replay check of the label shards a resumed run kept, read back (verified) from them."""
        plan = self.plan
        spec = shards.BatchSpec(num_images=plan.num_images, width=self.width, input_size=plan.input_size,
                                mix_type=plan.mix_type, codec=self.writer.codec, stored_dtype=self.o.label_dtype)
        for record in self.writer.kept_batches(spec, plan.batch_rows):
            self._count(record, labels)

    def _count(self, record: shards.BatchRecord, labels: np.ndarray) -> None:
        """Counted on the labels as stored (what a lossy codec gives back can differ from the logits
        in the argmax on a near tie), so that a resumed run, which has only the stored labels of the
        shards it kept, records the same alignment as an uninterrupted one."""
        argmax = record.soft_labels.astype(np.float32).argmax(axis=1)
        self.hits[record.epoch] += batch_hits(labels, record.indices, argmax, record.mix_index)

    def _as_stored(self, record: shards.BatchRecord) -> shards.BatchRecord:
        codec = self.writer.codec
        if codec.spec == fmt.CODEC_RAW:  # the logits themselves
            return record
        return replace(record, soft_labels=codec.decode(codec.encode(record.soft_labels), self.width))

    def write(self, record: shards.BatchRecord, labels: np.ndarray) -> None:
        try:
            self.writer.add_batch(record)
        except shards.CodecError as exc:
            raise RelabelError(f"epoch {record.epoch} batch {record.batch}: --label-codec {self.o.label_codec}: "
                              f"{exc}") from None
        self._count(self._as_stored(record), labels)
        if record.batch == self.plan.batches_per_epoch - 1:
            rate = self.alignment()[record.epoch]
            if rate < self.threshold:
                raise RelabelError(
                    f"epoch {record.epoch}: only {rate:.3f} of the rows' teacher argmax is the image's class or its "
                    f"partner's (threshold {self.threshold:.3f}). Likely causes, most common first: a crop size "
                    f"(--input-size) or crop scale (--crop-scale) other than the teachers were trained at; the mix "
                    f"type; teachers whose classes do not follow the class folders' sorted order; an untrained or "
                    f"weak teacher (--min-alignment 0 accepts any alignment; with --resume the finished shards are "
                    f"kept)")

    def alignment(self) -> list[float]:
        return [h / self.plan.num_images for h in self.hits]

    def finish(self, folder: ImageFolderListing, relabel: dict, say) -> shards.Manifest:
        plan, o, alignment = self.plan, self.o, self.alignment()
        say(f"alignment (teacher argmax = image class or mix partner's): mean {sum(alignment) / len(alignment):.3f}, "
            f"min {min(alignment):.3f}, accepted at >= {self.threshold:.3f}")
        codec = self.writer.codec
        return self.writer.finish(shards.Manifest(
            num_images=plan.num_images, batch_size=plan.batch_size, num_classes=len(folder.classes),
            soft_label_width=self.width, epochs=plan.epochs, input_size=plan.input_size, mix_type=plan.mix_type,
            fkd_seed=o.fkd_seed, classes=list(folder.classes), soft_label_dtype=o.label_dtype, shards=[],
            alignment=[round(a, 6) for a in alignment], created_by=f"fkd-relabel {VERSION}", label_codec=codec.spec,
            label_codec_temperature=None if codec.spec == fmt.CODEC_RAW else o.codec_temperature,
            min_alignment=round(self.threshold, 6), relabel=relabel,
        ))

    def abort(self) -> None:
        self.writer.abort()


def broadcast_start(start: int, env: DistEnv, device: str) -> int:
    """Rank 0's first position, to every rank."""
    if not env.active:
        return start
    import torch.distributed as dist

    value = torch.tensor([start], dtype=torch.int64, device=collective_device(device))
    dist.broadcast(value, src=0)
    return int(value.item())


def gathered(records: Iterator[shards.BatchRecord], plan: Plan, *, start: int, env: DistEnv, device: str, width: int,
             label_dtype: str, every: Iterator[shards.BatchRecord] | None) -> Iterator[list[shards.BatchRecord]]:
    """The labelled records in order, a round at a time: on rank 0 the round's records, elsewhere an
    empty list. In one process, every record is a round. Under torchrun every rank labels one batch
    of each round of ``world_size`` consecutive batches; a rank that fails to (logits not finite, a
    replay file gone) stops every rank before the gather (:func:`agreed`). The logits are gathered
    as tensors (padded to B rows) and rank 0 puts each into its own copy of the record (``every``:
    rank 0's skeletons of every position, the draws being the same on every rank)."""
    if not env.active:
        for record in records:
            yield [record]
        return
    import torch.distributed as dist

    total = plan.epochs * plan.batches_per_epoch
    dtype = LABEL_DTYPES[label_dtype]
    on = collective_device(device)
    for round_start in range(start, total, env.world_size):
        padded = torch.zeros((plan.batch_size, width), dtype=dtype, device=on)
        with agreed(env, device):  # rank 0's skeletons too: with --replay, reading them reads files
            if round_start + env.rank < total:
                soft = torch.from_numpy(next(records).soft_labels)
                padded[: len(soft)] = soft.to(on)
            skeletons = [] if every is None else \
                [skeleton for _, skeleton in zip(range(min(env.world_size, total - round_start)), every)]
        everyone = [torch.empty_like(padded) for _ in range(env.world_size)]
        dist.all_gather(everyone, padded)
        yield [replace(skeleton, soft_labels=everyone[r][: skeleton.size].cpu().numpy())
               for r, skeleton in enumerate(skeletons)]
