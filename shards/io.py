"""Shard-set locations: local paths, ``file://`` URLs and fsspec URLs (``s3://``, ``https://``, ...),
for reading (verified, bounded, retried) and for writing (local directory or staged uploads).

Reading never returns a byte that has not been checked: :func:`read_verified` reads at most the
expected size (a longer file or body is an error, not a bigger buffer), checks the size and the
sha256, and only then hands the bytes over. Failures name the URL and what happened: no such file,
unreachable, timed out, short, too long, sha256 mismatch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from urllib.parse import urlparse

from fkd_shards.common.files import (
    FileMissingError,
    FileReadError,
    FileWriteError,
    make_directory,
    read_bounded,
    remove_quietly,
    write_atomically,
)
from fkd_shards.common.text import first_line

from . import format as fmt


class LocationError(OSError):
    """A location that cannot be opened, read or written; the message names it."""


class LocationMissing(LocationError):
    """Nothing exists at the location (a missing file, an HTTP 404, a missing S3 key)."""


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


def fsspec_module():
    """fsspec, imported on first use; a clear error when the remote extra is not installed."""
    try:
        import fsspec
    except ImportError:
        raise LocationError("remote locations need fsspec: pip install 'fkd-shards[remote]'") from None
    return fsspec


def remote_options(url: str, timeout_s: float) -> dict:
    """fsspec storage options that bound every network wait of ``url``'s back-end by ``timeout_s``."""
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        import aiohttp

        # block_size=0: a plain sequential stream; sock_read: a body that stalls is an error.
        return {"block_size": 0, "client_kwargs": {"timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=timeout_s, sock_read=timeout_s)}}
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                  "retries": {"max_attempts": 1}}}
    return {}


def _chain(exc: BaseException) -> list[BaseException]:
    """The error and the ones it was raised from (fsspec's HTTP back-end, for one, reports both a
    404 and a refused connection as a FileNotFoundError raised from aiohttp's error)."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    return chain


def is_missing(exc: BaseException) -> bool:
    """A failure that says the file does not exist (not that the server could not be reached)."""
    chain = _chain(exc)
    return any(getattr(e, "status", None) in (404, 410) for e in chain) or isinstance(chain[-1], FileNotFoundError)


def describe_failure(exc: BaseException, timeout_s: float) -> str:
    """What a failed request means, in words: missing, timed out, unreachable, or the back-end's own."""
    if is_missing(exc):
        return "no such file"
    root = _chain(exc)[-1]
    if isinstance(root, TimeoutError) or "Timeout" in type(root).__name__:
        return f"timed out (no data for {timeout_s:g} s)"
    if isinstance(root, ConnectionError) or "Connect" in type(root).__name__:
        return f"unreachable ({first_line(root, 150)})"
    return f"request failed ({first_line(root, 150)})"


def _read_remote(url: str, limit: int, timeout_s: float) -> bytes:
    """At most ``limit`` bytes of ``url``; one more is an error (the body is longer than expected)."""
    fsspec = fsspec_module()
    with fsspec.open(url, "rb", **remote_options(url, timeout_s)) as f:
        parts, total = [], 0
        while True:
            chunk = f.read(min(1 << 22, limit + 1 - total))
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise LocationError(f"{url}: longer than the {limit} bytes expected")


def read_verified(url: str, size: int | None = None, sha256: str | None = None, *, limit: int | None = None,
                  retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 60.0) -> bytes:
    """The whole file at ``url``, checked against ``size`` and ``sha256`` when given, and never more
    than ``size`` (or ``limit``) bytes read.

    A remote failure (request, connection cut, timeout, short or long body, hash mismatch) is retried
    ``retries`` times with doubling backoff; then :class:`LocationError` names the URL and the last
    problem (:class:`LocationMissing` when the file does not exist). A local file is read once and
    must be a regular file."""
    bound = size if size is not None else limit
    if bound is None:
        raise ValueError("read_verified needs a size or a limit")
    if is_local(url):
        try:
            data = read_bounded(local_path(url), bound, size)
        except FileMissingError as exc:
            raise LocationMissing(str(exc)) from None
        except FileReadError as exc:
            raise LocationError(str(exc)) from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise LocationError(f"{url}: sha256 mismatch (file changed or corrupt)")
        return data
    problem, missing = "", False
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            data = _read_remote(url, bound, timeout_s)
        except LocationError as exc:
            problem, missing = str(exc).removeprefix(f"{url}: "), False
            continue
        except Exception as exc:  # the back-end's own errors: aiohttp, botocore, OSError, ...
            problem, missing = describe_failure(exc, timeout_s), is_missing(exc)
            continue
        if size is not None and len(data) != size:
            problem, missing = f"short read: {len(data)} of {size} bytes", False
        elif sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            problem, missing = "sha256 mismatch", False
        else:
            return data
    attempts = f" after {retries + 1} attempts" if retries else ""
    raise (LocationMissing if missing else LocationError)(f"{url}: {problem}{attempts}")


def cached_read(url: str, cache_dir: str, name: str, size: int, sha256: str, **options) -> bytes:
    """The verified bytes of ``url``, from ``cache_dir`` when a copy is there, else fetched and
    stored there (under a name carrying the sha256, written atomically, so that several processes
    may share one directory). A copy is re-hashed on every use; one that does not match is fetched
    again once, and a second mismatch is an error."""
    os.makedirs(cache_dir, exist_ok=True)
    stem = name[:-4] if name.endswith(".tar") else name
    path = os.path.join(cache_dir, f"{stem}-{sha256}.tar")
    if os.path.exists(path):
        try:
            return read_verified(path, size, sha256)
        except LocationError:
            remove_quietly(path)  # a corrupt copy (another process may be replacing it too): fetched again
    data = read_verified(url, size, sha256, **options)
    try:
        write_atomically(path, data)
    except OSError as exc:
        raise LocationError(f"{cache_dir}: cannot store a verified copy of {name} ({exc})") from None
    return read_verified(path, size, sha256)


class LocalOutput:
    """A shard set in a local directory: shards written under temporary names, renamed into place
    when the whole set is written."""

    defers_publishing = True

    def __init__(self, directory: str):
        self.directory = directory
        self.where = directory
        self._lock: int | None = None

    def ensure(self) -> None:
        """Create the directory and lock it for this writer (released by :meth:`close` or when the
        process ends): a second writer into the same directory is refused, not interleaved."""
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise LocationError(f"{self.directory}: exists and is not a directory")
        try:
            make_directory(self.directory)
            self._lock = os.open(self.directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise LocationError(str(exc) if isinstance(exc, FileWriteError) else
                                f"{self.directory}: cannot open ({exc.strerror})") from None
        import fcntl

        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            self._lock = None
            raise LocationError(f"{self.directory}: another fkd-convert or fkd-relabel writes this output") from None

    def names(self) -> list[str]:
        return sorted(os.listdir(self.directory))

    def read_small(self, name: str, limit: int) -> bytes:
        return read_verified(os.path.join(self.directory, name), limit=limit)

    def staging_path(self, name: str) -> str:
        return os.path.join(self.directory, name + fmt.TEMP_SUFFIX)

    def commit(self, name: str, staged: str) -> None:
        os.replace(staged, os.path.join(self.directory, name))

    def readable(self, name: str) -> str:
        """Where a closed shard can be read before the set is published: its temporary name."""
        return self.staging_path(name)

    def remove(self, name: str) -> None:
        path = os.path.join(self.directory, name)
        if os.path.lexists(path):
            os.remove(path)

    def write_small(self, name: str, data: bytes) -> None:
        write_atomically(os.path.join(self.directory, name), data)

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None


class RemoteOutput:
    """A shard set at an fsspec URL: shards staged in a local temporary directory and uploaded when
    closed; objects appear whole, and the manifest is uploaded last."""

    defers_publishing = False

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.where = self.url
        try:
            self.fs, self.root = fsspec_module().core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:
            raise LocationError(f"{self.url}: cannot use this location ({exc})") from None
        self.staging: str | None = None  # a local directory, made when the first shard is staged

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:  # the back-end's own network and permission errors
            raise LocationError(f"{self.url}: {what} failed ({first_line(exc)})") from None

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def ensure(self) -> None:
        pass

    def names(self) -> list[str]:
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._call("listing", self.fs.ls, self.root,
                                                                                  False))
        except FileNotFoundError:
            return []

    def read_small(self, name: str, limit: int) -> bytes:
        return read_verified(f"{self.url}/{name}", limit=limit, retries=1, backoff_s=0.1)

    def staging_path(self, name: str) -> str:
        if self.staging is None:
            self.staging = tempfile.mkdtemp(prefix="fkd-shards-")
        return os.path.join(self.staging, name)

    def commit(self, name: str, staged: str) -> None:
        self._call(f"uploading {name}", self.fs.put_file, staged, self._path(name))
        os.remove(staged)

    def readable(self, name: str) -> str:
        """Where a closed shard can be read before the set is published: uploaded, at its own name."""
        return f"{self.url}/{name}"

    def remove(self, name: str) -> None:
        try:
            self._call(f"removing {name}", self.fs.rm, self._path(name))
        except FileNotFoundError:
            pass

    def write_small(self, name: str, data: bytes) -> None:
        self._call(f"uploading {name}", self.fs.pipe_file, self._path(name), data)

    def close(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def output_for(location: str) -> LocalOutput | RemoteOutput:
    return LocalOutput(local_path(location)) if is_local(location) else RemoteOutput(location)
