"""common/files.py: atomic writes are never cut in half by Ctrl-C, with or without other threads."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from fkd_shards.common.files import write_atomically


@pytest.mark.parametrize("other_thread", [False, True])
def test_ctrl_c_during_an_atomic_write_waits_for_it(tmp_path, other_thread):
    # With another thread running the kernel may hand SIGINT to that thread; Python still interrupts
    # the main thread, so blocking the signal in the main thread alone would not hold it off.
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    if other_thread:
        helper.start()
    path = tmp_path / "file.bin"
    written = []

    def slow_writer(f):
        f.write(b"first half ")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler would run here, between bytecodes
        f.write(b"second half")
        written.append(True)

    try:
        with pytest.raises(KeyboardInterrupt):
            write_atomically(str(path), slow_writer)
    finally:
        stop.set()
    assert written and path.read_bytes() == b"first half second half"  # whole, then the interrupt
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert [name for name in os.listdir(tmp_path) if name != "file.bin"] == []


def test_a_directory_that_cannot_be_made_leaves_no_parents_and_keeps_its_reason(tmp_path):
    from fkd_shards.common.files import FileWriteError, make_directory
    from fkd_shards.common.text import error_line

    (tmp_path / "mine").mkdir()
    deep = os.path.join(str(tmp_path / "mine"), "new", *["b" * 200] * 30)  # past PATH_MAX
    with pytest.raises(FileWriteError) as failed:
        make_directory(deep)
    assert os.listdir(tmp_path / "mine") == []  # "new" and the levels below it were removed again
    line = error_line("fkd-convert", failed.value)
    assert line.endswith(": cannot create (File name too long)") and " ... " in line and len(line) < 2100
