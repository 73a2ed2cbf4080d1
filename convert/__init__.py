"""``fkd-convert``: SRe2L relabel output -> ordered, verifiable WebDataset shards.

``from fkd_shards.convert import ConvertOptions, convert``; the names are loaded on first use, so
that importing the command line does not import torch.
"""

__all__ = ["ConvertError", "ConvertOptions", "convert"]


def __getattr__(name: str):
    if name == "ConvertError":
        from .errors import ConvertError

        return ConvertError
    if name in ("ConvertOptions", "convert"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
