"""BatchStream: bit-identical to the written-out reference, ordered, sliced, checked."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fkd_shards import shards
from fkd_shards.batches.crop import crop_resize_flip
from fkd_shards.batches.images import ImageSource, ImageTable
from fkd_shards.batches.plan import slice_rows
from fkd_shards.batches.stream import BatchStream, StreamError
from fkd_shards.shards.boxes import pixel_boxes
from tests.conftest import INPUT_SIZE
from tests.reference import reference_batch


def _stream(output, **kwargs) -> BatchStream:
    return BatchStream(shards.ShardSet(output), **kwargs)

MODES = {"pil": {"decode_cache": False}, "decode_cache": {"decode_cache": True},
         "crop_device": {"crop_device": "cpu"}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mix_type,dtype", [("cutmix", torch.float16), ("mixup", torch.float32),
                                            ("none", torch.float16)])
def test_batches_bit_identical_to_reference(converted, mix_type, dtype, mode):
    output, samples, truth = converted(mix_type=mix_type, dtype=dtype, batch_size=8)  # 8, 8, 4 rows
    stream = _stream(output, workers=0, **MODES[mode])
    seen = 0
    for b in stream:
        indices = truth.indices(b.epoch, b.batch)
        x, targets, soft = reference_batch(truth.files, samples, indices, b.epoch, b.batch, INPUT_SIZE,
                                           mix_type)
        got = b.model_input("cpu")
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, x), f"epoch {b.epoch} batch {b.batch}"
        assert torch.equal(b.targets, targets)
        assert torch.equal(b.soft_labels, soft) and b.soft_labels.dtype == torch.float32
        assert b.images.dtype == torch.uint8 and b.images.shape == (len(indices), 3, INPUT_SIZE, INPUT_SIZE)
        seen += 1
    assert seen == len(stream) == 9


@pytest.mark.parametrize("decode_cache", [False, True])
def test_workers_give_identical_stream_and_keep_order(converted, decode_cache):
    output, _, _ = converted(mix_type="cutmix")
    inline = list(_stream(output, workers=0, decode_cache=False))
    parallel = list(_stream(output, workers=2, decode_cache=decode_cache))
    assert [(b.epoch, b.batch) for b in parallel] == [(e, k) for e in range(3) for k in range(4)]
    for a, b in zip(inline, parallel):
        assert (a.epoch, a.batch) == (b.epoch, b.batch)
        assert torch.equal(a.model_input(), b.model_input())
        assert torch.equal(a.soft_labels, b.soft_labels)


def test_decoded_cache_by_default_when_it_fits_the_memory_budget(converted, monkeypatch):
    output, _, _ = converted()
    monkeypatch.setattr("fkd_shards.batches.images.available_memory", lambda: 10**12)
    on = _stream(output, workers=0)
    assert on.pixels.cache and on.pixels.note.startswith("decoded cache: ")
    monkeypatch.setattr("fkd_shards.batches.images.available_memory", lambda: 2 * on.pixels.table.pixel_bytes - 2)
    off = _stream(output, workers=0)
    assert not off.pixels.cache and "would exceed" in off.pixels.note
    assert _stream(output, workers=0, decode_cache=True).pixels.cache  # asked for: kept
    for a, b in zip(on, off):
        assert torch.equal(a.model_input(), b.model_input())


def test_a_small_dev_shm_turns_the_shared_cache_off_or_is_an_error(converted, monkeypatch):
    from fkd_shards.batches.images import ImageError

    output, _, _ = converted()
    monkeypatch.setattr("fkd_shards.batches.images.shared_memory_free", lambda: 1000)  # a container's tiny /dev/shm
    auto = _stream(output, workers=2)
    assert not auto.pixels.cache and "the free space of /dev/shm" in auto.pixels.note
    with pytest.raises(ImageError, match="do not fit the 0.00 GB free in /dev/shm; make it larger"):
        _stream(output, workers=2, decode_cache=True)
    inline = _stream(output, workers=0, decode_cache=True)  # no worker: ordinary memory, /dev/shm is not used
    assert inline.pixels.cache and not inline.pixels.buffer.is_shared()
    assert all(torch.equal(a.model_input(), b.model_input()) for a, b in zip(auto, inline))


def test_the_cache_decodes_each_image_on_first_use_only(converted):
    output, _, _ = converted(batch_size=8)
    stream = _stream(output, workers=0, decode_cache=True)
    source = stream.pixels
    batches = iter(stream)
    first = next(batches)
    needed = len(np.unique(_samples_of(output, 0, 0)))
    assert first.crops.shape[0] == needed
    assert int(source.ready.sum()) == needed < len(source)  # training started before every image was decoded
    list(batches)
    assert int(source.ready.sum()) == len(source)
    for k in range(len(source)):
        img = Image.open(io.BytesIO(source.table.encoded[k])).convert("RGB")
        assert np.array_equal(source.rgb(k), np.asarray(img))


def _samples_of(output, epoch, batch):
    record = next(r for r in shards.ShardSet(output).batches(epoch, epoch + 1) if r.batch == batch)
    return np.concatenate([record.indices, record.indices[record.mix_index]])


def test_model_input_layouts_hold_the_same_values(converted):
    output, _, _ = converted(mix_type="cutmix")
    for b in _stream(output, workers=0, end_epoch=1):
        nchw, nhwc = b.model_input(), b.model_input(memory_format=torch.channels_last)
        assert nchw.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(nchw, nhwc)


def test_start_and_end_epoch(converted):
    output, _, _ = converted()
    got = [(b.epoch, b.batch) for b in _stream(output, start_epoch=1, end_epoch=2, workers=0)]
    assert got == [(1, k) for k in range(4)]
    with pytest.raises(ValueError, match="outside"):
        _stream(output, start_epoch=0, end_epoch=4)


@pytest.mark.parametrize("mix_type", ["cutmix", "mixup", "none"])
def test_rank_slices_reassemble_the_batch(converted, mix_type):
    output, _, _ = converted(mix_type=mix_type, batch_size=8)
    full = list(_stream(output, workers=0, end_epoch=1))
    parts = [list(_stream(output, workers=0, end_epoch=1, rank=r, world_size=4)) for r in range(4)]
    for k, whole in enumerate(full):
        slices = [p[k] for p in parts]
        assert [list(s.rows) for s in slices] == [
            list(range(r * 2, min(r * 2 + 2, whole.batch_rows))) for r in range(4)]
        assert torch.equal(torch.cat([s.model_input() for s in slices]), whole.model_input())
        assert torch.equal(torch.cat([s.targets for s in slices]), whole.targets)
        assert torch.equal(torch.cat([s.soft_labels for s in slices]), whole.soft_labels)
    # The short last batch (4 rows) leaves ranks 2 and 3 empty.
    assert [len(p[2].rows) for p in parts] == [2, 2, 0, 0]


def test_a_rank_crops_only_its_rows_and_partners(converted):
    output, _, _ = converted(mix_type="none", batch_size=8)
    stream = _stream(output, workers=0, rank=1, world_size=2)
    list(stream)
    assert stream.cropped_fraction == pytest.approx(0.4)  # 4+4+0 of 8+8+4 rows per epoch


def test_slice_rows():
    assert slice_rows(8, 8, 3, 4) == range(6, 8)
    assert slice_rows(8, 5, 2, 4) == range(4, 5)
    assert slice_rows(8, 3, 2, 4) == range(3, 3)


def test_misaligned_worker_output_is_an_error(converted, monkeypatch):
    from fkd_shards.batches.plan import BatchPlan

    output, _, _ = converted()
    real = BatchPlan.crop_request

    def shifted(plan):
        (epoch, batch), *rest = real(plan)
        return ((epoch, batch + (batch == 2)), *rest)  # the worker says batch 3 where batch 2 belongs

    monkeypatch.setattr(BatchPlan, "crop_request", shifted)
    with pytest.raises(StreamError, match="a worker returned epoch 0 batch 3 where epoch 0 batch 2 belongs"):
        list(_stream(output, workers=0))


def test_results_whose_tuples_became_lists_still_arrive_in_order(converted, monkeypatch):
    # torch's pin-memory thread turned tuples into lists before 2.9: the key (epoch, batch) must still match.
    from fkd_shards.batches.stream import BatchMaker

    output, _, _ = converted()
    real = BatchMaker.crop
    monkeypatch.setattr(BatchMaker, "crop", lambda self, request, shared=False: [list(x) if isinstance(x, tuple)
                                                                                else x for x in real(self, request)])
    listed = list(_stream(output, workers=0))
    monkeypatch.setattr(BatchMaker, "crop", real)
    assert [(b.epoch, b.batch) for b in listed] == [(e, k) for e in range(3) for k in range(4)]
    assert all(torch.equal(a.model_input(), b.model_input()) for a, b in zip(listed, _stream(output, workers=0)))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_that_does_not_decode_is_one_line_naming_it(converted, tmp_path, workers):
    output, _, _ = converted()
    from tests.tamper import reseal

    reseal(output, image_bytes={5: b"\xff\xd8\xff not a jpeg"})
    with pytest.raises(StreamError) as caught:
        list(_stream(output, workers=workers, decode_cache=False))
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "image 5 (new001/class001_id000.JPEG): cannot decode (not a known image format)" in message


def test_crop_rounds_to_nearest_like_pil():
    # A box edge at 2.6 px must round to 3, not truncate to 2.
    pixels = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    img = Image.fromarray(pixels, "RGB")
    coords = np.array([[0.26, 0.0, 0.5, 0.5]], dtype=np.float32)
    box = pixel_boxes(coords, np.array([10]), np.array([10]))[0]
    assert box.tolist() == [0, 3, 5, 8]
    out = crop_resize_flip(pixels, box, False, 5)
    expected = np.asarray(img.crop((0, 3, 5, 8)).resize((5, 5), Image.BILINEAR))
    truncated = np.asarray(img.crop((0, 2, 5, 7)).resize((5, 5), Image.BILINEAR))
    assert np.array_equal(out, expected) and not np.array_equal(out, truncated)


def test_cropping_cached_pixels_equals_pil_crop_of_the_image():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), "RGB")
              for shape in [(37, 29, 3), (5, 41, 3), (23, 23, 3)]]  # several: offsets and row strides differ
    encoded = []
    for img in images:
        png = io.BytesIO()
        img.save(png, format="PNG")
        encoded.append(png.getvalue())
    shapes = np.array([(img.size[1], img.size[0]) for img in images])
    source = ImageSource(ImageTable(encoded, np.zeros(3, np.int64), shapes, ["a", "b", "c"]), cache=True)
    cases = [np.array(c, dtype=np.float32) for c in
             [(0.5 / 37, 0.5 / 29, 0.5, 0.5), (2.5 / 37, 1.5 / 29, 0.3, 0.7), (0, 0, 1, 1),
              (0.9, 0.9, 0.2, 0.2)]]  # half-pixel edges, whole, reaching outside
    cases += [rng.random(4, dtype=np.float32) * np.float32(0.7) + np.float32(0.05) for _ in range(100)]
    for k, img in enumerate(images):
        assert np.array_equal(source.rgb(k), np.asarray(img))
        width, height = img.size
        for coords in cases:
            box = pixel_boxes(coords[None], np.array([height]), np.array([width]))[0]
            top, left = float(coords[0]) * height, float(coords[1]) * width
            float_box = (left, top, left + float(coords[3]) * width, top + float(coords[2]) * height)
            for flip in (False, True):
                for size in (7, 16):
                    # The reference: PIL's own crop of the float box (PIL rounds it), resize, flip.
                    ref = img.crop(float_box).resize((size, size), Image.BILINEAR)
                    ref = ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref
                    assert np.array_equal(crop_resize_flip(source.rgb(k), box, flip, size), np.asarray(ref)), \
                        (k, coords, flip, size)


def test_device_crops_cover_both_resample_paths_and_slices(converted):
    output, _, truth = converted(batch_size=8)
    stream = _stream(output, workers=0, crop_device="cpu")
    record = next(iter(stream.shard_set.batches()))
    shapes = stream.pixels.table.shapes[record.indices]
    boxes = pixel_boxes(record.coords, shapes[:, 0], shapes[:, 1])
    by_pil = boxes[:, 3] - boxes[:, 1] > INPUT_SIZE
    assert by_pil.any() and not by_pil.all()  # the fixture exercises the torch path and the PIL one
    full = list(_stream(output, workers=0, end_epoch=1))
    parts = [list(_stream(output, workers=0, end_epoch=1, rank=r, world_size=2, crop_device="cpu"))
             for r in range(2)]
    for k, whole in enumerate(full):
        assert torch.equal(torch.cat([p[k].model_input() for p in parts]), whole.model_input())


def test_decoded_cache_reaches_workers_started_without_fork(converted):
    # Python 3.14 starts DataLoader workers with forkserver by default: the dataset, cache included,
    # is pickled to them (torch moves the cache into shared memory once) instead of inherited.
    output, _, _ = converted(mix_type="cutmix")
    code = (f"import torch, torch.multiprocessing as mp\n"
            f"from fkd_shards.batches.stream import BatchStream\n"
            f"from fkd_shards.shards import ShardSet\n"
            f"if __name__ == '__main__':\n"
            f"    mp.set_start_method('forkserver', force=True)\n"
            f"    a = BatchStream(ShardSet({output!r}), workers=0, decode_cache=False, end_epoch=1)\n"
            f"    b = BatchStream(ShardSet({output!r}), workers=2, decode_cache=True, end_epoch=1)\n"
            f"    same = [torch.equal(x.model_input(), y.model_input()) for x, y in zip(a, b)]\n"
            f"    print(len(same), all(same), b.pixels.buffer.is_shared())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["4", "True", "True"], done.stderr[-2000:]


def test_device_crops_are_prepared_one_batch_ahead_in_another_thread(converted, monkeypatch):
    import threading

    from fkd_shards.batches.crop import CropError
    from fkd_shards.batches.device_crop import DeviceCropper
    from fkd_shards.batches.plan import BatchPlan

    output, _, _ = converted()
    requested, preparers = [], set()
    real_request, real_prepare = BatchPlan.crop_request, DeviceCropper.prepare

    def request(plan):
        requested.append(plan.key)
        return real_request(plan)

    def prepare(self, samples, coords, flips):
        preparers.add(threading.current_thread().name)
        return real_prepare(self, samples, coords, flips)

    monkeypatch.setattr(BatchPlan, "crop_request", request)
    monkeypatch.setattr(DeviceCropper, "prepare", prepare)
    stream = _stream(output, workers=0, crop_device="cpu")
    total = len(stream)
    for k, batch in enumerate(stream):
        # when batch k arrives, batch k + 1 has already been handed to the preparing thread
        assert requested[-1] == ((k + 1) // 4, (k + 1) % 4) if k + 1 < total else requested[-1] == batch.plan.key
        assert len(requested) == min(k + 2, total)
    assert preparers and threading.current_thread().name not in preparers

    def refuse(self, samples, coords, flips):
        raise CropError("the crop box of image 3 rounds to [1, 1, 1, 1]: no pixels")

    monkeypatch.setattr(DeviceCropper, "prepare", refuse)
    with pytest.raises(StreamError, match=r"^epoch 0 batch 0: the crop box of image 3 rounds to"):
        list(_stream(output, workers=0, crop_device="cpu"))
