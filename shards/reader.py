"""Reading a shard set: the manifest, ordered batch records, image records, verification."""

from __future__ import annotations

import io
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from . import format as fmt
from .io import HashingReader, LocationError, cached_fetch, fetch, is_local, join, open_read
from .manifest import Manifest, ManifestError, ShardInfo
from .records import BatchRecord, ImageRecord, RecordError, decode_batch, decode_image


class ShardError(ValueError):
    """A shard whose bytes or records disagree with the manifest; the message names the shard."""


class ShardSet:
    """A shard set at a local path or URL (``file://``, ``https://``, ``s3://``, any fsspec URL),
    validated on open.

    Local shards are streamed and their sha256 checked when each is read to its end. Remote shards
    are fetched whole and verified before any record is parsed (failures retried ``retries`` times
    with backoff), the next label shard being fetched while the current one is consumed: memory
    holds at most ``read_ahead + 1`` label shards. With ``cache_dir``, verified remote image shards
    (and label shards too with ``cache_labels``) are kept on local disk and reused.
    """

    def __init__(self, location: str, cache_dir: str | None = None, retries: int = 4,
                 backoff_s: float = 0.5, read_ahead: int = 1, cache_labels: bool = False):
        self.location = location
        self.cache_dir = cache_dir
        self.cache_labels = cache_labels
        self.retries, self.backoff_s, self.read_ahead = retries, backoff_s, max(0, read_ahead)
        self.remote = not is_local(location)
        manifest_url = join(location, fmt.MANIFEST_NAME)
        try:
            text = fetch(manifest_url, retries=retries, backoff_s=backoff_s).decode("utf-8")
        except LocationError as exc:
            if "no such file" in str(exc):
                raise ManifestError(
                    f"{manifest_url}: no manifest; not a shard set, or an incomplete (interrupted) one"
                ) from None
            raise ManifestError(str(exc)) from None
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
        for shard, source in self._sources(shards, self.read_ahead):
            url = self.url(shard)
            for members in self._records(shard, source):
                try:
                    record = decode_batch(members, m.label_codec, m.soft_label_width)
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
        for shard, source in self._sources(self.manifest.shards_of(fmt.IMAGES_KIND), 0):
            url = self.url(shard)
            for members in self._records(shard, source):
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
            try:
                with open_read(url) as f:
                    reader = HashingReader(f)
                    reader.drain()
            except LocationError as exc:
                raise ShardError(str(exc)) from None
            self._check_digest(url, shard, reader)

    def _sources(self, shards: list[ShardInfo], ahead: int) -> Iterator[tuple[ShardInfo, object]]:
        """Each shard with what to read it from: a local URL to stream, or verified bytes or a
        verified cached file for a remote one, fetched ``ahead`` shards in advance on a thread."""
        if not self.remote:
            yield from ((s, self.url(s)) for s in shards)
            return
        with ThreadPoolExecutor(1) as pool:
            pending: deque = deque()
            for shard in shards:
                pending.append((shard, pool.submit(self._fetch_verified, shard)))
                if len(pending) > ahead:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()

    def _fetch_verified(self, shard: ShardInfo) -> bytes | str:
        url = self.url(shard)
        try:
            if self.cache_dir and (shard.kind == fmt.IMAGES_KIND or self.cache_labels):
                return cached_fetch(url, self.cache_dir, shard.name, shard.bytes, shard.sha256, self.retries,
                                    self.backoff_s)
            return fetch(url, shard.bytes, shard.sha256, self.retries, self.backoff_s)
        except LocationError as exc:
            raise ShardError(str(exc)) from None

    def _records(self, shard: ShardInfo, source) -> Iterator[dict[str, bytes]]:
        """Group the members of one shard by key, in file order; a streamed (local) shard has its
        size and sha256 checked at its end, a fetched one was verified before."""
        url = self.url(shard)
        count = 0
        if isinstance(source, bytes):
            stream = io.BytesIO(source)
        else:
            stream = open(source, "rb") if self.remote else open_read(source)
        with stream as f:
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
        if not self.remote:
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
        dtype = m.soft_label_dtype if m.label_codec == "raw" else "float32"
        if soft.shape[1] != m.soft_label_width or str(soft.dtype) != dtype:
            raise ShardError(f"{where}: soft labels are {soft.dtype}{list(soft.shape)}")
        if (record.mix_index is None) != (m.mix_type == "none"):
            raise ShardError(f"{where}: mix data does not match mix type {m.mix_type}")
        if record.indices.min(initial=0) < 0 or record.indices.max(initial=0) >= m.num_images:
            raise ShardError(f"{where}: image index out of range")
