"""``manifest.json``: the schema, its validation on open (every field's type and range, complete
and ordered shard coverage, a checksum over the whole content), and its serialisation."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from fkd_shards.common.ranges import MAX_INPUT_SIZE
from fkd_shards.common.text import escape, shown

from . import codecs
from . import format as fmt
from .alignment import threshold as alignment_threshold
from .provenance import validate_relabel, validate_teacher_check


class ManifestError(ValueError):
    """A manifest that is missing, of another format or version, corrupt or inconsistent."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its file name, kind, size, sha256, record count and what it holds.

    Image shards hold sample indices ``[first, last]``; label shards hold batches
    ``[first, last]`` of one ``epoch`` (``epoch`` is None for image shards).
    """

    name: str
    kind: str
    bytes: int
    sha256: str
    count: int
    first: int
    last: int
    epoch: int | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a shard set, written after every shard is closed."""

    num_images: int
    batch_size: int
    num_classes: int
    soft_label_width: int
    epochs: int
    input_size: int
    mix_type: str
    fkd_seed: int
    classes: list[str]
    soft_label_dtype: str
    shards: list[ShardInfo]
    alignment: list[float] = field(default_factory=list)
    created_by: str = ""
    label_codec: str = fmt.CODEC_RAW
    label_codec_temperature: float | None = None
    # The alignment threshold the set was accepted with (0: accepted whatever its alignment); None
    # in sets written before it was recorded.
    min_alignment: float | None = None
    # fkd-relabel's provenance (teachers, seeds, knobs, versions); None for converted sets.
    relabel: dict | None = None
    # fkd-convert --check-teacher's result (teacher, batches recomputed, largest difference); None
    # when the images were matched to the labels by class only.
    teacher_check: dict | None = None
    format: str = fmt.FORMAT_NAME
    format_version: int = fmt.FORMAT_VERSION

    @property
    def batches_per_epoch(self) -> int:
        return fmt.batches_per_epoch(self.num_images, self.batch_size)

    def batch_rows(self, batch: int) -> int:
        """Row count of ``batch`` in every epoch (only the last one is short)."""
        return fmt.batch_rows(self.num_images, self.batch_size, batch)

    def shards_of(self, kind: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.kind == kind]

    @property
    def mixed(self) -> bool:
        return self.mix_type != fmt.MIX_NONE

    def content_id(self) -> str:
        """sha256 naming exactly this data: every shard's name and hash, and the fields that say how
        to read them. Two sets with the same id hold the same bytes."""
        body = {"shards": [(s.name, s.sha256) for s in self.shards], "input_size": self.input_size,
                "mix_type": self.mix_type, "label_codec": self.label_codec, "classes": self.classes}
        return hashlib.sha256(_canonical(body).encode()).hexdigest()

    def misalignment(self) -> str | None:
        """Why this set's recorded alignment should not be trusted, or None.

        A set accepted explicitly (``min_alignment`` 0) is trusted; otherwise an epoch whose rate is
        below the recorded threshold, or (sets that record none) near chance, is reported."""
        if not self.alignment or self.min_alignment == 0:
            return None
        threshold = alignment_threshold(self.min_alignment, self.num_classes, self.mixed)
        worst = min(range(len(self.alignment)), key=self.alignment.__getitem__)
        if self.alignment[worst] >= threshold:
            return None
        return (f"epoch {worst}'s replay alignment is {self.alignment[worst]:.3f}, below {threshold:.3f}: "
                f"the soft labels probably belong to other images (wrong fkd seed, image folder or N)")

    def describe(self) -> str:
        """A human-readable summary, one fact per line (strings from the file escaped)."""
        lines = [
            f"format          {self.format} v{self.format_version} ({escape(self.created_by)})",
            f"images N        {self.num_images} in {self.num_classes} classes",
            f"batch size B    {self.batch_size} ({self.batches_per_epoch} batches per epoch)",
            f"epochs E        {self.epochs}",
            f"input size S    {self.input_size}",
            f"mix type        {self.mix_type}",
            f"fkd seed        {self.fkd_seed}",
            f"soft labels     {self.soft_label_dtype} x {self.soft_label_width}",
            f"label codec     {self.label_codec}" + (f" (T={self.label_codec_temperature:g})"
                                                     if self.label_codec_temperature else ""),
        ]
        if self.alignment:
            accepted = "" if self.min_alignment is None else f", accepted at >= {self.min_alignment:g}"
            lines.append(f"alignment       mean {sum(self.alignment) / len(self.alignment):.3f}, "
                         f"min {min(self.alignment):.3f}{accepted}")
        lines.append(f"images proven   {self.label_source()}")
        for kind in fmt.SHARD_KINDS:
            found = self.shards_of(kind)
            lines.append(f"{kind + ' shards':<16}{len(found)}, {sum(s.bytes for s in found) / 1e6:.1f} MB")
        return "\n".join(lines)

    def label_source(self) -> str:
        """How the images are known to be the ones the labels were computed from, in a few words."""
        if self.relabel:
            teachers = ", ".join(escape(t["model"]) for t in self.relabel["teachers"])
            return f"labelled from them by fkd-relabel ({teachers})"
        c = self.teacher_check
        if c:
            return (f"by the relabel teacher {escape(c['model'])}: {len(c['batches'])} batches recomputed, "
                    f"{c['result']} (largest difference {c['largest_difference']:.3g}, "
                    f"{c['largest_relative']:.2g} of the logits' spread)")
        return "by class only (replay alignment; fkd-convert verify --check-teacher proves them)"

    def to_json(self) -> str:
        """The manifest as written: every field, ``batches_per_epoch`` for people, and a checksum
        over all of it."""
        body = asdict(self)
        body["batches_per_epoch"] = self.batches_per_epoch
        body["checksum"] = _checksum(body)
        return json.dumps(body, indent=1, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = fmt.MANIFEST_NAME) -> Manifest:
        """Parse and validate; raises :class:`ManifestError` naming ``where`` and the problem."""
        body = parse_json(text, where, ManifestError)
        if not isinstance(body, dict) or body.get("format") != fmt.FORMAT_NAME:
            raise ManifestError(f"{where}: not an {fmt.FORMAT_NAME} manifest")
        version = body.get("format_version")
        if version != fmt.FORMAT_VERSION or isinstance(version, bool):  # True == 1 in Python
            raise ManifestError(f"{where}: format version {escape(repr(version))[:40]} is not supported "
                                f"(expected {fmt.FORMAT_VERSION})")
        # Sets written before the checksum existed have none; any other set must match its own.
        checksum = body.pop("checksum", None)
        if checksum is not None and checksum != _checksum(body):
            raise ManifestError(f"{where}: checksum mismatch (the manifest was changed or is corrupt)")
        stated = body.pop("batches_per_epoch", None)  # written for readers' convenience, derived here
        manifest = cls._build(body, where)
        manifest.validate(where)
        if stated is not None and (stated != manifest.batches_per_epoch or type(stated) is not int):
            raise ManifestError(f"{where}: batches_per_epoch {shown(stated)} disagrees with num_images and "
                                f"batch_size ({manifest.batches_per_epoch})")
        return manifest

    @classmethod
    def _build(cls, body: dict, where: str) -> Manifest:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - names)
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {escape(', '.join(unknown))[:200]}")
        required = ("num_images", "batch_size", "num_classes", "soft_label_width", "epochs", "input_size",
                    "mix_type", "fkd_seed", "classes", "soft_label_dtype", "shards")
        missing = [name for name in required if name not in body]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
        shards = body["shards"]
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise ManifestError(f"{where}: shards is not a list of objects")
        shard_fields = {f.name for f in fields(ShardInfo)}
        for s in shards:
            if set(s) != shard_fields:
                raise ManifestError(f"{where}: a shard entry has fields {escape(sorted(s))[:200]}, expected "
                                    f"{sorted(shard_fields)}")
        return cls(**{**body, "shards": [ShardInfo(**s) for s in shards]})

    def with_shards(self, shards: list[ShardInfo]) -> Manifest:
        return replace(self, shards=list(shards))

    def validate(self, where: str = fmt.MANIFEST_NAME) -> None:
        """Check every field's type and range, and complete, ordered shard coverage."""

        def fail(message: str) -> None:
            raise ManifestError(f"{where}: {message}")

        for name in ("num_images", "batch_size", "num_classes", "soft_label_width", "epochs", "input_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                fail(f"{name} must be a positive integer, found {shown(getattr(self, name))}")
        if self.input_size > MAX_INPUT_SIZE:
            fail(f"input_size {self.input_size} is above {MAX_INPUT_SIZE}")
        if not _is_int(self.fkd_seed) or not 0 <= self.fkd_seed < 2**64:
            fail(f"fkd_seed must be an integer in [0, 2**64), found {shown(self.fkd_seed)}")
        if self.mix_type not in fmt.MIX_TYPES:
            fail(f"mix_type {shown(self.mix_type)} is not one of {fmt.MIX_TYPES}")
        try:
            codecs.parse(self.label_codec)
        except (codecs.CodecError, TypeError) as exc:
            fail(f"{escape(exc)}; this reader cannot decode this set's soft labels")
        if self.soft_label_dtype not in fmt.SOFT_LABEL_DTYPES:
            fail(f"soft_label_dtype {shown(self.soft_label_dtype)} is not one of {fmt.SOFT_LABEL_DTYPES}")
        if not isinstance(self.classes, list) or not all(isinstance(c, str) for c in self.classes):
            fail("classes is not a list of strings")
        for name in self.classes:  # class names are the image folder's directory names
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                fail(f"class name {shown(name)} cannot be a directory name")
        if len(self.classes) != self.num_classes or len(set(self.classes)) != len(self.classes):
            fail(f"{len(self.classes)} class names ({len(set(self.classes))} distinct) for "
                 f"num_classes={self.num_classes}")
        if not self.num_classes <= self.soft_label_width <= fmt.MAX_SOFT_LABEL_WIDTH:
            fail(f"soft_label_width {self.soft_label_width} outside [num_classes={self.num_classes}, "
                 f"{fmt.MAX_SOFT_LABEL_WIDTH}]")
        if self.num_images < self.num_classes:
            fail(f"num_images {self.num_images} < num_classes {self.num_classes}")
        for name in ("label_codec_temperature", "min_alignment"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value >= 0):
                fail(f"{name} must be a finite number >= 0 or null, found {shown(value)}")
        if not isinstance(self.alignment, list) or not all(_is_number(a) and 0 <= a <= 1 for a in self.alignment):
            fail("alignment is not a list of rates in [0, 1]")
        if self.alignment and len(self.alignment) != self.epochs:
            fail(f"alignment has {len(self.alignment)} rates for {self.epochs} epochs")
        if not isinstance(self.created_by, str):
            fail("created_by is not a string")
        if self.relabel is not None:
            validate_relabel(self.relabel, fail)
        if self.teacher_check is not None:
            validate_teacher_check(self.teacher_check, self.epochs, self.batches_per_epoch, fail)
        for s in self.shards:
            validate_shard(s, where)
        self._validate_coverage(fail)

    def _validate_coverage(self, fail) -> None:
        next_index = 0
        for s in self.shards_of(fmt.IMAGES_KIND):
            if s.first != next_index or s.last < s.first or s.count != s.last - s.first + 1:
                fail(f"image shard {s.name} holds [{s.first}, {s.last}], expected to start at {next_index}")
            if s.bytes < s.count * fmt.MIN_IMAGE_RECORD_BYTES:
                fail(f"image shard {s.name}: {s.bytes} bytes cannot hold {s.count} records")
            next_index = s.last + 1
        if next_index != self.num_images:
            fail(f"image shards hold {next_index} images, expected {self.num_images}")
        cursor = (0, 0)  # the next (epoch, batch) a label shard must start at
        # The bytes a row's soft labels take at the least: a manifest's sizes, which the shards' own
        # sizes are checked against, bound the width before anything is made that large.
        per_row = sum(np.dtype(dtype).itemsize * math.prod(tail) for dtype, tail in
                      codecs.parse(self.label_codec).layout(self.soft_label_dtype, self.soft_label_width).values())
        for s in self.shards_of(fmt.LABELS_KIND):
            if (s.epoch, s.first) != cursor:
                fail(f"label shard {s.name} starts at epoch {s.epoch} batch {s.first}, expected {cursor}")
            if not s.first <= s.last < self.batches_per_epoch or s.count != s.last - s.first + 1:
                fail(f"label shard {s.name} holds batches [{s.first}, {s.last}] of {self.batches_per_epoch}")
            rows = sum(self.batch_rows(b) for b in range(s.first, s.last + 1))
            if s.bytes < s.count * fmt.MIN_BATCH_RECORD_BYTES + rows * per_row:
                fail(f"label shard {s.name}: {s.bytes} bytes cannot hold {s.count} records of {self.soft_label_width} "
                     f"classes")
            cursor = (s.epoch, s.last + 1) if s.last + 1 < self.batches_per_epoch else (s.epoch + 1, 0)
        if cursor != (self.epochs, 0):
            fail(f"label shards end at epoch {cursor[0]} batch {cursor[1]}, expected {self.epochs} epochs")
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            fail("a shard is listed twice")


def validate_shard(s: ShardInfo, where: str = fmt.MANIFEST_NAME) -> None:
    """Check one shard entry's types and values; :class:`ManifestError` otherwise."""

    def fail(message: str) -> None:
        raise ManifestError(f"{where}: {message}")

    match = fmt.SHARD_NAME.fullmatch(s.name) if isinstance(s.name, str) else None
    if match is None or match.group(1) != s.kind:
        fail(f"bad shard entry {shown(s.name)} of kind {shown(s.kind)}")
    for name in ("bytes", "count", "first", "last"):
        value = getattr(s, name)
        if not _is_int(value) or value < (1 if name in ("bytes", "count") else 0):
            fail(f"shard {s.name}: {name} is {shown(value)}")
    if not (isinstance(s.sha256, str) and len(s.sha256) == 64 and all(c in "0123456789abcdef" for c in s.sha256)):
        fail(f"shard {s.name}: sha256 is not 64 lower-case hex digits")
    if s.kind == fmt.IMAGES_KIND and s.epoch is not None:
        fail(f"image shard {s.name} has an epoch")
    if s.kind == fmt.LABELS_KIND and not (_is_int(s.epoch) and s.epoch >= 0):
        fail(f"label shard {s.name}: epoch is {shown(s.epoch)}")


def parse_json(text: str, where: str, error: type[Exception]) -> object:
    """JSON with every failure as ``error`` naming ``where``: syntax, nesting too deep for the
    parser, NaN or infinite numbers, integers too long to convert, a key twice in one object."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not a valid number")

    def finite(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):  # 1e400 reads as inf
            raise ValueError(f"{literal[:20]} is beyond a float's range")
        return value

    def unique(pairs: list[tuple[str, object]]) -> dict:
        body = dict(pairs)
        if len(body) != len(pairs):  # json.loads would keep the last silently: which one was meant?
            seen = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ValueError(f"the key {twice[:40]!r} appears twice in one object")
        return body

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite, object_pairs_hook=unique)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise error(f"{where}: not valid JSON ({str(exc)[:100]})") from None


def _canonical(body: object) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _checksum(body: dict) -> str:
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)

