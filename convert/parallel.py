"""Ordered parallel map with a bounded number of tasks in flight."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(executor: Executor | None, fn: Callable[[T], R], items: Iterable[T],
                window: int) -> Iterator[R]:
    """``map(fn, items)`` in input order, at most ``window`` tasks ahead; inline without an executor."""
    if executor is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
