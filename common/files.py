"""Local files read with a bound and written atomically.

Reading: only regular files are read (a FIFO, a device such as ``/dev/zero`` or a directory is
refused before any byte is read; the open itself never blocks), and never more than a stated number
of bytes. Writing: to a temporary name unique to the process, flushed to disk, then renamed over the
target, so that a reader sees the old file or the new one, never a part; on failure the temporary
file is removed and the old file is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import threading
import uuid
from collections.abc import Callable
from typing import IO

from .text import shorten

TEMP_SUFFIX = ".partial"


class FileReadError(OSError):
    """A local file that cannot be read as asked; the message names it and the problem."""


class FileMissingError(FileReadError):
    """The file does not exist."""


class FileWriteError(OSError):
    """A file that could not be written (disk full, read-only, ...); the old file is intact."""


def open_regular(path: str) -> tuple[int, int]:
    """(descriptor, size) of ``path`` opened for reading after checking that it is a regular file.

    Opened non-blocking, so that a FIFO cannot hang the open; the flag is cleared for the reads."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileMissingError(f"{path}: no such file") from None
    except OSError as exc:
        raise FileReadError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileReadError(f"{path}: not a regular file ({_kind(info.st_mode)})")
        if hasattr(os, "O_NONBLOCK"):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def read_bounded(path: str, limit: int, expected: int | None = None) -> bytes:
    """The whole regular file ``path``: refused when larger than ``limit`` bytes, or when not
    exactly ``expected`` bytes if that is given (checked before and after reading: a file that
    changes size while it is read is refused too)."""
    fd, size = open_regular(path)
    with os.fdopen(fd, "rb", buffering=0) as f:
        if expected is not None and size != expected:
            raise FileReadError(f"{path}: {size} bytes, expected {expected}")
        if size > limit:
            raise FileReadError(f"{path}: {size} bytes, more than the {limit}-byte limit for this file")
        parts, done = [], 0
        try:
            while done < size:  # one read in the common case: the bytes object is the buffer
                part = f.read(size - done)
                if not part:
                    raise FileReadError(f"{path}: ended after {done} of {size} bytes (changed while read)")
                parts.append(part)
                done += len(part)
            if f.read(1):
                raise FileReadError(f"{path}: grew past {size} bytes while read")
        except OSError as exc:
            if isinstance(exc, FileReadError):
                raise
            raise FileReadError(f"{path}: read failed ({exc.strerror or exc})") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def temp_name(path: str) -> str:
    """A temporary name beside ``path``, unique to this process and call."""
    return f"{path}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT) waits until the block is done: a write is then complete or not started, never
    half done by a KeyboardInterrupt raised inside a library's writer. The handler is swapped for one
    that only takes note (blocking the signal would not do: with other threads running, the kernel
    hands it to one of them and Python still interrupts the main thread); the original handler runs
    after the block. Only in the main thread, the one Python runs handlers in; elsewhere the block
    runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    if previous is None:  # a handler installed outside Python: restored as the default
        previous = signal.SIG_DFL
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):  # Python's default handler raises KeyboardInterrupt
            previous(signal.SIGINT, None)
        elif received and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def write_atomically(path: str, content: bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``content`` (bytes, or a function writing to a binary file) to ``path`` through a
    temporary file, fsync and a rename (Ctrl-C waits for it); :class:`FileWriteError` names the
    path and the problem."""
    with interrupts_deferred():
        _write_atomically(path, content)


def _write_atomically(path: str, content: bytes | Callable[[IO[bytes]], None]) -> None:
    temp = temp_name(path)
    try:
        with open(temp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as exc:
        remove_quietly(temp)
        raise write_error(path, exc) from None
    except BaseException:
        remove_quietly(temp)
        raise


def write_error(path: str, exc: OSError) -> FileWriteError:
    """The :class:`FileWriteError` for ``exc`` raised while writing ``path``: the path and the reason."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason = f"disk full: {reason}"
    error = FileWriteError(f"{path}: cannot write ({reason})")
    error.errno = exc.errno
    return error


def remove_quietly(path: str) -> None:
    """Remove ``path`` if it exists; errors are ignored (used while cleaning up after another one)."""
    try:
        os.remove(path)
    except OSError:
        pass


def make_directory(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` whose failures, a path too long to walk included, are a
    :class:`FileWriteError` naming ``path``; the directories it made before failing are removed."""
    missing, parent = [], os.path.abspath(path)
    while not os.path.lexists(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
    except (OSError, RecursionError) as exc:
        for made in missing:  # deepest first; only the ones this call created, and only when empty
            with contextlib.suppress(OSError):
                os.rmdir(made)
        reason = "the path is too long" if isinstance(exc, RecursionError) else exc.strerror or exc
        raise FileWriteError(f"{shorten(path, 400)}: cannot create ({reason})") from None


def within(path: str, other: str) -> bool:
    """Whether local ``path`` is ``other`` or lies inside it (symlinks resolved)."""
    try:
        a, b = os.path.realpath(path), os.path.realpath(other)
    except (OSError, ValueError, RecursionError):
        return False
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def refuse_directory_loops(root: str) -> None:
    """Walk the folders under ``root`` as ImageFolder does (links followed) and raise
    :class:`FileReadError` naming the first one a symbolic link leads back into (a folder containing
    it): such a loop would list the same files again and again until the path grows too long."""
    stack: list[tuple[str, frozenset]] = [(root, frozenset())]
    while stack:
        path, ancestors = stack.pop()
        info = os.stat(path)
        folder = (info.st_dev, info.st_ino)
        if folder in ancestors:
            raise FileReadError(f"{path}: a symbolic link that leads back to a folder containing it (a loop)")
        with os.scandir(path) as entries:
            stack += [(entry.path, ancestors | {folder}) for entry in entries if entry.is_dir()]
