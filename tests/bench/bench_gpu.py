"""The one GPU script: checks and benchmarks of the CUDA paths, a table per section, nothing asserted
about time (skips cleanly without CUDA).

    python tests/bench/bench_gpu.py [--steps 50] [--workers 8] [--images 2048] [--students 2] [--sections 1 2 3]
    python tests/bench/bench_gpu.py --device cpu --steps 2 --images 64 --batch-size 8 --models resnet18 \\
        --teacher resnet18 --students 2          # a smoke run of this script on the CPU (gloo)

1. Model input: the crops of ``--device-crops`` and the CPU's (PIL) compared byte for byte, and the
   model input made on the GPU against the CPU's, over every crop of the set's first epochs.
2. Training steps at batch B, 224 px, per model, fp32 and bf16 + channels-last: images/s with the
   batch already on the GPU as uint8 crops (normalise and mix still run: the GPU-bound ceiling),
   through the real data path (BatchStream, pinned, crop workers), and with device crops; peak
   device memory. Warm-up covers the prefetched batches, so the data path's rate is its steady one.
3. One step under the microscope: host-device synchronisations inside ``train_step`` (CUDA's sync
   debug mode), and the GPU's busy share over a few steps (torch.profiler's kernel time / wall time).
4. fkd-relabel with a ``--teacher``: images/s of the labelling loop (start-up excluded, as the tool
   reports it) and of the whole run, against the teacher forward alone on the same inputs; and the
   teacher's logits with TF32 on against off (what ``--tf32`` changes).
5. ``--students K`` resnet18s in one fkd-train run against one solo run, each a whole process.
6. ``torchrun --nproc-per-node=<GPUs>`` for one epoch (with one GPU: a process group of one rank, so
   no communication is tested, and the line says so).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings

import torch

from common import make_fixture, now, print_table


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _warmup(workers: int) -> int:
    """Steps before timing: every batch the DataLoader prefetched (2 per worker) plus 5."""
    return 2 * workers + 5


def _steps(cfg, manifest, batches, steps: int, warmup: int) -> tuple[float, float]:
    """Images/s of ``steps`` training steps after ``warmup`` of a fresh student, and the peak device
    memory (GB) of the run."""
    from fkd_shards.train import loop

    state = loop.build_state(cfg, manifest)
    totals = loop.EpochTotals.zeros(cfg.device)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    images = 0
    for k, batch in enumerate(batches):
        if k == warmup:
            _sync(cfg.device)
            start = now()
        loop.train_step(state, batch, cfg, totals)
        if k >= warmup:
            images += len(batch.rows)
        if k == warmup + steps - 1:
            break
    _sync(cfg.device)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cfg.device.startswith("cuda") else float("nan")
    return images / (now() - start), peak


class _OnDevice:
    """The stream's first batch with its uint8 crops moved to the device once: every step still
    normalises and mixes (as the real path does), nothing else is made or copied."""

    def __init__(self, batch, device: str):
        self.batch = batch
        batch.crops = batch.crops.to(device)
        batch.soft_labels, batch.targets = batch.soft_labels.to(device), batch.targets.to(device)

    def __iter__(self):
        while True:
            yield self.batch


def _model_input_identity(shard_set, a, device: str) -> list[list]:
    """Section 1: device crops against PIL's, byte for byte; GPU model input against the CPU's."""
    from fkd_shards.batches.stream import BatchStream

    end = min(shard_set.manifest.epochs, 2)
    cpu = BatchStream(shard_set, 0, end, workers=a.workers)
    on_device = BatchStream(shard_set, 0, end, workers=0, crop_device=device)
    crops = equal = 0
    worst = 0.0
    for host, dev in zip(cpu, on_device):
        same = (host.crops == dev.crops.cpu()).flatten(1).all(dim=1)
        crops, equal = crops + len(same), equal + int(same.sum())
        worst = max(worst, (host.model_input("cpu") - host.model_input(device).cpu()).abs().max().item())
    return [["device crops = PIL crops (uint8)", f"{equal} of {crops}"],
            ["model input on the GPU vs the CPU, max |diff|", f"{worst:.2e}"]]


def _step_profile(cfg, manifest, shard_set, a) -> list[list]:
    """Section 3: syncs inside train_step (sync debug mode) and the GPU's busy share (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from fkd_shards.batches.stream import BatchStream
    from fkd_shards.train import loop

    state = loop.build_state(cfg, manifest)
    totals = loop.EpochTotals.zeros(cfg.device)
    batches = iter(BatchStream(shard_set, workers=a.workers, pin_memory=True))
    for _ in range(_warmup(a.workers)):
        loop.train_step(state, next(batches), cfg, totals)
    _sync(cfg.device)
    syncs = []
    for _ in range(5):
        batch = next(batches)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.train_step(state, batch, cfg, totals)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    steps = 10
    ready = [next(batches) for _ in range(steps)]
    _sync(cfg.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = now()
        for batch in ready:
            loop.train_step(state, batch, cfg, totals)
        _sync(cfg.device)
        wall = now() - start
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return [["host-device syncs inside train_step (5 steps)", ", ".join(map(str, syncs))],
            [f"GPU busy share over {steps} steps (prefetched batches)", f"{kernel_us / 1e6 / wall:.2f}"]]


def _relabel(train_dir: str, root: str, a, device: str) -> tuple[list[list], list[list]]:
    """Section 4: fkd-relabel end to end against the teacher alone; logits with TF32 on and off."""
    import torchvision

    from fkd_shards.batches.stream import BatchStream
    from fkd_shards.common.precision import set_precision
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
        said = io.StringIO()
        start = now()
        with contextlib.redirect_stdout(said):
            code = relabel_main(["--train-dir", train_dir, "--output", out, "--teacher", a.teacher, weights,
                                 "--batch-size", str(a.batch_size), "--epochs", "2", "--input-size", "224",
                                 "--min-alignment", "0", "-j", str(a.workers), "--device", device, "--amp", amp,
                                 "--no-progress"])
        whole = now() - start
        if code != 0:
            rows.append([amp, "FAILED", "", "", "", ""])
            continue
        loop_s = float(re.search(r"of ([0-9.]+) s", said.getvalue()).group(1))
        images = 2 * ShardSet(out).manifest.num_images
        inputs = [b.model_input(device) for b in BatchStream(ShardSet(out), workers=a.workers)]
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16")
        with torch.no_grad(), autocast:
            teacher(inputs[0])
            _sync(device)
            start = now()
            for x in inputs:
                teacher(x)
            _sync(device)
        alone = now() - start
        rows.append([amp, f"{images / loop_s:.0f}", f"{images / whole:.0f}", f"{images / alone:.0f}",
                     f"{alone / loop_s:.2f}"])
    x = inputs[0].float()
    logits = {}
    with torch.no_grad():
        for tf32 in (False, True):
            set_precision(tf32=tf32, cudnn_benchmark=False)
            logits[tf32] = teacher(x).float()
        set_precision(tf32=False, cudnn_benchmark=False)
        on_cpu = teacher.cpu()(x.cpu()).float()
    differs = (logits[True] - logits[False]).abs().max().item()
    argmax = (logits[True].argmax(1) == logits[False].argmax(1)).float().mean().item()
    precision = [["teacher logits, TF32 on vs off: max |diff|", f"{differs:.2e}"],
                 ["teacher argmax agreement, TF32 on vs off", f"{argmax:.4f}"],
                 ["teacher logits, GPU fp32 (TF32 off) vs CPU: max |diff|",
                  f"{(logits[False].cpu() - on_cpu).abs().max().item():.2e}"]]
    return rows, precision


def _students(shard_dir: str, manifest, root: str, a, device: str) -> list[list]:
    """Section 5: whole fkd-train processes, timed from outside (start-up and data path included)."""
    if a.students <= 0:
        return []
    gpu = device.startswith("cuda")
    common = ["--shards", shard_dir, "--device", device, "-j", str(a.workers), "--model", "resnet18", "--no-progress",
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


def _torchrun(shard_dir: str, root: str, a, device: str) -> str:
    """Section 6: one epoch under torchrun, one process per GPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 2
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
                          "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "fkd_shards.train",
                          "--shards", shard_dir, "--output-dir", os.path.join(root, "ddp"), "--epochs", "1",
                          "--restart", "--no-progress", "--device", device, "-j", str(max(1, a.workers // gpus))],
                         capture_output=True, text=True)
    backend = "NCCL" if device.startswith("cuda") else "gloo"
    what = (f"{gpus} ranks ({backend})" if gpus > 1 else
            f"1 rank ({backend} process group of one: no communication tested)")
    return f"torchrun, {what}, 1 epoch: " + ("OK" if run.returncode == 0 else "FAILED: " + run.stderr[-1500:])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--teacher", default="resnet50", help="fkd-relabel's teacher")
    p.add_argument("--students", type=int, default=2, help="resnet18 students of section 5 (0: skip it)")
    p.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="which sections to run")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fkd-bench"))
    a = p.parse_args()
    gpu = a.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available; skipping")
        return 0
    from fkd_shards.common.distributed import DistEnv
    from fkd_shards.convert import ConvertOptions, convert
    from fkd_shards.shards import ShardSet
    from fkd_shards.train.config import build_parser, resolve

    batch, device = a.batch_size, a.device
    warmup = _warmup(a.workers)
    root = os.path.join(a.workdir, f"gpu-{a.images}-{batch}")
    epochs = max(2, -(-(a.steps + warmup) * batch // a.images))
    train_dir, fkd_path, _ = make_fixture(root, images=a.images, classes=min(100, a.images // 4), size=224,
                                          batch_size=batch, epochs=epochs, width=1000)
    shard_dir = os.path.join(root, "shards")
    if not os.path.exists(os.path.join(shard_dir, "manifest.json")):
        convert(ConvertOptions(train_dir, fkd_path, shard_dir, input_size=224, overwrite=True, progress=False),
                log=lambda *_: None)
    shard_set = ShardSet(shard_dir)
    manifest = shard_set.manifest
    from fkd_shards.batches.stream import BatchStream

    run = set(a.sections)
    identity = _model_input_identity(shard_set, a, device) if gpu and 1 in run else []
    rows = []
    for name in a.models if 2 in run else []:
        for amp, channels_last in (("off", False), ("bf16", True)):
            flags = ["--shards", shard_dir, "--model", name, "--amp", amp, "--device", device]
            cfg = resolve(build_parser().parse_args(flags + (["--channels-last"] if channels_last else [])),
                          manifest, DistEnv())
            measured = []
            for source in ("on device", "data path", "device crops"):
                if source == "on device":
                    first = next(iter(BatchStream(shard_set, workers=0)))
                    batches = iter(_OnDevice(first, device))
                elif source == "data path":
                    batches = iter(BatchStream(shard_set, workers=a.workers, pin_memory=True))
                else:
                    batches = iter(BatchStream(shard_set, workers=0, crop_device=device))
                measured.append(_steps(cfg, manifest, batches, a.steps, warmup))
            (ceiling, peak), (path, _), (crops, _) = measured
            rows.append([name, "bf16+channels_last" if amp == "bf16" else "fp32", f"{ceiling:.0f}", f"{path:.0f}",
                         f"{path / ceiling:.2f}", f"{crops:.0f}", f"{peak:.1f}"])
    profile_rows = []
    if gpu and 3 in run:
        cfg = resolve(build_parser().parse_args(["--shards", shard_dir, "--model", "resnet18", "--amp", "bf16",
                                                 "--channels-last", "--device", device]), manifest, DistEnv())
        profile_rows = _step_profile(cfg, manifest, shard_set, a)
    relabel_rows, precision_rows = _relabel(train_dir, root, a, device) if 4 in run else ([], [])
    student_rows = _students(shard_dir, manifest, root, a, device) if 5 in run else []
    ddp = _torchrun(shard_dir, root, a, device) if 6 in run else "not run"
    name = torch.cuda.get_device_name() if gpu else "CPU (smoke run)"
    print(f"\n== {name}, torch {torch.__version__}, {os.cpu_count()} CPUs, {a.workers} crop workers ==")
    if identity:
        print_table(f"1. model input over epochs 0-1 ({manifest.num_images} images, 224 px)", ["check", "result"],
                    identity)
    if rows:
        print_table(f"2. training steps, batch {batch}, 224 px, {a.steps} steps after {warmup} warm-up",
                    ["model", "precision", "crops on GPU img/s", "data path img/s", "data path / GPU-bound",
                     "device crops img/s", "peak GB"], rows)
    if profile_rows:
        print_table("3. one resnet18 bf16 channels-last step", ["measure", "value"], profile_rows)
    if relabel_rows:
        print_table(f"4. fkd-relabel, {a.teacher} teacher, {manifest.num_images} images x 2 epochs, batch {batch}",
                    ["amp", "labelling img/s", "whole run img/s", "teacher alone img/s", "teacher share"],
                    relabel_rows)
        print_table("4b. float32 precision of the teacher", ["check", "result"], precision_rows)
    if student_rows:
        print_table(f"5. {a.students} resnet18 students in one run against one solo run, {epochs} epochs",
                    ["run", "wall s", "student-images/s", "K x solo time / one run's"], student_rows)
    print(f"\n6. {ddp}")
    return 0 if ddp.endswith("OK") or 6 not in run else 1


if __name__ == "__main__":
    sys.exit(main())
