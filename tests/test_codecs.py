"""Label codecs: round trips, the KL and size figures by hand, manifest records and errors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from fkd_shards import shards
from fkd_shards.convert.cli import main as convert_main
from fkd_shards.convert.codec_cost import kl_rows, measure
from fkd_shards.shards import codecs
from tests.conftest import INPUT_SIZE


def _logits(n=6, width=12, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, width)) * 3).astype(np.float16)


def _round_trip(spec, z, temperature=20.0):
    codec = codecs.parse(spec, temperature)
    arrays = codec.encode(z)
    return arrays, codec.decode(arrays, z.shape[1])


def test_raw_is_bit_exact():
    z = _logits()
    _, back = _round_trip("raw", z)
    assert back.dtype == np.float16 and back.tobytes() == z.tobytes()


def test_int8_round_trip_within_half_a_step():
    z = _logits().astype(np.float32)
    arrays, back = _round_trip("int8", z)
    assert arrays["soft_q"].dtype == np.int8 and back.dtype == np.float32
    assert np.all(np.abs(back - z) <= arrays["soft_step"][:, None] / 2 + 1e-6)
    assert np.allclose(back.min(1), z.min(1)) and np.allclose(back.max(1), z.max(1), atol=1e-5)


def test_topk_keeps_the_top_values_and_the_tail_mass():
    z = _logits().astype(np.float32)
    t = 4.0
    _, back = _round_trip("topk:3", z, t)
    for row, coded in zip(z, back):
        top = np.argsort(-row)[:3]
        assert np.allclose(coded[top], row[top].astype(np.float16), atol=0)
        rest = np.setdiff1d(np.arange(len(row)), top)
        assert np.allclose(np.exp(coded[rest] / t).sum(), np.exp(row[rest] / t).sum(), rtol=1e-5)
    probs = np.exp(back / t) / np.exp(back / t).sum(1, keepdims=True)
    exact = np.exp(z / t) / np.exp(z / t).sum(1, keepdims=True)
    top1 = np.argmax(z, 1)
    assert np.allclose(probs[np.arange(6), top1], exact[np.arange(6), top1], rtol=2e-3)


def test_kl_and_size_match_a_hand_computation():
    z = np.array([[3.0, 1.0, 0.0, -1.0]], dtype=np.float32)
    size, kl = measure("topk:2", z, temperature=1.0)
    assert size == 2 * 2 + 2 * 2 + 4  # two float16 values, two uint16 indices, one float32 fill
    fill = math.log((math.exp(0.0) + math.exp(-1.0)) / 2)
    coded = [3.0, 1.0, fill, fill]
    p = [math.exp(v) for v in z[0]]
    q = [math.exp(v) for v in coded]
    p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
    assert kl[0] == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-5)
    assert measure("raw", z.astype(np.float16), 1.0)[0] == 4 * 2
    assert measure("int8", z, 1.0)[0] == 4 + 4 + 4
    assert kl_rows(z, z, 20.0)[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("codec", ["int8", "topk:2"])
def test_converted_set_records_the_codec_and_decodes_to_float32(relabel_case, tmp_path, codec):
    train_dir, fkd_path, _, truth = relabel_case(batch_size=8)
    out = str(tmp_path / "coded")
    assert convert_main(["--train-dir", train_dir, "--fkd-path", fkd_path, "--output", out, "--input-size",
                         str(INPUT_SIZE), "--no-progress", "--label-codec", codec,
                         "--codec-temperature", "4"]) == 0
    s = shards.ShardSet(out)
    assert s.manifest.label_codec == codec and s.manifest.label_codec_temperature == 4.0
    import torch

    for rec in s.batches(end_epoch=1):
        raw = torch.load(truth.files[(rec.epoch, rec.batch)], weights_only=False)[5].float().numpy()
        assert rec.soft_labels.dtype == np.float32 and rec.soft_labels.shape == raw.shape
        assert kl_rows(raw, rec.soft_labels, 4.0).max() < 0.05
        assert np.array_equal(rec.soft_labels.argmax(1), raw.argmax(1))


def test_unknown_codec_is_refused_by_writer_and_reader(relabel_case, converted, tmp_path, capsys):
    train_dir, fkd_path, _, _ = relabel_case()
    assert convert_main(["--train-dir", train_dir, "--fkd-path", fkd_path, "--output", str(tmp_path / "x"),
                         "--input-size", str(INPUT_SIZE), "--no-progress", "--label-codec", "zstd"]) == 1
    assert "label codec 'zstd' is not supported" in capsys.readouterr().err
    output, _, _ = converted(name="ok")
    path = os.path.join(output, "manifest.json")
    body = json.load(open(path))
    json.dump(body | {"label_codec": "zstd"}, open(path, "w"))
    with pytest.raises(shards.ManifestError, match="checksum mismatch"):
        shards.ShardSet(output)
    json.dump({k: v for k, v in body.items() if k != "checksum"} | {"label_codec": "zstd"}, open(path, "w"))
    with pytest.raises(shards.ManifestError, match="this reader cannot decode this set's soft labels"):
        shards.ShardSet(output)


@pytest.mark.parametrize("spec,temperature,logits,message", [
    ("topk:2", 0.0, None, "topk needs a finite, positive codec temperature, got 0.0"),
    ("topk:2", float("inf"), None, "topk needs a finite, positive codec temperature, got inf"),
    ("topk:2", 20.0, np.array([[1e5, 0, 0]], np.float32), "does not give finite values"),
    ("int8", 20.0, np.array([[3e38, -3e38, 0]], np.float32), "int8: a row's logits span more than float32 holds"),
    ("topk:0", 20.0, None, "label codec 'topk:0' is not supported"),
    ("topk:x", 20.0, None, "label codec 'topk:x' is not supported"),
])
def test_codec_parameters_that_cannot_round_trip_are_refused(spec, temperature, logits, message):
    z = _logits().astype(np.float32) if logits is None else logits
    with pytest.raises(codecs.CodecError, match=message):
        codecs.parse(spec, temperature).encode(z)
