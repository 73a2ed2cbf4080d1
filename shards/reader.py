"""Reading a shard set: the manifest, ordered batch records, image records, verification.

Every shard, local or remote, is read whole (never more than the manifest's byte count) and its size
and sha256 are checked before any of its bytes is parsed; then every record is decoded and checked
against the manifest (:mod:`.records`). Memory holds the shard being consumed plus ``read_ahead``
label shards read on a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fkd_shards.common.prefetch import ordered_map
from fkd_shards.common.text import escape

from . import codecs
from . import format as fmt
from .io import LocationError, LocationMissing, cached_read, is_local, join, read_verified
from .manifest import Manifest, ManifestError, ShardInfo
from .records import BatchRecord, BatchSpec, ImageRecord, RecordError, decode_batch, decode_image
from .tar import TarFormatError, records


class ShardError(ValueError):
    """A shard whose bytes or records disagree with the manifest; the message names the shard."""


class ShardSet:
    """A shard set at a local path or URL (``file://``, ``https://``, ``s3://``, any fsspec URL),
    validated on open.

    Remote reads are retried ``retries`` times with doubling backoff and give up on a connection
    that sends nothing for ``timeout_s``. With ``cache_dir``, verified remote image shards (and label
    shards too with ``cache_labels``) are kept on local disk and re-hashed whenever they are used.
    """

    def __init__(self, location: str, cache_dir: str | None = None, cache_labels: bool = False, *, retries: int = 4,
                 backoff_s: float = 0.5, timeout_s: float = 60.0, read_ahead: int = 1):
        self.location = location
        self.cache_dir = cache_dir
        self.cache_labels = cache_labels
        self.read_ahead = max(0, read_ahead)
        self.remote = not is_local(location)
        self._options = {"retries": retries, "backoff_s": backoff_s, "timeout_s": timeout_s}
        manifest_url = join(location, fmt.MANIFEST_NAME)
        try:
            raw = read_verified(manifest_url, limit=fmt.MAX_MANIFEST_BYTES, **self._options)
        except LocationMissing:
            raise ManifestError(f"{manifest_url}: no manifest; not a shard set, or an incomplete "
                                f"(interrupted) one") from None
        except LocationError as exc:
            raise ManifestError(str(exc)) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"{manifest_url}: not UTF-8 text") from None
        self._use(Manifest.from_json(text, manifest_url))

    @classmethod
    def staged(cls, location: str, manifest: Manifest, locate: Callable[[str], str]) -> ShardSet:
        """A set not yet published: ``manifest`` (validated) held in memory, each shard read from
        ``locate(name)``. What a writer checks before it writes the manifest."""
        self = cls.__new__(cls)
        self.location, self.cache_dir, self.cache_labels, self.read_ahead = location, None, False, 1
        self.remote = not is_local(location)
        self._options = {"retries": 1, "backoff_s": 0.1, "timeout_s": 60.0}
        self._locate = locate
        manifest.validate(f"{location} (staged)")
        self._use(manifest)
        return self

    def _use(self, manifest: Manifest) -> None:
        self.manifest = m = manifest
        self.spec = BatchSpec(num_images=m.num_images, width=m.soft_label_width, input_size=m.input_size,
                              mix_type=m.mix_type, codec=codecs.parse(m.label_codec, m.label_codec_temperature),
                              stored_dtype=m.soft_label_dtype)

    _locate: Callable[[str], str] | None = None

    def url(self, shard: ShardInfo) -> str:
        return self._locate(shard.name) if self._locate else join(self.location, shard.name)

    def batches(self, start_epoch: int = 0, end_epoch: int | None = None) -> Iterator[BatchRecord]:
        """Batch records of epochs ``[start_epoch, end_epoch)``, strictly in (epoch, batch) order.

        Besides each record's own checks, every image index appears at most once per epoch (the
        sampler's order is a permutation)."""
        m = self.manifest
        end = m.epochs if end_epoch is None else end_epoch
        if not 0 <= start_epoch <= end <= m.epochs:
            raise ValueError(f"epochs [{start_epoch}, {end}) are outside the set's [0, {m.epochs})")
        shards = [s for s in m.shards_of(fmt.LABELS_KIND) if start_epoch <= s.epoch < end]
        verified = ((shard, self.url(shard), data) for shard, data in self._verified(shards, self.cache_labels))
        yield from batch_records(verified, self.spec, m.batch_rows)

    def images(self) -> Iterator[ImageRecord]:
        """Image records in sample-index order (``index`` runs from 0 to N-1), each checked."""
        m = self.manifest
        for shard, data in self._verified(m.shards_of(fmt.IMAGES_KIND), True):
            url = self.url(shard)
            index = shard.first
            for key, members in _counted_records(url, data, shard):
                if key != fmt.image_key(index):
                    raise ShardError(f"{url}: found record {escape(key[:40])}, expected image {index}")
                try:
                    yield decode_image(members, index, m.num_classes)
                except RecordError as exc:
                    raise ShardError(f"{url}: image {index}: {escape(exc)}") from None
                index += 1

    def verify(self) -> None:
        """Re-read and re-hash every shard against the manifest; :class:`ShardError` on the first
        mismatch."""
        for shard in self.manifest.shards:
            self._read(shard, cache=False)

    def _verified(self, shards: list[ShardInfo], cache: bool) -> Iterator[tuple[ShardInfo, bytes]]:
        """Each shard with its verified bytes, the next ones read ahead on a thread."""
        with ThreadPoolExecutor(1) as pool:
            yield from zip(shards, ordered_map(pool, lambda s: self._read(s, cache), shards, self.read_ahead))

    def _read(self, shard: ShardInfo, cache: bool) -> bytes:
        url = self.url(shard)
        try:
            if self.remote and self.cache_dir and cache:
                return cached_read(url, self.cache_dir, shard.name, shard.bytes, shard.sha256, **self._options)
            return read_verified(url, shard.bytes, shard.sha256, **self._options)
        except LocationError as exc:
            raise ShardError(str(exc)) from None



def batch_records(verified: Iterable[tuple[ShardInfo, str, bytes]], spec: BatchSpec,
                  batch_rows: Callable[[int], int]) -> Iterator[BatchRecord]:
    """The batch records of label shards, given as (shard, url, bytes) with the bytes verified
    against the shard's size and hash, in order: every record's key, count and fields checked
    (``batch_rows(b)``: the rows batch b must hold), and every image index at most once per epoch
    (the sampler's order is a permutation). Used by :meth:`ShardSet.batches` and by a resumed
    writer reading back the shards it kept."""
    seen = np.zeros(spec.num_images, dtype=bool)
    for shard, url, data in verified:
        if shard.first == 0:
            seen[:] = False
        batch = shard.first
        for key, members in _counted_records(url, data, shard):
            where = f"{url}: epoch {shard.epoch} batch {batch}"
            if key != fmt.batch_key(shard.epoch, batch):
                raise ShardError(f"{where}: found record {escape(key[:40])!s}")
            try:
                record = decode_batch(members, spec, shard.epoch, batch, batch_rows(batch))
            except RecordError as exc:
                raise ShardError(f"{where}: {escape(exc)}") from None
            if seen[record.indices].any() or len(np.unique(record.indices)) != record.size:
                raise ShardError(f"{where}: an image appears twice in the epoch")
            seen[record.indices] = True
            yield record
            batch += 1


def _counted_records(url: str, data: bytes, shard: ShardInfo) -> Iterator[tuple[str, dict]]:
    """The (key, members) records of a verified shard's bytes; exactly the manifest's count of them."""
    count = 0
    try:
        for key, members in records(data):
            count += 1
            if count > shard.count:
                raise ShardError(f"{url}: holds more than the {shard.count} records the manifest says")
            yield key, members
    except TarFormatError as exc:
        raise ShardError(f"{url}: malformed tar ({exc})") from None
    if count != shard.count:
        raise ShardError(f"{url}: holds {count} records, manifest says {shard.count}")
