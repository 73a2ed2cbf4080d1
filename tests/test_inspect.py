"""inspect: the manifest summary, and the PNG grid of a batch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fkd_shards.convert.cli import main as convert_main
from fkd_shards.train.cli import main as train_main
from fkd_shards.train.grid import LINE_PX


def test_summary_prints_the_fixture_numbers(converted, capsys):
    output, _, _ = converted(batch_size=8, mix_type="mixup")
    assert convert_main(["inspect", output]) == 0
    text = capsys.readouterr().out
    for line in ["images N        20 in 4 classes", "batch size B    8 (3 batches per epoch)",
                 "epochs E        3", "input size S    16", "mix type        mixup", "fkd seed        42",
                 "soft labels     float16 x 4", "labels shards   3,"]:
        assert line in text, line


def test_grid_has_the_expected_size_and_differs_between_batches(converted, tmp_path, capsys):
    output, _, _ = converted(batch_size=8)
    one, two = str(tmp_path / "one.png"), str(tmp_path / "two.png")
    assert train_main(["inspect", output, "--batch", "1", "0", "--out", one, "--columns", "4"]) == 0
    assert train_main(["inspect", output, "--batch", "1", "1", "--out", two, "--columns", "4"]) == 0
    a, b = Image.open(one), Image.open(two)
    legend = 4  # title, box, lambda note, key
    assert a.size[1] == b.size[1] == LINE_PX * legend + 4 + 2 * (96 + LINE_PX)  # 8 images in 2 rows of 4
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert train_main(["inspect", output, "--batch", "9", "0", "--out", one]) == 1
    assert "--batch 9 0: outside the set's epochs [0, 3)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # argparse's usage error, exit status 2
        train_main(["inspect", output, "--batch", "1", "0", "--out", one, "--columns", "0"])
    assert stopped.value.code == 2 and "argument --columns: must be in [1, 1024], got 0" in capsys.readouterr().err


def test_the_picture_is_only_ever_a_png(converted, tmp_path, capsys):
    output, _, _ = converted(batch_size=8)
    notes = tmp_path / "notes.png"
    notes.write_text("my notes, not a picture")
    for out, message in ((str(tmp_path / "grid.txt"), "the picture is a PNG; name it *.png"),
                         (str(notes), "exists and is not a PNG; choose another name")):
        assert train_main(["inspect", output, "--batch", "0", "0", "--out", out]) == 1
        assert f"--out {out}: {message}" in capsys.readouterr().err
    assert notes.read_text() == "my notes, not a picture" and not (tmp_path / "grid.txt").exists()
    grid = str(tmp_path / "grid.PNG")
    assert train_main(["inspect", output, "--batch", "0", "0", "--out", grid]) == 0
    assert train_main(["inspect", output, "--batch", "0", "1", "--out", grid]) == 0  # an earlier picture: replaced
    assert Image.open(grid).format == "PNG"


def test_a_closed_pipe_is_one_line_not_a_traceback(converted):
    import subprocess
    import sys

    output, _, _ = converted()
    proc = subprocess.Popen([sys.executable, "-m", "fkd_shards.convert", "inspect", output], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 1
    assert err.strip() == "fkd-convert: standard output was closed by its reader; stopped", err
