"""Writing a shard set: shards under temporary names, renamed when closed, ``manifest.json`` last."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import webdataset

from . import format as fmt
from .io import is_local, local_path
from .manifest import Manifest, ShardInfo
from .records import BatchRecord, ImageRecord, encode_batch, encode_image


class OutputExistsError(FileExistsError):
    """The output already holds files and overwriting was not asked for."""


class _HashingFile:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, path: str):
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


@dataclass
class _OpenShard:
    kind: str
    name: str
    temp_path: str
    file: _HashingFile
    tar: webdataset.TarWriter
    first: int
    last: int
    epoch: int | None
    count: int = 0


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    temp = path + fmt.TEMP_SUFFIX
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def prepare_output(directory: str, overwrite: bool) -> None:
    """Create ``directory``; refuse a non-empty one unless ``overwrite``, then remove a previous set.

    The old manifest goes first, so an interrupted clean-up leaves an incomplete, rejected set.
    Files that are not part of a shard set are left alone.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputExistsError(f"{directory}: exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    entries = os.listdir(directory)
    if entries and not overwrite:
        raise OutputExistsError(f"{directory}: output directory is not empty (use --overwrite)")
    if fmt.MANIFEST_NAME in entries:
        os.remove(os.path.join(directory, fmt.MANIFEST_NAME))
    for entry in entries:
        ours = entry.startswith(tuple(k + "-" for k in fmt.SHARD_KINDS)) and ".tar" in entry
        if ours or entry == fmt.MANIFEST_NAME + fmt.TEMP_SUFFIX:
            os.remove(os.path.join(directory, entry))


class ShardSetWriter:
    """Writes image records and batch records into rolled shards, then the manifest.

    Use as a context manager; leaving it by an exception removes every shard it wrote and
    writes no manifest, so the output is never taken for a complete set.
    """

    def __init__(self, output: str, shard_bytes: int = 512 * 10**6, overwrite: bool = False):
        if not is_local(output):
            raise ValueError(f"{output}: writing to remote locations is not supported yet")
        if shard_bytes <= 0:
            raise ValueError(f"shard size must be positive, got {shard_bytes}")
        self.directory = local_path(output)
        self.shard_bytes = shard_bytes
        prepare_output(self.directory, overwrite)
        self._open: dict[str, _OpenShard] = {}
        self._numbers = {kind: 0 for kind in fmt.SHARD_KINDS}
        self._closed: list[ShardInfo] = []
        self._written: list[str] = []

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add_image(self, record: ImageRecord) -> None:
        """Append one image; images must come in sample-index order."""
        shard = self._shard_for(fmt.IMAGES_KIND, record.index, None)
        shard.tar.write({"__key__": fmt.image_key(record.index), **encode_image(record)})
        self._advance(shard, record.index)

    def add_batch(self, record: BatchRecord) -> None:
        """Append one batch record; batches must come in (epoch, batch) order."""
        shard = self._shard_for(fmt.LABELS_KIND, record.batch, record.epoch)
        shard.tar.write({"__key__": fmt.batch_key(record.epoch, record.batch), **encode_batch(record)})
        self._advance(shard, record.batch)

    def finish(self, manifest: Manifest) -> Manifest:
        """Close all shards and write ``manifest`` (with the shard list filled in) last."""
        for kind in list(self._open):
            self._close_shard(kind)
        images = [s for s in self._closed if s.kind == fmt.IMAGES_KIND]
        labels = [s for s in self._closed if s.kind == fmt.LABELS_KIND]
        complete = manifest.with_shards(images + labels)
        complete.validate(os.path.join(self.directory, fmt.MANIFEST_NAME))
        write_atomically(os.path.join(self.directory, fmt.MANIFEST_NAME), complete.to_json().encode())
        return complete

    def abort(self) -> None:
        """Remove every file this writer created."""
        for shard in self._open.values():
            try:
                shard.tar.close()
                shard.file.close()
            except (OSError, ValueError):
                pass
            self._written.append(shard.temp_path)
        self._open.clear()
        for path in self._written:
            if os.path.exists(path):
                os.remove(path)

    def _shard_for(self, kind: str, position: int, epoch: int | None) -> _OpenShard:
        shard = self._open.get(kind)
        if shard is not None:
            if shard.epoch != epoch or shard.file.size >= self.shard_bytes:
                self._close_shard(kind)
                shard = None
            elif position != shard.last + 1:
                raise ValueError(f"{kind} record {position} follows {shard.last}: out of order")
        if shard is None:
            name = fmt.shard_name(kind, self._numbers[kind])
            self._numbers[kind] += 1
            temp_path = os.path.join(self.directory, name + fmt.TEMP_SUFFIX)
            file = _HashingFile(temp_path)
            tar = webdataset.TarWriter(file, user=fmt.TAR_USER, group=fmt.TAR_USER, encoder=False,
                                       mtime=fmt.TAR_MTIME)
            shard = _OpenShard(kind, name, temp_path, file, tar, first=position, last=position - 1,
                               epoch=epoch)
            self._open[kind] = shard
        return shard

    def _advance(self, shard: _OpenShard, position: int) -> None:
        shard.last = position
        shard.count += 1

    def _close_shard(self, kind: str) -> None:
        shard = self._open.pop(kind)
        shard.tar.close()
        shard.file.close()
        final = os.path.join(self.directory, shard.name)
        os.replace(shard.temp_path, final)
        self._written.append(final)
        self._closed.append(ShardInfo(
            name=shard.name, kind=kind, bytes=shard.file.size, sha256=shard.file.sha256.hexdigest(),
            count=shard.count, first=shard.first, last=shard.last, epoch=shard.epoch,
        ))
