"""Writing a shard set: shards under temporary names, renamed when closed, ``manifest.json`` last."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import webdataset

from . import format as fmt
from .io import LocationError, first_line, fsspec_module, is_local, local_path
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
    tar_bytes: int = 0  # members written so far, headers and padding included (the file lags behind)


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    temp = path + fmt.TEMP_SUFFIX
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _is_ours(name: str) -> bool:
    return (name.startswith(tuple(k + "-" for k in fmt.SHARD_KINDS)) and ".tar" in name) or \
        name == fmt.MANIFEST_NAME + fmt.TEMP_SUFFIX


class _LocalOutput:
    """A shard set in a local directory: shards written under temporary names and renamed."""

    def __init__(self, directory: str):
        self.directory = directory
        self.where = directory

    def prepare(self, overwrite: bool) -> None:
        """Create the directory; refuse a non-empty one unless ``overwrite``, then remove a previous
        set, manifest first, so that an interrupted clean-up leaves an incomplete, rejected set."""
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise OutputExistsError(f"{self.directory}: exists and is not a directory")
        os.makedirs(self.directory, exist_ok=True)
        entries = os.listdir(self.directory)
        if entries and not overwrite:
            raise OutputExistsError(f"{self.directory}: output directory is not empty (use --overwrite)")
        if fmt.MANIFEST_NAME in entries:
            os.remove(os.path.join(self.directory, fmt.MANIFEST_NAME))
        for entry in entries:
            if _is_ours(entry):
                os.remove(os.path.join(self.directory, entry))

    def staging_path(self, name: str) -> str:
        return os.path.join(self.directory, name + fmt.TEMP_SUFFIX)

    def commit(self, name: str, staged: str) -> None:
        os.replace(staged, os.path.join(self.directory, name))

    def remove(self, name: str) -> None:
        path = os.path.join(self.directory, name)
        if os.path.exists(path):
            os.remove(path)

    def write_manifest(self, data: bytes) -> None:
        write_atomically(os.path.join(self.directory, fmt.MANIFEST_NAME), data)

    def close(self) -> None:
        pass


class _RemoteOutput:
    """A shard set at an fsspec URL: shards staged in a local temporary directory and uploaded
    when closed; objects appear whole, and the manifest is uploaded last."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.where = self.url
        try:
            self.fs, self.root = fsspec_module().core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:
            raise LocationError(f"{self.url}: cannot use this location ({exc})") from None
        self.staging = tempfile.mkdtemp(prefix="fkd-convert-")

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:  # the back-end's own network and permission errors
            raise LocationError(f"{self.url}: {what} failed ({first_line(exc)})") from None

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def prepare(self, overwrite: bool) -> None:
        try:
            names = [p.rsplit("/", 1)[-1] for p in self._call("listing", self.fs.ls, self.root, False)]
        except FileNotFoundError:
            names = []
        if names and not overwrite:
            raise OutputExistsError(f"{self.url}: output location is not empty (use --overwrite)")
        if fmt.MANIFEST_NAME in names:
            self._call("removing the old manifest", self.fs.rm, self._path(fmt.MANIFEST_NAME))
        for name in names:
            if _is_ours(name):
                self._call(f"removing {name}", self.fs.rm, self._path(name))

    def staging_path(self, name: str) -> str:
        return os.path.join(self.staging, name)

    def commit(self, name: str, staged: str) -> None:
        self._call(f"uploading {name}", self.fs.put_file, staged, self._path(name))
        os.remove(staged)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm(self._path(name))
        except Exception:  # best effort while cleaning up after another error
            pass

    def write_manifest(self, data: bytes) -> None:
        self._call("uploading the manifest", self.fs.pipe_file, self._path(fmt.MANIFEST_NAME), data)

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


class ShardSetWriter:
    """Writes image records and batch records into rolled shards, then the manifest.

    Use as a context manager; leaving it by an exception removes every shard it wrote and
    writes no manifest, so the output is never taken for a complete set.
    """

    def __init__(self, output: str, shard_bytes: int = 512 * 10**6, overwrite: bool = False,
                 label_codec: str = "raw", codec_temperature: float = 20.0):
        if shard_bytes <= 0:
            raise ValueError(f"shard size must be positive, got {shard_bytes}")
        self.output = _LocalOutput(local_path(output)) if is_local(output) else _RemoteOutput(output)
        self.shard_bytes = shard_bytes
        self.label_codec, self.codec_temperature = label_codec, codec_temperature
        self.output.prepare(overwrite)
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
        members = encode_image(record)
        shard.tar.write({"__key__": fmt.image_key(record.index), **members})
        self._advance(shard, record.index, members)

    def add_batch(self, record: BatchRecord) -> None:
        """Append one batch record; batches must come in (epoch, batch) order."""
        shard = self._shard_for(fmt.LABELS_KIND, record.batch, record.epoch)
        members = encode_batch(record, self.label_codec, self.codec_temperature)
        shard.tar.write({"__key__": fmt.batch_key(record.epoch, record.batch), **members})
        self._advance(shard, record.batch, members)

    def finish(self, manifest: Manifest) -> Manifest:
        """Close all shards and write ``manifest`` (with the shard list filled in) last."""
        for kind in list(self._open):
            self._close_shard(kind)
        images = [s for s in self._closed if s.kind == fmt.IMAGES_KIND]
        labels = [s for s in self._closed if s.kind == fmt.LABELS_KIND]
        complete = manifest.with_shards(images + labels)
        complete.validate(f"{self.output.where}/{fmt.MANIFEST_NAME}")
        self.output.write_manifest(complete.to_json().encode())
        self.output.close()
        return complete

    def abort(self) -> None:
        """Remove every file this writer created."""
        for shard in self._open.values():
            try:
                shard.tar.close()
                shard.file.close()
            except (OSError, ValueError):
                pass
            if os.path.exists(shard.temp_path):
                os.remove(shard.temp_path)
        self._open.clear()
        for name in self._written:
            self.output.remove(name)
        self.output.close()

    def _shard_for(self, kind: str, position: int, epoch: int | None) -> _OpenShard:
        shard = self._open.get(kind)
        if shard is not None:
            if shard.epoch != epoch or shard.tar_bytes >= self.shard_bytes:
                self._close_shard(kind)
                shard = None
            elif position != shard.last + 1:
                raise ValueError(f"{kind} record {position} follows {shard.last}: out of order")
        if shard is None:
            name = fmt.shard_name(kind, self._numbers[kind])
            self._numbers[kind] += 1
            temp_path = self.output.staging_path(name)
            file = _HashingFile(temp_path)
            tar = webdataset.TarWriter(file, user=fmt.TAR_USER, group=fmt.TAR_USER, encoder=False,
                                       mtime=fmt.TAR_MTIME)
            shard = _OpenShard(kind, name, temp_path, file, tar, first=position, last=position - 1,
                               epoch=epoch)
            self._open[kind] = shard
        return shard

    def _advance(self, shard: _OpenShard, position: int, members: dict[str, bytes]) -> None:
        shard.last = position
        shard.count += 1
        # One 512-byte header per member (short names, integer fields: no PAX or long-name header)
        # and the data padded to 512 bytes.
        shard.tar_bytes += sum(512 + -(-len(data) // 512) * 512 for data in members.values())

    def _close_shard(self, kind: str) -> None:
        shard = self._open.pop(kind)
        shard.tar.close()
        shard.file.close()
        self.output.commit(shard.name, shard.temp_path)
        self._written.append(shard.name)
        self._closed.append(ShardInfo(
            name=shard.name, kind=kind, bytes=shard.file.size, sha256=shard.file.sha256.hexdigest(),
            count=shard.count, first=shard.first, last=shard.last, epoch=shard.epoch,
        ))
