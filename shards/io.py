"""Opening shard-set locations: local paths, ``file://`` URLs and fsspec URLs (``s3://``, ...)."""

from __future__ import annotations

import hashlib
import os
from typing import IO
from urllib.parse import urlparse


class LocationError(OSError):
    """A location that cannot be opened or read."""


def is_local(location: str) -> bool:
    scheme = urlparse(location).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(location: str) -> str:
    """The filesystem path of a local location (a path or a ``file://`` URL)."""
    return urlparse(location).path if location.startswith("file://") else location


def join(location: str, name: str) -> str:
    """The location of file ``name`` inside the shard-set ``location``."""
    if is_local(location):
        return os.path.join(local_path(location), name)
    return location.rstrip("/") + "/" + name


def open_read(url: str) -> IO[bytes]:
    """Open ``url`` for streaming binary reads; raises :class:`LocationError` naming it."""
    try:
        if is_local(url):
            return open(local_path(url), "rb")
        return _fsspec().open(url, "rb").open()
    except FileNotFoundError:
        raise LocationError(f"{url}: no such file") from None
    except OSError as exc:
        raise LocationError(f"{url}: cannot open ({exc})") from None


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise LocationError(
            "remote locations need fsspec: pip install 'fkd-shards[remote]'"
        ) from None
    return fsspec


class HashingReader:
    """A read-only stream wrapper that hashes (sha256) and counts every byte read through it."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream
        self._hash = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def drain(self, chunk: int = 1 << 20) -> None:
        """Read to the end, so that the hash covers the whole file."""
        while self.read(chunk):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        self._stream.close()
