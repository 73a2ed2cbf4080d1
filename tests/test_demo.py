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
    assert os.path.exists(out / "teacher.pth") and os.path.exists(out / "student-soft" / "final_weights.pth")
    assert len(os.listdir(out / "train")) == 10 and len(os.listdir(out / "val")) == 10
    assert result["teacher"] > 60
    assert result["soft"] > 30  # chance is 10%


def test_demo_via_convert_packs_the_original_layout(tmp_path):
    out = tmp_path / "demo"
    args = build_parser().parse_args([str(out), "--per-class", "3", "--epochs", "2", "--teacher-epochs", "4",
                                      "--via-convert"])
    run(args)
    assert os.path.exists(out / "fkd" / "epoch_1" / "batch_1.tar")  # 30 images, B=25
    m = shards.ShardSet(str(out / "shards")).manifest
    assert m.created_by.startswith("fkd-convert") and m.epochs == 2
