"""``--check-teacher MODEL WEIGHTS``: prove that a set's images are the ones its soft labels were
computed from, by running the relabel teacher again on exactly the stored model input of a few
batches and comparing its logits with the stored ones.

The replay alignment (teacher argmax = class of the image or its mix partner) sees only classes: two
distilled sets with the same classes and images per class pass it at 1.000 with each other's labels.
Recomputed logits see the pixels. Passing means either ``exact`` (every compared label equal after
the set's own rounding and codec: same device kind and libraries) or ``close``: in every batch the
root-mean-square difference between stored and recomputed logits is at most :data:`TOLERANCE` of
how much the stored logits vary from image to image (another device kind, TF32, another library
version). Anything else fails, naming the batch.

The measure is relative to the spread, not a KL divergence, because a KL depends on the teacher's
confidence: an untrained teacher's logits of other pictures are within a KL of 5e-4 of each other
(measured on the test fixture), while their difference is a whole spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fkd_shards import shards
from fkd_shards.batches.stream import batches_at
from fkd_shards.common.text import escape, first_line
from fkd_shards.models.teachers import Ensemble, Teacher, TeacherError, load_teacher

from .errors import ConvertError

# Root-mean-square difference, as a share of the stored logits' spread across images. Logits of
# other images differ by about a whole spread (sqrt(2) of it when independent); TF32 against true
# float32 moves a resnet50's logits by up to 2.6e-2 on an H200, a small fraction of a spread of units.
TOLERANCE = 0.05
DEFAULT_BATCHES = 4


class TeacherCheckError(ConvertError):
    """The teacher's logits on the stored images are not the stored labels; the message names the batch."""


@dataclass(frozen=True)
class CheckTeacher:
    """A loaded teacher to check a set with, and how many batches to recompute."""

    teacher: Teacher
    batches: int = DEFAULT_BATCHES


def load_check_teacher(model: str, weights: str, *, input_size: int, width: int, batches: int) -> CheckTeacher:
    """The teacher of ``--check-teacher``, loaded and checked to fit the set before any work."""
    try:
        teacher = load_teacher(model, weights, input_size)
    except TeacherError as exc:
        raise ConvertError(str(exc).replace("--teacher", "--check-teacher", 1)) from None
    if teacher.classes != width:
        raise ConvertError(f"--check-teacher {model} {escape(weights)}: {teacher.classes} classes, but the soft "
                           f"labels are {width} wide: not the relabel teacher")
    return CheckTeacher(teacher, batches)


def spread(epochs: int, batches_per_epoch: int, count: int) -> list[tuple[int, int]]:
    """``count`` (epoch, batch) positions spread evenly over the whole run, first and last included."""
    total = epochs * batches_per_epoch
    k = min(count, total)
    flat = sorted({round(i * (total - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
    return [(f // batches_per_epoch, f % batches_per_epoch) for f in flat]


@torch.no_grad()
def check_teacher(shard_set: shards.ShardSet, check: CheckTeacher, log=print) -> dict:
    """Recompute :attr:`CheckTeacher.batches` batches of ``shard_set`` and compare; returns the
    manifest's ``teacher_check`` object, or raises :class:`TeacherCheckError`."""
    m, t = shard_set.manifest, check.teacher
    # A set fkd-relabel wrote: its teacher ran as recorded (batch-norm mode, chunks, weight, autocast).
    relabel = m.relabel or {"teachers": [{"mix_weight": 1.0}]}
    if len(relabel["teachers"]) > 1:
        raise TeacherCheckError(f"--check-teacher {t.name}: this set was labelled by an ensemble of "
                                f"{len(relabel['teachers'])} teachers, and the check recomputes one; its manifest "
                                f"names every teacher and its weights' sha256")
    ensemble = Ensemble([t], [relabel["teachers"][0]["mix_weight"]], device="cpu",
                        bn_mode=relabel.get("bn_mode", "eval"), chunks=relabel.get("teacher_chunks", 1),
                        amp=relabel.get("amp", "off"))
    codec = shard_set.spec.codec
    positions = spread(m.epochs, m.batches_per_epoch, check.batches)
    compared = []  # (epoch, batch, stored, recomputed as stored)
    for batch in batches_at(shard_set, positions):
        try:
            logits = ensemble(batch.model_input("cpu"))
            # The recomputed logits as the set stores them: its dtype's rounding, then its codec.
            stored_form = logits.numpy().astype(m.soft_label_dtype)
            expected = np.asarray(codec.decode(codec.encode(stored_form), m.soft_label_width), dtype=np.float32)
        except (TeacherError, shards.CodecError) as exc:
            raise TeacherCheckError(f"--check-teacher {t.name}: epoch {batch.epoch} batch {batch.batch}: "
                                    f"{first_line(exc)}") from None
        compared.append((batch.epoch, batch.batch, batch.soft_labels, torch.from_numpy(expected)))
    stored_rows = torch.cat([stored for _, _, stored, _ in compared])
    # How much the stored logits vary from image to image: the scale a difference is measured on.
    spread_rms = float((stored_rows - stored_rows.mean(0)).pow(2).mean().sqrt())
    exact = all(torch.equal(stored, expected) for _, _, stored, expected in compared)
    largest_difference = max(float((stored - expected).abs().max()) for _, _, stored, expected in compared)
    largest_relative = 0.0
    for epoch, batch, stored, expected in compared:
        # Both in the stored form, so that a codec's own loss (topk:K's fill) is no difference.
        rms = float((stored - expected).pow(2).mean().sqrt())
        relative = rms / spread_rms if spread_rms > 0 else (0.0 if exact else math.inf)
        largest_relative = max(largest_relative, relative)
        if not relative <= TOLERANCE:  # NaN fails too
            raise TeacherCheckError(
                f"--check-teacher {t.name}: epoch {epoch} batch {batch}: the teacher's logits on the stored images "
                f"are not the stored labels (their difference is {relative:.3g} of the logits' spread across images, "
                f"more than {TOLERANCE:g}; largest |difference| {largest_difference:.3g}): the images (--train-dir), "
                f"crop size (--input-size), fkd seed or teacher are not those the labels were computed with")
    result = "exact" if exact else "close"
    log(f"teacher check: {t.name} recomputed {len(positions)} batch(es) on the stored images: {result} (largest "
        f"|difference| {largest_difference:.3g}, {largest_relative:.2g} of the logits' spread)")
    return {"model": t.name, "weights": t.weights, "weights_sha256": t.sha256, "result": result,
            "batches": [list(p) for p in positions], "largest_difference": largest_difference,
            "largest_relative": largest_relative, "tolerance": TOLERANCE, "device": "cpu"}
