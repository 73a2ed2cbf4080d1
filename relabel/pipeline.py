"""``relabel()``: an ImageFolder and teachers in, a shard set out, batch by batch.

For every (epoch, batch): the sample order of SRe2L's sampler replay, the draws of
:mod:`fkd_shards.batches.draws` (or, with ``--replay``, those of an existing SRe2L relabel output),
the crops made by the very code ``fkd-train`` uses (:class:`fkd_shards.batches.stream.BatchMaker`),
the model input of :meth:`fkd_shards.batches.Batch.model_input`, the teachers' mixed logits on it,
one batch record. Crops are made in worker processes while the teachers run; under torchrun each
rank labels whole batches and rank 0 writes.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from fkd_shards import shards
from fkd_shards.batches import draws
from fkd_shards.batches.images import ImageTable, open_pixels, upscale_note
from fkd_shards.batches.plan import plan_batch
from fkd_shards.batches.stream import BatchMaker, make_batches
from fkd_shards.common import distributed
from fkd_shards.common.device import resolve_device
from fkd_shards.common.distributed import DistEnv
from fkd_shards.common.precision import set_precision
from fkd_shards.common.threads import use_torch_threads
from fkd_shards.common.version import VERSION
from fkd_shards.convert.imagefolder import ImageFolderListing, list_image_folder, read_checked_image
from fkd_shards.convert.pipeline import RelabelReader, ReplayCheck, check_output_apart, report_alignment
from fkd_shards.convert.replay import epoch_orders
from fkd_shards.convert.sre2l import load_batch
from fkd_shards.models.teachers import Ensemble, Teacher, check_single_row_chunks, load_teacher, parse_mix
from fkd_shards.shards import format as fmt
from fkd_shards.shards.alignment import threshold as alignment_threshold

from .errors import RelabelError
from .options import Plan, RelabelOptions, check_options, make_plan
from .output import LABEL_DTYPES, LabelWriter, broadcast_start, gathered


def check_replay(plan: Plan, table: ImageTable, o: RelabelOptions, *, num_classes: int, log) -> str:
    """``--replay``: every batch file read and checked as ``fkd-convert`` checks it (unique bytes,
    consistent sizes, crops with pixels, and the replay check on its own soft labels, which finds a
    wrong ``--fkd-seed`` or image folder) before any label is computed. Returns the digest of all
    the files, which a resumed run must find again. The files are read again while labelling (by
    every rank, for its batches): keeping their draws instead would hold every epoch's in memory."""
    threshold = alignment_threshold(o.min_replay_alignment, num_classes, plan.mix_type != fmt.MIX_NONE)
    check = ReplayCheck(layout=plan.layout, labels=table.labels, shapes=table.shapes, first=plan.first,
                        batch_size=plan.batch_size, num_images=plan.num_images, epochs=plan.epochs,
                        input_size=plan.input_size, threshold=threshold,
                        threshold_given=o.min_replay_alignment is not None, num_classes=num_classes,
                        fkd_seed=o.fkd_seed, threshold_flag="--min-replay-alignment")
    with ThreadPoolExecutor(2) as pool:
        reader = RelabelReader(check, pool, ahead=8)
        for _ in tqdm(reader.batches(), total=plan.epochs * plan.batches_per_epoch, desc="replay check",
                      unit="batch", disable=not o.progress, file=sys.stderr):
            pass
    report_alignment(reader.alignment, check, log)
    return reader.digest


def read_images(folder: ImageFolderListing, progress: bool) -> tuple[ImageTable, str]:
    """Every image's bytes (each checked to decode) and a digest of the folder: names, classes, bytes."""
    digest = hashlib.sha256()
    encoded, shapes, paths = [], [], []
    for path, label in tqdm(folder.samples, desc="images", unit="img", disable=not progress, file=sys.stderr):
        data, height, width = read_checked_image(path)
        relative = folder.relative_path(path)
        digest.update(f"{relative}\0{label}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        encoded.append(data)
        shapes.append((height, width))
        paths.append(relative)
    table = ImageTable(encoded, np.asarray(folder.labels, dtype=np.int64), np.asarray(shapes, dtype=np.int64), paths)
    return table, digest.hexdigest()


def positions(plan: Plan, start: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, int]]:
    """The (epoch, batch) a rank labels: from position ``start`` (epoch * batches + batch) on,
    every ``world_size``-th one, beginning with ``start + rank``."""
    per_epoch = plan.batches_per_epoch
    for position in range(start + rank, plan.epochs * per_epoch, world_size):
        yield divmod(position, per_epoch)


def skeletons(plan: Plan, table: ImageTable, mine: Iterator[tuple[int, int]], fkd_seed: int
              ) -> Iterator[shards.BatchRecord]:
    """Batch records without soft labels, at the positions ``mine`` (in order)."""
    orders = epoch_orders(plan.num_images, fkd_seed, plan.epochs)
    order_epoch, order = -1, None
    for epoch, b in mine:
        while order_epoch < epoch:  # every epoch's order is drawn, in turn: the generator carries over
            order, order_epoch = next(orders), order_epoch + 1
        indices = order[b * plan.batch_size:(b + 1) * plan.batch_size]
        if plan.layout is not None:
            path = plan.layout.batch_path(epoch, b)
            found = load_batch(path, plan.input_size)
            if found.size != len(indices) or found.mix_type != plan.mix_type:
                raise RelabelError(f"{path}: {found.size} rows of {found.mix_type}, expected {len(indices)} of "
                                   f"{plan.mix_type}")
            d = draws.BatchDraws(found.coords, found.flips, found.mix_index, found.mix_lam, found.mix_bbox)
        else:
            d = draws.draw_batch(table.shapes[indices], plan.seed, epoch, b, scale=plan.crop_scale,
                                 mix_type=plan.mix_type, input_size=plan.input_size)
        yield shards.BatchRecord(epoch=epoch, batch=b, indices=indices, coords=d.coords, flips=d.flips,
                                 mix_index=d.mix_index, mix_lam=d.mix_lam, mix_bbox=d.mix_bbox,
                                 soft_labels=np.zeros((len(indices), 0), np.float32))


@dataclass
class Timing:
    """Where the wall time of the labelling loop went."""

    forward: float = 0.0
    waiting: float = 0.0
    writing: float = 0.0

    def describe(self, total: float) -> str:
        share = lambda part: f"{100 * part / max(total, 1e-9):.0f}%"  # noqa: E731
        return (f"time: teacher forward {share(self.forward)}, waiting for crops {share(self.waiting)}, "
                f"writing {share(self.writing)} of {total:.1f} s")


def label(records: Iterator[shards.BatchRecord], expected: Iterator[tuple[int, int]], *, maker: BatchMaker,
          ensemble: Ensemble, o: RelabelOptions, timing: Timing) -> Iterator[shards.BatchRecord]:
    """Each record with its soft labels: the teachers' logits on exactly the batch ``fkd-train`` builds
    from it, cast to the label dtype; a value that is not finite stops the run, naming the batch."""
    plans = (plan_batch(record, record.size) for record in records)  # whole batches: one rank labels each
    dtype = LABEL_DTYPES[o.label_dtype]
    started = time.perf_counter()
    for batch in make_batches(plans, maker, expected, workers=o.workers):
        ready = time.perf_counter()
        timing.waiting += ready - started
        logits = ensemble(batch.model_input(ensemble.device))
        soft = logits.to(dtype).cpu().numpy()
        timing.forward += time.perf_counter() - ready
        # A row whose largest logit lies below the label dtype's smallest normal number is stored as
        # a handful of subnormal steps or as zeros (tiny --teacher-mix weights): refused, not written.
        peak = logits.abs().amax(1)
        faint = (peak > 0) & (peak < torch.finfo(dtype).tiny)
        if bool(faint.any()):
            raise RelabelError(f"epoch {batch.epoch} batch {batch.batch}: the mixed logits of a row are at most "
                               f"{float(peak[faint].max()):.3g}, below {o.label_dtype}'s smallest normal number "
                               f"{torch.finfo(dtype).tiny:.3g}: its stored labels would be (almost) all 0; scale "
                               f"--teacher-mix {o.teacher_mix} up, or --label-dtype float32")
        if not np.isfinite(soft).all():
            raise RelabelError(f"epoch {batch.epoch} batch {batch.batch}: the teachers' logits are not all finite "
                               f"in {o.label_dtype} (a diverged teacher, or logits beyond float16: --label-dtype "
                               f"float32)")
        yield replace(batch.record, soft_labels=soft)
        started = time.perf_counter()


def device_name(device: str) -> str:
    """The device kind that computed the logits (recorded: CPU and GPU logits differ in the last bits)."""
    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return "cpu"


def settings_of(o: RelabelOptions, plan: Plan, teachers: list[Teacher], weights: list[float], *, images_digest: str,
                replay_digest: str | None, codec: shards.codecs.Codec, device: str) -> dict:
    """Everything that decides the bytes written: a resumed run must agree on all of it."""
    return {
        "teachers": [{"model": t.name, "weights_sha256": t.sha256} for t in teachers], "teacher_mix": weights,
        "bn_mode": o.bn_mode, "teacher_chunks": o.teacher_chunks, "amp": o.amp, "label_dtype": o.label_dtype,
        "label_codec": codec.spec, "codec_temperature": o.codec_temperature, "batch_size": plan.batch_size,
        "epochs": plan.epochs, "input_size": plan.input_size, "mix_type": plan.mix_type,
        "crop_scale": plan.crop_scale and list(plan.crop_scale), "seed": plan.seed, "fkd_seed": o.fkd_seed,
        "replay": o.replay, "replay_files": replay_digest, "images": images_digest, "shard_bytes": o.shard_bytes,
        "device": device_name(device),
    }


def provenance(o: RelabelOptions, plan: Plan, teachers: list[Teacher], weights: list[float], device: str) -> dict:
    """The manifest's ``relabel`` object: who labelled this set, how, on what, with which versions."""
    import PIL
    import torchvision

    return {
        "teachers": [{"model": t.name, "weights": t.weights, "weights_sha256": t.sha256, "classes": t.classes,
                      "mix_weight": w} for t, w in zip(teachers, weights)],
        "teacher_mix": o.teacher_mix, "bn_mode": o.bn_mode, "teacher_chunks": o.teacher_chunks, "amp": o.amp,
        "crop_scale": plan.crop_scale and list(plan.crop_scale), "mix_type": plan.mix_type,
        "seed": plan.seed, "fkd_seed": o.fkd_seed, "label_dtype": o.label_dtype,
        "replay": o.replay, "device": device_name(device),
        "draws": "numpy SeedSequence([seed, epoch, batch]).spawn(3): torch crops+flips, torch permutation, "
                 "numpy PCG64 lambda+box",
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                     "fkd-shards": VERSION},
    }


def relabel(o: RelabelOptions, env: DistEnv | None = None, log=print) -> shards.Manifest | None:
    """Label and write; returns the manifest on rank 0 (None elsewhere). Raises :class:`RelabelError`
    (and the shard format's errors) for bad input; a failed run leaves no manifest, and its finished
    shards stay for ``--resume``. Under torchrun (``env``), the process group lives as long as the call."""
    env = env or DistEnv()
    device = resolve_device(o.device, env)
    distributed.init(env, device, o.dist_timeout)
    try:
        return _relabel(o, env, device, log)
    finally:
        distributed.shutdown(env)


def _relabel(o: RelabelOptions, env: DistEnv, device: str, log) -> shards.Manifest | None:
    say = log if env.is_main else (lambda *_: None)
    say(use_torch_threads(o.workers, o.threads))
    precision = set_precision(tf32=o.tf32, cudnn_benchmark=o.cudnn_benchmark)
    out = None
    try:
        # Every rank prepares, then all agree that each could: a refusal on one rank (rank 0 alone
        # checks a replay and writes the image shards) stops every rank, none is left in a collective.
        with distributed.agreed(env, device):
            codec = check_options(o)
            check_output_apart(o.output, {"--train-dir": o.train_dir, "--replay": o.replay})
            folder = list_image_folder(o.train_dir)
            plan = make_plan(o, folder, say)
            if o.teacher_chunks > plan.batch_size:
                raise RelabelError(f"--teacher-chunks {o.teacher_chunks} is more than a batch's {plan.batch_size} rows")
            teachers = [load_teacher(name, weights, plan.input_size) for name, weights in o.teachers]
            for t in teachers:
                if t.classes != len(folder.classes):
                    raise RelabelError(f"--teacher {t.name} {t.weights}: {t.classes} classes, but {o.train_dir} has "
                                       f"{len(folder.classes)} class folders")
            weights = parse_mix(o.teacher_mix, len(teachers))
            table, digest = read_images(folder, o.progress and env.is_main)
            note = upscale_note(table.shapes, plan.input_size)
            if note:
                say(f"fkd-relabel: {note}")
            threshold = alignment_threshold(o.min_alignment, len(folder.classes), plan.mix_type != fmt.MIX_NONE)
            replay_digest = check_replay(plan, table, o, num_classes=len(folder.classes), log=say) \
                if plan.layout is not None and env.is_main else None
            batch_rows = {plan.batch_rows(0), plan.batch_rows(plan.batches_per_epoch - 1)}  # the full and the last
            check_single_row_chunks(teachers, o.bn_mode, o.teacher_chunks, batch_rows, plan.input_size)
            ensemble = Ensemble(teachers, weights, device=device, bn_mode=o.bn_mode, chunks=o.teacher_chunks,
                                amp=o.amp)
            settings = settings_of(o, plan, teachers, weights, images_digest=digest, replay_digest=replay_digest,
                                   codec=codec, device=device) | precision
            out = LabelWriter(o, plan, codec=codec, settings=settings, threshold=threshold,
                              width=teachers[0].classes) if env.is_main else None
            first = out.start(table, say) if out else 0
        start = broadcast_start(first, env, device)
        say(f"fkd-relabel: N={plan.num_images} images, {len(folder.classes)} classes, S={plan.input_size}, "
            f"B={plan.batch_size}, {plan.batches_per_epoch} batches x {plan.epochs} epochs, mix={plan.mix_type}, "
            f"{len(teachers)} teacher(s) ({', '.join(t.name for t in teachers)}) on {device}, bn={o.bn_mode}, "
            f"chunks={o.teacher_chunks}, " + (f"replaying {o.replay}" if plan.layout else
                                             f"seed {plan.seed}, crop scale {list(plan.crop_scale)}")
            + (f"; resuming at epoch {start // plan.batches_per_epoch} batch {start % plan.batches_per_epoch}"
               if start else ""))
        with distributed.agreed(env, device):  # shared memory for the decoded cache is each rank's own
            pixels = open_pixels(table, mode="auto", workers=o.workers, local_ranks=env.local_world_size)
            say(pixels.note)
            maker = BatchMaker(pixels, plan.input_size, plan.mix_type)
        timing = Timing()
        labelled = label(skeletons(plan, table, positions(plan, start, env.rank, env.world_size), o.fkd_seed),
                         positions(plan, start, env.rank, env.world_size), maker=maker, ensemble=ensemble, o=o,
                         timing=timing)
        began = time.perf_counter()
        with tqdm(total=plan.epochs * plan.batches_per_epoch - start, desc="batches", unit="batch",
                  disable=not (o.progress and env.is_main), file=sys.stderr) as bar:
            rounds = gathered(labelled, plan, start=start, env=env, device=device, width=teachers[0].classes,
                              label_dtype=o.label_dtype,
                              every=skeletons(plan, table, positions(plan, start), o.fkd_seed) if out else None)
            for written in rounds:
                writing = time.perf_counter()
                with distributed.agreed(env, device):  # rank 0's failed write (a full disk) stops every rank
                    for record in written:
                        out.write(record, table.labels)
                timing.writing += time.perf_counter() - writing
                bar.update(len(written))
                bar.set_postfix(img_s=f"{bar.n * plan.batch_size / max(time.perf_counter() - began, 1e-9):.0f}")
        manifest = None
        with distributed.agreed(env, device):  # the other ranks exit as rank 0's manifest did (or not)
            if out is not None:
                say(timing.describe(time.perf_counter() - began))
                manifest = out.finish(folder, provenance(o, plan, teachers, weights, device) | precision, say)
        return manifest
    except BaseException:
        if out is not None:
            out.abort()
        raise
