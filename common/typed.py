"""Typed checks of JSON objects read from files (a manifest's provenance, a run's summary): each
field has a predicate and the words a refusal uses, so a reader may index what passed without
guarding every access."""

from __future__ import annotations

import math
from collections.abc import Callable

from .text import shown

Rule = tuple[Callable[[object], bool], str]


def integer(low: int, high: int | None = None) -> Rule:
    """An int (not a bool) in [low, high) (no upper bound without ``high``)."""
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v and (high is None or v < high),
            f"an integer in [{low}, {high})" if high is not None else f"an integer >= {low}")


def number(low: float, high: float = math.inf) -> Rule:
    """A finite int or float (not a bool) in [low, high]."""
    def check(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high

    return check, f"a finite number in [{low:g}, {high:g}]"


def text(limit: int = 4096) -> Rule:
    return (lambda v: isinstance(v, str) and len(v) <= limit), f"a string of at most {limit} characters"


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


def or_null(rule: Rule) -> Rule:
    check, words = rule
    return (lambda v: v is None or check(v)), f"{words} or null"


BOOL: Rule = (lambda v: isinstance(v, bool)), "true or false"


def check_fields(body: object, rules: dict[str, Rule | None], name: str, fail: Callable[[str], None], *,
                 required: tuple[str, ...], unknown_allowed: bool = False) -> None:
    """``fail(message)`` (which raises) unless ``body`` is an object whose fields meet ``rules``
    (None: checked by the caller), ``required`` present, and no other field unless ``unknown_allowed``."""
    if not isinstance(body, dict):
        fail(f"{name} is not an object")
    unknown = sorted(set(body) - set(rules))
    if unknown and not unknown_allowed:
        fail(f"{name} has unknown field(s) {shown(unknown, 200)}")
    missing = [key for key in required if key not in body]
    if missing:
        fail(f"{name} lacks {', '.join(missing)}")
    for key, rule in rules.items():
        if rule is not None and key in body and not rule[0](body[key]):
            fail(f"{name}.{key} must be {rule[1]}, found {shown(body[key])}")
