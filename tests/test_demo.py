"""fkd-demo at a reduced size: every stage leaves its files, and distillation beats chance widely."""

from __future__ import annotations

import os

from fkd_shards import shards
from fkd_shards.demo.run import build_parser, run


def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    args = build_parser().parse_args([str(out), "--per-class", "5", "--epochs", "6", "--teacher-epochs", "4"])
    result = run(args)
    m = shards.ShardSet(str(out / "shards")).manifest
    assert m.created_by.startswith("fkd-relabel") and m.relabel["teachers"][0]["model"] == "resnet18"
    assert (m.num_images, m.batch_size, m.epochs) == (50, 25, 6)
    assert os.path.exists(out / "teacher.pth")
    students = ["resnet18-seed0", "resnet18-seed1", "mobilenet_v2-seed0", "mobilenet_v2-seed1"]
    assert all(os.path.exists(out / "students" / name / "final_weights.pth") for name in students)
    assert len(os.listdir(out / "train")) == 10 and len(os.listdir(out / "val")) == 10
    assert result["teacher"] > 60
    assert result["soft"]["resnet18"] > 30  # chance is 10%


def test_demo_via_convert_packs_the_original_layout(tmp_path):
    out = tmp_path / "demo"
    args = build_parser().parse_args([str(out), "--per-class", "3", "--epochs", "2", "--teacher-epochs", "4",
                                      "--via-convert"])
    run(args)
    assert os.path.exists(out / "fkd" / "epoch_1" / "batch_1.tar")  # 30 images, B=25
    m = shards.ShardSet(str(out / "shards")).manifest
    assert m.created_by.startswith("fkd-convert") and m.epochs == 2


def test_bad_flags_and_an_unusable_out_are_one_line_before_any_stage(tmp_path, capsys):
    from fkd_shards.demo.run import main

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    for argv, message in (([str(tmp_path / "a"), "--per-class", "0"], "--per-class must be in [1, 100], got 0"),
                          ([str(tmp_path / "a"), "--input-size", "4"], "--input-size must be in [8, 256], got 4"),
                          ([str(tmp_path / "a"), "--temperature", "inf"], "--temperature must be finite and positive"),
                          ([str(tmp_path / "a"), "--model", "nosuch"], "--model nosuch is not a torchvision"),
                          ([str(tmp_path / "a"), "--seeds", "0,0"], "--model resnet18 with seed 0 is asked twice"),
                          ([str(tmp_path / "a"), "--codecs", "int8", "foo"], "--codecs: --label-codec: label codec"),
                          ([str(taken)], f"{taken}: not empty; choose a new directory"),
                          ([str(a_file)], f"{a_file}: exists and is not a directory")):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("fkd-demo: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and (taken / "mine.txt").read_text() == "keep" and a_file.read_text() == "keep"
