"""How every command ends: 0; 1 with one line on stderr for a user's mistake or a failed run; 130
when interrupted. Bugs keep their traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .text import error_line


def run_command(prog: str, command: Callable[[], int], user_errors: Callable[[], tuple[type, ...]],
                interrupted: str) -> int:
    """Run ``command``; errors of the types ``user_errors()`` names (looked up only when one occurs,
    so that importing a command line stays cheap) become ``prog: error: ...`` on one line."""
    try:
        return command()
    except KeyboardInterrupt as exc:
        print(f"{prog}: {exc or interrupted}", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        print(error_line(prog, exc), file=sys.stderr)
        return 1
