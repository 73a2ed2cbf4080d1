"""The installed distribution's version: one number, written in pyproject.toml, read here."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("fkd-shards")
except PackageNotFoundError:  # a checkout on PYTHONPATH that was never installed
    VERSION = "unknown"
