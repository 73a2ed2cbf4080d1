"""Several students on one data pass: each equals its solo run bit for bit on the CPU, resumes on its
own, fails on its own, and the report makes the table."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fkd_shards.train import checkpoint
from fkd_shards.train.cli import main as train_main

# mobilenet_v3_small draws dropout masks: a student's random stream must be its own.
STUDENTS = ["--model", "resnet18", "--model", "mobilenet_v3_small@lr=0.003", "--seeds", "0,1"]
NAMES = ["resnet18-seed0", "resnet18-seed1", "mobilenet_v3_small-seed0", "mobilenet_v3_small-seed1"]
TIMED = ("train/images_per_s",)  # per-epoch keys that measure time, not training


def _run(output, out_dir, *extra, code=0, capsys=None):
    argv = ["--shards", output, "--output-dir", str(out_dir), "-j", "0", "--device", "cpu", "--epochs", "2", *extra]
    assert train_main(argv) == code
    if capsys is not None:
        return capsys.readouterr().err
    return None


def _state(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pth.tar"), weights_only=True)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in f]


def _same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same_run(multi, solo):
    """Weights, optimizer, schedule, RNG and per-epoch metrics identical; only paths and times differ."""
    a, b = _state(multi), _state(solo)
    for key in ("epoch", "state_dict", "optimizer", "scheduler", "rng", "best_acc1", "seed", "shard_set"):
        assert _same_tensors(a[key], b[key]), key
    assert _same_tensors(torch.load(os.path.join(multi, "final_weights.pth"), weights_only=True),
                         torch.load(os.path.join(solo, "final_weights.pth"), weights_only=True))
    assert _metrics(multi) == _metrics(solo)


@pytest.fixture
def case(converted, tmp_path):
    output, samples, _ = converted(batch_size=8)
    val = os.path.dirname(os.path.dirname(samples[0][0]))
    return output, val, tmp_path


def test_each_student_equals_its_solo_run_bit_for_bit(case, capsys):
    output, val, tmp = case
    _run(output, tmp / "multi", *STUDENTS, "--val-dir", val)
    said = capsys.readouterr()
    assert "students: " in said.out and all(f"{name}: TEST Iter 1" in said.out for name in NAMES)
    assert "Traceback" not in said.err
    listed = json.load(open(tmp / "multi" / "students.json"))["students"]
    assert [s["name"] for s in listed] == NAMES
    assert [s["learning_rate"] for s in listed] == [0.001, 0.001, 0.003, 0.003]  # AdamW's default, then @lr
    for name in NAMES:
        model, seed = name.rsplit("-seed", 1)
        rate = ["--adamw-lr", "0.003"] if model == "mobilenet_v3_small" else []
        _run(output, tmp / "solo" / name, "--model", model, "--seed", seed, *rate, "--val-dir", val)
        _assert_same_run(tmp / "multi" / name, tmp / "solo" / name)
    assert not _same_tensors(_state(tmp / "multi" / NAMES[0])["state_dict"],
                             _state(tmp / "multi" / NAMES[1])["state_dict"])  # the seeds do differ


def test_students_resume_each_from_its_own_checkpoint(case, monkeypatch):
    output, _, tmp = case
    _run(output, tmp / "straight", *STUDENTS, "--epochs", "3")
    real, saves = checkpoint.save, []

    def crash_at_the_seventh_save(*args, **kwargs):  # in epoch 1: two students saved, two not
        saves.append(1)
        if len(saves) == 7:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", crash_at_the_seventh_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(output, tmp / "resumed", *STUDENTS, "--epochs", "3")
    monkeypatch.setattr(checkpoint, "save", real)
    assert [_state(tmp / "resumed" / n)["epoch"] for n in NAMES] == [2, 2, 1, 1]  # students apart
    _run(output, tmp / "resumed", *STUDENTS, "--epochs", "3", "--resume", "auto")
    for name in NAMES:
        _assert_same_run(tmp / "resumed" / name, tmp / "straight" / name)
    _run(output, tmp / "resumed", *STUDENTS, "--epochs", "3", "--resume", "auto")  # all finished: nothing to do
    assert _state(tmp / "resumed" / NAMES[0])["epoch"] == 3


def test_a_diverging_student_is_named_and_its_neighbours_finish(case, capsys, diverging):
    output, _, tmp = case
    _run(output, tmp / "solo", "--model", "resnet18", "--seed", "1")
    diverging("resnet18", "mobilenet_v3_small")
    err = _run(output, tmp / "run", "--model", "resnet18", "--seeds", "0,1", code=1, capsys=capsys)
    assert "fkd-train: student resnet18-seed0 stopped: the loss stopped being finite" in err
    assert "fkd-train: error: 2 of 2 students stopped" in err
    diverging("mobilenet_v3_small")
    err = _run(output, tmp / "mixed", "--model", "resnet18", "--model", "mobilenet_v3_small", "--seeds", "1",
               code=1, capsys=capsys)
    assert "student mobilenet_v3_small-seed1 stopped: the loss stopped being finite (NaN or inf) at epoch 0" in err
    assert "it has no checkpoint; the other students go on" in err
    assert "fkd-train: error: 1 of 2 students stopped (their loss stopped being finite): " \
           "mobilenet_v3_small-seed1" in err
    assert not (tmp / "mixed" / "mobilenet_v3_small-seed1" / "checkpoint.pth.tar").exists()
    _assert_same_run(tmp / "mixed" / "resnet18-seed1", tmp / "solo")  # the neighbour is untouched


@pytest.mark.parametrize("flags, message", [
    (["--model", "resnet18", "--model", "no_such_net"], "--model no_such_net is not a torchvision.models"),
    (["--model", "resnet18", "--model", "resnet18", "--seeds", "0"], "--model resnet18 with seed 0 is asked twice"),
    (["--model", "resnet18@lr=-1"], "--model resnet18@lr must be in [0, 1000], got -1.0"),
    (["--model", "resnet18@lr=nan"], "--model resnet18@lr must be in [0, 1000], got nan"),
    (["--model", "resnet18@momentum=1"], "expected NAME or NAME@lr=LR"),
    (["--model", "resnet18@lr=1_0"], "expected NAME or NAME@lr=LR"),
    (["--seeds", "0,x"], "--seeds '0,x': expected comma-separated integers"),
    (["--seeds", "0,-1"], "--seeds: --seed must be in [0, 4294967295], got -1"),
    (["--seeds", ",".join(map(str, range(101)))], "101 students asked; at most 100 train in one run"),
    (["--model", "resnet18 @lr=0.1"], "--model 'resnet18 ': a model name is made of letters, digits"),
    (["--model", "résnet"], "--model 'résnet': a model name is made of letters, digits"),
    (["--seed", "1", "--seeds", "0,1"], "--seed and --seeds contradict each other"),
    (["--seeds", "0,1", "--resume", "x.pth"], "names one checkpoint, and there are 2 students"),
])
def test_bad_students_are_one_line_before_any_training(case, capsys, flags, message):
    output, _, tmp = case
    err = _run(output, tmp / "run", *flags, code=1, capsys=capsys)
    errors = [line for line in err.splitlines() if line.startswith("fkd-train: error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp / "run").exists()  # nothing made, not even the output directory


def test_an_output_dir_of_other_students_or_a_single_run_is_refused(case, capsys):
    output, _, tmp = case
    _run(output, tmp / "run", "--model", "resnet18", "--seeds", "0,1", "--epochs", "1")
    err = _run(output, tmp / "run", "--model", "resnet18", "--seeds", "0,2", "--epochs", "1", code=1, capsys=capsys)
    assert "holds the students resnet18-seed0, resnet18-seed1; this run asks for resnet18-seed0, resnet18-seed2" in err
    assert not (tmp / "run" / "resnet18-seed2").exists()
    err = _run(output, tmp / "run", "--epochs", "1", code=1, capsys=capsys)
    assert "holds the runs of several students (students.json); choose another --output-dir" in err
    _run(output, tmp / "single", "--epochs", "1")
    err = _run(output, tmp / "single", "--seeds", "0,1", "--epochs", "1", code=1, capsys=capsys)
    assert "holds the run of one student" in err
    err = _run(output, tmp / "run", "--model", "resnet18", "--seeds", "0,1", "--epochs", "1", code=1, capsys=capsys)
    assert "resnet18-seed0: holds a run" in err and "continue it with --resume auto" in err  # the same students
    _run(output, tmp / "run", "--model", "resnet18", "--seeds", "0,2", "--epochs", "1", "--restart")
    assert [s["name"] for s in json.load(open(tmp / "run" / "students.json"))["students"]] == \
        ["resnet18-seed0", "resnet18-seed2"]
    assert (tmp / "run" / "resnet18-seed0" / "previous-1" / "checkpoint.pth.tar").exists()  # kept, moved aside
    assert (tmp / "run" / "resnet18-seed1" / "checkpoint.pth.tar").exists()  # not this run's: untouched


def test_the_report_of_a_students_directory_is_the_table(case, capsys):
    output, val, tmp = case
    _run(output, tmp / "multi", *STUDENTS, "--val-dir", val, "--epochs", "1")
    capsys.readouterr()
    assert train_main(["report", str(tmp / "multi"), "--format", "json", "--plot", str(tmp / "table.png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["seeds"], r["runs"]) for r in rows] == [("resnet18", [0, 1], 2),
                                                                   ("mobilenet_v3_small", [0, 1], 2)]
    finals = [json.load(open(tmp / "multi" / n / "summary.json"))["final_top1"] for n in NAMES[:2]]
    assert rows[0]["final_top1"]["mean"] == pytest.approx(sum(finals) / 2)
    assert rows[0]["final_top1"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
    assert rows[0]["settings"] == {"adamw_lr": 0.001} and rows[1]["settings"] == {"adamw_lr": 0.003}
    with open(tmp / "table.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert train_main(["report", str(tmp / "multi"), "--format", "csv"]) == 0
    csv_rows = capsys.readouterr().out.splitlines()
    assert csv_rows[0].split(",")[5:8] == ["final top-1 mean", "final top-1 std", "final top-1 n"]
    assert csv_rows[1].split(",")[7] == "2"
    (tmp / "multi" / "students.json").write_text('{"students": [{"name": "../elsewhere"}]}')
    assert train_main(["report", str(tmp / "multi")]) == 1
    assert "students.json: not a students.json written by fkd-train" in capsys.readouterr().err


def test_a_refused_run_touches_no_directory_even_with_restart(case, capsys):
    output, _, tmp = case
    _run(output, tmp / "run", "--model", "resnet18", "--seeds", "0,1", "--epochs", "1")
    before = sorted(str(p.relative_to(tmp)) for p in (tmp / "run").rglob("*"))
    for bad in ("mobilenet_v3_smal", "alexnet"):  # unknown; too big for 16 px crops
        err = _run(output, tmp / "run", "--model", "resnet18", "--model", bad, "--seeds", "0,1", "--epochs", "1",
                   "--restart", code=1, capsys=capsys)
        assert f"--model {bad}" in err
    assert sorted(str(p.relative_to(tmp)) for p in (tmp / "run").rglob("*")) == before
    _run(output, tmp / "run", "--model", "resnet18", "--seeds", "0,2", "--epochs", "1", "--restart")
    assert (tmp / "run" / "previous-1" / "students.json").exists()  # the other students' list is kept


def test_ctrl_c_waits_for_the_epochs_checkpoints_best_copies_and_metrics(case, monkeypatch, capsys):
    import signal

    output, val, tmp = case
    real = checkpoint.save

    def save_then_interrupt(*args, **kwargs):
        path = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C came right after the first student's checkpoint
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_interrupt)
    assert train_main(["--shards", output, "--output-dir", str(tmp / "run"), "-j", "0", "--device", "cpu",
                       "--epochs", "2", "--model", "resnet18", "--seeds", "0,1", "--val-dir", val]) == 130
    assert "the students' checkpoints hold epochs resnet18-seed0 0..0, resnet18-seed1 0..0" in capsys.readouterr().err
    for name in NAMES[:2]:  # both students' epoch 0 complete: checkpoint, best copy, metrics line
        assert _state(tmp / "run" / name)["epoch"] == 1
        assert (tmp / "run" / name / "model_best.pth.tar").exists() and len(_metrics(tmp / "run" / name)) == 1


def test_the_report_finds_students_inside_a_directory_and_leaves_out_the_unfinished(case, capsys, diverging):
    output, _, tmp = case
    diverging("mobilenet_v3_small")
    _run(output, tmp / "all" / "multi", "--model", "resnet18", "--model", "mobilenet_v3_small",
         "--seeds", "0", "--epochs", "1", code=1)
    _run(output, tmp / "all" / "solo", "--model", "resnet18", "--seed", "1", "--epochs", "1")
    capsys.readouterr()
    assert train_main(["report", str(tmp / "all"), "--format", "json"]) == 0
    said = capsys.readouterr()
    rows = json.loads(said.out)
    assert [(r["model"], r["seeds"]) for r in rows] == [("resnet18", [0, 1])]
    assert "mobilenet_v3_small-seed0: no summary.json (stopped or not finished); left out" in said.err


def test_a_restart_refused_by_a_locked_student_moves_nothing(case, capsys):
    import subprocess
    import sys

    output, _, tmp = case
    _run(output, tmp / "run", "--model", "resnet18", "--seeds", "0,1", "--epochs", "1")
    before = sorted(str(p.relative_to(tmp)) for p in (tmp / "run").rglob("*"))
    code = ("import sys, time\nfrom fkd_shards.train.rundir import RunLock\nlock = RunLock(sys.argv[1])\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp / "run" / "resnet18-seed1")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _run(output, tmp / "run", "--model", "resnet18", "--seeds", "0,1", "--epochs", "1", "--restart", code=1,
                   capsys=capsys)
        assert "another fkd-train" in err
    finally:
        holder.kill()
        holder.wait(30)
    assert sorted(str(p.relative_to(tmp)) for p in (tmp / "run").rglob("*")) == before  # seed0 was not moved
