"""The KD loop of train_FKD.py (SRE2L-FACTS section 6), reading top to bottom."""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from fkd_shards import shards
from fkd_shards.shards.io import first_line

from . import checkpoint
from .config import ConfigError, TrainConfig
from .distributed import DistEnv, sum_across_ranks
from .kd import kd_loss, lr_factor, parameter_groups, topk_correct
from .metrics import MetricsLog, start_wandb
from .stream import Batch, BatchStream
from .validate import evaluate, val_loader


@dataclass
class EpochTotals:
    """Sums over an epoch's micro-batches, kept on the device until the epoch ends."""

    loss: torch.Tensor  # sum of (loss / A) * rows, as the original's meter
    top1: torch.Tensor
    top5: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def zeros(cls, device: str) -> EpochTotals:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(4)))


def build_model(cfg: TrainConfig, num_classes: int, device: str) -> nn.Module:
    if cfg.model not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"--model {cfg.model} is not a torchvision.models classification model")
    model = torchvision.models.get_model(cfg.model, weights=None, num_classes=num_classes)
    if cfg.init_weights:
        weights = checkpoint.model_state(checkpoint.load(cfg.init_weights))
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise checkpoint.CheckpointError(f"{cfg.init_weights}: does not fit --model {cfg.model} "
                                             f"({str(exc).splitlines()[0]})") from None
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.sgd:
        return torch.optim.SGD(parameter_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                               momentum=cfg.momentum)
    return torch.optim.AdamW(parameter_groups(model, cfg.adamw_weight_decay), lr=cfg.adamw_lr)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, first_epoch: int) -> LambdaLR:
    """LambdaLR stepped once per epoch, positioned at ``first_epoch``."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, lambda e: lr_factor(e, cfg.epochs, cfg.cos), last_epoch=first_epoch - 1)


def train_step(model: nn.Module, batch: Batch, cfg: TrainConfig, device: str, optimizer, scaler,
               totals: EpochTotals, micro_rows: int) -> None:
    """One loaded batch: zero_grad, micro-batches of B/(K*A) rows each with its own forward and
    loss/A backward, then one optimizer step.

    Every rank runs as many micro-steps as rank 0 (which holds the most rows); a rank whose part
    of the short last batch is empty runs empty forwards with a zero loss, so that collective calls
    (the gradient all-reduce on the last micro-step, SyncBatchNorm) match across ranks.
    """
    x = batch.model_input(device, torch.channels_last if cfg.channels_last else torch.contiguous_format)
    soft = batch.soft_labels.to(device)
    targets = batch.targets.to(device)
    accumulation = cfg.gradient_accumulation_steps
    rank0_rows = min(micro_rows * accumulation, batch.batch_rows)
    micro_steps = max(1, math.ceil(rank0_rows / micro_rows))
    divisor = float(accumulation)  # the original's: the short last batch is divided by A too
    if cfg.last_batch_loss == "mean":
        # Divide by the micro-batches the batch really has (over all K ranks, whose gradients DDP
        # averages), so that the short last batch's update is a mean like every other one.
        ranks = cfg.batch_size // (micro_rows * accumulation)
        divisor = math.ceil(batch.batch_rows / micro_rows) / ranks
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if cfg.amp == "bf16"
                              else torch.float16, enabled=cfg.amp != "off")
    optimizer.zero_grad()
    for k in range(micro_steps):
        part = slice(k * micro_rows, (k + 1) * micro_rows)
        last = k == micro_steps - 1
        with nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync():
            with autocast:
                out = model(x[part])
            rows = out.shape[0]
            if rows:
                loss = kd_loss(out.float(), soft[part], cfg.temperature) / divisor
            else:
                loss = out.float().sum() * 0.0
            scaler.scale(loss).backward()
        if rows:
            top1, top5 = topk_correct(out.detach(), targets[part], (1, 5))
            totals.loss += loss.detach().double() * rows
            totals.top1 += top1
            totals.top5 += top5
            totals.rows += rows
    scaler.step(optimizer)
    scaler.update()


@dataclass
class TrainState:
    """What the loop updates and a checkpoint holds."""

    model: nn.Module  # DDP-wrapped under torchrun
    plain: nn.Module  # the unwrapped student
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    first_epoch: int
    best_acc1: float

    def checkpoint(self, epoch: int, cfg: TrainConfig, manifest: shards.Manifest, device: str) -> dict:
        """The original's keys, plus what exact resumption needs."""
        return {
            "epoch": epoch + 1, "state_dict": self.plain.state_dict(), "best_acc1": self.best_acc1,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "position": {"epoch": epoch + 1, "batch": 0},
            "rng": _rng_state(device), "manifest": manifest.identity(), "config": cfg.as_dict(),
        }


def build_state(cfg: TrainConfig, m: shards.Manifest, env: DistEnv) -> TrainState:
    """Student, optimizer, scheduler and scaler, fresh or restored from ``--resume``."""
    device = cfg.device
    torch.manual_seed(0)  # the student's random init; the data order is fixed by the shards
    model = build_model(cfg, m.soft_label_width, device)
    if env.active:
        if cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Buffers are not broadcast: batch-norm running statistics stay per rank (rank 0's are
        # saved), and forwards need no collective, so ranks may run different micro-batches.
        model = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None,
                                        broadcast_buffers=False)
    plain = model.module if env.active else model
    optimizer = build_optimizer(cfg, plain)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=cfg.amp == "fp16")
    path = _resume_path(cfg)
    if path is None:
        return TrainState(model, plain, optimizer, build_scheduler(cfg, optimizer, cfg.start_epoch), scaler,
                          cfg.start_epoch, 0.0)
    state = checkpoint.load(path)
    needed = ("epoch", "state_dict", "optimizer", "scheduler", "rng", "manifest")
    missing = [k for k in needed if k not in state]
    if missing:
        raise checkpoint.CheckpointError(f"{path}: not an fkd-train checkpoint (no {', '.join(missing)})")
    if state["manifest"] != m.identity():
        raise checkpoint.CheckpointError(f"{path}: written for another shard set")
    plain.load_state_dict(checkpoint.model_state(state))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state.get("scaler", {}))
    _restore_rng(state["rng"], device)
    scheduler = build_scheduler(cfg, optimizer, state["epoch"])
    scheduler.load_state_dict(state["scheduler"])
    return TrainState(model, plain, optimizer, scheduler, scaler, state["epoch"], state.get("best_acc1", 0.0))


def train_epoch(s: TrainState, batches, epoch: int, cfg: TrainConfig, m: shards.Manifest, env: DistEnv,
                micro_rows: int) -> tuple[EpochTotals, float]:
    """One epoch of loaded batches; returns the totals and the seconds it took."""
    s.model.train()
    totals = EpochTotals.zeros(cfg.device)
    started = time.perf_counter()
    bar = tqdm(total=m.batches_per_epoch, desc=f"epoch {epoch}", unit="batch", leave=False,
               disable=not env.is_main)
    for _ in range(m.batches_per_epoch):
        batch = next(batches)
        assert batch.epoch == epoch, (batch.epoch, epoch)
        train_step(s.model, batch, cfg, cfg.device, s.optimizer, s.scaler, totals, micro_rows)
        bar.update(1)
        if bar.n % 10 == 0 or bar.n == m.batches_per_epoch:  # .item() waits for the device
            seen = totals.rows.item()
            bar.set_postfix(loss=f"{totals.loss.item() / max(seen, 1):.4f}",
                            img_s=f"{seen * env.world_size / (time.perf_counter() - started):.0f}")
    bar.close()
    return totals, time.perf_counter() - started


def train(cfg: TrainConfig, shard_set: shards.ShardSet, env: DistEnv, api_key: str | None = None,
          log=print) -> dict:
    """Train epochs [start, E) (or from the resumed checkpoint); returns the last epoch's metrics."""
    m = shard_set.manifest
    world, steps = env.world_size, cfg.gradient_accumulation_steps
    if cfg.batch_size % (world * steps):
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by world size {world} x "
                          f"--gradient-accumulation-steps {steps}")
    micro_rows = cfg.batch_size // (world * steps)
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{cfg.output_dir}: cannot create the output directory ({exc.strerror})") from None
    val = None
    if cfg.val_dir:
        try:
            val = val_loader(cfg.val_dir, m.input_size, cfg.batch_size, min(cfg.workers, 4), env)
        except OSError as exc:  # torchvision: missing folder, or a class folder without images
            raise ConfigError(f"{cfg.val_dir}: not a usable image folder ({first_line(exc)})") from None
        if val.dataset.dataset.classes != m.classes:
            raise ConfigError(f"{cfg.val_dir}: class folders differ from the shard set's classes")
    s = build_state(cfg, m, env)
    if s.first_epoch >= cfg.epochs:
        log(f"already trained {s.first_epoch} of {cfg.epochs} epochs; nothing to do")
        return {}
    decode_cache = {"auto": None, "on": True, "off": False}[cfg.decode_cache]
    stream = BatchStream(shard_set, s.first_epoch, cfg.epochs, cfg.workers, env.rank, world,
                         decode_cache=decode_cache, pin_memory=cfg.device.startswith("cuda"),
                         crop_device=cfg.device if cfg.device_crops else None)
    metrics_log = None
    if env.is_main:
        log(stream.decode_cache_note)
        log(f"fkd-train: {cfg.model} on {cfg.device}, N={m.num_images}, C={m.soft_label_width}, "
            f"B={cfg.batch_size} = {world} rank(s) x {steps} micro-batches x {micro_rows} rows, "
            f"epochs {s.first_epoch}..{cfg.epochs - 1}, mix={m.mix_type}, T={cfg.temperature}, "
            f"{'SGD' if cfg.sgd else 'AdamW'}, amp={cfg.amp}")
        run = start_wandb(cfg.wandb_project, os.path.basename(os.path.normpath(cfg.output_dir)),
                          cfg.wandb_mode, cfg.as_dict(), api_key)
        metrics_log = MetricsLog(cfg.output_dir, s.first_epoch, run)

    metrics: dict = {}
    batches = iter(stream)
    for epoch in range(s.first_epoch, cfg.epochs):
        totals, seconds = train_epoch(s, batches, epoch, cfg, m, env, micro_rows)
        metrics = _train_metrics(totals, env, epoch, s.scheduler.get_last_lr()[0], seconds, steps)
        if env.is_main and env.active:
            log(f"rank 0 cropped {stream.decoded_fraction:.1%} of the images of the batches it trained "
                f"on (its rows plus their mix partners; 1/K = {1 / world:.1%})")
        if env.is_main:
            log(f"TRAIN Iter {epoch}: lr = {metrics['train/lr']:.6f},\tloss = {metrics['train/loss']:.6f},\t"
                f"Top-1 err = {100 - metrics['train/Top1']:.6f},\t"
                f"Top-5 err = {100 - metrics['train/Top5']:.6f},\ttrain_time = {seconds:.6f}")
        top1 = 0.0
        if val is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs - 1):
            metrics.update(evaluate(s.model, val, cfg.device, env), **{"val/epoch": epoch})
            top1 = metrics["val/top1"]
            if env.is_main:
                log(f"TEST Iter {epoch}: loss = {metrics['val/loss']:.6f},\t"
                    f"Top-1 err = {100 - top1:.6f},\tTop-5 err = {100 - metrics['val/top5']:.6f}")
        s.scheduler.step()
        is_best = top1 > s.best_acc1
        s.best_acc1 = max(s.best_acc1, top1)
        if env.is_main:
            checkpoint.save(s.checkpoint(epoch, cfg, m, cfg.device), cfg.output_dir, is_best)
            metrics_log.log(metrics)
    if metrics_log is not None:
        metrics_log.close()
    return metrics


def _train_metrics(totals: EpochTotals, env: DistEnv, epoch: int, lr: float, seconds: float,
                   steps: int) -> dict:
    """The original's wandb keys (``train/loss`` is the loss already divided by A), summed over ranks."""
    summed = sum_across_ranks(torch.stack([totals.loss, totals.top1, totals.top5, totals.rows]), env)
    loss, top1, top5, rows = (v.item() for v in summed)
    return {"train/loss": loss / rows, "train/loss_unscaled": loss / rows * steps,
            "train/Top1": 100 * top1 / rows, "train/Top5": 100 * top5 / rows, "train/lr": lr,
            "train/epoch": epoch, "train/images_per_s": rows / seconds}


def _resume_path(cfg: TrainConfig) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        path = os.path.join(cfg.output_dir, checkpoint.CHECKPOINT_NAME)
        return path if os.path.exists(path) else None
    return cfg.resume


def _rng_state(device: str) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _restore_rng(state: dict, device: str) -> None:
    torch.set_rng_state(state["torch"])
    if device.startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))
