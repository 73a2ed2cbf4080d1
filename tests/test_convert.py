"""fkd-convert: round trips against the independent fixture, the replay, and every input error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from fkd_shards import shards
from fkd_shards.convert.cli import main as convert_main
from fkd_shards.convert.imagefolder import list_image_folder
from fkd_shards.convert.replay import epoch_orders
from fkd_shards.demo.example import replay_orders
from tests.conftest import INPUT_SIZE, listing


@pytest.mark.parametrize("mix_type,dtype", [("cutmix", torch.float16), ("mixup", torch.float32),
                                            ("none", torch.float16)])
def test_round_trip_matches_relabel_files(converted, mix_type, dtype):
    output, samples, truth = converted(mix_type=mix_type, dtype=dtype, shard_bytes=1500)
    s = shards.ShardSet(output)
    m = s.manifest
    assert (m.num_images, m.batch_size, m.epochs, m.mix_type) == (20, 6, 3, mix_type)
    assert m.soft_label_dtype == str(dtype).removeprefix("torch.")
    assert len(m.shards_of("labels")) > m.epochs  # small shard size: several shards per epoch
    seen = []
    for rec in s.batches():
        seen.append((rec.epoch, rec.batch))
        coords, flips, mix_index, lam, bbox, soft = torch.load(truth.files[(rec.epoch, rec.batch)],
                                                               weights_only=False)
        assert rec.indices.tolist() == truth.indices(rec.epoch, rec.batch)
        assert rec.coords.tobytes() == coords.numpy().tobytes()
        assert rec.flips.tolist() == flips.tolist()
        assert rec.soft_labels.dtype == soft.numpy().dtype
        assert rec.soft_labels.tobytes() == soft.numpy().tobytes()
        if mix_type == "none":
            assert rec.mix_index is None and rec.mix_lam is None and rec.mix_bbox is None
        else:
            assert rec.mix_index.tolist() == mix_index.tolist()
            assert rec.mix_lam == lam  # bit-exact float
            assert rec.mix_bbox == (None if bbox is None else tuple(int(v) for v in bbox))
    assert seen == [(e, b) for e in range(3) for b in range(4)]
    assert [rec.batch for rec in s.batches() if rec.epoch == 2] == [0, 1, 2, 3]
    assert s.batches(start_epoch=2).__next__().epoch == 2
    images = list(s.images())
    assert [img.index for img in images] == list(range(20))
    for img, (path, label) in zip(images, samples):
        assert img.label == label
        with open(path, "rb") as f:
            assert img.data == f.read()


def test_short_last_batch_and_label_shards_never_span_epochs(converted):
    output, _, _ = converted(batch_size=8)  # N=20: batches of 8, 8, 4
    s = shards.ShardSet(output)
    sizes = [rec.size for rec in s.batches(end_epoch=1)]
    assert sizes == [8, 8, 4]
    for shard in s.manifest.shards_of("labels"):
        assert shard.epoch is not None


def test_sampler_replay_pinned():
    # Hand-derived: torch.randperm with one generator, two draws per epoch (the second discarded).
    g = torch.Generator().manual_seed(42)
    expected = []
    for _ in range(3):
        expected.append(torch.randperm(7, generator=g).tolist())
        torch.randperm(7, generator=g)
    got = [o.tolist() for o in epoch_orders(7, 42, 3)]
    assert got == expected == replay_orders(7, 42, 3)
    # Pinned values, so that a change in torch's RNG or sampler shows up here first.
    assert got == [[1, 6, 3, 5, 4, 0, 2], [6, 1, 3, 2, 0, 4, 5], [3, 2, 0, 4, 5, 6, 1]]
    # Drawing only ONE randperm per epoch would give another epoch-1 order.
    g = torch.Generator().manual_seed(42)
    one_draw = [torch.randperm(7, generator=g).tolist() for _ in range(2)]
    assert got[1] != one_draw[1]


def _walk_order(root: str) -> list[tuple[str, int]]:
    """SRE2L-FACTS section 1, written out: sorted class dirs; os.walk entries sorted by dirpath
    string, file names sorted inside each; image extensions by lower-cased name."""
    exts = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    out = []
    for rank, cls in enumerate(classes):
        walked = sorted(os.walk(os.path.join(root, cls), followlinks=True), key=lambda t: t[0])
        for dirpath, _, files in walked:
            out += [(os.path.join(dirpath, f), rank) for f in sorted(files) if f.lower().endswith(exts)]
    return out


def test_image_folder_order_matches_written_out_rules(tmp_path):
    root = tmp_path / "tree"
    for rel in ["b/x.jpg", "b/a/b-2/z.png", "b/a/b/c/y.PNG", "b/a/b/c/notes.txt", "a/2.jpg",
                "a/10.jpg", ".hidden/q.jpg", "c/sub/k.JPEG"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = list_image_folder(str(root))
    assert found.classes == [".hidden", "a", "b", "c"]
    assert [(p, label) for p, label in found.samples] == _walk_order(str(root))
    assert [os.path.relpath(p, root) for p, _ in found.samples][3:6] == \
        ["b/x.jpg", "b/a/b-2/z.png", "b/a/b/c/y.PNG"]


def _run_cli(train_dir, fkd_path, output, *extra):
    return convert_main(["--train-dir", train_dir, "--fkd-path", fkd_path, "--output", output,
                         "--input-size", str(INPUT_SIZE), "--workers", "1", "--no-progress", *extra])


def _assert_fails(capsys, output, code, message, train_dir, fkd_path, *extra):
    assert _run_cli(train_dir, fkd_path, output, *extra) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fkd-convert: error: ")
    assert message in err, err
    assert "manifest.json" not in listing(output)
    with pytest.raises(shards.ManifestError):
        shards.ShardSet(output)
    return err


def _mutate(path, index, value):
    item = torch.load(path, weights_only=False)
    item[index] = value(item) if callable(value) else value
    torch.save(item, path)


@pytest.mark.parametrize("case,message", [
    ("missing_batch", "batch_1.tar: missing"),
    ("extra_batch", "batch_4.tar: extra batch file"),
    ("missing_epoch", "epoch_1: missing"),
    ("stray_file", "notes.txt: unexpected entry"),
    ("wrong_rows", "epoch_1/batch_1.tar: 5 rows, expected 6"),
    ("width_changes", "soft labels have 5 classes, batch 0 of epoch 0 has 4"),
    ("width_too_small", "fewer than the 4 class folders"),
    ("coords_range", "coords outside [0, 1]"),
    ("not_permutation", "mix_index is not a permutation"),
    ("lam_range", "mix_lam 1.5 outside [0, 1]"),
    ("bbox_range", "outside the 16x16 crop"),
    ("truncated", "truncated or not a torch.save file"),
    ("not_torch", "truncated or not a torch.save file"),
    ("unsafe_pickle", "needs unsafe unpickling"),
    ("mixed_types", "mix type mixup, batch 0 of epoch 0 has cutmix"),
    ("bad_image", "unreadable image"),
    ("empty_train", "not a usable image folder"),
    ("n_disagrees", "relabel output covers 20 images but"),
    ("too_many_epochs", "--epochs 9 asked, the relabel output holds 3"),
    ("nan_logits", "soft_label row 2 holds a value that is not finite"),
    ("inf_logits", "soft_label row 0 holds a value that is not finite"),
    ("random_bytes", "truncated or not a torch.save file (invalid pickle data)"),
    ("epoch_02", "epoch_02: unexpected entry"),
    ("fifo_batch", "batch_1.tar: not a regular file (a FIFO)"),
    ("dev_zero", "batch_1.tar: not a regular file (a device)"),
    ("huge_png", "class000_id004.png: image has more than"),
    ("bbox_floats", "mix_bbox is not 4 integers"),
    ("flipped_logit_byte", "epoch_1/batch_1.tar: damaged (Bad CRC-32 for file"),
    ("copied_batch", "epoch_1/batch_1.tar: the same bytes as"),
    ("linked_batch", "epoch_2/batch_0.tar: the same bytes as"),
    ("encrypted_flag", "epoch_1/batch_1.tar: truncated or not a torch.save file (File"),
    ("entry_offset", "epoch_1/batch_1.tar: damaged (Truncated file header)"),
    ("crop_off_image", "epoch_1/batch_1.tar: coords of row 2 reach outside the image"),
    ("crop_without_pixels", "epoch_1/batch_1.tar: the crop box of row 3 rounds to"),
    ("meta_tensor", "epoch_1/batch_1.tar: soft_label is a meta tensor, expected a dense CPU tensor"),
    ("sparse_tensor", "epoch_1/batch_1.tar: coords is a sparse_coo tensor, expected a dense CPU tensor"),
    ("folder_loop", "new001/again: a symbolic link that leads back to a folder containing it (a loop)"),
])
def test_bad_input_is_one_line_error_and_no_output(relabel_case, tmp_path, capsys, case, message):
    train_dir, fkd_path, samples, truth = relabel_case()
    output = str(tmp_path / "out")
    extra = []
    b11 = truth.files[(1, 1)]
    if case == "missing_batch":
        os.remove(b11)
    elif case == "extra_batch":
        torch.save(torch.load(b11, weights_only=False), os.path.join(fkd_path, "epoch_1", "batch_4.tar"))
    elif case == "missing_epoch":
        os.rename(os.path.join(fkd_path, "epoch_1"), os.path.join(fkd_path, "epoch_7"))
    elif case == "stray_file":
        open(os.path.join(fkd_path, "epoch_0", "notes.txt"), "w").close()
    elif case == "wrong_rows":
        item = torch.load(b11, weights_only=False)
        keep = [1, 0, 2, 3, 4]
        torch.save([item[0][:5], item[1][:5], torch.tensor(keep), item[3], item[4], item[5][:5]], b11)
    elif case == "width_changes":
        _mutate(b11, 5, lambda it: torch.cat([it[5], it[5][:, :1]], 1))
    elif case == "width_too_small":
        for path in truth.files.values():
            _mutate(path, 5, lambda it: it[5][:, :3])
    elif case == "coords_range":
        _mutate(b11, 0, lambda it: it[0] + 1.5)
    elif case == "not_permutation":
        _mutate(b11, 2, torch.zeros(6, dtype=torch.int64))
    elif case == "lam_range":
        _mutate(b11, 3, 1.5)
    elif case == "bbox_range":
        _mutate(b11, 4, [np.int64(0), np.int64(0), np.int64(17), np.int64(3)])
    elif case == "truncated":
        data = open(b11, "rb").read()
        open(b11, "wb").write(data[: len(data) // 2])
    elif case == "not_torch":
        open(b11, "w").write("hello")
    elif case == "unsafe_pickle":
        _mutate(b11, 3, lambda it: {"lam": it[3], "obj": UnsafeThing()})
    elif case == "mixed_types":
        _mutate(b11, 4, None)
    elif case == "bad_image":
        open(samples[7][0], "wb").write(b"\xff\xd8\xff not really a jpeg")
    elif case == "empty_train":
        os.makedirs(os.path.join(train_dir, "new999"))
    elif case == "n_disagrees":
        os.remove(samples[3][0])
    elif case == "too_many_epochs":
        extra = ["--epochs", "9"]
    elif case == "nan_logits":
        _mutate(b11, 5, lambda it: it[5].index_fill(0, torch.tensor([2]), float("nan")))
    elif case == "inf_logits":
        _mutate(b11, 5, lambda it: it[5].index_fill(0, torch.tensor([0]), float("-inf")))
    elif case == "random_bytes":
        open(b11, "wb").write(np.random.default_rng(0).bytes(3000))
    elif case == "epoch_02":
        os.rename(os.path.join(fkd_path, "epoch_2"), os.path.join(fkd_path, "epoch_02"))
    elif case == "fifo_batch":
        os.remove(b11)
        os.mkfifo(b11)
    elif case == "dev_zero":
        os.remove(b11)
        os.symlink("/dev/zero", b11)
    elif case == "huge_png":
        open(samples[4][0], "wb").write(_png_header(20000, 20000))
    elif case == "bbox_floats":
        _mutate(b11, 4, [0.5, 1.0, 2.0, 3.0])
    elif case == "flipped_logit_byte":  # torch.load alone would read a wrong number
        data = bytearray(open(b11, "rb").read())
        data[data.index(torch.load(b11, weights_only=False)[5].numpy().tobytes())] ^= 0x04
        open(b11, "wb").write(data)
    elif case in ("encrypted_flag", "entry_offset"):  # zipfile raises RuntimeError, OverflowError here
        data = bytearray(open(b11, "rb").read())
        central = [i for i in range(len(data) - 4) if data[i:i + 4] == b"PK\x01\x02"]
        for i in central:
            if case == "encrypted_flag":
                data[i + 8] |= 1
        if case == "entry_offset":
            data[central[-1] + 42:central[-1] + 46] = b"\xff\xff\xff\x7f"  # the last entry's header offset
        open(b11, "wb").write(data)
    elif case == "crop_off_image":
        _mutate(b11, 0, lambda it: it[0].index_put((torch.tensor([2]), torch.tensor([0])), torch.tensor(0.9))
                .index_put((torch.tensor([2]), torch.tensor([2])), torch.tensor(0.9)))
    elif case == "crop_without_pixels":  # positive, but far below one pixel of any image
        _mutate(b11, 0, lambda it: it[0].index_put((torch.tensor([3]), torch.tensor([2])), torch.tensor(1e-30)))
    elif case == "meta_tensor":
        _mutate(b11, 5, lambda it: it[5].to("meta"))
    elif case == "sparse_tensor":
        _mutate(b11, 0, lambda it: it[0].to_sparse())
    elif case == "folder_loop":  # ImageFolder would list the set again under new001, up to 40 levels deep
        os.symlink("..", os.path.join(train_dir, "new001", "again"))
    elif case == "copied_batch":
        shutil.copyfile(truth.files[(0, 3)], b11)
    elif case == "linked_batch":
        os.remove(truth.files[(2, 0)])
        os.symlink(truth.files[(1, 0)], truth.files[(2, 0)])
    _assert_fails(capsys, output, 1, message, train_dir, fkd_path, *extra)


class UnsafeThing:
    """A class a weights_only load must refuse to construct."""


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header (and holds no pixels): decoding it would be a bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_output_is_refused_unless_overwrite(relabel_case, tmp_path, capsys):
    train_dir, fkd_path, _, _ = relabel_case()
    output = str(tmp_path / "out")
    assert _run_cli(train_dir, fkd_path, output) == 0
    first = shards.ShardSet(output).manifest
    assert _run_cli(train_dir, fkd_path, output) == 1
    assert "output is not empty (use --overwrite" in capsys.readouterr().err
    assert shards.ShardSet(output).manifest == first  # untouched
    assert _run_cli(train_dir, fkd_path, output, "--overwrite", "--epochs", "2") == 0
    assert shards.ShardSet(output).manifest.epochs == 2
    assert len(listing(output)) == 1 + 1 + 2  # manifest, one image shard, two label shards


def test_converter_killed_mid_run_leaves_no_accepted_set_and_overwrite_cleans_up(relabel_case, tmp_path):
    train_dir, fkd_path, _, truth = relabel_case()
    output = str(tmp_path / "out")
    # A slow file system, simulated: reading one batch file blocks until the converter is killed.
    code = ("import sys, time\n"
            "import fkd_shards.convert.pipeline as p\n"
            "from fkd_shards.convert.cli import main\n"
            "real = p.read_file\n"
            "p.read_file = lambda path: time.sleep(600) if path.endswith('epoch_1/batch_2.tar') else real(path)\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "--train-dir", train_dir, "--fkd-path", fkd_path,
                             "--output", output, "--input-size", str(INPUT_SIZE), "--workers", "1", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while "labels-000001.tar.partial" not in listing(output):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = listing(output)
    assert "manifest.json" not in left and "progress.json" in left
    with pytest.raises(shards.ManifestError, match="no manifest"):
        shards.ShardSet(output)
    named = json.load(open(os.path.join(output, "progress.json")))
    assert {s["name"] for s in named["shards"]} == {"images-000000.tar", "labels-000000.tar"}
    assert named["open"] == ["labels-000001.tar"]
    user_file = os.path.join(output, "notes.txt")
    open(user_file, "w").write("mine")
    assert _run_cli(train_dir, fkd_path, output, "--overwrite") == 0  # the interrupted run's files are replaced
    assert open(user_file).read() == "mine"  # not written by us: kept
    assert shards.ShardSet(output).manifest.epochs == 3


def test_overwrite_removes_only_files_a_manifest_names(relabel_case, tmp_path, capsys):
    train_dir, fkd_path, _, _ = relabel_case()
    output = str(tmp_path / "out")
    assert _run_cli(train_dir, fkd_path, output, "--shard-size", "2000") == 0
    look_alikes = ["images-old.tar", "labels-notes.txt", "images-000000.tar.bak"]
    for name in look_alikes:
        open(os.path.join(output, name), "w").write("user data")
    assert _run_cli(train_dir, fkd_path, output, "--overwrite", "--epochs", "1") == 0
    for name in look_alikes:
        assert open(os.path.join(output, name)).read() == "user data"
    stray = os.path.join(output, "labels-000099.tar")
    open(stray, "w").write("not from a conversion of ours")
    before = listing(output)
    assert _run_cli(train_dir, fkd_path, output, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "labels-000099.tar: looks like a shard, but no manifest or progress file there names it" in err
    assert listing(output) == before  # nothing removed when refusing


def test_failure_mid_run_removes_shards(relabel_case, tmp_path, capsys):
    train_dir, fkd_path, _, truth = relabel_case()
    open(truth.files[(2, 0)], "w").write("broken")
    output = str(tmp_path / "out")
    _assert_fails(capsys, output, 1, "epoch_2/batch_0.tar: truncated", train_dir, fkd_path)
    assert listing(output) == []


def test_a_full_disk_names_the_shard_and_leaves_nothing(relabel_case, tmp_path, monkeypatch, capsys):
    import errno
    import io

    from fkd_shards.shards import writer

    train_dir, fkd_path, _, _ = relabel_case()

    class FillsUp(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 20_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(writer, "open", lambda path, mode: FillsUp(path, mode), raising=False)
    output = str(tmp_path / "out")
    _assert_fails(capsys, output, 1, "out/images-000000.tar.partial: cannot write (disk full: No space left on "
                  "device)", train_dir, fkd_path)
    assert listing(output) == []


def test_verify_catches_a_flipped_byte(converted, capsys):
    output, _, _ = converted()
    shards.ShardSet(output).verify()
    assert convert_main(["verify", output]) == 0
    path = os.path.join(output, "labels-000001.tar")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(shards.ShardError, match="labels-000001.tar: sha256 mismatch"):
        shards.ShardSet(output).verify()
    assert convert_main(["verify", output]) == 1
    assert "labels-000001.tar: sha256 mismatch" in capsys.readouterr().err


def test_a_wrong_seed_is_refused_unless_accepted_explicitly(relabel_case, tmp_path, capsys):
    train_dir, fkd_path, _, _ = relabel_case(num_classes=10, per_class=4, mix_type="none", batch_size=8)
    good = str(tmp_path / "good")
    assert _run_cli(train_dir, fkd_path, good) == 0
    assert min(shards.ShardSet(good).manifest.alignment) == 1.0
    capsys.readouterr()
    err = _assert_fails(capsys, str(tmp_path / "wrong"), 1, "epoch 0's replay alignment", train_dir, fkd_path,
                        "--fkd-seed", "7")
    assert "below 0.325 (the default threshold" in err and "--min-alignment 0 accepts" in err
    _assert_fails(capsys, str(tmp_path / "strict"), 1, "below 0.900 (--min-alignment)", train_dir, fkd_path,
                  "--fkd-seed", "7", "--min-alignment", "0.9")
    accepted = str(tmp_path / "accepted")
    assert _run_cli(train_dir, fkd_path, accepted, "--fkd-seed", "7", "--min-alignment", "0") == 0
    m = shards.ShardSet(accepted).manifest
    assert m.min_alignment == 0 and max(m.alignment) < 0.5 and m.misalignment() is None
    assert shards.ShardSet(good).manifest.min_alignment == pytest.approx(0.325)


def test_input_size_is_inferred_from_square_images_or_asked_for(relabel_case, tmp_path, capsys):
    from fkd_shards.demo.example import make_image_folder, make_relabel

    train_dir, fkd_path = str(tmp_path / "train"), str(tmp_path / "fkd")
    samples = make_image_folder(train_dir, 3, 4, kinds=[(32, 32, "RGB", "png")])
    make_relabel(fkd_path, samples, epochs=1, batch_size=5, width=3, input_size=32)
    out = str(tmp_path / "out")
    assert convert_main(["--train-dir", train_dir, "--fkd-path", fkd_path, "--output", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "input size S=32 inferred from the images" in printed and "S=32" in printed.splitlines()[-1]
    assert shards.ShardSet(out).manifest.input_size == 32
    mixed_dir, mixed_fkd, _, _ = relabel_case()  # five sizes, some not square
    assert convert_main(["--train-dir", mixed_dir, "--fkd-path", mixed_fkd, "--output", str(tmp_path / "x"),
                         "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "images are not all one square size" in err and "--input-size" in err


def test_non_utf8_file_names_convert(relabel_case, tmp_path):
    train_dir, fkd_path, samples, _ = relabel_case()
    folder = os.fsencode(os.path.dirname(samples[0][0]))
    os.rename(os.fsencode(samples[0][0]), os.path.join(folder, b"class000_id000\xff.jpg"))
    output = str(tmp_path / "out")
    assert _run_cli(train_dir, fkd_path, output) == 0
    paths = sorted(image.path for image in shards.ShardSet(output).images())
    assert "new000/class000_id000\\xff.jpg" in paths


def test_parallel_workers_give_identical_shards(relabel_case, tmp_path):
    train_dir, fkd_path, _, _ = relabel_case()
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert _run_cli(train_dir, fkd_path, one) == 0
    assert convert_main(["--train-dir", train_dir, "--fkd-path", fkd_path, "--output", two,
                         "--input-size", str(INPUT_SIZE), "--workers", "2", "--no-progress"]) == 0
    for name in listing(one):
        assert open(os.path.join(one, name), "rb").read() == open(os.path.join(two, name), "rb").read()


def test_a_failed_overwrite_leaves_the_old_set_whole(relabel_case, tmp_path, capsys):
    train_dir, fkd_path, _, _ = relabel_case(num_classes=10, per_class=4, mix_type="none", batch_size=8)
    output = str(tmp_path / "out")
    assert _run_cli(train_dir, fkd_path, output, "--shard-size", "2000") == 0
    before = {name: open(os.path.join(output, name), "rb").read() for name in listing(output)}
    assert _run_cli(train_dir, fkd_path, output, "--overwrite", "--fkd-seed", "7") == 1  # refused: near chance
    assert "replay alignment" in capsys.readouterr().err
    assert {name: open(os.path.join(output, name), "rb").read() for name in listing(output)} == before
    shards.ShardSet(output).verify()
    assert _run_cli(train_dir, fkd_path, output, "--overwrite", "--epochs", "1") == 0  # a good one replaces it
    assert shards.ShardSet(output).manifest.epochs == 1 and not any(n.endswith(".partial") for n in listing(output))


def test_an_output_inside_an_input_is_refused_and_nothing_is_written(relabel_case, capsys):
    train_dir, fkd_path, _, _ = relabel_case()
    inputs = {path: listing(path) for path in (train_dir, fkd_path)}
    for output, flag, where in ((os.path.join(train_dir, "shards"), "--train-dir", train_dir),
                                (fkd_path, "--fkd-path", fkd_path)):
        assert _run_cli(train_dir, fkd_path, output) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"fkd-convert: error: --output {output}: is, or is inside, {flag} {where}; choose another " \
                      "directory", err
    assert {path: listing(path) for path in inputs} == inputs


def test_ctrl_c_is_one_line_saying_nothing_complete_was_written(relabel_case, tmp_path, monkeypatch, capsys):
    from fkd_shards.shards import writer

    train_dir, fkd_path, _, _ = relabel_case()
    output = str(tmp_path / "out")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.ShardSetWriter, "finish", interrupted)
    assert _run_cli(train_dir, fkd_path, output) == 130
    assert capsys.readouterr().err.strip() == \
        "fkd-convert: interrupted; no manifest written, so nothing is taken for a complete set"
    assert "manifest.json" not in listing(output)


def test_swapped_batch_files_are_found_by_their_alignment(relabel_case, tmp_path, capsys):
    # N=400 in batches of 50; the fixture's teacher is always right, so a batch holding another
    # batch's labels sits near chance (0.19 with 10 classes and CutMix) in an epoch at about 0.8.
    train_dir, fkd_path, _, truth = relabel_case(num_classes=10, per_class=40, batch_size=50, epochs=1)
    a, b = truth.files[(0, 2)], truth.files[(0, 5)]
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    err = _assert_fails(capsys, str(tmp_path / "out"), 1, "epoch_0/batch_2.tar: replay alignment", train_dir,
                        fkd_path)
    assert "in an epoch at 0.7" in err or "in an epoch at 0.8" in err, err
    assert _run_cli(train_dir, fkd_path, str(tmp_path / "accepted"), "--min-alignment", "0") == 0


def test_binomial_lower_tail_matches_exact_sums():
    from fractions import Fraction
    from math import comb

    from fkd_shards.shards.alignment import implausible_batches, lower_tail

    for hits, rows, rate in ((0, 8, 0.9), (3, 10, 0.5), (10, 50, 0.8), (40, 1024, 0.25), (7, 7, 0.3)):
        p = Fraction(rate)
        exact = sum(comb(rows, k) * p ** k * (1 - p) ** (rows - k) for k in range(hits + 1))
        assert lower_tail(hits, rows, rate) == pytest.approx(float(exact), rel=1e-9, abs=1e-300)
    assert lower_tail(3, 10, 1.0) == 0.0 and lower_tail(3, 10, 0.0) == 1.0
    # At an epoch rate of 0.8: 10 of 50 is implausible (1e-19); 1 of 8 and 20 of 50 (7e-10) can be bad
    # luck; 45 of 50 is above the epoch's rate.
    assert implausible_batches([(45, 50), (10, 50), (1, 8), (20, 50)], 0.8, 0.19) == [1]
    assert implausible_batches([(10, 50)], 0.8, 0.19, limit=1e-20) == []
