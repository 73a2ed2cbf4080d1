"""Tampering with a shard set the way an attacker who controls it (or a buggy writer) would: shard
members rewritten, then the manifest's sizes, hashes and checksum made to match again, so that only
the readers' own checks of each record stand between the change and training."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable

from fkd_shards.shards import format as fmt


def rewrite(set_dir: str, shard_name: str, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite one shard member by member: ``edit(member_name, data)`` returns the new data, or None
    to drop the member."""
    path = os.path.join(set_dir, shard_name)
    out = io.BytesIO()
    with tarfile.open(path) as source, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as target:
        for info in source.getmembers():
            data = edit(info.name, source.extractfile(info).read())
            if data is None:
                continue
            info.size = len(data)
            target.addfile(info, io.BytesIO(data))
    with open(path, "wb") as f:
        f.write(out.getvalue())


def reseal(set_dir: str, image_bytes: dict[int, bytes] | None = None,
           members: dict[str, Callable[[bytes], bytes | None]] | None = None) -> None:
    """Replace images' bytes and/or rewrite members by name (``{"e00000_b000001.coords.npy": fn}``),
    then make the manifest match the shards again (sizes, sha256, checksum)."""
    edits = {fmt.image_key(k) + "." + fmt.IMAGE_BYTES: (lambda data, new=new: new)
             for k, new in (image_bytes or {}).items()}
    edits |= members or {}
    manifest_path = os.path.join(set_dir, fmt.MANIFEST_NAME)
    with open(manifest_path) as f:
        body = json.load(f)
    for entry in body["shards"]:
        rewrite(set_dir, entry["name"], lambda name, data: edits[name](data) if name in edits else data)
        with open(os.path.join(set_dir, entry["name"]), "rb") as f:
            data = f.read()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    write_sealed(manifest_path, body)


def write_sealed(path: str, body: dict) -> None:
    """A manifest body written with the checksum the library computes for it, whatever it holds."""
    from fkd_shards.shards.manifest import _checksum

    body = {k: v for k, v in body.items() if k != "checksum"}
    body["checksum"] = _checksum(body)
    with open(path, "w") as f:
        json.dump(body, f)
