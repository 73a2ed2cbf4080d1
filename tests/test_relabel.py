"""fkd-relabel: labels of exactly what the student sees, SRe2L's draws, replay bit for bit, ensembles,
batch-norm modes, determinism across workers, ranks and resumes, and every bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from fkd_shards import shards
from fkd_shards.batches import draws
from fkd_shards.batches.stream import BatchStream
from fkd_shards.demo.example import make_image_folder
from fkd_shards.relabel.cli import main as relabel_main
from tests.reference_relabel import write_sre2l_relabel

SIZE = 16


@pytest.fixture
def case(tmp_path):
    """An image folder of 4 classes x 5 images of several sizes and modes, and two teachers."""
    train = str(tmp_path / "train")
    samples = make_image_folder(train, 4, 5)
    teachers = {}
    for name, seed in (("resnet18", 1), ("mobilenet_v3_small", 2)):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, num_classes=4)
        if name == "resnet18":  # batch-norm statistics other than 0 and 1, so that the bn modes differ
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        path = str(tmp_path / f"{name}.pth")
        torch.save(model.state_dict(), path)
        teachers[name] = (path, model.eval())
    return tmp_path, train, samples, teachers


def _relabel(train, out, *flags, code=0, teachers=(("resnet18", None),), capsys=None):
    # Untrained teachers: any alignment is accepted, of the new labels and of --replay's files alike.
    argv = ["--train-dir", train, "--output", str(out), "--input-size", str(SIZE), "--min-alignment", "0", "-j", "0",
            "--device", "cpu", "--no-progress", *flags,
            *(["--min-replay-alignment", "0"] if "--replay" in flags else [])]
    for name, path in teachers:
        argv += ["--teacher", name, path]
    assert relabel_main(argv) == code
    if capsys is not None:
        err = capsys.readouterr().err.strip()
        assert code == 0 or len(err.splitlines()) == 1, err
        return err
    return None


def _label_hashes(out) -> dict:
    m = shards.ShardSet(str(out)).manifest
    return {s.name: s.sha256 for s in m.shards}


@pytest.mark.parametrize("mix_type", ["cutmix", "mixup", "none"])
def test_labels_are_the_teacher_on_exactly_the_students_input(case, mix_type):
    tmp, train, _, teachers = case
    path, teacher = teachers["resnet18"]
    out = tmp / "set"
    _relabel(train, out, "--batch-size", "6", "--epochs", "2", "--mix-type", mix_type,
             teachers=[("resnet18", path)])
    seen = 0
    with torch.no_grad():
        for b in BatchStream(shards.ShardSet(str(out)), workers=0):
            expected = teacher(b.model_input()).half().float()
            assert torch.equal(b.soft_labels, expected), (b.epoch, b.batch)
            seen += 1
    assert seen == 2 * 4
    m = shards.ShardSet(str(out)).manifest
    assert m.mix_type == mix_type and m.soft_label_dtype == "float16" and m.created_by.startswith("fkd-relabel")
    (info,) = m.relabel["teachers"]
    assert info["weights_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert m.relabel["versions"]["torch"] == torch.__version__ and m.relabel["seed"] == 0
    # Float32 precision is set, not inherited from torch's defaults, and recorded.
    assert (m.relabel["tf32"], m.relabel["cudnn_benchmark"]) == (False, False)


@pytest.mark.parametrize("mix_type", ["cutmix", "mixup", "none"])
def test_replay_gives_the_original_relabel_steps_labels_bit_for_bit(case, mix_type, capsys):
    tmp, train, samples, teachers = case
    path, teacher = teachers["resnet18"]
    fkd = str(tmp / "fkd")
    write_sre2l_relabel(train, fkd, teacher, epochs=2, batch_size=6, input_size=SIZE, mix_type=mix_type)
    out = tmp / "replayed"
    _relabel(train, out, "--replay", fkd, teachers=[("resnet18", path)])
    records = list(shards.ShardSet(str(out)).batches())
    assert len(records) == 8
    for record in records:
        coords, flips, mix_index, lam, bbox, soft = torch.load(
            os.path.join(fkd, f"epoch_{record.epoch}", f"batch_{record.batch}.tar"), weights_only=False)
        assert record.soft_labels.tobytes() == soft.numpy().tobytes(), (record.epoch, record.batch)
        assert record.coords.tobytes() == coords.numpy().tobytes() and record.flips.tolist() == flips.tolist()
        assert record.mix_lam == lam and (mix_index is None or record.mix_index.tolist() == mix_index.tolist())
    m = shards.ShardSet(str(out)).manifest
    assert (m.batch_size, m.epochs, m.mix_type, m.relabel["replay"]) == (6, 2, mix_type, fkd)


def test_workers_and_resume_give_the_same_bytes(case, monkeypatch):
    tmp, train, _, teachers = case
    flags = ("--batch-size", "6", "--epochs", "3", "--shard-size", "3000")
    t = [("resnet18", teachers["resnet18"][0])]
    _relabel(train, tmp / "j0", *flags, teachers=t)
    _relabel(train, tmp / "j2", *flags, "-j", "2", teachers=t)
    straight = _label_hashes(tmp / "j0")
    assert len([n for n in straight if n.startswith("labels-")]) > 3 and _label_hashes(tmp / "j2") == straight
    _killed_at_the_seventh_batch(monkeypatch, train, tmp / "resumed", flags, t)
    assert "progress.json" in os.listdir(tmp / "resumed") and "manifest.json" not in os.listdir(tmp / "resumed")
    _relabel(train, tmp / "resumed", *flags, "--resume", teachers=t)
    assert _label_hashes(tmp / "resumed") == straight
    resumed, whole = (shards.ShardSet(str(tmp / name)).manifest for name in ("resumed", "j0"))
    assert resumed.alignment == whole.alignment


def _killed_at_the_seventh_batch(monkeypatch, train, out, flags, teachers) -> None:
    """A run that dies as it writes its 7th batch (as a crash would: no clean-up beyond the writer's)."""
    from fkd_shards.relabel.output import LabelWriter

    real, calls = LabelWriter.write, []

    def crash(self, record, *args):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("killed")
        return real(self, record, *args)

    monkeypatch.setattr(LabelWriter, "write", crash)
    with pytest.raises(RuntimeError, match="killed"):
        _relabel(train, out, *flags, teachers=teachers)
    monkeypatch.setattr(LabelWriter, "write", real)


def test_resume_refuses_other_flags_and_a_changed_image_folder(case, monkeypatch, capsys):
    tmp, train, samples, teachers = case
    flags = ("--batch-size", "6", "--epochs", "2", "--shard-size", "3000")
    t = [("resnet18", teachers["resnet18"][0])]
    from fkd_shards.relabel.output import LabelWriter

    real = LabelWriter.write
    monkeypatch.setattr(LabelWriter, "write", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    for name in ("early", "other-flags", "other-images"):  # each killed before any label shard closed
        with pytest.raises(RuntimeError):
            _relabel(train, tmp / name, *flags, teachers=t)
    monkeypatch.setattr(LabelWriter, "write", real)
    _relabel(train, tmp / "early", *flags, "--resume", teachers=t)  # the images are kept; the labels continue
    assert shards.ShardSet(str(tmp / "early")).manifest.epochs == 2
    err = _relabel(train, tmp / "other-flags", *flags, "--resume", "--seed", "5", teachers=t, code=1, capsys=capsys)
    assert "was written with other settings (seed: 0 then, 5 now)" in err
    err = _relabel(train, tmp / "other-flags", *flags, "--resume", "--seed", "5", "--crop-scale", "0.5", "1",
                   teachers=t, code=1, capsys=capsys)
    assert "other settings (crop_scale: [0.08, 1.0] then, [0.5, 1.0] now; seed: 0 then, 5 now)" in err  # both
    Image.new("RGB", (20, 20), "red").save(samples[3][0])
    err = _relabel(train, tmp / "other-images", *flags, "--resume", teachers=t, code=1, capsys=capsys)
    assert "other settings (images:" in err


def test_replay_checks_its_files_as_fkd_convert_does_and_a_resume_finds_them_changed(case, monkeypatch, capsys):
    from fkd_shards.convert.imagefolder import list_image_folder
    from fkd_shards.convert.replay import epoch_orders

    tmp, train, _, teachers = case
    t = [("resnet18", teachers["resnet18"][0])]
    fkd = str(tmp / "fkd")
    write_sre2l_relabel(train, fkd, teachers["resnet18"][1], epochs=2, batch_size=6, input_size=SIZE, mix_type="none")
    # Soft labels that name each crop's class under the replay of --fkd-seed 42, as a trained teacher's would.
    labels = np.asarray(list_image_folder(train).labels)
    for epoch, order in enumerate(epoch_orders(len(labels), 42, 2)):
        for b in range(4):
            path = os.path.join(fkd, f"epoch_{epoch}", f"batch_{b}.tar")
            item = torch.load(path, weights_only=False)
            item[5] = torch.nn.functional.one_hot(torch.from_numpy(labels[order[b * 6:(b + 1) * 6]]), 4).half()
            torch.save(item, path)
    strict = ["--train-dir", train, "--input-size", str(SIZE), "-j", "0", "--device", "cpu", "--no-progress",
              "--teacher", *t[0], "--replay", fkd]
    # The replay check passes on the files' own labels; the untrained teacher's new labels then fail theirs.
    assert relabel_main([*strict, "--output", str(tmp / "good")]) == 1
    out, err = capsys.readouterr()
    assert "replay alignment (teacher argmax = image class or mix partner's): mean 1.000" in out
    assert "teacher argmax is the image's class or its partner's" in err
    assert relabel_main([*strict, "--output", str(tmp / "seed"), "--fkd-seed", "7"]) == 1
    assert "epoch 0's replay alignment" in capsys.readouterr().err and not (tmp / "seed" / "manifest.json").exists()
    # Accepting any alignment of the new labels leaves the check of the replayed files on: its own flag.
    assert relabel_main([*strict, "--output", str(tmp / "seed"), "--fkd-seed", "7", "--min-alignment", "0"]) == 1
    assert "(the default threshold, a quarter of the way from chance to 1): wrong --fkd-seed" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        relabel_main([*strict, "--output", str(tmp / "any"), "--min-replay-alignment", "-1"])
    assert "argument --min-replay-alignment: must be in [0, 1], got -1" in capsys.readouterr().err
    _killed_at_the_seventh_batch(monkeypatch, train, tmp / "resumed", ["--replay", fkd], t)
    later = os.path.join(fkd, "epoch_1", "batch_3.tar")  # not yet labelled when the run was killed
    item = torch.load(later, weights_only=False)
    torch.save([item[0] * 0.5, *item[1:]], later)
    err = _relabel(train, tmp / "resumed", "--replay", fkd, "--resume", teachers=t, code=1, capsys=capsys)
    assert "was written with other settings (replay_files:" in err
    shutil.copyfile(os.path.join(fkd, "epoch_1", "batch_0.tar"), os.path.join(fkd, "epoch_1", "batch_1.tar"))
    err = _relabel(train, tmp / "copied", "--replay", fkd, teachers=t, code=1, capsys=capsys)
    assert "epoch_1/batch_1.tar: the same bytes as" in err and not (tmp / "copied").exists()


def test_an_ensemble_stores_the_weighted_sum_in_the_given_order(case):
    tmp, train, _, teachers = case
    (p1, m1), (p2, m2) = teachers["resnet18"], teachers["mobilenet_v3_small"]
    out = tmp / "ensemble"
    _relabel(train, out, "--batch-size", "6", "--epochs", "1", "--teacher-mix", "0.7,0.3", "--label-dtype", "float32",
             teachers=[("resnet18", p1), ("mobilenet_v3_small", p2)])
    with torch.no_grad():
        for b in BatchStream(shards.ShardSet(str(out)), workers=0):
            x = b.model_input()
            assert torch.equal(b.soft_labels, 0.7 * m1(x) + 0.3 * m2(x))
    m = shards.ShardSet(str(out)).manifest
    assert [t["mix_weight"] for t in m.relabel["teachers"]] == [0.7, 0.3]


def test_bn_train_mode_uses_batch_statistics_and_leaves_the_teacher_untouched(case):
    tmp, train, _, teachers = case
    path, teacher = teachers["resnet18"]
    before = open(path, "rb").read()
    flags = ("--batch-size", "5", "--epochs", "1", "--label-dtype", "float32")  # chunks of 3 and 2 images
    _relabel(train, tmp / "eval", *flags, teachers=[("resnet18", path)])
    _relabel(train, tmp / "bn-train", *flags, "--bn-mode", "train", "--teacher-chunks", "2",
             teachers=[("resnet18", path)])
    assert open(path, "rb").read() == before
    eval_set, train_set = (list(BatchStream(shards.ShardSet(str(tmp / n)), workers=0)) for n in ("eval", "bn-train"))
    reference = torchvision.models.resnet18(num_classes=4)
    reference.load_state_dict(torch.load(path, weights_only=True))
    buffers = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.train()  # batch statistics, per half-batch chunk, as --bn-mode train --teacher-chunks 2
    with torch.no_grad():
        for a, b in zip(eval_set, train_set):
            assert not torch.equal(a.soft_labels, b.soft_labels)
            x = b.model_input()
            halves = [reference(part) for part in torch.chunk(x, 2)]
            assert torch.allclose(b.soft_labels, torch.cat(halves), atol=1e-5)
    assert any(not torch.equal(buffers[k], v) for k, v in reference.state_dict().items())  # train() does update them


def _expected_area(low: float, tries: int = 10, samples: int = 200_000) -> float:
    """Mean area fraction of RandomResizedCrop on a square image, simulated in numpy from its
    definition: area ~ U(low, 1), log aspect ~ U(log 3/4, log 4/3), kept when both sides fit, up to
    ten tries, else the whole image."""
    rng = np.random.default_rng(0)
    area = np.ones(samples)
    pending = np.ones(samples, dtype=bool)
    for _ in range(tries):
        a = rng.uniform(low, 1.0, samples)
        r = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), samples))
        fits = pending & (np.sqrt(a * r) <= 1) & (np.sqrt(a / r) <= 1)
        area[fits] = a[fits]
        pending &= ~fits
    return float(area.mean())


def test_the_draws_are_torchvisions_and_have_the_right_distributions():
    for seed in range(200):
        height, width = [(224, 224), (17, 31), (400, 90), (90, 400), (5, 5)][seed % 5]
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), (0.08, 1.0), (3 / 4, 4 / 3))
        assert draws.crop_box(height, width, (0.08, 1.0), torch.Generator().manual_seed(seed)) == expected
    shapes = np.array([[224, 224]] * 64)
    flips, lams, areas, mixups = [], [], [], []
    for b in range(60):
        d = draws.draw_batch(shapes, 0, 0, b, scale=(0.25, 1.0), mix_type="cutmix", input_size=224)
        flips += d.flips.tolist()
        lams.append(d.mix_lam)
        areas += (d.coords[:, 2] * d.coords[:, 3]).tolist()
        assert sorted(d.mix_index.tolist()) == list(range(64))
        x1, y1, x2, y2 = d.mix_bbox
        assert 0 <= x1 <= x2 <= 224 and 0 <= y1 <= y2 <= 224
        mixups.append(draws.draw_batch(shapes, 0, 1, b, scale=(0.25, 1.0), mix_type="mixup", input_size=224).mix_lam)
    n = len(flips)
    assert abs(np.mean(flips) - 0.5) < 4 * math.sqrt(0.25 / n)
    assert 0.25 - 0.02 <= min(areas) and max(areas) <= 1.0 + 0.02  # whole pixels: the fraction is near the range
    assert abs(np.mean(areas) - _expected_area(0.25)) < 0.02
    assert abs(np.mean(lams) - 0.5) < 4 * math.sqrt(1 / 12 / 60) and abs(np.var(lams) - 1 / 12) < 0.04
    assert abs(np.mean(mixups) - 0.5) < 4 * math.sqrt(0.0962 / 60)
    # Every batch has its own generators: the same (seed, epoch, batch) draws the same; others differ.
    knobs = {"scale": (0.08, 1), "mix_type": "cutmix", "input_size": 224}
    a, b = draws.draw_batch(shapes, 7, 3, 2, **knobs), draws.draw_batch(shapes, 7, 3, 2, **knobs)
    c = draws.draw_batch(shapes, 7, 3, 3, **knobs)
    assert np.array_equal(a.coords, b.coords) and a.mix_lam == b.mix_lam and not np.array_equal(a.coords, c.coords)


def test_fkd_train_trains_on_a_relabelled_set(case, tmp_path):
    from fkd_shards.train.cli import main as train_main

    _, train, _, teachers = case
    out = tmp_path / "set"
    _relabel(train, out, "--batch-size", "6", "--epochs", "2", teachers=[("resnet18", teachers["resnet18"][0])])
    assert train_main(["--shards", str(out), "--output-dir", str(tmp_path / "run"), "-j", "0", "--device", "cpu",
                       "--allow-misaligned"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_done"] == 2


@pytest.mark.parametrize("setup,message", [
    ("classes", "--teacher resnet18 {p}: 3 classes, but {train} has 4 class folders"),
    ("wrong_model", "does not fit --teacher resnet34"),
    ("inf_logits", "the teachers' logits are not all finite"),
    ("replay_seed", "--seed do(es) not apply with --replay"),
    ("replay_batch", "--batch-size 4 contradicts"),
    ("mix_count", "--teacher-mix has 1 weights for 2 teachers"),
    ("no_such_model", "--teacher no_such_net is not a torchvision.models classification model"),
    ("bad_device", "--device 'tpu:0' is not a device"),
    ("missing_weights", "neither a file nor a torchvision weights name"),
    ("no_batch_size", "--batch-size and --epochs are required"),
    ("misaligned", "Likely causes, most common first: a crop size (--input-size) or crop scale (--crop-scale)"),
    ("small_crops", "--teacher squeezenet1_0 cannot take this set's 16x16 crops (Given input size"),
    ("zero_mix", "--teacher-mix 0: every weight is 0, so every soft label would be 0"),
    ("tiny_mix", "below float16's smallest normal number 6.1e-05: its stored labels would be (almost) all 0; scale "
                 "--teacher-mix 1e-30 up, or --label-dtype float32"),
    ("one_row_chunks", "--teacher resnet18 --bn-mode train cannot normalise a chunk of one image at 16x16"),
    ("chunks_over_batch", "--teacher-chunks 7 is more than a batch's 6 rows"),
    ("mix_underscore", "--teacher-mix 1_0: expected 'mean' or comma-separated numbers"),
])
def test_bad_input_is_one_line_and_leaves_nothing_complete(case, capsys, setup, message):
    tmp, train, _, teachers = case
    path = teachers["resnet18"][0]
    t = [("resnet18", path)]
    flags = ["--batch-size", "6", "--epochs", "1"]
    if setup == "classes":
        torch.manual_seed(0)
        path = str(tmp / "three.pth")
        torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
        t = [("resnet18", path)]
    elif setup == "wrong_model":
        t = [("resnet34", path)]
    elif setup == "inf_logits":
        state = torch.load(path, weights_only=True)
        state["fc.weight"] *= 1e38
        path = str(tmp / "huge.pth")
        torch.save(state, path)
        t = [("resnet18", path)]
    elif setup in ("replay_seed", "replay_batch"):
        fkd = str(tmp / "fkd")
        write_sre2l_relabel(train, fkd, teachers["resnet18"][1], epochs=1, batch_size=6, input_size=SIZE,
                            mix_type="cutmix")
        flags = ["--replay", fkd, *(["--seed", "3"] if setup == "replay_seed" else ["--batch-size", "4"])]
    elif setup == "mix_count":
        t = [("resnet18", path), ("mobilenet_v3_small", teachers["mobilenet_v3_small"][0])]
        flags += ["--teacher-mix", "1.0"]
    elif setup == "no_such_model":
        t = [("no_such_net", path)]
    elif setup == "bad_device":
        flags += ["--device", "tpu:0"]
    elif setup == "missing_weights":
        t = [("resnet18", "nowhere")]
    elif setup == "no_batch_size":
        flags = ["--epochs", "1"]
    elif setup == "small_crops":  # its last max-pool has no output at 16 px
        path = str(tmp / "squeeze.pth")
        torch.save(torchvision.models.squeezenet1_0(num_classes=4).state_dict(), path)
        t = [("squeezenet1_0", path)]
    elif setup == "zero_mix":
        flags += ["--teacher-mix", "0"]
    elif setup == "tiny_mix":  # finite, not zero, and every stored float16 label would be 0
        flags += ["--teacher-mix", "1e-30"]
    elif setup == "one_row_chunks":  # resnet18's last feature maps are 1x1 at 16 px
        flags += ["--bn-mode", "train", "--teacher-chunks", "6"]
    elif setup == "chunks_over_batch":
        flags += ["--teacher-chunks", "7"]
    elif setup == "mix_underscore":  # float() would read it as 10
        flags += ["--teacher-mix", "1_0"]
    out = tmp / "out"
    argv = ["--train-dir", train, "--output", str(out), "--input-size", str(SIZE), "-j", "0",
            *([] if setup == "bad_device" else ["--device", "cpu"]), "--no-progress", *flags,
            *(["--min-alignment", "0"] if setup != "misaligned" else [])]
    for name, p in t:
        argv += ["--teacher", name, p]
    assert relabel_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fkd-relabel: error: "), err
    assert message.format(p=path, train=train) in err, err
    assert not os.path.exists(out / "manifest.json")
    # These are found before any output is made.
    if setup in ("small_crops", "zero_mix", "one_row_chunks", "chunks_over_batch", "mix_underscore"):
        assert not os.path.exists(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_write_the_same_shards_as_one_process(case):
    tmp, train, _, teachers = case
    flags = ["--train-dir", train, "--input-size", str(SIZE), "--min-alignment", "0", "-j", "0", "--device", "cpu",
             "--no-progress", "--batch-size", "6", "--epochs", "2", "--teacher", "resnet18", teachers["resnet18"][0]]
    assert relabel_main([*flags, "--output", str(tmp / "one")]) == 0
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
                          "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "fkd_shards.relabel",
                          *flags, "--output", str(tmp / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _label_hashes(tmp / "two") == _label_hashes(tmp / "one")


def test_an_output_inside_the_image_folder_and_ctrl_c_are_one_line(case, monkeypatch, capsys):
    tmp, train, _, teachers = case
    t = [("resnet18", teachers["resnet18"][0])]
    before = sorted(os.listdir(train))
    inside = os.path.join(train, "labels")
    err = _relabel(train, inside, "--batch-size", "6", "--epochs", "1", code=1, teachers=t, capsys=capsys)
    assert err == f"fkd-relabel: error: --output {inside}: is, or is inside, --train-dir {train}; choose another " \
                  "directory"
    assert sorted(os.listdir(train)) == before
    from fkd_shards.relabel.output import LabelWriter

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real = LabelWriter.write
    monkeypatch.setattr(LabelWriter, "write", interrupted)
    flags = ("--batch-size", "6", "--epochs", "1")
    assert _relabel(train, tmp / "out", *flags, code=130, teachers=t, capsys=capsys) == \
        "fkd-relabel: interrupted; no manifest written; finished shards are kept: continue with --resume"
    assert "manifest.json" not in os.listdir(tmp / "out")
    monkeypatch.setattr(LabelWriter, "write", real)
    _relabel(train, tmp / "out", *flags, "--resume", teachers=t)
    _relabel(train, tmp / "whole", *flags, teachers=t)
    assert _label_hashes(tmp / "out") == _label_hashes(tmp / "whole")


def test_alignment_is_counted_on_the_labels_as_stored_so_a_resume_records_the_same(case, monkeypatch):
    from fkd_shards.shards.alignment import batch_hits

    tmp, train, samples, teachers = case
    state = torch.load(teachers["resnet18"][0], weights_only=True)
    # Three logits near 1 and one at -100: int8's step, 101 / 255, makes the three one value (a tie,
    # argmax 0) where float16 still tells them apart; the stored labels' argmax differs from the logits'.
    state["fc.weight"] *= 0.1
    state["fc.bias"][:] = torch.tensor([1.0, 1.0, 1.0, -100.0])
    flat = str(tmp / "flat.pth")
    torch.save(state, flat)
    t = [("resnet18", flat)]
    flags = ("--batch-size", "6", "--epochs", "3", "--label-codec", "int8", "--shard-size", "3000")
    _relabel(train, tmp / "straight", *flags, teachers=t)
    stored = shards.ShardSet(str(tmp / "straight"))
    labels = np.array([label for _, label in samples])
    hits = [0, 0, 0]
    for r in stored.batches():
        hits[r.epoch] += batch_hits(labels, r.indices, r.soft_labels.astype(np.float32).argmax(1), r.mix_index)
    assert stored.manifest.alignment == [round(h / len(samples), 6) for h in hits]
    _killed_at_the_seventh_batch(monkeypatch, train, tmp / "resumed", flags, t)
    _relabel(train, tmp / "resumed", *flags, "--resume", teachers=t)
    assert shards.ShardSet(str(tmp / "resumed")).manifest == stored.manifest


def test_a_refusal_on_rank_0_alone_stops_both_ranks_with_one_line(case):
    tmp, train, _, teachers = case
    flags = ["--train-dir", train, "--input-size", str(SIZE), "--min-alignment", "0", "-j", "0", "--device", "cpu",
             "--no-progress", "--batch-size", "6", "--epochs", "1", "--teacher", "resnet18", teachers["resnet18"][0],
             "--output", str(tmp / "set")]
    assert relabel_main(flags) == 0
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    # Rank 0 alone owns the output, and refuses to write over a finished set; rank 1 must not wait for it.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
                          "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "fkd_shards.relabel",
                          *flags], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("fkd-relabel: error:")]
    assert len(errors) == 1 and str(tmp / "set") in errors[0], run.stderr[-3000:]
