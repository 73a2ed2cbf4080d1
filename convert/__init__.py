"""``fkd-convert``: SRe2L relabel output -> ordered, verifiable WebDataset shards."""

from .errors import ConvertError
from .pipeline import ConvertOptions, convert

__all__ = ["ConvertError", "ConvertOptions", "convert"]
