"""fkd-demo at a reduced size: every stage leaves its files, and distillation beats chance widely."""

from __future__ import annotations

import os

from fkd_shards.demo.run import build_parser, run


def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    args = build_parser().parse_args([str(out), "--per-class", "5", "--epochs", "6", "--teacher-epochs", "4",
                                      "--model", "resnet18"])
    result = run(args)
    assert os.path.exists(out / "fkd" / "epoch_5" / "batch_1.tar")  # 50 images, B=25
    assert os.path.exists(out / "shards" / "manifest.json")
    assert os.path.exists(out / "student-soft" / "checkpoint.pth.tar")
    assert len(os.listdir(out / "train")) == 10 and len(os.listdir(out / "val")) == 10
    assert result["teacher"] > 70
    assert result["soft"] > 35  # chance is 10%
