"""Ordered read-ahead: ``map`` over an executor, results in input order, a bounded window in flight."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(executor: Executor | None, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``map(fn, items)`` in input order with up to ``ahead`` calls running ahead of the consumer
    (inline when ``executor`` is None or ``ahead`` is 0). Leaving early cancels what has not started."""
    if executor is None or ahead <= 0:
        yield from map(fn, items)
        return
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
