"""Writing a shard set: shards under temporary names, ``manifest.json`` last.

While it runs, the writer keeps ``progress.json`` up to date: the shards it has closed (with their
sizes and hashes) and the one it is writing. That file is what lets ``--overwrite`` remove exactly
the files an earlier, interrupted run wrote, and what a resumable writer continues from.

In a local directory the shards keep their temporary names (``NAME.tar.partial``) until the whole
set is written: only then are they renamed into place and the manifest written, so a set being
replaced with ``--overwrite`` stays whole and readable until its replacement is complete. On object
storage each shard is uploaded when it closes (objects appear whole), after the old set was removed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fkd_shards.common.files import write_error
from fkd_shards.common.text import escape

from . import format as fmt
from .codecs import Codec, Raw
from .io import LocationError, LocationMissing, join, output_for, read_verified
from .manifest import Manifest, ManifestError, ShardInfo, parse_json, validate_shard
from .reader import ShardError, ShardSet, batch_records
from .records import BatchRecord, BatchSpec, ImageRecord, encode_batch, encode_image

if TYPE_CHECKING:
    import webdataset

PROGRESS_FORMAT = "fkd-shards-progress"


class OutputExistsError(FileExistsError):
    """The output already holds files and overwriting was not asked for, or holds files that this
    project did not demonstrably write."""


class ResumeError(ValueError):
    """An output that cannot be continued: nothing to continue, other settings, a changed shard."""


class _HashingFile:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "wb")
        except OSError as exc:
            raise write_error(path, exc) from None
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        try:
            return self._file.write(data)
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
        except OSError as exc:
            raise write_error(self.path, exc) from None


@dataclass
class _OpenShard:
    kind: str
    name: str
    temp_path: str
    file: _HashingFile
    tar: webdataset.TarWriter
    first: int
    last: int
    epoch: int | None
    count: int = 0
    tar_bytes: int = 0  # members written so far, headers and padding included (the file lags behind)


def _names_in(data: bytes, key: str) -> set[str]:
    """Shard names listed under ``key`` in a manifest or progress file (read loosely: it may be the
    corrupt file being replaced); only names that look like shards are returned."""
    try:
        body = parse_json(data.decode("utf-8"), "", ValueError)
    except (ValueError, UnicodeDecodeError):
        return set()
    entries = body.get(key, []) if isinstance(body, dict) else []
    names = {e.get("name") if isinstance(e, dict) else e for e in entries if isinstance(e, (dict, str))}
    return {n for n in names if isinstance(n, str) and fmt.SHARD_NAME.fullmatch(n)}


def _looks_like_ours(name: str) -> bool:
    return bool(fmt.SHARD_NAME.fullmatch(name.removesuffix(fmt.TEMP_SUFFIX))) or name in (
        fmt.MANIFEST_NAME, fmt.PROGRESS_NAME)


class ShardSetWriter:
    """Writes image records and batch records into rolled shards, then the manifest.

    Use as a context manager; leaving it by an exception removes what this writer wrote and writes
    no manifest, so the output is never taken for a complete set (a ``resumable`` writer keeps its
    closed shards and ``progress.json``, so that the run can be continued). With ``resume``, the
    writer continues the shards named by ``progress.json`` after checking their bytes and that it
    was written with the same ``settings``; :attr:`completed` lists them.
    """

    def __init__(self, output: str, shard_bytes: int = 64 * 10**6, overwrite: bool = False,
                 codec: Codec | None = None, *, resumable: bool = False, resume: bool = False,
                 settings: dict | None = None):
        if shard_bytes <= 0:
            raise ValueError(f"shard size must be positive, got {shard_bytes}")
        self.location = output
        self.output = output_for(output)
        self.shard_bytes = shard_bytes
        self.codec = codec or Raw()
        self.resumable = resumable or resume
        self.settings = settings or {}
        self._open: dict[str, _OpenShard] = {}
        self._written: list[str] = []  # files this writer created (for abort)
        self._replaced: set[str] = set()  # the files of a set being replaced, removed when this one is complete
        self.output.ensure()
        try:
            self._continued = False  # a progress file of the same run was found (with or without shards)
            self.completed: list[ShardInfo] = self._continue() if resume else []
            if not self._continued:
                self._prepare(overwrite)
            self._numbers = {kind: sum(s.kind == kind for s in self.completed) for kind in fmt.SHARD_KINDS}
            self._save_progress()
        except BaseException:
            self.output.close()  # the output's lock, and a remote output's staging directory
            raise

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    # ---- starting ------------------------------------------------------------------------------------

    def _prepare(self, overwrite: bool) -> None:
        """Refuse a non-empty output unless ``overwrite``; then clear out exactly the files an earlier
        run named in its manifest or progress file. An interrupted run's files go now; a complete
        set's stay until the new one is complete (where the output defers publishing) or go now,
        manifest first (so that an interrupted clean-up leaves an incomplete, rejected set). Files this
        project cannot show it wrote are never removed: a shard-like one makes the whole call refuse,
        anything else is left where it is."""
        where, names = self.output.where, self.output.names()
        if not names:
            return
        if not overwrite:
            raise OutputExistsError(f"{where}: output is not empty (use --overwrite to replace a shard set "
                                    f"written before)")
        if fmt.MANIFEST_NAME in names and not self._is_manifest():
            raise OutputExistsError(f"{where}/{fmt.MANIFEST_NAME}: not a manifest of this project; "
                                    f"refusing to replace it")
        complete = self._listed(names, fmt.MANIFEST_NAME, ("shards",))
        interrupted = self._listed(names, fmt.PROGRESS_NAME, ("shards", "open")) - complete
        stray = [n for n in names if _looks_like_ours(n) and n not in complete | interrupted
                 and n not in (fmt.MANIFEST_NAME, fmt.PROGRESS_NAME)]
        if stray:
            raise OutputExistsError(f"{where}/{escape(stray[0])}: looks like a shard, but no manifest or "
                                    f"progress file there names it; remove it yourself")
        for name in sorted(interrupted & set(names)) + [fmt.PROGRESS_NAME] * (fmt.PROGRESS_NAME in names):
            self.output.remove(name)
        self._replace(complete & set(names) | ({fmt.MANIFEST_NAME} & set(names)))

    def _replace(self, old: set[str]) -> None:
        """The files of a complete earlier set: kept until this set is complete, or removed now."""
        if self.output.defers_publishing:
            self._replaced = old
            return
        for name in sorted(old, key=lambda n: n != fmt.MANIFEST_NAME):  # the manifest first
            self.output.remove(name)

    def _listed(self, names: list[str], listing: str, keys: tuple[str, ...]) -> set[str]:
        """The shard-like names ``listing`` (a manifest or progress file) names under ``keys``, with
        their temporary names."""
        if listing not in names:
            return set()
        data = self._read_small(listing, fmt.MAX_MANIFEST_BYTES)
        listed = set().union(*(_names_in(data, key) for key in keys))
        return listed | {n + fmt.TEMP_SUFFIX for n in listed}

    def _is_manifest(self) -> bool:
        try:
            body = parse_json(self._read_small(fmt.MANIFEST_NAME, fmt.MAX_MANIFEST_BYTES).decode("utf-8"), "",
                              ValueError)
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(body, dict) and body.get("format") == fmt.FORMAT_NAME

    def _read_small(self, name: str, limit: int) -> bytes:
        try:
            return self.output.read_small(name, limit)
        except LocationError as exc:
            raise LocationError(f"cannot read {exc}") from None

    def _continue(self) -> list[ShardInfo]:
        """The shards an interrupted run closed, each checked, when it ran with the same settings."""
        where = self.output.where
        names = self.output.names()
        if fmt.PROGRESS_NAME not in names:
            if fmt.MANIFEST_NAME in names:
                raise ResumeError(f"{where}: already holds a complete shard set (manifest.json); nothing to resume")
            if any(_looks_like_ours(n) for n in names):
                raise ResumeError(f"{where}: holds shards but no {fmt.PROGRESS_NAME}; cannot tell what to "
                                  f"continue (use --overwrite to start again)")
            return []  # nothing written yet: the run starts (into an empty output, as any run)
        text = self._read_small(fmt.PROGRESS_NAME, fmt.MAX_PROGRESS_BYTES)
        try:
            body = parse_json(text.decode("utf-8"), f"{where}/{fmt.PROGRESS_NAME}", ResumeError)
        except UnicodeDecodeError:
            raise ResumeError(f"{where}/{fmt.PROGRESS_NAME}: not UTF-8") from None
        if not isinstance(body, dict) or body.get("format") != PROGRESS_FORMAT:
            raise ResumeError(f"{where}/{fmt.PROGRESS_NAME}: not a progress file of this project")
        before = body.get("settings")
        if before != self.settings:
            raise ResumeError(f"{where}: was written with other settings ({_difference(before, self.settings)}); "
                              f"give the same flags, or use --overwrite to start again")
        listed = body.get("shards")
        try:
            shards = [ShardInfo(**s) for s in (listed if isinstance(listed, list) else [])]
            for s in shards:
                validate_shard(s)
        except (TypeError, ManifestError) as exc:
            raise ResumeError(f"{where}/{fmt.PROGRESS_NAME}: malformed shard entries ({exc})") from None
        _check_sequence(shards, f"{where}/{fmt.PROGRESS_NAME}")
        for s in shards:
            try:
                read_verified(self.location_of(s), s.bytes, s.sha256)
            except LocationError as exc:
                raise ResumeError(f"cannot continue: {exc}") from None
        opened = body.get("open")
        for name in opened if isinstance(opened, list) else []:
            if isinstance(name, str) and fmt.SHARD_NAME.fullmatch(name) and name not in {s.name for s in shards}:
                self.output.remove(name + fmt.TEMP_SUFFIX)
                if not self.output.defers_publishing:
                    self.output.remove(name)  # a remote shard uploaded before its close was recorded
        if fmt.MANIFEST_NAME in names:  # the set this run replaces, kept whole until it is complete
            self._replaced = {fmt.MANIFEST_NAME} | (self._listed(names, fmt.MANIFEST_NAME, ("shards",)) & set(names))
        self._continued = True
        return shards

    def location_of(self, shard: ShardInfo) -> str:
        """Where a closed shard's bytes are: under its temporary name until the set is published."""
        return join(self.location, shard.name + (fmt.TEMP_SUFFIX if self.output.defers_publishing else ""))

    def kept_batches(self, spec: BatchSpec, batch_rows: Callable[[int], int]) -> Iterator[BatchRecord]:
        """The batch records of the label shards a resumed writer kept, in order, each shard read
        back and verified against its recorded size and hash, then checked as a reader checks it
        (:func:`.reader.batch_records`); a shard that fails is a :class:`ResumeError`."""
        kept = [s for s in self.completed if s.kind == fmt.LABELS_KIND]

        def verified():
            for shard in kept:
                where = self.location_of(shard)
                yield shard, where, read_verified(where, shard.bytes, shard.sha256)

        try:
            yield from batch_records(verified(), spec, batch_rows)
        except (ShardError, LocationError) as exc:
            raise ResumeError(f"cannot continue: {exc}") from None

    def _save_progress(self, opening: str | None = None) -> None:
        opened = [s.name for s in self._open.values()] + ([opening] if opening else [])
        body = {"format": PROGRESS_FORMAT, "settings": self.settings,
                "shards": [asdict(s) for s in self.completed], "open": opened}
        self.output.write_small(fmt.PROGRESS_NAME, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
        if fmt.PROGRESS_NAME not in self._written:
            self._written.append(fmt.PROGRESS_NAME)

    # ---- writing -------------------------------------------------------------------------------------

    def add_image(self, record: ImageRecord) -> None:
        """Append one image; images must come in sample-index order."""
        shard = self._shard_for(fmt.IMAGES_KIND, record.index, None)
        members = encode_image(record)
        shard.tar.write({"__key__": fmt.image_key(record.index), **members})
        self._advance(shard, record.index, members)

    def end_images(self) -> None:
        """Close the image shard being written: every image is in (so that ``progress.json`` names
        the image shards as complete while the labels are written)."""
        if fmt.IMAGES_KIND in self._open:
            self._close_shard(fmt.IMAGES_KIND)

    def add_batch(self, record: BatchRecord) -> None:
        """Append one batch record; batches must come in (epoch, batch) order."""
        shard = self._shard_for(fmt.LABELS_KIND, record.batch, record.epoch)
        members = encode_batch(record, self.codec)
        shard.tar.write({"__key__": fmt.batch_key(record.epoch, record.batch), **members})
        self._advance(shard, record.batch, members)

    def finish(self, manifest: Manifest, check: Callable[[ShardSet], Manifest] | None = None) -> Manifest:
        """Close all shards, publish them (where deferred: the set being replaced goes, manifest first,
        and the new shards are renamed into place), then write ``manifest`` (the shard list filled
        in) last and remove ``progress.json``.

        ``check``: given the finished set before anything is published (read from where its shards
        wait), returns the manifest to write, or raises: then no manifest is written (and in a local
        directory a set being replaced stays as it was; a remote one was removed when writing began)."""
        for kind in list(self._open):
            self._close_shard(kind)
        images = [s for s in self.completed if s.kind == fmt.IMAGES_KIND]
        labels = [s for s in self.completed if s.kind == fmt.LABELS_KIND]
        complete = manifest.with_shards(images + labels)
        # Only a progress.json changed by hand between a run and its resume can make this fail.
        complete.validate(f"{self.output.where}/{fmt.MANIFEST_NAME} (not written: the shards do not form a set)")
        if check is not None:
            complete = check(ShardSet.staged(self.output.where, complete, self.output.readable))
            complete.validate(f"{self.output.where}/{fmt.MANIFEST_NAME} (not written)")
        if self.output.defers_publishing:
            if fmt.MANIFEST_NAME in self._replaced:
                self.output.remove(fmt.MANIFEST_NAME)  # from here on the directory is no complete set
            for shard in self.completed:
                self.output.commit(shard.name, self.output.staging_path(shard.name))
            for name in sorted(self._replaced - {s.name for s in self.completed} - {fmt.MANIFEST_NAME}):
                self.output.remove(name)
        self.output.write_small(fmt.MANIFEST_NAME, complete.to_json().encode())
        self.output.remove(fmt.PROGRESS_NAME)
        self.output.close()
        return complete

    def abort(self) -> None:
        """Remove what this writer created: every file, or, when resumable, only the shard it was
        writing (closed shards and ``progress.json`` stay for a later resume)."""
        for shard in self._open.values():
            try:
                shard.tar.close()
            except (OSError, ValueError):
                pass
            try:
                shard.file.close()
            except (OSError, ValueError):
                pass
            if os.path.exists(shard.temp_path):
                os.remove(shard.temp_path)
        self._open.clear()
        if self.resumable:
            try:
                self._save_progress()
            except OSError:
                pass
        else:
            for name in self._written:
                try:
                    self.output.remove(name)
                except (OSError, LocationMissing):
                    pass
        self.output.close()  # a set being replaced is left as it was

    def _shard_for(self, kind: str, position: int, epoch: int | None) -> _OpenShard:
        shard = self._open.get(kind)
        if shard is not None:
            if shard.epoch != epoch or shard.tar_bytes >= self.shard_bytes:
                self._close_shard(kind)
                shard = None
            elif position != shard.last + 1:
                raise ValueError(f"{kind} record {position} follows {shard.last}: out of order")
        if shard is None:
            import webdataset  # here, not at the top: it imports torch, which readers never need

            name = fmt.shard_name(kind, self._numbers[kind])
            self._numbers[kind] += 1
            self._save_progress(opening=name)  # names the shard before its file exists
            temp_path = self.output.staging_path(name)
            file = _HashingFile(temp_path)
            tar = webdataset.TarWriter(file, user=fmt.TAR_USER, group=fmt.TAR_USER, encoder=False,
                                       mtime=fmt.TAR_MTIME)
            shard = _OpenShard(kind, name, temp_path, file, tar, first=position, last=position - 1, epoch=epoch)
            self._open[kind] = shard
        return shard

    def _advance(self, shard: _OpenShard, position: int, members: dict[str, bytes]) -> None:
        shard.last = position
        shard.count += 1
        # One 512-byte header per member (short names, integer fields: no PAX or long-name header)
        # and the data padded to 512 bytes.
        shard.tar_bytes += sum(fmt.TAR_BLOCK + -(-len(data) // fmt.TAR_BLOCK) * fmt.TAR_BLOCK
                               for data in members.values())

    def _close_shard(self, kind: str) -> None:
        shard = self._open[kind]
        shard.tar.close()
        shard.file.close()
        if self.output.defers_publishing:
            self._written.append(shard.name + fmt.TEMP_SUFFIX)  # renamed into place by finish()
        else:
            self.output.commit(shard.name, shard.temp_path)
            self._written.append(shard.name)
        del self._open[kind]  # only now: until then abort() removes its temporary file
        self.completed.append(ShardInfo(
            name=shard.name, kind=kind, bytes=shard.file.size, sha256=shard.file.sha256.hexdigest(),
            count=shard.count, first=shard.first, last=shard.last, epoch=shard.epoch,
        ))
        self._save_progress()


def _check_sequence(shards: list[ShardInfo], where: str) -> None:
    """The shards a writer closed come in the order it writes them: image shards covering images
    0, 1, ... then label shards covering (epoch, batch) in order, each named by its number."""
    next_image, next_label, numbers = 0, (0, 0), {kind: 0 for kind in fmt.SHARD_KINDS}
    for s in shards:
        if s.name != fmt.shard_name(s.kind, numbers[s.kind]):
            raise ResumeError(f"{where}: shard {escape(s.name)} is out of sequence")
        numbers[s.kind] += 1
        if s.kind == fmt.IMAGES_KIND:
            if numbers[fmt.LABELS_KIND] or s.first != next_image or s.count != s.last - s.first + 1:
                raise ResumeError(f"{where}: image shard {s.name} does not continue at image {next_image}")
            next_image = s.last + 1
        else:
            if (s.epoch, s.first) != next_label and (s.epoch, s.first) != (next_label[0] + 1, 0):
                raise ResumeError(f"{where}: label shard {s.name} does not continue at epoch {next_label[0]} "
                                  f"batch {next_label[1]}")
            next_label = (s.epoch, s.last + 1)


def _difference(before: object, now: dict) -> str:
    """Every setting that differs, each as ``name: then then, now now``."""
    if not isinstance(before, dict):
        return "no settings recorded"
    differing = [f"{escape(key)}: {escape(repr(before.get(key)))[:80]} then, {escape(repr(now.get(key)))[:80]} now"
                 for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    return "; ".join(differing) or "none"
