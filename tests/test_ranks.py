"""What two ranks (gloo on 127.0.0.1) agree on: errors met by one rank stop every rank with one line
from rank 0 and no hang; validation scores the model rank 0 saves; each rank's random stream is its
own and is restored on resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from tests.conftest import INPUT_SIZE, header_only_image
from tests.test_distributed import _env, _torchrun, kill_after_first_checkpoint

NAN_ON_RANK_1 = """
import os, sys
from fkd_shards.train import loop
real, calls = loop.kd_loss, [0]
def kd_loss(logits, soft, temperature):
    calls[0] += 1
    loss = real(logits, soft, temperature)
    # Rank 1 alone: its 7th micro-batch is epoch 1 batch 1 (5 batches per epoch).
    return loss * float("nan") if os.environ["RANK"] == "1" and calls[0] == 7 else loss
loop.kd_loss = kd_loss
from fkd_shards.train.cli import main
sys.exit(main(sys.argv[1:]))
"""

FAIL_ON_RANK_1 = """
import os, sys, torch
from fkd_shards.train import loop
def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
if os.environ["RANK"] == "1":
    real, calls = getattr(loop, WHERE), [0]
    def failing(*args, **kwargs):
        calls[0] += 1
        return oom() if calls[0] == CALL else real(*args, **kwargs)
    setattr(loop, WHERE, failing)
from fkd_shards.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(args: list[str], script: str | None = None, tmp_path=None) -> subprocess.CompletedProcess:
    command = _torchrun(2, args)
    if script is not None:
        runner = tmp_path / "runner.py"
        runner.write_text(script)
        at = command.index("fkd_shards.train")
        command[at - 1:at + 1] = [str(runner)]  # "-m fkd_shards.train" -> the runner
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)


def _args(shards_dir, out_dir, *extra) -> list[str]:
    """A 2-rank CPU run of one student (resnet18 unless ``--model`` is in ``extra``)."""
    model = [] if "--model" in extra else ["--model", "resnet18"]
    return ["--shards", shards_dir, "--output-dir", str(out_dir), "-j", "0", "--device", "cpu", *model, *extra]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fkd-train: error:")]


def _image_folder(samples) -> str:
    return os.path.dirname(os.path.dirname(samples[0][0]))


def _epoch(out) -> int:
    return torch.load(os.path.join(out, "checkpoint.pth.tar"), weights_only=True)["epoch"]


def test_a_loss_not_finite_on_one_rank_stops_both_with_one_line(converted, tmp_path):
    output, _, _ = converted(batch_size=8, epochs=3, per_class=10)  # N=40: 5 batches per epoch
    out = tmp_path / "run"
    run = _run(_args(output, out), NAN_ON_RANK_1, tmp_path)
    assert run.returncode != 0
    errors = _errors(run.stderr)
    assert errors == ["fkd-train: error: the loss stopped being finite (NaN or inf) at epoch 1 batch 1: no checkpoint "
                      "was written for epoch 1 (too high a learning rate or temperature?)"], run.stderr[-3000:]
    assert _epoch(out) == 1  # epoch 0's checkpoint is kept


def test_an_unreadable_validation_image_on_one_rank_stops_both_at_start_up_or_after_the_checkpoint(converted, tmp_path):
    output, samples, _ = converted(batch_size=8, epochs=3, per_class=10)
    val = tmp_path / "val"
    shutil.copytree(_image_folder(samples), val)
    first_class = sorted(os.listdir(val))[0]
    broken = val / first_class / sorted(os.listdir(val / first_class))[1]  # index 1: rank 1's share
    broken.write_bytes(b"not an image")  # seen by rank 1's check of its headers: before anything trains
    for out in (tmp_path / "early", tmp_path / "run"):
        run = _run(_args(output, out, "--val-dir", str(val), "--val-every", "1"))
        assert run.returncode != 0
        errors = _errors(run.stderr)
        assert len(errors) == 1 and errors[0].startswith(f"fkd-train: error: rank 1 of 2: {broken}: unreadable "
                                                         f"image"), run.stderr[-3000:]
        if out.name == "early":
            assert not out.exists()
            header_only_image(broken)  # its header parses: found when rank 1 validates, after the checkpoint
    assert _epoch(out) == 1


def test_two_ranks_validate_the_model_rank_0_saves(converted, tmp_path):
    import torchvision

    from fkd_shards.common.distributed import DistEnv
    from fkd_shards.train.validate import evaluate, val_loader

    output, samples, _ = converted(batch_size=8, epochs=2, per_class=10)
    val = _image_folder(samples)  # the training images double as a validation set
    out = tmp_path / "run"
    run = _run(_args(output, out, "--val-dir", val, "--val-every", "1", "--sgd", "-lr", "0.2"))
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(torch.load(out / "checkpoint.pth.tar", weights_only=True)["state_dict"])
    alone = evaluate(model, val_loader(val, sorted(os.listdir(val)), INPUT_SIZE, 8, 0, DistEnv()), "cpu", DistEnv())
    assert last["val/top1"] == alone["val/top1"]
    assert last["val/loss"] == pytest.approx(alone["val/loss"], rel=1e-6)


def test_each_rank_draws_its_own_dropout_and_a_two_rank_resume_is_bit_identical(converted, tmp_path):
    output, _, _ = converted(batch_size=8, epochs=3, per_class=10)
    flags = ["--model", "mobilenet_v2"]  # dropout before its classifier
    straight = tmp_path / "straight"
    run = _run([*_args(output, straight, *flags)])
    assert run.returncode == 0, run.stderr[-3000:]
    states = torch.load(straight / "checkpoint.pth.tar", weights_only=True)["ranks_rng"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    out = tmp_path / "killed"
    kill_after_first_checkpoint(_torchrun(2, _args(output, out, *flags)), out)
    if _epoch(out) == 3:
        pytest.skip("the run finished before it could be killed")
    run = _run(_args(output, out, *flags, "--resume", "auto"))
    assert run.returncode == 0, run.stderr[-3000:]
    a = torch.load(straight / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.parametrize("where,call,said", [
    # the move to the device inside build_state, before DDP's first broadcast: agreed, one line from rank 0
    ("build_model", 1, "fkd-train: error: rank 1 of 2: out of memory putting --model resnet18 on cpu"),
    # the third step on rank 1 alone (no collective agrees inside a step): rank 1 says it, torchrun stops rank 0
    ("train_step", 3, "fkd-train: error: rank 1 of 2: out of memory at epoch 0 batch 2"),
])
def test_out_of_memory_on_one_rank_ends_the_job_with_one_line_naming_the_rank(converted, tmp_path, where, call, said):
    import time

    output, _, _ = converted(batch_size=8, epochs=2, per_class=10)
    script = FAIL_ON_RANK_1.replace("WHERE", repr(where)).replace("CALL", str(call))
    if where == "build_model":  # the model itself is fine; its move to the device runs out of memory
        script = script.replace("return oom() if", "model = real(*args, **kwargs)\n        "
                                "model.to = lambda *a, **k: oom()\n        return model if")
    out = tmp_path / "run"
    started = time.monotonic()
    run = _run(_args(output, out, "--no-progress"), script, tmp_path)  # rank 1's line would follow rank 0's bar
    assert run.returncode != 0
    assert time.monotonic() - started < 120  # no rank left waiting for the process group's timeout
    errors = _errors(run.stderr)
    assert len(errors) == 1 and errors[0].startswith(said), run.stderr[-3000:]
    assert not (out / "checkpoint.pth.tar").exists()
    if where == "build_model":  # agreed: rank 0 stopped on its own, not by losing its peer inside DDP's broadcast
        assert "[rank0]: Traceback" not in run.stderr, run.stderr[-3000:]


def test_under_torchrun_ctrl_c_is_said_by_rank_0_and_a_lone_error_names_its_rank(monkeypatch, capsys):
    from fkd_shards.common.cli import run_command

    def interrupted():
        raise KeyboardInterrupt

    def refused():
        raise ValueError("--val-dir /data/val: no such directory")

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", "fkd-train: interrupted\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        assert run_command("fkd-train", interrupted, lambda: (ValueError,), "interrupted") == 130
        assert capsys.readouterr().err == said
    for rank, prefix in (("0", ""), ("1", "rank 1 of 2: ")):
        monkeypatch.setenv("RANK", rank)
        assert run_command("fkd-train", refused, lambda: (ValueError,), "interrupted") == 1
        assert capsys.readouterr().err == f"fkd-train: error: {prefix}--val-dir /data/val: no such directory\n"
