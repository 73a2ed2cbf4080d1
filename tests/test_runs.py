"""fkd-train's runs: never lost, never mixed, never resumed from something untrustworthy; seeds,
weights files, summaries and reports; one line for every user mistake."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import torchvision
from torch import nn

from fkd_shards.train import checkpoint, loop
from fkd_shards.train.cli import main as train_main
from tests.conftest import header_only_image


def _run(output, out_dir, *extra, code=0, capsys=None):
    argv = ["--shards", output, "--output-dir", str(out_dir), "-j", "0", "--device", "cpu", *extra]
    assert train_main(argv) == code
    if capsys is not None:  # what the user reads besides the progress bars
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fkd-train: ")]
        assert code == 0 or len(lines) == 1, lines
        return "\n".join(lines)
    return None


def _weights(path):
    state = torch.load(path, weights_only=True)
    return state.get("state_dict", state)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_output_dir_holding_a_run_is_refused_unless_resumed_or_restarted(converted, tmp_path, capsys):
    output, _, _ = converted()
    out = tmp_path / "run"
    _run(output, out, "--epochs", "1")
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pth.tar", "metrics.jsonl")}
    err = _run(output, out, "--epochs", "1", code=1, capsys=capsys)
    assert "holds a run (checkpoint.pth.tar, final_weights.pth, metrics.jsonl, summary.json, curves.png); continue " \
           "it with --resume auto, or start over with --restart" in err
    assert all((out / name).read_bytes() == data for name, data in before.items())
    _run(output, out, "--epochs", "1", "--restart")
    assert (out / "previous-1" / "checkpoint.pth.tar").read_bytes() == before["checkpoint.pth.tar"]
    assert (out / "checkpoint.pth.tar").exists()


def test_a_second_process_is_refused_while_the_first_trains(converted, tmp_path, capsys):
    output, _, _ = converted()
    out = tmp_path / "run"
    os.makedirs(out)
    code = ("import sys, time\nfrom fkd_shards.train.rundir import RunLock\nlock = RunLock(sys.argv[1])\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _run(output, out, "--epochs", "1", code=1, capsys=capsys)
        assert f"another fkd-train (pid {holder.pid}) is training into this directory" in err
    finally:
        holder.kill()  # however the first process ends, the kernel releases its lock
        holder.wait(30)
    _run(output, out, "--epochs", "1")


def test_stale_temporary_files_are_removed_and_user_files_kept(converted, tmp_path):
    output, _, _ = converted()
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "checkpoint.pth.tar.4242.0123456789ab.partial").write_bytes(b"half")
    (out / "checkpoint.pth.tar.mine").write_bytes(b"user")
    _run(output, out, "--epochs", "1")
    assert not (out / "checkpoint.pth.tar.4242.0123456789ab.partial").exists()
    assert (out / "checkpoint.pth.tar.mine").read_bytes() == b"user"


def _crash_after(monkeypatch, steps):
    real, calls = loop.train_step, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) > steps:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", crash)
    return real


def _interrupted_run(output, out, monkeypatch, *extra):
    real = _crash_after(monkeypatch, 4)  # epoch 0 (4 batches of 6) done and saved
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(output, out, *extra)
    monkeypatch.setattr(loop, "train_step", real)


def _flip_tensor_byte(path):
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len
    data = bytearray(open(path, "rb").read())
    data[start + info.file_size // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_a_checkpoint_with_a_flipped_byte_is_refused(converted, tmp_path, monkeypatch, capsys):
    output, _, _ = converted()
    out = tmp_path / "run"
    _interrupted_run(output, out, monkeypatch)
    path = out / "checkpoint.pth.tar"
    state = torch.load(path, weights_only=True)
    _flip_tensor_byte(path)  # torch.load alone would read a wrong number
    err = _run(output, out, "--resume", "auto", code=1, capsys=capsys)
    assert "checkpoint.pth.tar: damaged (Bad CRC-32 for file" in err
    state["state_dict"]["fc.bias"][0] += 1  # saved anew: the zip's CRCs fit, the integrity hash does not
    torch.save(state, path)
    err = _run(output, out, "--resume", "auto", code=1, capsys=capsys)
    assert "checkpoint.pth.tar: integrity hash mismatch (the file changed or is corrupt); refused" in err
    weights = tmp_path / "weights.pt"
    torch.save(state["state_dict"], weights)
    with zipfile.ZipFile(weights) as stored, zipfile.ZipFile(tmp_path / "deflated.pt", "w") as deflated:
        for entry in stored.infolist():
            deflated.writestr(entry.filename, stored.read(entry), compress_type=zipfile.ZIP_DEFLATED)
    err = _run(output, tmp_path / "other", "--init-weights", str(tmp_path / "deflated.pt"), code=1, capsys=capsys)
    assert "deflated.pt: entry weights/data.pkl is compressed, which torch.save never does; refused" in err


def test_weights_of_another_model_say_which_keys_and_shapes_differ(converted, tmp_path, capsys):
    output, _, _ = converted()
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "ten.pt")
    err = _run(output, tmp_path / "a", "--init-weights", str(tmp_path / "ten.pt"), code=1, capsys=capsys)
    assert "ten.pt: does not fit --model resnet18 (2 of another shape, e.g. 'fc.weight' [10, 512] in the file, " \
           "[4, 512] in the model)" in err
    err = _run(output, tmp_path / "b", "--init-weights", str(tmp_path / "ten.pt"), "--model", "resnet34", code=1,
               capsys=capsys)
    assert "does not fit --model resnet34 (" in err and " missing, e.g. 'layer1.2.conv1.weight'" in err


def test_nan_weights_are_refused_on_resume_and_as_init_weights(converted, tmp_path, monkeypatch, capsys):
    output, _, _ = converted()
    out = tmp_path / "run"
    _interrupted_run(output, out, monkeypatch)
    path = out / "checkpoint.pth.tar"
    state = torch.load(path, weights_only=True)
    state.pop("integrity")
    state["state_dict"]["fc.bias"][0] = float("nan")
    state["integrity"] = {"algorithm": checkpoint.INTEGRITY, "sha256": checkpoint.digest(state)}
    torch.save(state, path)
    err = _run(output, out, "--resume", "auto", code=1, capsys=capsys)
    assert "fc.bias holds NaN or inf values; refused" in err
    torch.save(state["state_dict"], tmp_path / "nan.pt")
    err = _run(output, tmp_path / "other", "--init-weights", str(tmp_path / "nan.pt"), code=1, capsys=capsys)
    assert "nan.pt: fc.bias holds NaN or inf values; refused" in err


@pytest.mark.parametrize("flags,message", [
    (["--sgd"], "--sgd True differs from the checkpoint's False"),
    (["--model", "resnet34"], "--model 'resnet34' differs from the checkpoint's 'resnet18'"),
    (["--seed", "3"], "--seed 3 differs from the checkpoint's 0"),
    (["-T", "4"], "--temperature 4.0 differs from the checkpoint's 3.0"),
    (["--gradient-accumulation-steps", "2"], "the micro-batch, B / (ranks x --gradient-accumulation-steps) rows: 3 "
                                            "differs from the checkpoint's 6"),
    (["--sgd", "-T", "4"], "--sgd True differs from the checkpoint's False; --temperature 4.0 differs from the "
                           "checkpoint's 3.0; resume with the same values"),  # every difference, in one line
])
def test_resume_with_other_run_defining_flags_says_what_differs(converted, tmp_path, monkeypatch, capsys, flags,
                                                                  message):
    output, _, _ = converted()
    out = tmp_path / "run"
    _interrupted_run(output, out, monkeypatch)
    err = _run(output, out, "--resume", "auto", *flags, code=1, capsys=capsys)
    assert message in err


def test_resume_on_another_set_of_the_same_shape_is_refused(converted, tmp_path, monkeypatch, capsys):
    from tests.tamper import reseal

    a, _, _ = converted(name="a")
    b, samples, _ = converted(name="b")  # the same fixture: the same shape, bytes and hashes ...
    reseal(b, image_bytes={0: open(samples[1][0], "rb").read()})  # ... until one image differs
    out = tmp_path / "run"
    _interrupted_run(a, out, monkeypatch)
    err = _run(b, out, "--resume", "auto", code=1, capsys=capsys)
    assert "written for another shard set (its shards' hashes differ" in err


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_run_resumes(converted, tmp_path, monkeypatch, capsys):
    output, _, _ = converted()
    _run(output, tmp_path / "straight", "--cos")
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint after epoch 1
            f.write(b"x" * 1000)
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:  # as on a full tmpfs: torch's zip writer hides the OSError (context only)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 900")  # noqa: B904
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    err = _run(output, out, "--cos", code=1, capsys=capsys)
    assert "checkpoint.pth.tar: cannot write (disk full: No space left on device); the previous file there is " \
           "intact" in err
    monkeypatch.setattr(torch, "save", real_save)
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    assert checkpoint.load_checkpoint(str(out / "checkpoint.pth.tar"))["epoch"] == 1
    _run(output, out, "--cos", "--resume", "auto")
    assert _same(_weights(out / "final_weights.pth"), _weights(tmp_path / "straight" / "final_weights.pth"))


def test_a_loss_that_stops_being_finite_stops_the_run_before_its_checkpoint(converted, tmp_path, capsys, diverging):
    output, _, _ = converted()
    diverging("resnet18")
    err = _run(output, tmp_path / "run", code=1, capsys=capsys)
    assert "the loss stopped being finite (NaN or inf) at epoch 0 batch" in err
    assert not (tmp_path / "run" / "checkpoint.pth.tar").exists()


def test_an_unreadable_validation_image_is_named_after_the_epoch_is_saved(converted, tmp_path, capsys):
    import shutil

    output, samples, _ = converted()
    val = tmp_path / "val"
    shutil.copytree(os.path.dirname(os.path.dirname(samples[0][0])), val)
    broken = val / "new002" / sorted(os.listdir(val / "new002"))[1]
    broken.write_bytes(b"\xff\xd8\xff broken")  # not even a header: named before anything trains
    err = _run(output, tmp_path / "early", "--epochs", "1", "--val-dir", str(val), code=1, capsys=capsys)
    assert err == f"fkd-train: error: {broken}: unreadable image (cannot identify image file <_io.BytesIO object>)" \
        or (err.startswith(f"fkd-train: error: {broken}: unreadable image (") and "\n" not in err), err
    assert not (tmp_path / "early").exists()
    header_only_image(broken)  # a header that parses, pixels that do not: found when validating
    err = _run(output, tmp_path / "run", "--epochs", "1", "--val-dir", str(val), code=1, capsys=capsys)
    assert f"{broken}: unreadable image" in err
    assert checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoint.pth.tar"))["epoch"] == 1


def test_a_validation_folder_that_loops_is_refused_before_training(tmp_path):
    from PIL import Image

    from fkd_shards.common.distributed import DistEnv
    from fkd_shards.train.validate import ValidationError, val_loader

    for name in ("a", "b"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / name / "0.png")
    os.symlink("..", tmp_path / "val" / "b" / "up")
    with pytest.raises(ValidationError, match="val/b/up: a symbolic link that leads back to a folder containing it"):
        val_loader(str(tmp_path / "val"), ["a", "b"], 8, 8, 0, DistEnv())


@pytest.mark.parametrize("env,message", [
    ({"RANK": "x"}, "environment variable RANK='x' is not an integer"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be in [1, 1048576)"),
    ({"WORLD_SIZE": "99999999999999999999"}, "WORLD_SIZE=99999999999999999999 must be in [1, 1048576)"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 asks for 2 processes, but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are "
                          "not set (start the run with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"},
     "MASTER_PORT='x' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 is not a port (1 to 65535)"),
])
def test_bad_torchrun_variables_are_one_line_errors(converted, tmp_path, monkeypatch, capsys, env, message):
    output, _, _ = converted()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert message in _run(output, tmp_path / "run", code=1, capsys=capsys)


def test_ctrl_c_says_what_is_on_disk(converted, tmp_path, monkeypatch, capsys):
    output, _, _ = converted()
    real = loop.train_step

    def interrupt_at(step):
        calls = []

        def stepper(*args, **kwargs):
            calls.append(1)
            if len(calls) == step:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return stepper

    monkeypatch.setattr(loop, "train_step", interrupt_at(2))
    assert train_main(["--shards", output, "--output-dir", str(tmp_path / "a"), "-j", "0"]) == 130
    assert "interrupted before the first checkpoint was written; nothing to resume" in capsys.readouterr().err
    monkeypatch.setattr(loop, "train_step", interrupt_at(6))
    assert train_main(["--shards", output, "--output-dir", str(tmp_path / "b"), "-j", "0"]) == 130
    assert "checkpoint.pth.tar holds epochs 0..0: continue with --resume auto" in capsys.readouterr().err


def test_seeds_reproduce_and_differ_and_are_recorded(converted, tmp_path):
    output, _, _ = converted()
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        _run(output, tmp_path / name, "--epochs", "1", "--seed", seed)
    a, b, c = (_weights(tmp_path / n / "final_weights.pth") for n in "abc")
    assert _same(a, b) and not _same(a, c)
    assert torch.load(tmp_path / "c" / "checkpoint.pth.tar", weights_only=True)["seed"] == 2
    assert json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[0])["seed"] == 2


def test_final_weights_load_into_the_model_and_export_matches(converted, tmp_path, capsys):
    output, _, _ = converted()
    out = tmp_path / "run"
    _run(output, out, "--epochs", "1")
    printed = capsys.readouterr().out
    assert f"final weights (state dict): {out / 'final_weights.pth'}" in printed and "done: resnet18" in printed
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(torch.load(out / "final_weights.pth", weights_only=True))
    assert train_main(["export", str(out / "checkpoint.pth.tar"), str(tmp_path / "w.pth")]) == 0
    assert _same(_weights(tmp_path / "w.pth"), _weights(out / "final_weights.pth"))
    assert train_main(["export", str(out / "checkpoint.pth.tar"), str(tmp_path / "w.pth")]) == 1
    assert "w.pth: exists; choose another name" in capsys.readouterr().err


def test_report_groups_seeds_with_mean_and_std(converted, tmp_path, capsys):
    output, samples, _ = converted()
    val = os.path.dirname(os.path.dirname(samples[0][0]))
    runs = []
    for seed in ("0", "1", "2"):
        runs.append(str(tmp_path / f"s{seed}"))
        _run(output, runs[-1], "--epochs", "1", "--seed", seed, "--val-dir", val)
    _run(output, tmp_path / "sgd", "--epochs", "1", "--sgd", "--val-dir", val)
    capsys.readouterr()
    assert train_main(["report", *runs, str(tmp_path / "sgd")]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 4 and "0,1,2 (n=3)" in table[2] and "0 (n=1)" in table[3]
    finals = [json.load(open(os.path.join(r, "summary.json")))["final_top1"] for r in runs]
    mean = sum(finals) / 3
    std = (sum((f - mean) ** 2 for f in finals) / 2) ** 0.5
    assert f"{mean:.2f} ± {std:.2f}" in table[2]
    assert "sgd=false" in table[2] and "sgd=true" in table[3]  # the column that tells the rows apart
    assert train_main(["report", *runs, runs[0]]) == 0
    assert "0,0,1,2 (n=4, seed 0 repeated)" in capsys.readouterr().out  # seeds in order
    assert train_main(["report", str(tmp_path)]) == 0  # a directory holding runs: the runs inside
    assert capsys.readouterr().out.strip().splitlines() == table
    (tmp_path / "empty").mkdir()
    assert train_main(["report", str(tmp_path / "empty")]) == 1
    assert "no summary.json (not a finished fkd-train run), no students.json, and no run directory inside" in \
        capsys.readouterr().err


def test_report_and_the_metrics_log_read_only_bounded_regular_files(tmp_path, capsys):
    from fkd_shards.train.metrics import MetricsError, read_metrics

    cases = {"zero": "not a regular file", "fifo": "not a regular file", "deep": "nested too deeply",
             "twice": "the key 'config' appears twice", "huge": "more than the 1048576-byte limit"}
    for name, message in cases.items():
        summary = tmp_path / name / "summary.json"
        summary.parent.mkdir()
        if name == "zero":
            summary.symlink_to("/dev/zero")
        elif name == "fifo":
            os.mkfifo(summary)
        else:
            summary.write_text({"deep": "[" * 100_000 + "]" * 100_000, "twice": '{"config": {}, "config": {}}',
                                "huge": " " * (2 << 20)}[name])
        assert train_main(["report", str(summary.parent)]) == 1, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{name}/summary.json" in err and message in err, err
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "summary.json").write_text(json.dumps(_summary(model="=HYPERLINK(1)", shards='a,"b')))
    assert train_main(["report", "--csv", str(hostile)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("'=HYPERLINK(1),\"a,\"\"b\"")  # no formula; quoted as RFC 4180 says
    os.mkfifo(tmp_path / "metrics.jsonl")
    with pytest.raises(MetricsError, match="metrics.jsonl: not a regular file"):
        read_metrics(str(tmp_path / "metrics.jsonl"))
    (tmp_path / "cut.jsonl").write_text('{"train/epoch": 0}\n[1]\n{"train/ep')
    assert read_metrics(str(tmp_path / "cut.jsonl")) == [('{"train/epoch": 0}', {"train/epoch": 0})]


def _summary(**fields) -> dict:
    """A summary.json body as fkd-train writes one, with ``fields`` replaced."""
    return {"model": "resnet18", "seed": 0, "shards": "/data/set", "shard_set": "ab" * 32, "epochs": 2,
            "epochs_done": 2, "final_top1": 50.0, "best_top1": 55.0, "best_epoch": 1, "images_per_s": 100.0,
            "wall_s": 10.0, "config": {}, "written_by": "fkd-train 0.3.0"} | fields


@pytest.mark.parametrize("fields,said", [
    ({"shards": ["a", "b"]}, "summary.shards must be a string of at most 4096 characters, found ['a', 'b']"),
    ({"final_top1": 1e308}, "summary.final_top1 must be a finite number in [0, 100] or null, found 1e+308"),
    ({"best_top1": True}, "summary.best_top1 must be a finite number in [0, 100] or null, found True"),
    ({"seed": "0"}, "summary.seed must be an integer >= 0, found '0'"),
    ({"config": None}, "summary.config must be an object, found None"),
    ({"epochs_done": -1}, "summary.epochs_done must be an integer >= 0, found -1"),
])
def test_report_refuses_a_summary_of_other_types_or_absurd_numbers_in_one_line(tmp_path, capsys, fields, said):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for run, body in ((good, _summary()), (bad, _summary(**fields))):
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(body))
    assert train_main(["report", str(good)]) == 0
    capsys.readouterr()
    assert train_main(["report", str(good), str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"fkd-train: error: {bad}/summary.json: {said} (not an fkd-train summary, or edited)"
    (bad / "summary.json").write_text(json.dumps({k: v for k, v in _summary().items() if k != "wall_s"}))
    assert train_main(["report", str(bad)]) == 1
    assert "summary lacks wall_s" in capsys.readouterr().err


def test_help_answers_without_importing_torch(tmp_path):
    for module in ("fkd_shards.train.cli", "fkd_shards.convert.cli"):
        code = (f"import sys\nfrom {module} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                f"print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.stdout.strip().splitlines()[-1] == "NO TORCH", (module, done.stderr[-500:])
        assert "(default:" in done.stdout


def test_no_generic_import_name_is_installed(tmp_path):
    (tmp_path / "train.py").write_text("raise SystemExit('the user file ran')\n")
    code = ("import importlib.util\n"
            "print([n for n in ('train', 'convert', 'shards', 'demo', 'common', 'relabel') "
            "if importlib.util.find_spec(n) is not None and 'fkd' in str(importlib.util.find_spec(n).origin)])\n"
            "import fkd_shards.train.cli, fkd_shards.convert.cli\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["[]", "ok"], done.stderr[-1000:]
    done = subprocess.run([sys.executable, "-m", "fkd_shards.train", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "usage: fkd-train" in done.stdout  # not the user's train.py


def test_timm_students_train_and_a_model_that_cannot_take_the_crops_is_one_line(converted, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    output, _, _ = converted()
    out = tmp_path / "run"
    _run(output, out, "--epochs", "1", "--model", "timm:resnet10t")
    student = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    student.load_state_dict(torch.load(out / "final_weights.pth", weights_only=True))
    _run(output, tmp_path / "deit", "--epochs", "1", "--model", "timm:deit_tiny_patch16_224")  # built for 16 px
    err = _run(output, tmp_path / "vit", "--model", "timm:vit_small_patch32_224", code=1, capsys=capsys)
    assert "--model timm:vit_small_patch32_224 cannot take this set's 16x16 crops" in err
    assert not (tmp_path / "vit" / "checkpoint.pth.tar").exists()


def test_students_with_auxiliary_heads_train_on_their_logits_or_are_refused_up_front(converted, tmp_path):
    from fkd_shards.models.build import ModelError, check_training_output

    output, _, _ = converted()
    _run(output, tmp_path / "googlenet", "--epochs", "1", "--model", "googlenet")  # built without aux heads
    weights = torch.load(tmp_path / "googlenet" / "final_weights.pth", weights_only=True)
    assert not [k for k in weights if k.startswith("aux")]

    class TwoHeadsWhenTraining(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            logits = self.fc(x.mean((2, 3)))
            return (logits, logits) if self.training else logits

    with pytest.raises(ModelError, match="--model two returns tuple, not a tensor of logits, in training mode"):
        check_training_output(TwoHeadsWhenTraining(), "--model two", 16)


def test_a_near_chance_set_is_refused_unless_accepted_at_conversion_or_allowed(relabel_case, tmp_path, capsys):
    from fkd_shards.convert import ConvertOptions, convert
    from tests.conftest import INPUT_SIZE

    train_dir, fkd_path, _, _ = relabel_case(num_classes=10, per_class=4, mix_type="none", batch_size=8, epochs=1)
    accepted = str(tmp_path / "accepted")  # a wrong seed, accepted explicitly
    convert(ConvertOptions(train_dir, fkd_path, accepted, input_size=INPUT_SIZE, fkd_seed=7, min_alignment=0,
                           progress=False), log=lambda *_: None)
    _run(accepted, tmp_path / "a", "--fkd-seed", "7")
    older = str(tmp_path / "older")  # a set written before the threshold was recorded
    shutil.copytree(accepted, older)
    path = os.path.join(older, "manifest.json")
    body = json.load(open(path))
    body.pop("checksum")
    body["min_alignment"] = None
    json.dump(body, open(path, "w"))
    err = _run(older, tmp_path / "b", code=1, capsys=capsys)
    assert "epoch 0's replay alignment is" in err and "--allow-misaligned trains on it anyway" in err
    _run(older, tmp_path / "c", "--allow-misaligned")


@pytest.mark.parametrize("flag", ["--output-dir", "--shards", "--val-dir", "--init-weights"])
def test_very_long_paths_are_one_line_errors(converted, tmp_path, capsys, flag):
    output, _, _ = converted()
    long = str(tmp_path / ("x" * 300) / ("y" * 300))
    argv = {"--output-dir": [], "--shards": [], "--val-dir": ["--val-dir", long],
            "--init-weights": ["--init-weights", long]}[flag]
    shards_dir = long if flag == "--shards" else output
    out = long if flag == "--output-dir" else str(tmp_path / "run")
    assert train_main(["--shards", shards_dir, "--output-dir", out, "-j", "0", "--device", "cpu", *argv]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fkd-train: ")]
    assert len(lines) == 1 and ("File name too long" in lines[0] or "no such file" in lines[0]
                                or "not a usable image folder" in lines[0]), lines


def test_resume_auto_where_no_epoch_finished_starts_the_run(converted, tmp_path):
    output, _, _ = converted()
    out = tmp_path / "run"
    os.makedirs(out / "wandb")  # what a run interrupted in its first epoch leaves, with wandb on
    (out / "metrics.jsonl").write_text("")
    _run(output, out, "--epochs", "1", "--resume", "auto")
    assert checkpoint.load_checkpoint(str(out / "checkpoint.pth.tar"))["epoch"] == 1


def test_another_directorys_checkpoint_is_not_resumed_into_a_run(converted, tmp_path, monkeypatch, capsys):
    output, _, _ = converted()
    _interrupted_run(output, tmp_path / "a", monkeypatch)
    _run(output, tmp_path / "b", "--epochs", "1")
    before = (tmp_path / "b" / "checkpoint.pth.tar").read_bytes()
    err = _run(output, tmp_path / "b", "--resume", str(tmp_path / "a" / "checkpoint.pth.tar"), code=1, capsys=capsys)
    assert "--resume of another directory's checkpoint needs an empty output directory" in err
    assert (tmp_path / "b" / "checkpoint.pth.tar").read_bytes() == before
    _run(output, tmp_path / "c", "--resume", str(tmp_path / "a" / "checkpoint.pth.tar"))  # into an empty one: fine


def test_a_micro_batch_of_one_image_under_batch_norm_is_refused_before_training(converted, tmp_path, capsys):
    output, _, _ = converted(batch_size=19, epochs=1)  # N=20: the last batch has 1 row; 16 px reach 1x1 in resnet18
    err = _run(output, tmp_path / "run", code=1, capsys=capsys)
    assert "--model resnet18 cannot batch-normalise a single image at 16x16" in err
    assert "the last batch of each epoch holds 1 row(s) (N = 20, B = 19), which leaves a micro-batch of 1 row; " \
           "no --gradient-accumulation-steps avoids it" in err
    assert not (tmp_path / "run" / "checkpoint.pth.tar").exists()
    output, _, _ = converted(batch_size=8, epochs=1, name="eights")  # N=20: 8, 8, 4 rows
    err = _run(output, tmp_path / "a8", "--gradient-accumulation-steps", "8", code=1, capsys=capsys)
    assert "B / (ranks x --gradient-accumulation-steps) = 8 / (1 x 8) = 1 row; --gradient-accumulation-steps 1 " \
           "or 2 or 4 avoids it" in err
    from fkd_shards.batches.plan import micro_batch_sizes, single_row_micro_batch

    assert micro_batch_sizes(19, 20, 1, 19) == {19, 1}
    # Ranks take B / W rows each, in order: 8, 8, 4 rows over 2 ranks leave rank 1 empty in the last batch.
    assert micro_batch_sizes(8, 20, 2, 2) == {2}
    assert micro_batch_sizes(8, 20, 2, 4) == {4}
    assert micro_batch_sizes(8, 18, 2, 4) == {4, 2}
    assert micro_batch_sizes(8, 17, 2, 4) == {4, 1}
    assert micro_batch_sizes(12, 23, 2, 3) == {3, 2}  # the last batch's 11 rows: 6 (3 + 3) and 5 (3 + 2)
    assert single_row_micro_batch(8, 29, 1, 4).endswith("N = 29, B = 8), which leaves a micro-batch of 1 row; "
                                                        "--gradient-accumulation-steps 1 avoids it")  # 5 = 4 + 1
    assert single_row_micro_batch(8, 20, 2, 2) is None


def test_validation_images_must_be_regular_files(converted, tmp_path, capsys):
    output, samples, _ = converted()
    val = tmp_path / "val"
    shutil.copytree(os.path.dirname(os.path.dirname(samples[0][0])), val)
    fifo = val / "new001" / sorted(os.listdir(val / "new001"))[0]
    os.remove(fifo)
    os.mkfifo(fifo)  # reading it would block for ever
    err = _run(output, tmp_path / "run", "--epochs", "1", "--val-dir", str(val), code=1, capsys=capsys)
    assert f"{fifo}: not a regular file (a FIFO)" in err


def test_outputs_may_not_lie_inside_the_shard_set_and_workers_are_bounded(converted, tmp_path, capsys):
    output, _, _ = converted()
    before = sorted(os.listdir(output))
    for inside in (output, os.path.join(output, "run")):
        err = _run(output, inside, code=1, capsys=capsys)
        assert f"--output-dir {inside} is, or is inside, the shard set {output}" in err
    assert sorted(os.listdir(output)) == before
    with pytest.raises(SystemExit):
        train_main(["--shards", output, "--output-dir", str(tmp_path / "r"), "-j", "100000"])
    assert "argument -j/--workers: must be in [0, 256], got 100000" in capsys.readouterr().err


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
def test_running_out_of_memory_in_a_step_is_one_line(converted, tmp_path, monkeypatch, capsys, error):
    output, _, _ = converted()

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "train_step", exhausted)
    err = _run(output, tmp_path / "run", code=1, capsys=capsys)
    assert "out of memory at epoch 0 batch 0: a smaller micro-batch (--gradient-accumulation-steps) or --amp bf16" \
        in err
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError keeps its traceback
        _run(output, tmp_path / "other")


@pytest.mark.parametrize("kind", ["meta", "sparse", "float8", "complex"])
def test_weights_files_with_tensors_that_are_not_plain_are_one_line_everywhere(converted, relabel_case, tmp_path,
                                                                                capsys, kind):
    from fkd_shards.relabel.cli import main as relabel_main

    output, _, _ = converted()
    weights = torchvision.models.resnet18(num_classes=4).state_dict()
    odd = {"meta": lambda t: torch.empty_like(t, device="meta"), "sparse": lambda t: t.to_sparse(),
           "float8": lambda t: t.to(torch.float8_e4m3fn), "complex": lambda t: t.to(torch.complex64)}[kind]
    weights["fc.weight"] = odd(weights["fc.weight"])
    path = tmp_path / "odd.pth"
    torch.save(weights, path)
    train_dir = relabel_case(name="teach")[0]
    for argv, main in ((["--shards", output, "--output-dir", str(tmp_path / "run"), "-j", "0", "--device", "cpu",
                         "--init-weights", str(path)], train_main),
                       (["export", str(path), str(tmp_path / "out.pth")], train_main),
                       (["--train-dir", train_dir, "--output", str(tmp_path / "labels"), "--teacher", "resnet18",
                         str(path), "--batch-size", "6", "--epochs", "1", "--input-size", "16", "--device", "cpu", "-j",
                         "0"], relabel_main)):
        assert main(argv) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and f"odd.pth: fc.weight is a {kind.replace('float8', 'float8_e4m3fn')}" in errors[0] \
            and "only dense tensors of float, integer or bool dtypes are loaded" in errors[0], errors
    assert not (tmp_path / "out.pth").exists() and not (tmp_path / "run" / "checkpoint.pth.tar").exists()
    assert not (tmp_path / "labels" / "manifest.json").exists()


def test_no_progress_leaves_the_epoch_lines_only(converted, tmp_path, capsys):
    output, _, _ = converted()
    _run(output, tmp_path / "bars", "--epochs", "1")
    assert "epoch 0:" in capsys.readouterr().err  # the bar
    _run(output, tmp_path / "quiet", "--epochs", "1", "--no-progress")
    said = capsys.readouterr()
    assert "epoch 0:" not in said.err and "\r" not in said.err and "TRAIN Iter 0" in said.out


def test_export_of_a_run_directory_takes_its_best_checkpoint_and_says_which(converted, tmp_path, capsys):
    output, samples, _ = converted()
    val = os.path.dirname(os.path.dirname(samples[0][0]))
    out = tmp_path / "run"
    _run(output, out, "--epochs", "2", "--val-dir", val, "--val-every", "1")
    capsys.readouterr()
    best = torch.load(out / "model_best.pth.tar", weights_only=True)
    assert train_main(["export", str(out), str(tmp_path / "w.pth")]) == 0
    said = capsys.readouterr().out
    assert f"from {out / 'model_best.pth.tar'} (after epoch {best['epoch'] - 1}, best top-1 so far " \
           f"{best['best_acc1']:.2f}%)" in said
    assert _same(_weights(tmp_path / "w.pth"), best["state_dict"])
    (tmp_path / "empty").mkdir()
    assert train_main(["export", str(tmp_path / "empty"), str(tmp_path / "x.pth")]) == 1
    assert "holds neither model_best.pth.tar nor checkpoint.pth.tar (not a run directory)" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_a_validation_folder_that_cannot_be_used_leaves_no_output_directory(converted, tmp_path, capsys):
    output, _, _ = converted()
    (tmp_path / "val" / "other").mkdir(parents=True)
    err = _run(output, tmp_path / "run", "--val-dir", str(tmp_path / "val"), code=1, capsys=capsys)
    assert "not a usable image folder" in err or "class folders differ" in err
    assert not (tmp_path / "run").exists()  # refused before the output directory was made


def test_torch_threads_are_the_cpus_left_after_the_crop_workers_unless_asked(converted, tmp_path, capsys,
                                                                             monkeypatch):
    from fkd_shards.common import threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    assert threads.torch_threads(6, None, {})[0] == 8 and threads.torch_threads(16, None, {})[0] == 8
    assert threads.torch_threads(6, 5, {"OMP_NUM_THREADS": "3"})[0] == 5  # --threads wins
    assert threads.torch_threads(2, None, {"OMP_NUM_THREADS": "3"}) == \
        (3, "threads: 3 torch thread(s) beside 2 crop worker process(es) on 8 CPU(s) (OMP_NUM_THREADS)")
    output, _, _ = converted()
    monkeypatch.delenv("OMP_NUM_THREADS")
    _run(output, tmp_path / "run", "--epochs", "1", "-j", "2")
    assert "threads: 8 torch thread(s) beside 2 crop worker process(es) on 8 CPU(s) (one per CPU; --threads sets " \
           "it); 10 busy processes and threads on 8 CPU(s): on a loaded machine fewer" in capsys.readouterr().out
    assert torch.get_num_threads() == 8
    torch.set_num_threads(1)
    with pytest.raises(SystemExit):
        _run(output, tmp_path / "zero", "--threads", "0")
    assert "argument --threads: must be in [1, 1024], got 0" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    err = _run(output, tmp_path / "env", code=1, capsys=capsys)
    assert "OMP_NUM_THREADS='many' is not a number of threads" in err
    torch.set_num_threads(1)


def test_every_run_keeps_its_curves_redrawn_each_epoch(converted, tmp_path, capsys):
    output, samples, _ = converted()
    val = os.path.dirname(os.path.dirname(samples[0][0]))
    out = tmp_path / "run"
    _run(output, out, "--epochs", "2", "--val-dir", val, "--val-every", "1")
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"train/epoch": "x", "train/loss": [1]}\n')  # a hand-edited line is left out of the picture
    from fkd_shards.train.curves import draw_curves

    os.remove(out / "curves.png")
    draw_curves(str(out), "again")
    assert (out / "curves.png").exists()
    _run(output, out, "--epochs", "1", "--restart")
    assert (out / "previous-1" / "curves.png").exists() and (out / "curves.png").exists()
