"""``manifest.json``: the schema, its validation on open, and its atomic serialisation."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

from . import codecs
from . import format as fmt


class ManifestError(ValueError):
    """A manifest that is missing, of another format or version, or inconsistent."""


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
    label_codec: str = codecs.RAW
    label_codec_temperature: float | None = None
    format: str = fmt.FORMAT_NAME
    format_version: int = fmt.FORMAT_VERSION

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def batch_rows(self, batch: int) -> int:
        """Row count of ``batch`` in every epoch (only the last one is short)."""
        return min(self.batch_size, self.num_images - batch * self.batch_size)

    def shards_of(self, kind: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.kind == kind]

    def identity(self) -> dict:
        """The fields that say which data a checkpoint was trained on."""
        return {
            "num_images": self.num_images, "batch_size": self.batch_size,
            "soft_label_width": self.soft_label_width, "mix_type": self.mix_type,
            "fkd_seed": self.fkd_seed, "input_size": self.input_size, "classes": list(self.classes),
        }

    def describe(self) -> str:
        """A human-readable summary, one fact per line."""
        lines = [
            f"format          {self.format} v{self.format_version} ({self.created_by})",
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
            lines.append(f"alignment       mean {sum(self.alignment) / len(self.alignment):.3f}, "
                         f"min {min(self.alignment):.3f}")
        for kind in fmt.SHARD_KINDS:
            found = self.shards_of(kind)
            lines.append(f"{kind + ' shards':<16}{len(found)}, {sum(s.bytes for s in found) / 1e6:.1f} MB")
        return "\n".join(lines)

    def to_json(self) -> str:
        body = asdict(self)
        body["batches_per_epoch"] = self.batches_per_epoch
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = fmt.MANIFEST_NAME) -> Manifest:
        """Parse and validate; raises :class:`ManifestError` naming ``where`` and the problem."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(body, dict) or body.get("format") != fmt.FORMAT_NAME:
            raise ManifestError(f"{where}: not an {fmt.FORMAT_NAME} manifest")
        version = body.get("format_version")
        if version != fmt.FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format version {version!r} is not supported (expected {fmt.FORMAT_VERSION})"
            )
        body.pop("batches_per_epoch", None)
        try:
            shards = [ShardInfo(**s) for s in body.pop("shards")]
            manifest = cls(shards=shards, **body)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where}: missing or unknown field ({exc})") from None
        manifest.validate(where)
        return manifest

    def with_shards(self, shards: list[ShardInfo]) -> Manifest:
        return replace(self, shards=list(shards))

    def validate(self, where: str = fmt.MANIFEST_NAME) -> None:
        """Check internal consistency: sizes, known values, and complete, ordered shard coverage."""

        def fail(message: str) -> None:
            raise ManifestError(f"{where}: {message}")

        for name in ("num_images", "batch_size", "num_classes", "soft_label_width", "epochs",
                     "input_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                fail(f"{name} must be a positive integer, found {value!r}")
        if self.mix_type not in fmt.MIX_TYPES:
            fail(f"mix_type {self.mix_type!r} is not one of {fmt.MIX_TYPES}")
        try:
            codecs.parse(self.label_codec)
        except ValueError as exc:
            fail(f"{exc}; this reader cannot decode this set's soft labels")
        if self.soft_label_dtype not in fmt.SOFT_LABEL_DTYPES:
            fail(f"soft_label_dtype {self.soft_label_dtype!r} is not one of {fmt.SOFT_LABEL_DTYPES}")
        if len(self.classes) != self.num_classes:
            fail(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if self.soft_label_width < self.num_classes:
            fail(f"soft_label_width {self.soft_label_width} < num_classes {self.num_classes}")
        next_index = 0
        for s in self.shards_of(fmt.IMAGES_KIND):
            if s.first != next_index or s.last < s.first or s.count != s.last - s.first + 1:
                fail(f"image shard {s.name} holds [{s.first}, {s.last}], expected to start at {next_index}")
            next_index = s.last + 1
        if next_index != self.num_images:
            fail(f"image shards hold {next_index} images, expected {self.num_images}")
        cursor = (0, 0)  # the next (epoch, batch) a label shard must start at
        for s in self.shards_of(fmt.LABELS_KIND):
            if (s.epoch, s.first) != cursor:
                fail(f"label shard {s.name} starts at epoch {s.epoch} batch {s.first}, expected {cursor}")
            if not s.first <= s.last < self.batches_per_epoch or s.count != s.last - s.first + 1:
                fail(f"label shard {s.name} holds batches [{s.first}, {s.last}] of {self.batches_per_epoch}")
            cursor = (s.epoch, s.last + 1) if s.last + 1 < self.batches_per_epoch else (s.epoch + 1, 0)
        if cursor != (self.epochs, 0):
            fail(f"label shards end at epoch {cursor[0]} batch {cursor[1]}, expected {self.epochs} epochs")
        for s in self.shards:
            if s.kind not in fmt.SHARD_KINDS or "/" in s.name or s.name.startswith("."):
                fail(f"bad shard entry {s.name!r} of kind {s.kind!r}")
