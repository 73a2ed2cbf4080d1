"""The manifest's two records of where its labels come from, typed field by field like every other
field: ``relabel`` (how fkd-relabel labelled the set) and ``teacher_check`` (what ``fkd-convert
--check-teacher`` found when it recomputed stored batches with the relabel teacher). Unknown fields
are refused, as they are at the manifest's top level."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from fkd_shards.common.ranges import MAX_CHECK_BATCHES
from fkd_shards.common.text import shown
from fkd_shards.common.typed import BOOL, check_fields, integer, number, one_of, or_null, text

TEACHER_CHECK_RESULTS = ("exact", "close")
MAX_TEACHERS = 64

_SHA256 = (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None), "a sha256 in hex"
_TEACHER = {"model": text(200), "weights": text(), "weights_sha256": _SHA256, "classes": integer(1),
            "mix_weight": number(-math.inf)}
_RELABEL = {
    "teachers": None,  # a list of _TEACHER objects, checked below
    "teacher_mix": text(), "bn_mode": one_of("eval", "train"), "teacher_chunks": integer(1), "amp": text(20),
    "crop_scale": or_null(((lambda v: isinstance(v, list) and len(v) == 2 and all(number(0, 1)[0](x) for x in v)),
                           "two rates in [0, 1]")),
    "mix_type": text(20), "seed": or_null(integer(0)), "fkd_seed": integer(0), "label_dtype": text(20),
    "replay": or_null(text()), "device": text(200), "draws": text(), "tf32": BOOL, "cudnn_benchmark": BOOL,
    "versions": ((lambda v: isinstance(v, dict) and all(isinstance(x, str) and len(x) <= 200 for x in v.values())),
                 "an object of version strings"),
}
_TEACHER_CHECK = {
    "model": text(200), "weights": text(), "weights_sha256": _SHA256, "result": one_of(*TEACHER_CHECK_RESULTS),
    "batches": None,  # a list of [epoch, batch] positions of the set, checked below
    "largest_difference": number(0), "largest_relative": number(0), "tolerance": number(0), "device": text(200),
}


def validate_relabel(body: object, fail: Callable[[str], None]) -> None:
    """fkd-relabel's provenance object (sets written before 0.3 lack ``tf32`` and ``cudnn_benchmark``)."""
    check_fields(body, _RELABEL, "relabel", fail, required=("teachers",))
    teachers = body["teachers"]
    if not isinstance(teachers, list) or not 1 <= len(teachers) <= MAX_TEACHERS:
        fail(f"relabel.teachers must be a list of 1 to {MAX_TEACHERS} objects, found {shown(teachers)}")
    for k, teacher in enumerate(teachers):
        check_fields(teacher, _TEACHER, f"relabel.teachers[{k}]", fail, required=tuple(_TEACHER))


def validate_teacher_check(body: object, epochs: int, batches_per_epoch: int, fail: Callable[[str], None]) -> None:
    """fkd-convert --check-teacher's result; its positions must lie in the set."""
    check_fields(body, _TEACHER_CHECK, "teacher_check", fail, required=tuple(_TEACHER_CHECK))
    positions = body["batches"]
    if not (isinstance(positions, list) and 1 <= len(positions) <= MAX_CHECK_BATCHES and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
            and 0 <= p[0] < epochs and 0 <= p[1] < batches_per_epoch for p in positions)):
        fail(f"teacher_check.batches must list 1 to {MAX_CHECK_BATCHES} [epoch, batch] positions of the set, found "
             f"{shown(positions)}")
