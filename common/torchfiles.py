"""Files written by ``torch.save`` that a user hands us (relabel batches, checkpoints, weights),
loaded with ``weights_only=True`` and nothing else: no full unpickling, ever."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile

from .files import FileReadError, open_regular
from .text import escape, first_line


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
    _check_stored_crcs(source, where)
    stream = source if isinstance(source, str) else io.BytesIO(source)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed_globals or []):
            # A sparse tensor is checked and warned about; callers that take only dense ones refuse it.
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
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
        # The legacy format's reader fails on a text file with a bare KeyError of the first byte.
        reason = "invalid data" if isinstance(exc, KeyError) else first_line(exc, 120)
        raise TorchFileError(f"{where}: truncated or not a torch.save file ({reason})") from None


_ZIP_MAGIC = b"PK\x03\x04"


def _check_stored_crcs(source: bytes | str, where: str) -> None:
    """``torch.load`` does not check the CRC-32 that ``torch.save`` stores with every entry of its
    zip archive, so a flipped byte in a tensor loads as a wrong number. Check them first (about a
    gigabyte per second). Files saved with ``torch.serialization.set_crc32_options(False)`` store 0
    for every entry and cannot be checked; the legacy (non-zip) format has nothing to check."""
    if isinstance(source, str):
        with open(source, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    else:
        head = source[:len(_ZIP_MAGIC)]
    if head != _ZIP_MAGIC:
        return
    try:
        archive = zipfile.ZipFile(source if isinstance(source, str) else io.BytesIO(source))
    except Exception as exc:  # zipfile raises BadZipFile, OSError, OverflowError ... for a broken directory
        raise TorchFileError(f"{where}: truncated or not a torch.save file ({first_line(exc, 120)})") from None
    with archive:
        entries = archive.infolist()
        if all(entry.CRC == 0 for entry in entries):
            return
        for entry in entries:
            if entry.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses; a zip bomb might
                raise TorchFileError(f"{where}: entry {escape(entry.filename[:80])} is compressed, which "
                                     f"torch.save never does; refused")
            try:
                with archive.open(entry) as member:
                    while member.read(1 << 20):
                        pass
            except zipfile.BadZipFile as exc:  # "Bad CRC-32 for file ...": the entry's bytes changed
                raise TorchFileError(f"{where}: damaged ({first_line(exc, 120)})") from None
            except Exception as exc:  # encrypted (RuntimeError), offsets out of range (OverflowError), ...
                raise TorchFileError(f"{where}: truncated or not a torch.save file ({first_line(exc, 120)})") \
                    from None
