"""The shard format: encode/decode pairs, every record check, manifest validation, deterministic and
resumable writer, verify-before-parse reader."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time

import numpy as np
import pytest

from fkd_shards import shards
from fkd_shards.shards import format as fmt
from fkd_shards.shards.codecs import Raw
from fkd_shards.shards.records import (
    BatchSpec,
    decode_batch,
    decode_image,
    decode_npy,
    encode_batch,
    encode_image,
    encode_meta,
    encode_npy,
)
from fkd_shards.shards.tar import TarFormatError, records


def _batch(epoch=0, batch=0, n=3, width=5, mixed=True, dtype=np.float16, start=0):
    rng = np.random.default_rng(epoch * 10 + batch)
    return shards.BatchRecord(
        epoch=epoch, batch=batch, indices=(start + rng.permutation(n)).astype(np.int64),
        # tops and lefts in [0, 0.45), heights and widths in [0.05, 0.5): boxes inside the image
        coords=(rng.random((n, 4), dtype=np.float32) * np.float32(0.45) + np.float32([0, 0, 0.05, 0.05])),
        flips=rng.random(n) < 0.5,
        mix_index=rng.permutation(n).astype(np.int64) if mixed else None,
        mix_lam=0.1 + 0.2 if mixed else None, mix_bbox=(1, 2, 3, 4) if mixed else None,
        soft_labels=rng.standard_normal((n, width)).astype(dtype),
    )


def _spec(mixed=True, dtype="float16", num_images=4, width=5, mix_type=None):
    return BatchSpec(num_images=num_images, width=width, input_size=8,
                     mix_type=mix_type or ("cutmix" if mixed else "none"), codec=Raw(), stored_dtype=dtype)


def _members(record):
    return {k: memoryview(v) for k, v in encode_batch(record, Raw()).items()}


@pytest.mark.parametrize("mixed,dtype", [(True, np.float16), (False, np.float32)])
def test_batch_record_round_trip(mixed, dtype):
    record = _batch(mixed=mixed, dtype=dtype)
    back = decode_batch(_members(record), _spec(mixed, np.dtype(dtype).name), 0, 0, 3)
    assert (back.epoch, back.batch, back.mix_lam, back.mix_bbox) == \
        (record.epoch, record.batch, record.mix_lam, record.mix_bbox)
    for name in ("indices", "coords", "flips", "soft_labels"):
        a, b = getattr(record, name), getattr(back, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert (back.mix_index is None) == (not mixed)
    if mixed:
        assert back.mix_index.tolist() == record.mix_index.tolist()
        assert back.mix_lam == 0.30000000000000004  # the exact double survives


def test_image_record_round_trip():
    record = shards.ImageRecord(index=7, label=3, data=b"\x00\xffbytes", path="new003/a.jpg", height=5, width=9)
    members = {k: memoryview(v) for k, v in encode_image(record).items()}
    assert decode_image(members, 7, num_classes=4) == record
    with pytest.raises(shards.RecordError, match="meta label is 3, expected an integer in \\[0, 2\\]"):
        decode_image(members, 7, num_classes=3)
    with pytest.raises(shards.RecordError, match="holds image 7, expected 8"):
        decode_image(members, 8, num_classes=4)


def _tampered(record, **changes):
    """The members of ``record`` with some replaced: meta keys (``meta_*``) or whole members."""
    members = encode_batch(record, Raw())
    meta = {"epoch": 0, "batch": 0, "n": 3, "mix_lam": 0.3, "mix_bbox": [1, 2, 3, 4]}
    meta |= {k.removeprefix("meta_"): v for k, v in changes.items() if k.startswith("meta_")}
    members[fmt.META] = encode_meta(meta)
    for key, value in changes.items():
        if not key.startswith("meta_"):
            if value is None:
                del members[key]
            else:
                members[key] = value
    return {k: memoryview(v) for k, v in members.items()}


def _npy_header(dtype: str, shape: tuple) -> bytes:
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@pytest.mark.parametrize("changes,message", [
    ({"coords.npy": encode_npy(np.zeros((4, 4), np.float32))}, r"coords is float32\[4, 4\], expected float32\[3, 4\]"),
    ({"flips.npy": None}, "record lacks member\\(s\\) flips.npy"),
    ({"extra.npy": encode_npy(np.zeros(3))}, "unexpected member\\(s\\) extra.npy"),
    ({"meta_n": "3"}, "meta n is '3', expected an integer"),
    ({"meta_epoch": True}, "meta epoch is True, expected an integer"),
    ({"meta_batch": 5}, "holds epoch 0 batch 5, expected epoch 0 batch 0"),
    ({"meta_mix_lam": float("nan")}, "mix_lam is nan, expected a float in \\[0, 1\\]"),
    ({"meta_mix_lam": 1}, "mix_lam is 1, expected a float"),
    ({"meta_mix_bbox": [0, 0, 9, 3]}, "mix_bbox \\[0, 0, 9, 3\\] outside the 8x8 crop"),
    ({"meta_mix_bbox": [1, 2, 3]}, "mix_bbox is \\[1, 2, 3\\], expected 4 integers"),
    ({"meta_extra": 1}, "unknown \\['extra'\\] keys"),
    ({"indices.npy": _npy_header("<i8", (10**12,))}, r"indices is int64\[1000000000000\], expected int64\[3\]"),
    ({"indices.npy": _npy_header("<i8", (3,)) + b"\0" * 8}, "indices: 8 payload bytes for int64\\[3\\]"),
    ({"indices.npy": _npy_header(">i8", (3,)) + b"\0" * 24}, "indices is >i8\\[3\\], expected int64\\[3\\]"),
    ({"indices.npy": _npy_header("|O", (3,)) + b"\0" * 24}, "indices"),
    ({"indices.npy": b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 70000}, "indices: not a valid .npy header"),
    ({"indices.npy": encode_npy(np.array([0, 1, 4]))}, "indices outside \\[0, 4\\)"),
    ({"mix_index.npy": encode_npy(np.array([0, 0, 1]))}, "mix_index is not a permutation"),
    ({"coords.npy": encode_npy(np.full((3, 4), np.nan, np.float32))}, "coords not finite or outside \\[0, 1\\]"),
    ({"coords.npy": encode_npy(np.full((3, 4), 1.5, np.float32))}, "coords not finite or outside \\[0, 1\\]"),
    ({"coords.npy": encode_npy(np.array([[0, 0, 0, 0.5]] * 3, np.float32))}, "crop of zero height or width"),
    ({"coords.npy": encode_npy(np.array([[0.9, 0, 0.2, 0.5]] * 3, np.float32))}, "coords of row 0 reach outside"),
    ({"coords.npy": encode_npy(np.array([[0, 0, 1, 1], [0, 0.5, 1, 0.5001]] * 1 + [[0, 0, 1, 1]], np.float32))},
     "coords of row 1 reach outside"),
    ({"soft_labels.npy": encode_npy(np.full((3, 5), np.inf, np.float16))}, "soft labels hold a value that is not"),
    ({fmt.META: b"\xc1"}, "meta.msgpack: not valid msgpack"),
    ({fmt.META: b"\x91" * 5000 + b"\xc0"}, "meta.msgpack"),
])
def test_decode_refuses_every_malformed_field(changes, message):
    with pytest.raises(shards.RecordError, match=message):
        decode_batch(_tampered(_batch(), **changes), _spec(), 0, 0, 3)


def test_every_box_a_relabel_step_can_draw_is_inside_and_has_pixels():
    """Whole-pixel boxes (top, height) with top + height = H, stored as float32 fractions as the relabel
    step stores them, are never judged outside, and round back to the very box, on H up to 2,048."""
    from fkd_shards.shards.boxes import empty_boxes, pixel_boxes, reaching_outside

    for size in range(1, 2049):
        tops = np.arange(size, dtype=np.float64)
        heights = size - tops
        coords = np.stack([tops / size, tops / size, heights / size, heights / size], 1).astype(np.float32)
        assert not reaching_outside(coords).any(), size
        boxes = pixel_boxes(coords, np.full(size, size), np.full(size, size))
        assert not empty_boxes(boxes).any() and (boxes[:, 2] == size).all() and (boxes[:, 1] == tops).all(), size


def test_npy_header_is_checked_before_anything_is_allocated():
    started = time.perf_counter()
    with pytest.raises(shards.RecordError):
        decode_npy("x", _npy_header("<f4", (10**6, 10**6)), np.dtype(np.float32), (2, 2))
    assert time.perf_counter() - started < 1.0  # a 4 TB allocation would not return at all
    array = decode_npy("x", encode_npy(np.arange(6, dtype=np.float32).reshape(2, 3)), np.dtype(np.float32), (2, 3))
    assert array.tolist() == [[0, 1, 2], [3, 4, 5]] and not array.flags.writeable


def test_mix_fields_must_match_the_sets_mix_type():
    with pytest.raises(shards.RecordError, match="mix_lam/mix_bbox present in a set without mix"):
        decode_batch(_tampered(_batch(), **{"mix_index.npy": None}), _spec(mixed=False), 0, 0, 3)
    with pytest.raises(shards.RecordError, match="mix_bbox present in a Mixup set"):
        decode_batch(_tampered(_batch()), _spec(mix_type="mixup"), 0, 0, 3)


def _write(directory, records, images=4, shard_bytes=10**9, **kwargs):
    with shards.ShardSetWriter(str(directory), shard_bytes, **kwargs) as writer:
        for i in range(images):
            writer.add_image(shards.ImageRecord(i, i % 2, bytes([i]) * 100, f"c/{i}.jpg", 1, 100))
        writer.end_images()
        for record in records:
            writer.add_batch(record)
        return writer.finish(_manifest(images))


def _manifest(images=4):
    return shards.Manifest(num_images=images, batch_size=3, num_classes=2, soft_label_width=5, epochs=2,
                           input_size=8, mix_type="cutmix", fkd_seed=42, classes=["a", "b"],
                           soft_label_dtype="float16", shards=[])


def _records():
    return [_batch(e, b, n=3 if b == 0 else 1, start=b * 3) for e in range(2) for b in range(2)]


def test_writer_is_deterministic_and_reader_round_trips(tmp_path):
    first = _write(tmp_path / "one", _records(), shard_bytes=1)
    second = _write(tmp_path / "two", _records(), shard_bytes=1)
    assert first == second  # same names, sizes and sha256
    assert len(first.shards_of("labels")) == 4  # one record per shard at this size
    s = shards.ShardSet(str(tmp_path / "one"))
    assert [(r.epoch, r.batch, r.size) for r in s.batches()] == [(0, 0, 3), (0, 1, 1), (1, 0, 3), (1, 1, 1)]
    assert [i.data for i in s.images()] == [bytes([i]) * 100 for i in range(4)]
    assert sorted(os.listdir(tmp_path / "one")) == sorted(["manifest.json", *(x.name for x in first.shards)])


def test_older_shards_with_pax_headers_still_read(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "TAR_MTIME", 0.0)  # what sets before the integer mtime were written with
    _write(tmp_path / "old", _records())
    shard = tmp_path / "old" / "labels-000000.tar"
    with tarfile.open(shard) as tar:
        assert any(m.pax_headers for m in tar.getmembers())
    s = shards.ShardSet(str(tmp_path / "old"))
    assert len(list(s.batches())) == 4 and len(list(s.images())) == 4


def test_manifest_versions_types_and_checksum(tmp_path):
    manifest = _write(tmp_path / "set", _records())
    path = tmp_path / "set" / "manifest.json"
    text = path.read_text()
    body = json.loads(text)
    assert shards.Manifest.from_json(text) == manifest

    def refused(new_body_or_text, message):
        path.write_text(new_body_or_text if isinstance(new_body_or_text, str) else json.dumps(new_body_or_text))
        with pytest.raises(shards.ManifestError, match=message):
            shards.ShardSet(str(tmp_path / "set"))

    refused(body | {"format_version": 99}, "format version 99 is not supported \\(expected 1\\)")
    refused(body | {"epochs": 3}, "checksum mismatch")
    unsealed = {k: v for k, v in body.items() if k != "checksum"}  # sets written before the checksum
    refused(unsealed | {"epochs": 3}, "expected 3 epochs")
    refused({k: v for k, v in unsealed.items() if k != "fkd_seed"}, "missing field\\(s\\) fkd_seed")
    refused(unsealed | {"num_images": "4"}, "num_images must be a positive integer, found '4'")
    refused(unsealed | {"batch_size": True}, "batch_size must be a positive integer, found True")
    refused(unsealed | {"classes": ["a", 7]}, "classes is not a list of strings")
    refused(unsealed | {"classes": ["a", "../b"]}, "class name '../b' cannot be a directory name")
    refused(unsealed | {"format_version": True}, "format version True is not supported")
    refused(unsealed | {"batches_per_epoch": body["batches_per_epoch"] + 1}, "disagrees with num_images and batch_size")
    refused(text.replace('"epochs":', '"epochs": 3, "epochs":', 1), "the key 'epochs' appears twice in one object")
    refused(unsealed | {"shards": [dict(body["shards"][0], sha256="x" * 64)]}, "sha256 is not 64 lower-case hex")
    refused(unsealed | {"shards": [dict(body["shards"][0], name="../etc/passwd")]}, "bad shard entry")
    refused(unsealed | {"surprise": 1}, "unknown field\\(s\\) surprise")
    refused(unsealed | {"alignment": [float("nan")] * 2}, "not valid JSON \\(NaN is not a valid number\\)")
    refused("[" * 100_000 + "]" * 100_000, "nested too deeply")
    overflowing = json.dumps(unsealed | {"alignment": [0.25, 0.5]}).replace("0.25", "1e400")  # reads as inf
    refused(overflowing, "not valid JSON \\(1e400 is beyond a float's range\\)")
    refused("{not json", "not valid JSON")
    path.write_text(json.dumps(unsealed))
    assert shards.ShardSet(str(tmp_path / "set")).manifest == manifest


def test_manifest_strings_are_escaped_when_shown(tmp_path):
    _write(tmp_path / "set", _records())
    path = tmp_path / "set" / "manifest.json"
    body = {k: v for k, v in json.loads(path.read_text()).items() if k != "checksum"}
    path.write_text(json.dumps(body | {"created_by": "evil\x1b[2J\x1b[31m"}))
    shown = shards.ShardSet(str(tmp_path / "set")).manifest.describe()
    assert "\x1b" not in shown and "evil\\x1b[2J" in shown


def test_a_flipped_byte_is_found_before_any_record_of_that_shard_is_used(tmp_path):
    manifest = _write(tmp_path / "set", _records(), shard_bytes=1)
    last = manifest.shards_of("labels")[-1]
    path = tmp_path / "set" / last.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    for ahead in (0, 1):
        seen = []
        with pytest.raises(shards.ShardError, match=f"{last.name}: sha256 mismatch"):
            for record in shards.ShardSet(str(tmp_path / "set"), read_ahead=ahead).batches():
                seen.append((record.epoch, record.batch))
        assert seen == [(0, 0), (0, 1), (1, 0)]  # everything before the corrupt shard, nothing of it


@pytest.mark.parametrize("kind", ["truncated", "longer", "fifo", "dev_zero", "directory"])
def test_shards_that_are_not_what_the_manifest_says_are_refused_without_reading_them(tmp_path, kind):
    manifest = _write(tmp_path / "set", _records())
    shard = manifest.shards_of("labels")[0]
    path = tmp_path / "set" / shard.name
    data = path.read_bytes()
    path.unlink()
    if kind == "truncated":
        path.write_bytes(data[:700])
    elif kind == "longer":
        path.write_bytes(data + b"\0" * 512)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    else:
        os.mkdir(path)
    message = {"truncated": "700 bytes, expected", "longer": f"{len(data) + 512} bytes, expected",
               "fifo": "not a regular file \\(a FIFO\\)", "dev_zero": "not a regular file \\(a device\\)",
               "directory": "not a regular file \\(a directory\\)"}[kind]
    with pytest.raises(shards.ShardError, match=f"{shard.name}: {message}"):
        list(shards.ShardSet(str(tmp_path / "set")).batches())


def test_an_image_twice_in_one_epoch_is_refused(tmp_path):
    records = _records()
    records[1] = _batch(0, 1, n=1, start=0)  # image 0 again, instead of image 3
    records[1] = shards.BatchRecord(**{**records[1].__dict__, "indices": np.array([0], np.int64)})
    _write(tmp_path / "set", records)
    with pytest.raises(shards.ShardError, match="epoch 0 batch 1: an image appears twice in the epoch"):
        list(shards.ShardSet(str(tmp_path / "set")).batches())


def test_malformed_tar_is_an_error_not_a_read_out_of_bounds():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("k.a")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    good = buffer.getvalue()
    assert [(k, {s: bytes(v) for s, v in m.items()}) for k, m in records(good)] == [("k", {"a": b"hello"})]
    bad = bytearray(good)
    bad[124:136] = b"77777777777\0"  # a size far past the end
    with pytest.raises(TarFormatError, match="past the end of the archive"):
        list(records(bytes(bad)))
    with pytest.raises(TarFormatError, match="no end-of-archive block"):
        list(records(good[:512 + 512]))


def test_writer_abort_removes_its_shards(tmp_path):
    with pytest.raises(RuntimeError):
        with shards.ShardSetWriter(str(tmp_path / "set"), 1) as writer:
            writer.add_image(shards.ImageRecord(0, 0, b"x"))
            writer.add_image(shards.ImageRecord(1, 0, b"y"))
            raise RuntimeError("stop")
    assert os.listdir(tmp_path / "set") == []


def test_out_of_order_records_are_refused(tmp_path):
    with shards.ShardSetWriter(str(tmp_path / "set")) as writer:
        writer.add_batch(_batch(0, 0))
        with pytest.raises(ValueError, match="out of order"):
            writer.add_batch(_batch(0, 2))
        writer.abort()


def test_a_resumed_writer_gives_the_same_bytes(tmp_path):
    whole = _write(tmp_path / "whole", _records(), shard_bytes=1)
    settings = {"seed": 1}
    with pytest.raises(RuntimeError):
        with shards.ShardSetWriter(str(tmp_path / "cut"), 1, resumable=True, settings=settings) as writer:
            for i in range(4):
                writer.add_image(shards.ImageRecord(i, i % 2, bytes([i]) * 100, f"c/{i}.jpg", 1, 100))
            writer.end_images()
            for record in _records()[:3]:
                writer.add_batch(record)
            raise RuntimeError("killed")
    with pytest.raises(shards.ResumeError, match="seed: 1 then, 2 now"):
        shards.ShardSetWriter(str(tmp_path / "cut"), 1, resume=True, settings={"seed": 2})
    writer = shards.ShardSetWriter(str(tmp_path / "cut"), 1, resume=True, settings=settings)
    done = [(s.kind, s.epoch, s.last) for s in writer.completed]
    # One record per shard at this size; the shard that was open, (1, 0), was dropped and is written again.
    assert done == [("images", None, k) for k in range(4)] + [("labels", 0, 0), ("labels", 0, 1)]
    for record in _records()[2:]:
        writer.add_batch(record)
    assert writer.finish(_manifest()) == whole
    assert sorted(os.listdir(tmp_path / "cut")) == sorted(os.listdir(tmp_path / "whole"))


def test_a_shard_that_fails_to_close_leaves_nothing(tmp_path, monkeypatch):
    import errno

    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with shards.ShardSetWriter(str(tmp_path / "set"), 1) as writer:
            writer.add_image(shards.ImageRecord(0, 0, b"x"))
            monkeypatch.setattr(os, "fsync", full)
            writer.add_image(shards.ImageRecord(1, 0, b"y"))  # closes shard 0: its fsync fails
    monkeypatch.setattr(os, "fsync", real)
    assert os.listdir(tmp_path / "set") == []


def test_a_second_writer_into_the_same_directory_is_refused(tmp_path):
    first = shards.ShardSetWriter(str(tmp_path / "set"))
    with pytest.raises(shards.LocationError, match="another fkd-convert or fkd-relabel writes this output"):
        shards.ShardSetWriter(str(tmp_path / "set"), overwrite=True)
    first.abort()  # releases the directory
    shards.ShardSetWriter(str(tmp_path / "set"), overwrite=True).abort()
