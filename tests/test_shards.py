"""The shard format: encode/decode pairs, manifest validation, deterministic writer, reader errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fkd_shards import shards
from fkd_shards.shards.records import decode_batch, decode_image, encode_batch, encode_image


def _batch(epoch=0, batch=0, n=3, width=5, mixed=True, dtype=np.float16):
    rng = np.random.default_rng(epoch * 10 + batch)
    return shards.BatchRecord(
        epoch=epoch, batch=batch, indices=rng.permutation(4)[:n].astype(np.int64),
        coords=rng.random((n, 4), dtype=np.float32), flips=rng.random(n) < 0.5,
        mix_index=rng.permutation(n).astype(np.int64) if mixed else None,
        mix_lam=0.1 + 0.2 if mixed else None, mix_bbox=(1, 2, 3, 4) if mixed else None,
        soft_labels=rng.standard_normal((n, width)).astype(dtype),
    )


@pytest.mark.parametrize("mixed,dtype", [(True, np.float16), (False, np.float32)])
def test_batch_record_round_trip(mixed, dtype):
    record = _batch(mixed=mixed, dtype=dtype)
    back = decode_batch(encode_batch(record))
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
    record = shards.ImageRecord(index=7, label=3, data=b"\x00\xffbytes", path="new003/a.jpg")
    assert decode_image(encode_image(record)) == record


def test_decode_refuses_bad_members():
    members = encode_batch(_batch())
    bad = dict(members, **{"coords.npy": encode_batch(_batch(n=4))["coords.npy"]})
    with pytest.raises(shards.RecordError, match=r"coords is float32\[4, 4\], expected float32\[3, 4\]"):
        decode_batch(bad)
    del members["flips.npy"]
    with pytest.raises(shards.RecordError, match="lacks member"):
        decode_batch(members)


def _write(directory, records, images=4, shard_bytes=10**9, **kwargs):
    with shards.ShardSetWriter(str(directory), shard_bytes, **kwargs) as writer:
        for i in range(images):
            writer.add_image(shards.ImageRecord(i, i % 2, bytes([i]) * 100, f"c/{i}.jpg"))
        for record in records:
            writer.add_batch(record)
        return writer.finish(shards.Manifest(
            num_images=images, batch_size=3, num_classes=2, soft_label_width=5, epochs=2,
            input_size=8, mix_type="cutmix", fkd_seed=42, classes=["a", "b"],
            soft_label_dtype="float16", shards=[]))


def _records():
    return [_batch(e, b, n=3 if b == 0 else 1) for e in range(2) for b in range(2)]


def test_writer_is_deterministic_and_reader_round_trips(tmp_path):
    first = _write(tmp_path / "one", _records(), shard_bytes=1)
    second = _write(tmp_path / "two", _records(), shard_bytes=1)
    assert first == second  # same names, sizes and sha256
    assert len(first.shards_of("labels")) == 4  # one record per shard at this size
    s = shards.ShardSet(str(tmp_path / "one"))
    assert [(r.epoch, r.batch, r.size) for r in s.batches()] == [(0, 0, 3), (0, 1, 1), (1, 0, 3), (1, 1, 1)]
    assert [i.data for i in s.images()] == [bytes([i]) * 100 for i in range(4)]


def test_manifest_versions_and_consistency(tmp_path):
    manifest = _write(tmp_path / "set", _records())
    path = tmp_path / "set" / "manifest.json"
    body = json.loads(path.read_text())
    assert shards.Manifest.from_json(path.read_text()) == manifest
    path.write_text(json.dumps(body | {"format_version": 99}))
    with pytest.raises(shards.ManifestError, match="format version 99 is not supported \\(expected 1\\)"):
        shards.ShardSet(str(tmp_path / "set"))
    path.write_text(json.dumps(body | {"epochs": 3}))
    with pytest.raises(shards.ManifestError, match="expected 3 epochs"):
        shards.ShardSet(str(tmp_path / "set"))
    path.write_text(json.dumps({k: v for k, v in body.items() if k != "fkd_seed"}))
    with pytest.raises(shards.ManifestError, match="missing or unknown field"):
        shards.ShardSet(str(tmp_path / "set"))
    path.write_text("{not json")
    with pytest.raises(shards.ManifestError, match="not valid JSON"):
        shards.ShardSet(str(tmp_path / "set"))


def test_reader_names_a_truncated_shard(tmp_path):
    _write(tmp_path / "set", _records())
    shard = tmp_path / "set" / "labels-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    s = shards.ShardSet(str(tmp_path / "set"))
    with pytest.raises(shards.ShardError, match="labels-000001.tar"):
        list(s.batches())


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
