"""Records of a shard held in memory: a small reader of the uncompressed POSIX tar files the writer
makes (ustar headers, optionally PAX extended headers, as older sets have), without a Python
``tarfile`` object per member. Every offset and size is checked against the buffer, so a malformed
archive is an error, never a read out of bounds. Callers pass bytes whose sha256 is verified."""

from __future__ import annotations

import re
from collections.abc import Iterator

from . import format as fmt

BLOCK = fmt.TAR_BLOCK
_REGULAR = (b"0", b"\0", b"7")
_PAX = (b"x", b"g")
_OCTAL = re.compile(rb"[0-7]+")


class TarFormatError(ValueError):
    """An archive this reader cannot walk; the message says where and why."""


def _octal(field: bytes, what: str, offset: int) -> int:
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not _OCTAL.fullmatch(text):  # int(text, 8) alone would take a sign, spaces or underscores
        raise TarFormatError(f"header at byte {offset}: bad {what} field")
    return int(text, 8)


def members(data: bytes | memoryview) -> Iterator[tuple[str, memoryview]]:
    """``(name, content)`` of every regular file, in archive order (directories and other entries
    are skipped; the archive ends at the first all-zero block)."""
    view = memoryview(data)
    end, offset, pending_path = len(view), 0, None
    while True:
        if offset + BLOCK > end:
            raise TarFormatError(f"archive ends inside a header at byte {offset} (no end-of-archive block)")
        header = bytes(view[offset:offset + BLOCK])
        if header == bytes(BLOCK):
            return
        size = _octal(header[124:136], "size", offset)
        start = offset + BLOCK
        stop = start + size
        if stop > end:
            raise TarFormatError(f"member at byte {offset} claims {size} bytes, past the end of the archive")
        kind = header[156:157]
        if kind in _PAX:
            path = _pax_path(view[start:stop], offset)
            if kind == b"x" and path is not None:
                pending_path = path
        elif kind in _REGULAR:
            name = pending_path or _ustar_name(header, offset)
            yield name, view[start:stop]
            pending_path = None
        else:
            pending_path = None
        offset = start + -(-size // BLOCK) * BLOCK


def _ustar_name(header: bytes, offset: int) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise TarFormatError(f"header at byte {offset}: member name is not UTF-8") from None


def _pax_path(body: memoryview, offset: int) -> str | None:
    """The ``path`` record of a PAX extended header, if any (``size`` overrides are not written by
    this project and are refused)."""
    raw, path, position = bytes(body), None, 0
    while position < len(raw):
        space = raw.find(b" ", position)
        if space < 0:
            raise TarFormatError(f"PAX header at byte {offset}: malformed record")
        try:
            length = int(raw[position:space])
        except ValueError:
            raise TarFormatError(f"PAX header at byte {offset}: malformed record length") from None
        if length <= space - position or position + length > len(raw):
            raise TarFormatError(f"PAX header at byte {offset}: record length out of range")
        key, _, value = raw[space + 1:position + length - 1].partition(b"=")
        if key == b"size":
            raise TarFormatError(f"PAX header at byte {offset}: size override not supported")
        if key == b"path":
            try:
                path = value.decode("utf-8")
            except UnicodeDecodeError:
                raise TarFormatError(f"PAX header at byte {offset}: path is not UTF-8") from None
        position += length
    return path


def records(data: bytes | memoryview) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """``(key, {suffix: content})`` per record: members grouped by the name before the first dot,
    in archive order. A key that comes back after another one, or a repeated member, is an error."""
    key, group, seen = None, {}, set()
    for name, content in members(data):
        member_key, dot, suffix = name.partition(".")
        if not dot or not member_key or "/" in name:
            raise TarFormatError(f"member {name[:80]!r} is not named KEY.SUFFIX")
        if member_key != key:
            if group:
                yield key, group
            if member_key in seen:
                raise TarFormatError(f"record {member_key[:40]!r} appears twice")
            seen.add(member_key)
            key, group = member_key, {}
        if suffix in group:
            raise TarFormatError(f"record {member_key[:40]!r} has member {suffix[:40]!r} twice")
        group[suffix] = content
    if group:
        yield key, group
