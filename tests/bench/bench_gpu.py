"""GPU benchmark and NCCL check (skips cleanly without CUDA).

    python tests/bench/bench_gpu.py [--steps 100] [--workers 8] [--images 2048]
    python tests/bench/bench_gpu.py --device cpu --steps 1 --images 64 --batch-size 8 --models resnet18

1. Training steps of resnet18 and resnet50 at batch 256, 224 px: synthetic data already on the GPU
   versus the real data path (BatchStream, normalise and mix on the GPU), in fp32 and in
   ``--amp bf16 --channels-last``. If the data path's images/s is below the synthetic one, the GPU waits.
   Also BatchStream with ``crop_device`` (``--device-crops``): crops made on the GPU.
2. fkd-relabel with a resnet50 teacher: images/s of the whole run against the teacher forward alone on
   the same model inputs (how close to teacher-bound), fp32 and bf16.
3. ``torchrun --nproc-per-node=<GPUs> -m fkd_shards.train ... --device cuda`` for one epoch (NCCL).
4. ``--students K`` resnet18s (``--seeds 0..K-1``, bf16 + channels-last) in one fkd-train run against
   one solo run, each a whole process: K x the solo time over the one run's time (goal >= 0.9: the
   data path paid once, the GPU busy with students).
(The second command line is a smoke run of this script on the CPU, with gloo.)
Prints a table last. Not a test: nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

import torch

from common import make_fixture, now, print_table


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _steps(cfg, manifest, batches, steps: int, batch_size: int) -> float:
    """Images/s of ``steps`` training steps (after 5 warm-up steps) of a fresh student."""
    from fkd_shards.train import loop

    state = loop.build_state(cfg, manifest)
    totals = loop.EpochTotals.zeros(cfg.device)
    for k, batch in enumerate(batches):  # the first 5 steps warm up
        if k == 5:
            _sync(cfg.device)
            start = now()
        loop.train_step(state, batch, cfg, totals)
        if k == steps + 4:
            break
    _sync(cfg.device)
    return steps * batch_size / (now() - start)


class _Synthetic:
    """A batch already on the GPU (no data path at all)."""

    def __init__(self, size: int, classes: int, device: str):
        self.rows = range(size)
        self.batch_rows = size
        self.x = torch.randn(size, 3, 224, 224, device=device)
        self.soft_labels = torch.randn(size, classes, device=device)
        self.targets = torch.randint(0, classes, (size,), device=device)

    def model_input(self, device, memory_format=torch.contiguous_format):
        if not self.x.is_contiguous(memory_format=memory_format):
            self.x = self.x.contiguous(memory_format=memory_format)  # once, not every step
        return self.x


def _relabel(train_dir: str, root: str, a, device: str) -> list[list]:
    """fkd-relabel end to end against the teacher alone on the same model inputs."""
    import shutil

    import torchvision

    from fkd_shards.batches.stream import BatchStream
    from fkd_shards.relabel.cli import main as relabel_main
    from fkd_shards.shards import ShardSet

    classes = len(os.listdir(train_dir))
    torch.manual_seed(0)
    teacher = torchvision.models.get_model(a.teacher, num_classes=classes).eval()
    weights = os.path.join(root, "teacher.pth")
    torch.save(teacher.state_dict(), weights)
    teacher.to(device)
    rows = []
    for amp in ("off", "bf16"):
        out = os.path.join(root, f"relabel-{amp}")
        shutil.rmtree(out, ignore_errors=True)
        start = now()
        assert relabel_main(["--train-dir", train_dir, "--output", out, "--teacher", a.teacher, weights,
                             "--batch-size", str(a.batch_size), "--epochs", "1", "--input-size", "224",
                             "--min-alignment", "0", "-j", str(a.workers), "--device", device, "--amp", amp,
                             "--no-progress"]) == 0
        whole = now() - start
        inputs = [b.model_input(device) for b in BatchStream(ShardSet(out), workers=0)]
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16")
        with torch.no_grad(), autocast:
            teacher(inputs[0])
            _sync(device)
            start = now()
            for x in inputs:
                teacher(x)
            _sync(device)
        alone = now() - start
        rows.append([amp, f"{a.images / whole:.0f}", f"{a.images / alone:.0f}", f"{alone / whole:.2f}"])
    return rows


def _students(shard_dir: str, manifest, root: str, a, device: str) -> list[list]:
    """Section 4: whole fkd-train processes, timed from outside (start-up and data path included)."""
    if a.students <= 0:
        return []
    gpu = device.startswith("cuda")
    common = ["--shards", shard_dir, "--device", device, "-j", str(a.workers), "--model", "resnet18",
              "--amp", "bf16" if gpu else "off", *(["--channels-last"] if gpu else [])]
    seconds = {}
    for run, seeds in (("solo", "0"), ("together", ",".join(map(str, range(a.students))))):
        started = now()
        done = subprocess.run([sys.executable, "-m", "fkd_shards.train", *common, "--seeds", seeds, "--output-dir",
                               os.path.join(root, f"students-{run}"), "--restart"], capture_output=True, text=True)
        if done.returncode != 0:
            return [[run, "FAILED: " + done.stderr[-300:], "", ""]]
        seconds[run] = now() - started
    images = manifest.num_images * manifest.epochs
    return [["1 student", f"{seconds['solo']:.1f}", f"{images / seconds['solo']:.0f}", ""],
            [f"{a.students} students", f"{seconds['together']:.1f}", f"{images * a.students / seconds['together']:.0f}",
             f"{a.students * seconds['solo'] / seconds['together']:.2f}"]]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--teacher", default="resnet50", help="fkd-relabel's teacher")
    p.add_argument("--students", type=int, default=4, help="resnet18 students of section 4 (0: skip it)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available; skipping")
        return 0
    from fkd_shards.batches.stream import BatchStream
    from fkd_shards.convert import ConvertOptions, convert
    from fkd_shards.train.config import build_parser, resolve

    batch = a.batch_size
    root = os.path.join(a.workdir, f"gpu-{a.images}-{batch}")
    epochs = max(2, -(-(a.steps + 5) * batch // a.images))
    train_dir, fkd_path, _ = make_fixture(root, images=a.images, classes=min(100, a.images // 4), size=224,
                                          batch_size=batch,
                                          epochs=epochs, width=1000)
    shard_dir = os.path.join(root, "shards")
    if not os.path.exists(os.path.join(shard_dir, "manifest.json")):
        convert(ConvertOptions(train_dir, fkd_path, shard_dir, input_size=224, overwrite=True, progress=False),
                log=lambda *_: None)
    from fkd_shards.common.distributed import DistEnv
    from fkd_shards.shards import ShardSet

    shard_set = ShardSet(shard_dir)
    manifest = shard_set.manifest
    device = a.device
    rows = []
    for name in a.models:
        for amp, channels_last in (("off", False), ("bf16", True)):
            flags = ["--shards", shard_dir, "--model", name, "--amp", amp, "--device", device]
            cfg = resolve(build_parser().parse_args(flags + (["--channels-last"] if channels_last else [])),
                          manifest, DistEnv())
            rates = []
            for source in ("synthetic", "data path", "device crops"):
                if source == "synthetic":
                    fixed = _Synthetic(batch, manifest.soft_label_width, device)
                    batches = (fixed for _ in range(a.steps + 5))
                elif source == "data path":
                    batches = iter(BatchStream(shard_set, workers=a.workers, pin_memory=True))
                else:
                    batches = iter(BatchStream(shard_set, workers=0, crop_device=device))
                rates.append(_steps(cfg, manifest, batches, a.steps, batch))
            rows.append([name, "bf16+channels_last" if amp == "bf16" else "fp32", f"{rates[0]:.0f}",
                         f"{rates[1]:.0f}", "yes" if rates[1] < 0.95 * rates[0] else "no", f"{rates[2]:.0f}"])
    relabel_rows = _relabel(train_dir, root, a, device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 2
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
                          "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "fkd_shards.train",
                          "--shards", shard_dir, "--output-dir", os.path.join(root, "ddp"), "--epochs", "1",
                          "--device", device, "-j", str(max(1, a.workers // gpus))],
                         capture_output=True, text=True)
    student_rows = _students(shard_dir, manifest, root, a, device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU (smoke run)"
    print_table(f"{name}, batch {batch}, 224 px, {a.steps} steps, "
                f"{a.workers} workers, {os.cpu_count()} CPUs",
                ["model", "precision", "synthetic img/s", "data path img/s", "GPU waits",
                 "device crops img/s"], rows)
    print_table(f"fkd-relabel, {a.teacher} teacher, {a.images} images, batch {batch}, 224 px",
                ["amp", "relabel img/s", "teacher alone img/s", "teacher share"], relabel_rows)
    if student_rows:
        print_table(f"{a.students} resnet18 students in one run against one solo run, {epochs} epochs, bf16 + "
                    f"channels-last", ["run", "wall s", "student-images/s", "K x solo time / one run's"], student_rows)
    print(f"\ntorchrun --nproc-per-node={gpus} ({'NCCL' if device.startswith('cuda') else 'gloo'}), 1 epoch: "
          f"{'OK' if ddp.returncode == 0 else 'FAILED: ' + ddp.stderr[-1500:]}")
    return 0 if ddp.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
