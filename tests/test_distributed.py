"""fkd-train under torchrun: 2 CPU processes (gloo on 127.0.0.1) against the one-process run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from fkd_shards.train.cli import main as train_main
from tests.conftest import listing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "fkd_shards.train", *args]


def _env() -> dict:
    return dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _args(shards_dir, out_dir, *extra) -> list[str]:
    return ["--shards", shards_dir, "--output-dir", str(out_dir), "-j", "0", "--device", "cpu",
            "--model", "resnet18", *extra]


def _params(out_dir) -> dict:
    state = torch.load(os.path.join(out_dir, "checkpoint.pth.tar"), weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def _init(tmp_path) -> str:
    import torchvision

    torch.manual_seed(5)
    path = str(tmp_path / "init.pt")
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    return path


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=2e-4, atol=2e-5, msg=name)


def test_two_ranks_match_one_process_with_k_times_the_accumulation(converted, tmp_path):
    # N=20, B=8: batches of 8, 8, 4 rows; the last batch leaves rank 1 of 2 empty.
    output, _, _ = converted(batch_size=8, epochs=2)
    init = _init(tmp_path)
    assert train_main(_args(output, tmp_path / "one", "--init-weights", init,
                            "--gradient-accumulation-steps", "2")) == 0
    run = subprocess.run(_torchrun(2, _args(output, tmp_path / "two", "--init-weights", init)),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("TRAIN Iter") == 2  # rank 0 alone prints
    assert "B=8 = 2 rank(s) x 1 micro-batches x 4 rows" in run.stdout
    _assert_close(_params(tmp_path / "one"), _params(tmp_path / "two"))


def test_batch_not_divisible_by_ranks_times_accumulation_is_an_error(converted, tmp_path):
    output, _, _ = converted(batch_size=6, epochs=1)
    run = subprocess.run(_torchrun(2, _args(output, tmp_path / "r", "--gradient-accumulation-steps", "2")),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "--batch-size 6 is not divisible by world size 2 x --gradient-accumulation-steps 2" in run.stderr


def test_killed_two_rank_run_resumes_on_one_process(converted, tmp_path):
    output, _, _ = converted(batch_size=8, epochs=3, per_class=10)  # N=40: 5 batches per epoch
    init = _init(tmp_path)
    assert train_main(_args(output, tmp_path / "straight", "--init-weights", init,
                            "--gradient-accumulation-steps", "2")) == 0
    out = tmp_path / "killed"
    kill_after_first_checkpoint(_torchrun(2, _args(output, out, "--init-weights", init)), out)
    epoch = torch.load(out / "checkpoint.pth.tar", weights_only=True)["epoch"]
    if epoch == 3:
        pytest.skip("the run finished before it could be killed")
    assert train_main(_args(output, out, "--init-weights", init, "--gradient-accumulation-steps", "2",
                            "--resume", "auto")) == 0
    _assert_close(_params(tmp_path / "straight"), _params(out))


def test_a_failing_rank_fails_the_job_and_keeps_the_checkpoint(converted, tmp_path):
    output, _, _ = converted(batch_size=8, epochs=3, per_class=10)
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(2, _args(output, out)), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while "checkpoint.pth.tar" not in listing(str(out)):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        worker = _rank_pid(proc.pid, rank=1)
        os.kill(worker, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in stderr or "exitcode: -9" in stderr, stderr[-2000:]
    state = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] >= 1 and "state_dict" in state


def kill_after_first_checkpoint(command: list[str], out) -> None:
    """Start ``command`` (a torchrun job writing to ``out``) and kill every process of it as soon as
    its first checkpoint is on disk."""
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while "checkpoint.pth.tar" not in listing(str(out)):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        _kill_tree(proc.pid)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
                found += children
                stack += children
        except FileNotFoundError:
            continue
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL the launcher and every worker (torchrun may start workers in sessions of their own), and
    wait until each has exited: a dying worker still holds its run lock for a moment after the signal."""
    tree = [pid, *_descendants(pid)]
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 60
    while any(_running(p) for p in tree) and time.time() < deadline:
        time.sleep(0.01)


def _running(pid: int) -> bool:
    """Whether any thread of pid is alive. A zombie (exited, not yet reaped) has released its files,
    but the main thread turns zombie while other threads may still be exiting with the files (and
    the run lock) open: every thread counts."""
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
    except (FileNotFoundError, ProcessLookupError):
        return False
    return False


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the worker whose environment says RANK=rank, among the launcher's children."""
    deadline = time.time() + 30
    while time.time() < deadline:
        for task in os.listdir(f"/proc/{launcher}/task"):
            with open(f"/proc/{launcher}/task/{task}/children") as f:
                for child in f.read().split():
                    try:
                        with open(f"/proc/{child}/environ", "rb") as env:
                            if f"RANK={rank}".encode() in env.read().split(b"\0"):
                                return int(child)
                    except FileNotFoundError:
                        continue
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank}")


def test_two_ranks_train_several_students_each_as_alone(converted, tmp_path):
    output, _, _ = converted(batch_size=8)
    multi = subprocess.run(_torchrun(2, _args(output, tmp_path / "multi", "--epochs", "2", "--seeds", "0,1")),
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    solo = subprocess.run(_torchrun(2, _args(output, tmp_path / "solo", "--epochs", "2", "--seed", "1")),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert solo.returncode == 0, solo.stderr[-3000:]
    a, b = _params(tmp_path / "multi" / "resnet18-seed1"), _params(tmp_path / "solo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(_params(tmp_path / "multi" / "resnet18-seed0")["fc.weight"], a["fc.weight"])
