"""Files written by ``torch.save`` that a user hands us (relabel batches, checkpoints, weights),
loaded with ``weights_only=True`` and nothing else: no full unpickling, ever."""

from __future__ import annotations

import io
import os
import pickle

from .files import FileReadError, open_regular
from .text import first_line


class TorchFileError(ValueError):
    """A file that is not a loadable ``torch.save`` file, or that would need unsafe unpickling."""


def load_weights_only(source: bytes | str, where: str, allowed_globals: list | None = None) -> object:
    """``torch.load(source, weights_only=True)`` on the CPU, from bytes or from the regular file at
    path ``source``, allowing ``allowed_globals`` besides the defaults; :class:`TorchFileError` says
    whether the file is missing, broken or asks for unsafe types.

    Not thread-safe with ``allowed_globals``: torch's allowlist is process-wide."""
    import torch

    if isinstance(source, str):
        try:
            os.close(open_regular(source)[0])  # a FIFO or device is refused before torch opens it
        except FileReadError as exc:
            raise TorchFileError(str(exc)) from None
    stream = source if isinstance(source, str) else io.BytesIO(source)
    try:
        if allowed_globals:
            with torch.serialization.safe_globals(allowed_globals):
                return torch.load(stream, map_location="cpu", weights_only=True)
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only names the global it refused; any other unpickling error is broken data.
        if "Unsupported global" in str(exc):
            refused = next((line.split("GLOBAL ", 1)[1].split(" ", 1)[0] for line in str(exc).splitlines()
                            if "GLOBAL " in line), "a Python object")
            raise TorchFileError(f"{where}: needs unsafe unpickling of {refused[:80]}; refused (only tensors, "
                                 f"numbers, strings and containers of them are loaded)") from None
        raise TorchFileError(f"{where}: truncated or not a torch.save file (invalid pickle data)") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, zip errors ... for broken files
        raise TorchFileError(f"{where}: truncated or not a torch.save file ({first_line(exc, 120)})") from None
