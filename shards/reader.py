"""Reading a shard set: the manifest, ordered batch records, image records, verification."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from . import format as fmt
from .io import HashingReader, LocationError, join, open_read
from .manifest import Manifest, ManifestError, ShardInfo
from .records import BatchRecord, ImageRecord, RecordError, decode_batch, decode_image


class ShardError(ValueError):
    """A shard whose bytes or records disagree with the manifest; the message names the shard."""


class ShardSet:
    """A shard set at a local path or URL, validated on open.

    >>> s = ShardSet("out/")              # doctest: +SKIP
    >>> for rec in s.batches(): ...       # doctest: +SKIP
    """

    def __init__(self, location: str):
        self.location = location
        manifest_url = join(location, fmt.MANIFEST_NAME)
        try:
            with open_read(manifest_url) as f:
                text = f.read().decode("utf-8")
        except LocationError:
            raise ManifestError(
                f"{manifest_url}: no manifest; not a shard set, or an incomplete (interrupted) one"
            ) from None
        except UnicodeDecodeError:
            raise ManifestError(f"{manifest_url}: not UTF-8 text") from None
        self.manifest = Manifest.from_json(text, manifest_url)

    def url(self, shard: ShardInfo) -> str:
        return join(self.location, shard.name)

    def batches(self, start_epoch: int = 0, end_epoch: int | None = None) -> Iterator[BatchRecord]:
        """Batch records of epochs ``[start_epoch, end_epoch)``, strictly in (epoch, batch) order."""
        m = self.manifest
        end = m.epochs if end_epoch is None else end_epoch
        if not 0 <= start_epoch <= end <= m.epochs:
            raise ValueError(f"epochs [{start_epoch}, {end}) are outside the set's [0, {m.epochs})")
        expected = ((e, b) for e in range(start_epoch, end) for b in range(m.batches_per_epoch))
        shards = [s for s in m.shards_of(fmt.LABELS_KIND) if start_epoch <= s.epoch < end]
        for shard in shards:
            for members in self._records(shard):
                url = self.url(shard)
                try:
                    record = decode_batch(members)
                except (RecordError, ValueError, KeyError) as exc:
                    raise ShardError(f"{url}: bad batch record: {exc}") from None
                position = next(expected, None)
                if (record.epoch, record.batch) != position:
                    raise ShardError(
                        f"{url}: found epoch {record.epoch} batch {record.batch}, expected {position}"
                    )
                self._check_batch(url, record)
                yield record
        leftover = next(expected, None)
        if leftover is not None:
            raise ShardError(f"{self.location}: label shards end before epoch/batch {leftover}")

    def images(self) -> Iterator[ImageRecord]:
        """Image records in sample-index order (``index`` runs from 0 to N-1)."""
        next_index = 0
        for shard in self.manifest.shards_of(fmt.IMAGES_KIND):
            url = self.url(shard)
            for members in self._records(shard):
                try:
                    record = decode_image(members)
                except (RecordError, ValueError, KeyError) as exc:
                    raise ShardError(f"{url}: bad image record: {exc}") from None
                if record.index != next_index:
                    raise ShardError(f"{url}: found image {record.index}, expected {next_index}")
                next_index += 1
                yield record
        if next_index != self.manifest.num_images:
            raise ShardError(f"{self.location}: image shards hold {next_index} of {self.manifest.num_images}")

    def verify(self) -> None:
        """Re-hash every shard against the manifest; raises :class:`ShardError` on the first mismatch."""
        for shard in self.manifest.shards:
            url = self.url(shard)
            with open_read(url) as f:
                reader = HashingReader(f)
                reader.drain()
            self._check_digest(url, shard, reader)

    def _records(self, shard: ShardInfo) -> Iterator[dict[str, bytes]]:
        """Group the members of one shard by key, in file order; checks size and sha256 at the end."""
        url = self.url(shard)
        count = 0
        with open_read(url) as f:
            reader = HashingReader(f)
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    key, members = None, {}
                    for info in tar:
                        if not info.isfile():
                            continue
                        member_key, _, suffix = info.name.partition(".")
                        if member_key != key and members:
                            count += 1
                            yield members
                            members = {}
                        key = member_key
                        members[suffix] = tar.extractfile(info).read()
                    if members:
                        count += 1
                        yield members
                reader.drain()
            except (tarfile.TarError, EOFError) as exc:
                raise ShardError(f"{url}: corrupt or truncated tar ({exc})") from None
        self._check_digest(url, shard, reader)
        if count != shard.count:
            raise ShardError(f"{url}: holds {count} records, manifest says {shard.count}")

    @staticmethod
    def _check_digest(url: str, shard: ShardInfo, reader: HashingReader) -> None:
        if reader.bytes_read != shard.bytes:
            raise ShardError(f"{url}: {reader.bytes_read} bytes, manifest says {shard.bytes}")
        if reader.hexdigest() != shard.sha256:
            raise ShardError(f"{url}: sha256 mismatch (file changed or corrupt)")

    def _check_batch(self, url: str, record: BatchRecord) -> None:
        m = self.manifest
        n = m.batch_rows(record.batch)
        where = f"{url}: epoch {record.epoch} batch {record.batch}"
        if record.size != n:
            raise ShardError(f"{where}: {record.size} rows, expected {n}")
        soft = record.soft_labels
        if soft.shape[1] != m.soft_label_width or str(soft.dtype) != m.soft_label_dtype:
            raise ShardError(f"{where}: soft labels are {soft.dtype}{list(soft.shape)}")
        if (record.mix_index is None) != (m.mix_type == "none"):
            raise ShardError(f"{where}: mix data does not match mix type {m.mix_type}")
        if record.indices.min(initial=0) < 0 or record.indices.max(initial=0) >= m.num_images:
            raise ShardError(f"{where}: image index out of range")
