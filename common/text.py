"""Messages a person reads: one line each, with control characters from data escaped."""

from __future__ import annotations

import re

# C0 and C1 control characters, DEL, the Unicode line and paragraph separators and the
# bidirectional-text controls: anything that could move the cursor, change the terminal's colours,
# start a new line or make a message read in another order than its bytes.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_MESSAGE = 300


def escape(text: object) -> str:
    """``text`` with control characters shown as ``\\x1b``-style escapes, and undecodable bytes of a
    file name (surrogate escapes) as ``\\udcff``-style ones, so that nothing from data acts on a terminal."""
    value = str(text)
    value = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), value)
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(value: object, limit: int = 60) -> str:
    """A value from data as a message shows it: its repr, escaped and shortened."""
    return shorten(escape(repr(value)), limit)


def first_line(exc: BaseException, limit: int = MAX_MESSAGE) -> str:
    """An exception's message cut to its first line and ``limit`` characters, for wrapping a
    library's error into one of ours; the exception's type name when it has no message."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return shorten(line, limit)


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters in its middle, marked with `` ... ``: a message's end
    says what went wrong, so a very long path before it is what gives way."""
    if len(text) <= limit:
        return text
    tail = (limit - 5) * 2 // 5
    return text[: limit - 5 - tail] + " ... " + text[len(text) - tail:]


def error_line(program: str, exc: BaseException | str) -> str:
    """``program: error: message``, escaped and on one line, as every command prints its errors."""
    message = exc if isinstance(exc, str) else str(exc)
    message = " ".join(message.split("\n"))
    return f"{program}: error: {escape(shorten(message, 2000))}"
