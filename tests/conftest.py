"""Shared fixtures: a small ImageFolder plus relabel output, written by fkd_shards.demo.example."""

from __future__ import annotations

import os
import urllib.request

import pytest
import torch

from fkd_shards.demo.example import make_image_folder, make_relabel

torch.set_num_threads(1)
# The tools set torch's threads themselves (OMP_NUM_THREADS wins): one, as every reference here computes with.
os.environ["OMP_NUM_THREADS"] = "1"

INPUT_SIZE = 16


@pytest.fixture
def relabel_case(tmp_path):
    """Factory: ``relabel_case(mix_type=..., dtype=..., ...)`` -> (train_dir, fkd_path, samples, truth)."""

    def build(mix_type="cutmix", dtype=torch.float16, num_classes=4, per_class=5, epochs=3,
              batch_size=6, width=None, seed=42, name="case"):
        root = tmp_path / name
        train_dir, fkd_path = str(root / "train"), str(root / "fkd")
        samples = make_image_folder(train_dir, num_classes, per_class)
        truth = make_relabel(fkd_path, samples, epochs=epochs, batch_size=batch_size,
                             width=width or num_classes, input_size=INPUT_SIZE, mix_type=mix_type,
                             dtype=dtype, seed=seed)
        return train_dir, fkd_path, samples, truth

    return build


@pytest.fixture
def converted(relabel_case, tmp_path):
    """Factory: build a relabel case and convert it; returns (output_dir, samples, truth)."""
    from fkd_shards.convert import ConvertOptions, convert

    def build(shard_bytes=10**9, **kwargs):
        train_dir, fkd_path, samples, truth = relabel_case(**kwargs)
        output = str(tmp_path / (kwargs.get("name", "case") + "-shards"))
        convert(ConvertOptions(train_dir, fkd_path, output, input_size=INPUT_SIZE,
                               fkd_seed=kwargs.get("seed", 42), shard_bytes=shard_bytes, progress=False),
                log=lambda *_: None)
        return output, samples, truth

    return build


def listing(directory: str) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.fixture
def s3(monkeypatch):
    """moto's S3-compatible server on 127.0.0.1, with a bucket; endpoint and keys in the environment."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bucket")
    yield "s3://bucket"
    s3fs.S3FileSystem.clear_instance_cache()
    # moto keeps its buckets in this process: empty them for the next test.
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"))
    server.stop()


@pytest.fixture
def diverging(monkeypatch):
    """``diverging("mobilenet_v3_small", ...)``: students of these models give NaN logits from their
    first forward on (what a far too high learning rate does, without waiting for it)."""
    from fkd_shards.train import loop

    real = loop.build_model

    def make(*names: str) -> None:
        def build_model(name, *args, **kwargs):
            model = real(name, *args, **kwargs)
            if name in names:
                model.register_forward_hook(lambda module, inputs, output: output * float("nan"))
            return model

        monkeypatch.setattr(loop, "build_model", build_model)

    return make


def header_only_image(path) -> None:
    """Write at ``path`` a PNG whose header parses and whose pixels do not decode (cut inside IDAT)."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
