"""Shard sets over HTTP and S3 (real servers on 127.0.0.1), faults, retries and the cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fkd_shards import shards
from fkd_shards.batches.stream import BatchStream
from fkd_shards.convert import ConvertOptions, convert
from fkd_shards.convert.cli import main as convert_main
from fkd_shards.train.cli import main as train_main
from tests.conftest import INPUT_SIZE, listing
from tests.servers import StaticServer

FAST = {"retries": 3, "backoff_s": 0.01}


@pytest.fixture
def http_set(converted):
    output, _, _ = converted(batch_size=8, shard_bytes=3000)  # several label shards per epoch
    server = StaticServer(output)
    yield output, server
    server.stop()


def _same_batches(a: BatchStream, b: BatchStream) -> int:
    n = 0
    for x, y in zip(a, b, strict=True):
        assert (x.epoch, x.batch) == (y.epoch, y.batch)
        assert torch.equal(x.model_input(), y.model_input())
        assert torch.equal(x.soft_labels, y.soft_labels) and torch.equal(x.targets, y.targets)
        n += 1
    return n


def test_http_stream_equals_local(http_set):
    local, server = http_set
    remote = shards.ShardSet(server.url, **FAST)
    assert remote.manifest == shards.ShardSet(local).manifest
    assert _same_batches(BatchStream(shards.ShardSet(local), workers=0), BatchStream(remote, workers=0)) == 9
    remote.verify()


def test_http_faults_are_retried(http_set):
    local, server = http_set
    label = shards.ShardSet(local).manifest.shards_of("labels")[1].name
    server.faults.errors.update({"manifest.json": 2, "images-000000.tar": 2, label: 2})
    server.faults.cut[label] = 700
    server.faults.flip[label], server.faults.flip_times[label] = 900, 1
    remote = shards.ShardSet(server.url, **FAST)
    assert _same_batches(BatchStream(shards.ShardSet(local), workers=0), BatchStream(remote, workers=0)) == 9
    # Every injected fault was served, and the stream still matches the local one.
    assert set(server.faults.errors.values()) == {0} and label not in server.faults.cut
    assert server.faults.flip_times[label] == 0


def test_persistent_corruption_fails_naming_the_shard_and_yields_nothing_from_it(http_set):
    local, server = http_set
    labels = shards.ShardSet(local).manifest.shards_of("labels")
    bad = labels[2]
    server.faults.flip[bad.name] = 600
    remote = shards.ShardSet(server.url, **FAST)
    seen = []
    with pytest.raises(shards.ShardError, match=f"{bad.name}: sha256 mismatch after 4 attempts"):
        for record in remote.batches():
            seen.append((record.epoch, record.batch))
    before = sum(s.count for s in labels[:2])
    assert len(seen) == before  # every batch of the good shards, none of the bad one


def test_missing_shard_is_a_clear_error(http_set):
    local, server = http_set
    name = shards.ShardSet(local).manifest.shards_of("labels")[-1].name
    os.rename(os.path.join(local, name), os.path.join(local, name + ".away"))
    with pytest.raises(shards.ShardError, match=f"{name}: no such file"):
        list(shards.ShardSet(server.url, **FAST).batches())


def test_a_body_longer_than_the_manifest_says_is_cut_off_and_refused(http_set):
    local, server = http_set
    name = shards.ShardSet(local).manifest.shards_of("labels")[0].name
    server.faults.endless.add(name)
    with pytest.raises(shards.ShardError, match=f"{name}: longer than the [0-9]+ bytes expected after 4 attempts"):
        list(shards.ShardSet(server.url, **FAST).batches())


def test_a_stalled_server_is_a_timeout_naming_the_shard(http_set):
    local, server = http_set
    name = shards.ShardSet(local).manifest.shards_of("labels")[0].name
    server.faults.stall[name], server.faults.stall_s = 100, 3.0
    with pytest.raises(shards.ShardError, match=f"{name}: timed out \\(no data for 0.5 s\\) after 2 attempts"):
        list(shards.ShardSet(server.url, retries=1, backoff_s=0.01, timeout_s=0.5).batches())


def test_a_server_that_went_away_is_not_called_a_missing_manifest(http_set):
    _, server = http_set
    url = server.url
    server.stop()
    with pytest.raises(shards.ManifestError) as caught:
        shards.ShardSet(url, **FAST)
    assert "unreachable" in str(caught.value) and "no manifest" not in str(caught.value)


def test_a_missing_manifest_is_named_as_such(http_set):
    _, server = http_set
    with pytest.raises(shards.ManifestError, match="manifest.json: no manifest; not a shard set, or an incomplete"):
        shards.ShardSet(server.url + "/elsewhere", **FAST)


def test_a_corrupt_cache_copy_is_fetched_again(http_set, tmp_path):
    local, server = http_set
    cache = str(tmp_path / "cache")
    list(shards.ShardSet(server.url, cache_dir=cache, **FAST).images())
    name = listing(cache)[0]
    copy = os.path.join(cache, name)
    data = bytearray(open(copy, "rb").read())
    data[len(data) // 2] ^= 1
    open(copy, "wb").write(bytes(data))
    requests = len(server.faults.requests)
    images = list(shards.ShardSet(server.url, cache_dir=cache, **FAST).images())
    assert [i.data for i in images] == [i.data for i in shards.ShardSet(local).images()]
    assert set(server.faults.requests[requests:]) == {"manifest.json", name.rsplit("-", 1)[0] + ".tar"}  # fetched again
    assert open(copy, "rb").read() != bytes(data)  # and the copy replaced


def test_cache_dir_holds_image_shards_and_on_request_label_shards(http_set, tmp_path):
    local, server = http_set
    cache = str(tmp_path / "cache")
    list(BatchStream(shards.ShardSet(server.url, cache_dir=cache, **FAST), workers=0))
    image_shards = len(shards.ShardSet(local).manifest.shards_of("images"))
    assert len(listing(cache)) == image_shards and all(f.startswith("images-") for f in listing(cache))
    first = BatchStream(shards.ShardSet(server.url, cache_dir=cache, cache_labels=True, **FAST), workers=0)
    list(first)
    files = listing(cache)
    assert len(files) == len(shards.ShardSet(local).manifest.shards)
    assert not any("partial" in f for f in files)
    requests = len(server.faults.requests)
    second = BatchStream(shards.ShardSet(server.url, cache_dir=cache, cache_labels=True, **FAST), workers=0)
    assert _same_batches(BatchStream(shards.ShardSet(local), workers=0), second) == 9
    assert set(server.faults.requests[requests:]) == {"manifest.json"}  # all shards from the cache


def test_two_processes_share_one_cache_dir(http_set, tmp_path):
    _, server = http_set
    cache = str(tmp_path / "cache")
    code = ("import sys; from fkd_shards import shards;"
            "s = shards.ShardSet(sys.argv[1], cache_dir=sys.argv[2], cache_labels=True);"
            "print(len(list(s.images())), len(list(s.batches())))")
    procs = [subprocess.Popen([sys.executable, "-c", code, server.url, cache], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=os.getcwd()) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [o[0].split() for o in outputs] == [["20", "9"], ["20", "9"]]
    assert not any("partial" in f for f in listing(cache))


def test_convert_to_s3_then_train_from_it(relabel_case, tmp_path, s3, capsys):
    train_dir, fkd_path, _, _ = relabel_case(batch_size=8)
    local = str(tmp_path / "local")
    options = dict(input_size=INPUT_SIZE, shard_bytes=3000, progress=False)
    convert(ConvertOptions(train_dir, fkd_path, local, **options), log=lambda *_: None)
    url = f"{s3}/sets/one"
    assert convert_main(["--train-dir", train_dir, "--fkd-path", fkd_path, "--output", url, "--input-size",
                         str(INPUT_SIZE), "--shard-size", "3000", "--no-progress"]) == 0
    assert convert_main(["--train-dir", train_dir, "--fkd-path", fkd_path, "--output", url, "--input-size",
                         str(INPUT_SIZE), "--no-progress"]) == 1
    assert "output is not empty (use --overwrite" in capsys.readouterr().err
    assert convert_main(["verify", url]) == 0
    remote = shards.ShardSet(url, **FAST)
    assert remote.manifest == shards.ShardSet(local).manifest  # same bytes, same hashes
    cache = str(tmp_path / "cache")
    cached = BatchStream(shards.ShardSet(url, cache_dir=cache), workers=0)
    assert _same_batches(BatchStream(shards.ShardSet(local), workers=0), cached) == 9
    for run, extra in (("cold", []), ("warm", [])):
        out = tmp_path / run
        assert train_main(["--shards", url, "--cache-dir", cache, "--output-dir", str(out), "-j", "0",
                           "--device", "cpu", "--epochs", "1", *extra]) == 0
    cold = torch.load(tmp_path / "cold" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    warm = torch.load(tmp_path / "warm" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(cold[k], warm[k]) for k in cold)


def test_interrupted_upload_leaves_no_manifest(relabel_case, s3):
    train_dir, fkd_path, _, truth = relabel_case(batch_size=8)
    open(truth.files[(2, 1)], "w").write("broken")
    url = f"{s3}/sets/broken"
    assert convert_main(["--train-dir", train_dir, "--fkd-path", fkd_path, "--output", url, "--input-size",
                         str(INPUT_SIZE), "--shard-size", "3000", "--no-progress"]) == 1
    with pytest.raises(shards.ManifestError, match="no manifest"):
        shards.ShardSet(url, **FAST)
    import s3fs

    assert s3fs.S3FileSystem().find("bucket/sets/broken") == []  # the uploaded shards were removed too
