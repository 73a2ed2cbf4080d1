"""--check-teacher: the relabel teacher, run again on the stored model input, tells the right image
folder from another one of the same classes and images per class, which the replay alignment cannot."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torchvision

from fkd_shards import shards
from fkd_shards.convert.cli import main as convert_main
from fkd_shards.demo.example import make_image_folder
from fkd_shards.train.cli import main as train_main
from tests.reference_relabel import write_sre2l_relabel
from tests.tamper import write_sealed

SIZE = 16


@pytest.fixture
def two_folders(tmp_path):
    """Folders A and B of the same layout (4 classes x 5 images, other pixels), A's relabel output
    written by the reference relabel step with a teacher, and that teacher's weights file."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_image_folder(a, 4, 5, seed=0)
    make_image_folder(b, 4, 5, seed=1)
    torch.manual_seed(1)
    teacher = torchvision.models.get_model("resnet18", num_classes=4)
    for m in teacher.modules():  # running statistics other than 0 and 1: logits that vary with the pixels
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    weights = str(tmp_path / "teacher.pth")
    torch.save(teacher.state_dict(), weights)
    fkd = str(tmp_path / "fkd")
    write_sre2l_relabel(a, fkd, teacher.eval(), epochs=2, batch_size=6, input_size=SIZE, mix_type="cutmix")
    return tmp_path, a, b, fkd, weights


def _convert(train, fkd, out, *flags) -> int:
    # The untrained teacher's argmax is not the class: the class-rank check is switched off, as a
    # trained teacher on either folder would pass it.
    return convert_main(["--train-dir", train, "--fkd-path", fkd, "--output", str(out), "--input-size", str(SIZE),
                         "--min-alignment", "0", "--workers", "1", "--no-progress", *flags])


def test_the_right_folder_is_proven_exact_and_recorded(two_folders, capsys):
    tmp, a, _, fkd, weights = two_folders
    out = tmp / "right"
    assert _convert(a, fkd, out, "--check-teacher", "resnet18", weights, "--check-batches", "3") == 0
    said = capsys.readouterr().out
    assert "teacher check: resnet18 recomputed 3 batch(es) on the stored images: exact" in said
    check = shards.ShardSet(str(out)).manifest.teacher_check
    assert check["result"] == "exact" and check["largest_difference"] == 0.0
    assert check["batches"] == [[0, 0], [1, 0], [1, 3]]  # positions 0, 4, 7 of 2 epochs x 4 batches
    assert check["weights_sha256"] == __import__("hashlib").sha256(open(weights, "rb").read()).hexdigest()
    # fkd-train's inspect and start-up say how the images were proven
    assert train_main(["inspect", str(out)]) == 0
    assert "images proven   by the relabel teacher resnet18: 3 batches recomputed, exact" in capsys.readouterr().out
    assert train_main(["--shards", str(out), "--output-dir", str(tmp / "run"), "--model", "resnet18", "--epochs", "1",
                       "-j", "0", "--device", "cpu", "--no-progress"]) == 0
    assert "fkd-train: images proven by the relabel teacher resnet18: 3 batches recomputed, exact" in \
        capsys.readouterr().out


def test_another_folder_of_the_same_layout_fails_naming_the_batch_and_leaves_no_set(two_folders, capsys):
    tmp, _, b, fkd, weights = two_folders
    out = tmp / "wrong"
    assert _convert(b, fkd, out) == 0  # without the check it passes: same classes, same images per class
    said = capsys.readouterr()
    assert "images matched to the labels by class only" in said.out
    out2 = tmp / "wrong-checked"
    assert _convert(b, fkd, out2, "--check-teacher", "resnet18", weights) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fkd-convert: error: --check-teacher resnet18: epoch 0 batch 0: the "
                                               "teacher's logits on the stored images are not the stored labels"), err
    assert "the images (--train-dir)" in err[0]
    relative = float(re.search(r"their difference is ([0-9.e+-]+) of the logits' spread", err[0]).group(1))
    assert relative > 0.3  # far above the 0.05 tolerance: other pictures differ by a good part of a spread
    assert not os.path.exists(out2 / shards.MANIFEST_NAME) and os.listdir(out2) == []
    # verify proves the unchecked set wrong in the same words
    assert convert_main(["verify", str(out), "--check-teacher", "resnet18", weights]) == 1
    assert "epoch 0 batch 0: the teacher's logits" in capsys.readouterr().err


def test_a_refused_check_leaves_the_set_it_would_replace_as_it_was(two_folders, capsys):
    tmp, a, b, fkd, weights = two_folders
    out = tmp / "set"
    assert _convert(a, fkd, out) == 0
    before = {name: open(out / name, "rb").read() for name in os.listdir(out)}
    assert _convert(b, fkd, out, "--overwrite", "--check-teacher", "resnet18", weights) == 1
    assert {name: open(out / name, "rb").read() for name in os.listdir(out)} == before
    assert shards.ShardSet(str(out)).manifest.teacher_check is None


def test_a_teacher_that_does_not_fit_is_refused_before_any_work(two_folders, capsys):
    tmp, a, _, fkd, _ = two_folders
    other = tmp / "ten.pth"
    torch.save(torchvision.models.get_model("resnet18", num_classes=10).state_dict(), other)
    out = tmp / "out"
    assert _convert(a, fkd, out, "--check-teacher", "resnet18", str(other)) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"fkd-convert: error: --check-teacher resnet18 {other}: 10 classes, but the soft labels are 4 "
                   f"wide: not the relabel teacher")
    assert not out.exists()
    assert _convert(a, fkd, out, "--check-teacher", "resnet18", str(tmp / "missing.pth")) == 1
    assert "missing.pth" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        _convert(a, fkd, out, "--check-teacher", "resnet18", str(other), "--check-batches", "0")
    assert "argument --check-batches: must be in [1, 10000], got 0" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,said", [
    ("result", "perfect", "teacher_check.result must be one of exact, close"),
    ("batches", [[5, 0]], "teacher_check.batches must list"),
    ("largest_relative", -1, "teacher_check.largest_relative must be a finite number"),
    ("weights_sha256", None, "teacher_check.weights_sha256 must be a sha256 in hex"),
    ("extra", 1, "teacher_check has unknown field(s)"),
])
def test_a_tampered_teacher_check_is_refused_in_one_line(two_folders, capsys, field, value, said):
    tmp, a, _, fkd, weights = two_folders
    out = tmp / "right"
    assert _convert(a, fkd, out, "--check-teacher", "resnet18", weights, "--check-batches", "1") == 0
    capsys.readouterr()
    with open(out / shards.MANIFEST_NAME) as f:
        body = json.load(f)
    body["teacher_check"][field] = value
    write_sealed(str(out / shards.MANIFEST_NAME), body)
    assert convert_main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err, err


def test_a_teacher_computed_slightly_differently_is_close_not_exact(two_folders, capsys):
    # Another device kind or TF32 moves the logits a little: weights scaled by 1 + 1e-4 stand in for it.
    tmp, a, _, fkd, weights = two_folders
    state = torch.load(weights, weights_only=True)
    nudged = tmp / "nudged.pth"
    torch.save({k: v * (1 + 1e-4) if v.is_floating_point() else v for k, v in state.items()}, nudged)
    out = tmp / "close"
    assert _convert(a, fkd, out, "--check-teacher", "resnet18", str(nudged)) == 0
    check = shards.ShardSet(str(out)).manifest.teacher_check
    assert check["result"] == "close" and 0 < check["largest_relative"] <= check["tolerance"] == 0.05


RELABEL = {"teachers": [{"model": "resnet18", "weights": "t.pth", "weights_sha256": "0" * 64, "classes": 4,
                         "mix_weight": 1.0}], "bn_mode": "eval", "seed": 0, "tf32": False}


@pytest.mark.parametrize("relabel,said", [
    (RELABEL | {"teachers": None}, "relabel.teachers must be a list of 1 to 64 objects, found None"),
    (RELABEL | {"teachers": [None]}, "relabel.teachers[0] is not an object"),
    (RELABEL | {"teachers": [RELABEL["teachers"][0] | {"classes": "4"}]},
     "relabel.teachers[0].classes must be an integer >= 1, found '4'"),
    (RELABEL | {"bn_mode": "train-ish"}, "relabel.bn_mode must be one of eval, train"),
    (RELABEL | {"tf32": 0}, "relabel.tf32 must be true or false, found 0"),
    (RELABEL | {"versions": {"torch": 2}}, "relabel.versions must be an object of version strings"),
    ({"bn_mode": "eval"}, "relabel lacks teachers"),
    ([1], "relabel is not an object"),
])
def test_a_relabel_provenance_of_other_types_is_refused_in_one_line_by_both_tools(two_folders, capsys, relabel, said):
    tmp, a, _, fkd, _ = two_folders
    out = tmp / "set"
    assert _convert(a, fkd, out) == 0
    with open(out / shards.MANIFEST_NAME) as f:
        body = json.load(f)
    write_sealed(str(out / shards.MANIFEST_NAME), body | {"relabel": RELABEL})
    assert convert_main(["inspect", str(out)]) == 0  # a well-typed provenance reads
    assert "labelled from them by fkd-relabel (resnet18)" in capsys.readouterr().out
    write_sealed(str(out / shards.MANIFEST_NAME), body | {"relabel": relabel})
    for main in (convert_main, train_main):
        capsys.readouterr()
        assert main(["inspect", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err


def test_the_check_reads_a_set_on_object_storage_before_its_manifest_is_uploaded(two_folders, s3, capsys):
    import s3fs

    tmp, a, b, fkd, weights = two_folders
    url = f"{s3}/sets/right"
    assert _convert(a, fkd, url, "--check-teacher", "resnet18", weights, "--check-batches", "2") == 0
    assert shards.ShardSet(url).manifest.teacher_check["result"] == "exact"
    assert _convert(b, fkd, f"{s3}/sets/wrong", "--check-teacher", "resnet18", weights) == 1
    assert "epoch 0 batch 0: the teacher's logits" in capsys.readouterr().err
    assert s3fs.S3FileSystem().find("bucket/sets/wrong") == []  # the uploaded shards were removed


def test_a_crop_size_above_every_image_is_said_in_one_line(two_folders, capsys):
    import numpy as np

    from fkd_shards.batches.images import upscale_note

    assert upscale_note(np.array([[23, 19], [31, 17]]), 31) is None  # one side reaches S: no note
    tmp, a, _, fkd, _ = two_folders  # images of 16 to 31 px
    out = tmp / "big"
    assert _convert(a, fkd, out) == 0
    assert "larger than every image" not in capsys.readouterr().out
    assert _convert(a, fkd, tmp / "upscaled", "--input-size", "32") == 0
    assert ("fkd-convert: note: crop size S=32 is larger than every image (the longest side is 31 px): every crop "
            "is upscaled") in capsys.readouterr().out.splitlines()
    assert train_main(["--shards", str(tmp / "upscaled"), "--output-dir", str(tmp / "run"), "--epochs", "1", "-j", "0",
                       "--device", "cpu", "--no-progress"]) == 0
    assert "fkd-train: note: crop size S=32 is larger than every image" in capsys.readouterr().out


@pytest.mark.parametrize("codec", ["int8", "topk:2"])
def test_a_set_stored_through_a_lossy_codec_is_compared_in_its_stored_form(two_folders, capsys, codec):
    tmp, a, b, fkd, weights = two_folders
    assert _convert(a, fkd, tmp / "right", "--label-codec", codec, "--check-teacher", "resnet18", weights) == 0
    check = shards.ShardSet(str(tmp / "right")).manifest.teacher_check
    assert check["result"] == "exact" and check["largest_relative"] == 0.0
    assert _convert(b, fkd, tmp / "wrong", "--label-codec", codec, "--check-teacher", "resnet18", weights) == 1
    assert "the teacher's logits on the stored images are not the stored labels" in capsys.readouterr().err


def test_verify_recomputes_a_relabelled_set_as_its_provenance_says(two_folders, capsys):
    from fkd_shards.relabel.cli import main as relabel_main

    tmp, a, _, _, weights = two_folders
    base = ["--train-dir", a, "--input-size", str(SIZE), "--batch-size", "6", "--epochs", "1", "--min-alignment", "0",
            "-j", "0", "--device", "cpu", "--no-progress", "--teacher", "resnet18", weights]
    assert relabel_main([*base, "--output", str(tmp / "half"), "--teacher-mix", "0.5"]) == 0
    capsys.readouterr()
    assert convert_main(["verify", str(tmp / "half"), "--check-teacher", "resnet18", weights]) == 0
    assert "batch(es) on the stored images: exact" in capsys.readouterr().out  # with the recorded weight 0.5
    assert relabel_main([*base, "--output", str(tmp / "two"), "--teacher", "resnet18", weights]) == 0
    capsys.readouterr()
    assert convert_main(["verify", str(tmp / "two"), "--check-teacher", "resnet18", weights]) == 1
    assert "labelled by an ensemble of 2 teachers, and the check recomputes one" in capsys.readouterr().err
