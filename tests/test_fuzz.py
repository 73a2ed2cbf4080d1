"""Seeded fuzz of the read path: a few hundred mutations of a tiny shard set. Whatever is changed,
reading the set and building every batch the trainer would see either fails with one of the
documented one-line errors, or succeeds; and where the manifest was not re-sealed to match (a
corrupt disk, a cut transfer), success must mean that nothing mutated was used: every batch
identical to the unmutated set's."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import tarfile

import pytest
import torch

from fkd_shards import shards
from fkd_shards.batches.stream import BatchStream, StreamError
from tests.tamper import reseal, write_sealed

CLEAN_ERRORS = (shards.ManifestError, shards.ShardError, StreamError)
CASES = 300


def consume(location: str) -> str:
    """Digest of everything training takes from a set: model inputs, targets, soft labels, order;
    and whatever was accepted holds what training relies on."""
    h = hashlib.sha256()
    shard_set = shards.ShardSet(location, retries=0)
    m = shard_set.manifest
    h.update(json.dumps([m.epochs, m.classes]).encode())
    for b in BatchStream(shard_set, workers=0):
        h.update(f"{b.epoch},{b.batch},{b.batch_rows};".encode())
        x = b.model_input()
        assert x.shape == (len(b.rows), 3, m.input_size, m.input_size) and torch.isfinite(x).all()
        assert b.soft_labels.shape == (len(b.rows), m.soft_label_width) and torch.isfinite(b.soft_labels).all()
        assert ((b.targets >= 0) & (b.targets < m.num_classes)).all()
        for t in (x, b.targets, b.soft_labels):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from fkd_shards.convert import ConvertOptions, convert
    from fkd_shards.demo.example import make_image_folder, make_relabel
    from tests.conftest import INPUT_SIZE

    root = tmp_path_factory.mktemp("fuzz")
    samples = make_image_folder(str(root / "train"), 3, 4)
    make_relabel(str(root / "fkd"), samples, epochs=2, batch_size=5, width=3, input_size=INPUT_SIZE)
    out = str(root / "set")
    convert(ConvertOptions(str(root / "train"), str(root / "fkd"), out, input_size=INPUT_SIZE, shard_bytes=4000,
                           progress=False), log=lambda *_: None)
    return out, consume(out)


def _members(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name for m in tar.getmembers()]


def _mutate_bytes(rng: random.Random, location: str) -> str:
    """A raw change of one file, the manifest not re-sealed: what a bad disk or transfer does."""
    names = sorted(os.listdir(location))
    name = rng.choice(names)
    path = os.path.join(location, name)
    data = bytearray(open(path, "rb").read())
    kind = rng.choice(["flip", "flip", "truncate", "append", "zero_block", "swap"])
    if kind == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "append":
        data += bytes(rng.randrange(1, 2000))
    elif kind == "zero_block":
        start = rng.randrange(len(data))
        data[start:start + 512] = bytes(len(data[start:start + 512]))
    else:
        a, b = sorted(rng.sample(range(len(data)), 2))
        data[a], data[b] = data[b], data[a]
    open(path, "wb").write(bytes(data))
    return f"{kind} {name}"


def _mutate_sealed(rng: random.Random, location: str) -> str:
    """A changed record with the manifest re-sealed to match: what an attacker who controls the set,
    or a buggy writer, produces. Only the per-record checks stand in the way."""
    shard = rng.choice([s for s in sorted(os.listdir(location)) if s.endswith(".tar")])
    member = rng.choice(_members(os.path.join(location, shard)))
    kind = rng.choice(["flip", "truncate", "garbage", "drop", "npy_shape"])

    def edit(data: bytes) -> bytes | None:
        data = bytearray(data)
        if kind == "flip" and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del data[rng.randrange(len(data) + 1):]
        elif kind == "garbage":
            data = bytearray(rng.randbytes(rng.randrange(0, 300)))
        elif kind == "drop":
            return None
        elif kind == "npy_shape" and data.startswith(b"\x93NUMPY"):
            data = data.replace(b"'shape': (", b"'shape': (99999999999, ", 1)
        return bytes(data)

    reseal(location, members={member: edit})
    return f"sealed {kind} {member}"


def _mutate_manifest_sealed(rng: random.Random, location: str) -> str:
    """A manifest field set to another value, the checksum recomputed."""
    path = os.path.join(location, shards.MANIFEST_NAME)
    body = json.load(open(path))
    key = rng.choice(sorted(k for k in body if k not in ("checksum", "format", "format_version")))
    value = rng.choice([0, -1, 1, 2, 10**12, "x", None, [], {}, True, 0.5, [1, "a"], body[key]])
    if key == "shards" and rng.random() < 0.7:
        entry = rng.choice(body["shards"])
        field = rng.choice(sorted(entry))
        entry[field] = rng.choice([0, -1, 1, 10**12, "x", None, "labels-000000.tar", "../x"])
        key = f"shards.{field}"
    else:
        body[key] = value
    write_sealed(path, body)
    return f"manifest {key}={value!r}"


class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang("no answer within 20 s")


def test_no_mutation_is_used_unverified_and_none_gives_a_traceback(pristine, tmp_path):
    original, expected = pristine
    rng = random.Random(20261130)
    outcomes = {"clean error": 0, "identical": 0, "sealed and accepted": 0}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(CASES):
            location = str(tmp_path / f"case{case}")
            shutil.copytree(original, location)
            choice = rng.random()
            sealed = choice >= 0.55
            mutate = _mutate_bytes if not sealed else _mutate_sealed if choice < 0.85 else _mutate_manifest_sealed
            try:
                what = mutate(rng, location)
            except shards.ManifestError:
                continue  # the mutation made a manifest the tamper helper itself cannot re-seal
            signal.alarm(20)
            try:
                digest = consume(location)
            except CLEAN_ERRORS as exc:
                assert "\n" not in str(exc) and str(exc), (what, str(exc))
                outcomes["clean error"] += 1
            else:
                if sealed:
                    outcomes["sealed and accepted"] += 1
                else:
                    assert digest == expected, f"case {case}: {what} was used unverified"
                    outcomes["identical"] += 1
            finally:
                signal.alarm(0)
            shutil.rmtree(location)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["clean error"] > CASES // 2, outcomes


def test_a_sealed_nan_logit_is_refused_by_the_reader_and_by_training(converted, tmp_path, capsys):
    import numpy as np

    from fkd_shards.train.cli import main as train_main

    output, _, _ = converted(dtype=torch.float32)

    def poison(data: bytes) -> bytes:
        array = np.load(__import__("io").BytesIO(data))
        array[1, 2] = np.nan
        buffer = __import__("io").BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    reseal(output, members={"e00001_b000002.soft_labels.npy": poison})
    with pytest.raises(shards.ShardError, match="epoch 1 batch 2: soft labels hold a value that is not finite"):
        list(shards.ShardSet(output).batches())
    out = tmp_path / "run"
    assert train_main(["--shards", output, "--output-dir", str(out), "-j", "0", "--device", "cpu"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # besides the progress bar
    assert len(errors) == 1 and errors[0].startswith("fkd-train: error: ") and "not finite" in errors[0]
    state = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 1  # epoch 0 was trained and kept; epoch 1 stopped at the poisoned record


class _Tiny(torch.nn.Module):
    """A model with every kind of state a weights file holds: conv and linear weights, batch-norm
    buffers (an int64 counter among them)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)


def _confused(rng: random.Random, value):
    """A value of another type or kind where a tensor was (what weights_only=True lets through)."""
    return rng.choice([
        lambda: 1, lambda: "x", lambda: None, lambda: [value], lambda: {"nested": value}, lambda: value.double(),
        lambda: value.to(torch.float8_e4m3fn) if value.is_floating_point() else value.bool(),
        lambda: value.to("meta"), lambda: value.to_sparse() if value.dim() else value,
        lambda: value.float() * float("nan"), lambda: value.float() * float("inf"), lambda: value.reshape(-1)[:1],
        lambda: value.to(torch.complex64), lambda: torch.zeros(0), lambda: value.flatten().repeat(2),
    ])()


def test_weights_files_mutated_or_type_confused_load_or_fail_in_one_line(tmp_path):
    from fkd_shards.models.weights import WeightsError, load_into, load_state

    torch.manual_seed(0)
    pristine = _Tiny().state_dict()
    rng = random.Random(20261204)
    outcomes = {"clean error": 0, "loaded": 0}
    for case in range(150):
        path = tmp_path / f"w{case}.pth"
        state = {k: v.clone() for k, v in pristine.items()}
        wrap = rng.random() < 0.3  # a checkpoint keeps the state dict under a key, as ours do
        if rng.random() < 0.5:
            key = rng.choice(sorted(state))
            state[key] = _confused(rng, state[key])
            torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
            sealed = True
        else:
            torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
            data = bytearray(path.read_bytes())
            at = rng.randrange(len(data))
            kind = rng.choice(["flip", "cut", "zero"])
            if kind == "flip":
                data[at] ^= 1 << rng.randrange(8)
            elif kind == "cut":
                del data[at:]
            else:
                data[at:at + 64] = bytes(len(data[at:at + 64]))
            path.write_bytes(bytes(data))
            sealed = False
        model = _Tiny()
        try:
            load_into(model, load_state(str(path)), str(path), "--init-weights")
        except WeightsError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), (case, str(exc))
            outcomes["clean error"] += 1
        else:
            loaded = model.state_dict()
            assert all(torch.isfinite(v).all() for v in loaded.values() if v.is_floating_point()), case
            if not sealed:  # a changed byte that was not refused must not have changed a number
                assert all(torch.equal(loaded[k], pristine[k]) for k in pristine), f"case {case}: corrupt bytes used"
            outcomes["loaded"] += 1
    assert outcomes["clean error"] > 75 and outcomes["loaded"] > 0, outcomes


def test_summaries_mutated_or_type_confused_report_or_fail_in_one_line(tmp_path, capsys):
    from fkd_shards.train.cli import main as train_main

    base = {"model": "resnet18", "seed": 0, "shards": "/data/set", "shard_set": "ab" * 32, "epochs": 2,
            "epochs_done": 2, "final_top1": 50.0, "best_top1": 55.0, "best_epoch": 1, "images_per_s": 100.0,
            "wall_s": 10.0, "config": {"temperature": 3.0}, "written_by": "fkd-train 0.3.0"}
    rng = random.Random(4)
    outcomes = {"clean error": 0, "reported": 0}
    for case in range(150):
        run = tmp_path / f"run{case}"
        run.mkdir()
        body = dict(base)
        if rng.random() < 0.6:
            key = rng.choice(sorted(body))
            body[key] = rng.choice([0, -1, 1e308, -1e308, 10**40, "x", "", None, [], {}, True, [1, "a"],
                                    {"a": [None]}, "\x1b[2J", 1e-320])
            text = json.dumps(body)
        else:
            text = bytearray(json.dumps(body).encode())
            at = rng.randrange(len(text))
            text[at] = rng.randrange(256)
            text = text.decode("utf-8", errors="replace")
        (run / "summary.json").write_text(text)
        code = train_main(["report", str(run), "--format", rng.choice(["markdown", "csv", "json", "text"])])
        said = capsys.readouterr()
        if code == 0:
            assert "\x1b" not in said.out, case  # control characters from data are escaped
            outcomes["reported"] += 1
        else:
            assert code == 1 and len(said.err.strip().splitlines()) == 1, (case, said.err)
            assert said.err.startswith("fkd-train: error: "), said.err
            outcomes["clean error"] += 1
    assert outcomes["clean error"] > 40 and outcomes["reported"] > 20, outcomes
