"""Opening shard-set locations: local paths, ``file://`` URLs and fsspec URLs (``s3://``, ...)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
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
        # block_size=0: a plain sequential stream for http(s); other backends ignore it.
        options = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
        return fsspec_module().open(url, "rb", **options).open()
    except FileNotFoundError:
        raise LocationError(f"{url}: no such file") from None
    except LocationError:
        raise
    except Exception as exc:  # network back-ends raise their own types (aiohttp, botocore, ...)
        raise LocationError(f"{url}: cannot open ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (at most 200 characters), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def fetch(url: str, size: int | None = None, sha256: str | None = None, retries: int = 4,
          backoff_s: float = 0.5) -> bytes:
    """The whole file at ``url``, checked against ``size`` and ``sha256`` when given.

    For a remote URL, a failed request (a missing file too: some back-ends report every failed
    status as one), a short read or a hash mismatch is retried ``retries`` times with doubling
    backoff; then :class:`LocationError` names the URL and the last problem. A local file is read once.
    """
    problem = ""
    retries = 0 if is_local(url) else retries
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            with open_read(url) as f:
                data = _read_all(f)
        except LocationError as exc:
            problem = str(exc).removeprefix(f"{url}: ")
            continue
        except Exception as exc:  # a connection cut mid-read surfaces as the back-end's own error
            problem = f"read failed ({first_line(exc)})"
            continue
        if size is not None and len(data) != size:
            problem = f"short read: {len(data)} of {size} bytes"
        elif sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            problem = "sha256 mismatch"
        else:
            return data
    attempts = f" after {retries + 1} attempts" if retries else ""
    raise LocationError(f"{url}: {problem}{attempts}")


def _read_all(f: IO[bytes], chunk: int = 1 << 22) -> bytes:
    parts = []
    while True:
        data = f.read(chunk)
        if not data:
            return b"".join(parts)
        parts.append(data)


def cached_fetch(url: str, cache_dir: str, name: str, size: int, sha256: str, retries: int = 4,
                 backoff_s: float = 0.5) -> str:
    """A local path holding the verified file, from ``cache_dir`` or fetched into it.

    The cache file's name carries its sha256, so a hit is re-checked cheaply by its size. A new file
    is written under a name unique to this process and renamed, so several processes may share one
    cache directory.
    """
    os.makedirs(cache_dir, exist_ok=True)
    stem = name[:-4] if name.endswith(".tar") else name
    path = os.path.join(cache_dir, f"{stem}-{sha256}.tar")
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    data = fetch(url, size, sha256, retries, backoff_s)
    temp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.partial"
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return path


def fsspec_module():
    """fsspec, imported on first use; a clear error when the remote extra is not installed."""
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
