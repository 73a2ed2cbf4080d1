"""The output directory of a run: its file names, and the claim that keeps a run from being lost.

A directory holding a run is refused unless the run is continued (``--resume``) or explicitly
started over (``--restart``, which first moves the old run's files to ``previous-N/``). A lock held
for the whole run keeps a second process from training into the same directory: a POSIX record lock
(``lockf``), which the kernel releases when the process ends, however it ends, and which the
DataLoader's forked workers do not inherit (an ``flock`` would stay held while they linger).
Temporary files an interrupted write left behind are removed, ours only: they match the names our
writers use.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable

from fkd_shards.common.files import (
    TEMP_SUFFIX,
    FileMissingError,
    FileReadError,
    FileWriteError,
    make_directory,
    read_bounded,
    write_atomically,
)

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
FINAL_WEIGHTS_NAME = "final_weights.pth"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CURVES_NAME = "curves.png"
WANDB_DIR = "wandb"
LOCK_NAME = ".fkd-train.lock"
STUDENTS_NAME = "students.json"  # in OUTPUT_DIR of a run of several students: who is in which directory
MAX_STUDENTS_BYTES = 1 << 20
RUN_FILES = (CHECKPOINT_NAME, BEST_NAME, FINAL_WEIGHTS_NAME, METRICS_NAME, SUMMARY_NAME, CURVES_NAME, WANDB_DIR)
# common.files.temp_name's pattern (and the older NAME.PID.partial) for each file a run writes.
_TEMP = re.compile("({})".format("|".join(re.escape(n) for n in RUN_FILES)) + r"\.\d+(\.[0-9a-f]{12})?"
                   + re.escape(TEMP_SUFFIX))


class RunDirError(ValueError):
    """An output directory that cannot be used for this run; the message says why and what to do."""


def resume_path(flag: str | None, output_dir: str) -> str | None:
    """``--resume auto``: OUTPUT_DIR's checkpoint if there is one (else a fresh run); a file must exist."""
    if flag is None:
        return None
    if flag == "auto":
        path = os.path.join(output_dir, CHECKPOINT_NAME)
        return path if os.path.exists(path) else None
    if not os.path.isfile(flag):
        raise RunDirError(f"--resume {flag}: no such file")
    return flag


class RunLock:
    """An exclusive lock on an output directory, held until :meth:`release` or the process's end."""

    def __init__(self, directory: str):
        import fcntl

        self.path = os.path.join(directory, LOCK_NAME)
        self._file = open(self.path, "a+")
        try:
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                self._file.close()
                raise RunDirError(f"{directory}: cannot lock the output directory ({exc.strerror})") from None
            self._file.seek(0)
            owner = self._file.read(32).strip() or "?"
            self._file.close()
            raise RunDirError(f"{directory}: another fkd-train (pid {owner}) is training into this directory") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the descriptor releases the lock


def claim(directory: str, resume_asked: bool, resume: str | None, restart: bool, *,
          later: list[Callable[[], object]] | None = None) -> RunLock:
    """Create ``directory`` if needed, lock it, remove stale temporary files, and check that this
    run may write there. A run the directory holds is continued (``--resume`` of its own checkpoint,
    or ``--resume auto`` when it has none yet: nothing is lost then), moved aside (``restart``), or
    refused; so is resuming another directory's checkpoint into one that holds a run."""
    try:
        make_directory(directory)
    except FileWriteError as exc:
        raise RunDirError(f"output directory {exc}") from None
    if not os.access(directory, os.W_OK):
        raise RunDirError(f"{directory}: output directory is not writable")
    lock = RunLock(directory)
    try:
        for name in os.listdir(directory):
            if _TEMP.fullmatch(name):
                os.remove(os.path.join(directory, name))
        if os.path.lexists(os.path.join(directory, STUDENTS_NAME)):
            raise RunDirError(f"{directory}: holds the runs of several students ({STUDENTS_NAME}); choose another "
                              f"--output-dir for a run of one student")
        existing = [name for name in RUN_FILES if os.path.lexists(os.path.join(directory, name))]
        own = os.path.join(directory, CHECKPOINT_NAME)
        continuing = resume_asked and (resume is None or (os.path.exists(own) and os.path.samefile(resume, own)))
        if existing and not continuing:
            if not restart:
                what = "continue it with --resume auto" if not resume_asked else \
                    "--resume of another directory's checkpoint needs an empty output directory; continue this one's " \
                    "with --resume auto"
                raise RunDirError(f"{directory}: holds a run ({', '.join(existing)}); {what}, or start over with "
                                  f"--restart (its files are moved to {directory}/previous-N/ first)")
            if later is None:
                _move_aside(directory, existing)
            else:  # moved once every directory of the run is claimed: a refused run moves nothing
                later.append(lambda: _move_aside(directory, existing))
    except BaseException:
        lock.release()
        raise
    return lock


def claim_students(directory: str, students: list[dict], restart: bool, later: list[Callable[[], object]]) -> RunLock:
    """The output directory of a run of several students (each then claims its own directory
    inside it, :func:`claim`): locked and checked now; ``students.json`` naming them is written by
    an action appended to ``later``, which the caller runs once everything is claimed. A directory
    that holds a single run, or other students (without ``restart``), is refused."""
    try:
        make_directory(directory)
    except FileWriteError as exc:
        raise RunDirError(f"output directory {exc}") from None
    lock = RunLock(directory)
    try:
        single = [name for name in RUN_FILES if os.path.lexists(os.path.join(directory, name))]
        if single:
            raise RunDirError(f"{directory}: holds the run of one student ({', '.join(single)}); choose another "
                              f"--output-dir for several students")
        path = os.path.join(directory, STUDENTS_NAME)
        before = _student_names(path)
        names = [s["name"] for s in students]
        if before is not None and sorted(before) != sorted(names) and not restart:
            raise RunDirError(f"{directory}: holds the students {', '.join(before[:6])}; this run asks for "
                              f"{', '.join(names[:6])}: ask for the same --model and --seeds to continue them, "
                              f"use another --output-dir, or --restart")
        later.append(lambda: _write_students(directory, students, keep_old=before is not None
                                             and sorted(before) != sorted(names)))
    except BaseException:
        lock.release()
        raise
    return lock


def _write_students(directory: str, students: list[dict], keep_old: bool) -> None:
    """``students.json``; ``keep_old``: the list of other students there is moved to ``previous-N/``."""
    if keep_old:
        _move_aside(directory, [STUDENTS_NAME])
    body = {"format": "fkd-train-students", "students": students}
    try:
        write_atomically(os.path.join(directory, STUDENTS_NAME), (json.dumps(body, indent=1) + "\n").encode())
    except FileWriteError as exc:
        raise RunDirError(str(exc)) from None


def read_students(path: str) -> list[dict] | None:
    """The students a ``students.json`` names (each a dict with at least a string ``name``, the
    directory beside it), or None when there is no such file; anything else is a :class:`RunDirError`."""
    try:
        data = read_bounded(path, MAX_STUDENTS_BYTES)
    except FileMissingError:
        return None
    except FileReadError as exc:
        raise RunDirError(str(exc)) from None
    try:
        body = json.loads(data.decode("utf-8"))
        students = body["students"]
        if not isinstance(students, list) or not all(isinstance(s, dict) and plain_name(s.get("name"))
                                                     for s in students):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise RunDirError(f"{path}: not a students.json written by fkd-train") from None
    return students


def plain_name(name: object) -> bool:
    """A student's directory name: one path component of ours, never ``..`` or a path elsewhere."""
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.+-]{1,200}", name) is not None \
        and name not in (".", "..")


def _student_names(path: str) -> list[str] | None:
    students = read_students(path)
    return None if students is None else [s["name"] for s in students]


def _move_aside(directory: str, names: list[str]) -> str:
    n = 1
    while os.path.lexists(os.path.join(directory, f"previous-{n}")):
        n += 1
    target = os.path.join(directory, f"previous-{n}")
    os.makedirs(target)
    for name in names:
        shutil.move(os.path.join(directory, name), os.path.join(target, name))
    return target
