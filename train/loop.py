"""The KD loop of train_FKD.py, reading top to bottom: :func:`train`, then the epoch and the step,
then the helpers they use."""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fkd_shards import shards
from fkd_shards.batches.batch import Batch
from fkd_shards.batches.images import load_images, open_pixels
from fkd_shards.batches.plan import single_row_micro_batch
from fkd_shards.batches.stream import BatchStream
from fkd_shards.common.distributed import sum_across_ranks
from fkd_shards.common.files import FileWriteError
from fkd_shards.common.text import escape
from fkd_shards.models.build import build_model, check_micro_batches
from fkd_shards.models.weights import load_into, load_state

from . import checkpoint
from .checkpoint import TrainState, build_scheduler
from .config import TrainConfig
from .kd import kd_loss, parameter_groups, topk_correct
from .metrics import MetricsLog, start_wandb
from .rundir import BEST_NAME, CHECKPOINT_NAME, FINAL_WEIGHTS_NAME, METRICS_NAME, SUMMARY_NAME, claim
from .summary import RunSummary, summarize, write_summary
from .validate import ValidationError, evaluate, val_loader


class TrainingError(RuntimeError):
    """Training cannot go on (the loss stopped being finite); the message says where and what is kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what is on disk: the message says which checkpoint a resume continues from."""


def train(cfg: TrainConfig, shard_set: shards.ShardSet, api_key: str | None = None, log=print) -> RunSummary | None:
    """Train epochs [first, E): from ``--start-epoch``, or after the epoch ``--resume``'s checkpoint
    completed. Rank 0 prints, writes and logs; every rank trains its slice of each batch."""
    m, env = shard_set.manifest, cfg.dist
    say = log if env.is_main else (lambda *_: None)
    lock = claim(cfg.output_dir, cfg.resume_asked, cfg.resume, cfg.restart) if env.is_main else None
    started = time.perf_counter()
    last_saved = None  # the last epoch whose checkpoint is on disk, for the Ctrl-C message
    try:
        val = val_loader(cfg.val_dir, m.classes, m.input_size, m.batch_size, min(cfg.workers, 4), env) \
            if cfg.val_dir else None
        s = build_state(cfg, m)
        if cfg.resume:
            last_saved = s.first_epoch - 1
            best = f", best top-1 so far {s.best_acc1:.2f}%" if s.best_acc1 > 0 else ""
            say(f"fkd-train: resumed from epoch {s.first_epoch} of {escape(cfg.resume)} (epochs "
                f"0..{s.first_epoch - 1} done{best})")
        if s.first_epoch >= cfg.epochs:
            say(f"fkd-train: already trained {s.first_epoch} of {cfg.epochs} epochs; nothing to do")
            return None
        stream = _stream(cfg, shard_set, s.first_epoch, say)
        metrics_log = _metrics_log(cfg, s.first_epoch, api_key) if env.is_main else None
        try:
            batches = iter(stream)
            for epoch in range(s.first_epoch, cfg.epochs):
                run_epoch(s, batches, epoch, cfg=cfg, manifest=m, val=val, metrics_log=metrics_log, say=say)
                last_saved = epoch
                if env.is_main and env.active:
                    say(f"rank 0 cropped {stream.cropped_fraction:.1%} of the rows of the batches it trained on "
                        f"(its rows plus their mix partners; 1/K = {1 / env.world_size:.1%})")
        finally:
            if metrics_log is not None:
                metrics_log.close()
        return _finish(cfg, m, s, val is not None, time.perf_counter() - started, say)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(cfg, last_saved)) from None
    finally:
        if lock is not None:
            lock.release()


def run_epoch(s: TrainState, batches, epoch: int, *, cfg: TrainConfig, manifest: shards.Manifest, val,
              metrics_log: MetricsLog | None, say) -> None:
    """Train one epoch, validate when due, then save the checkpoint and the metrics line; an
    unreadable validation image is raised after the epoch's training is saved."""
    m = manifest
    totals, seconds = train_epoch(s, batches, epoch, cfg, m)
    metrics = _train_metrics(totals, cfg, epoch, s.scheduler.get_last_lr()[0], seconds)
    say(f"TRAIN Iter {epoch}: lr = {metrics['train/lr']:.6f},\tloss = {metrics['train/loss']:.6f},\t"
        f"Top-1 err = {100 - metrics['train/Top1']:.6f},\tTop-5 err = {100 - metrics['train/Top5']:.6f},"
        f"\ttrain_time = {seconds:.6f}")
    s.scheduler.step()
    failed = None
    if val is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs - 1):
        try:
            metrics.update(evaluate(s.model, val, cfg.device, cfg.dist), **{"val/epoch": epoch})
        except ValidationError as exc:
            failed = exc
        else:
            say(f"TEST Iter {epoch}: loss = {metrics['val/loss']:.6f},\tTop-1 err = "
                f"{100 - metrics['val/top1']:.6f},\tTop-5 err = {100 - metrics['val/top5']:.6f}")
    is_best = metrics.get("val/top1", -1.0) > s.best_acc1
    s.best_acc1 = max(s.best_acc1, metrics.get("val/top1", 0.0))
    if cfg.dist.is_main:
        checkpoint.save(s, epoch, cfg, m, is_best)
        metrics_log.log(metrics)
    if failed is not None:
        raise failed


def train_epoch(s: TrainState, batches, epoch: int, cfg: TrainConfig, m: shards.Manifest) -> tuple[EpochTotals, float]:
    """One epoch of loaded batches; returns the totals and the seconds it took. A loss that is not
    finite stops the run before the epoch's checkpoint is written, naming the batch (checked where
    the progress bar reads the device anyway, and at the end: no sync per step)."""
    s.model.train()
    totals = EpochTotals.zeros(cfg.device)
    bad = torch.zeros(m.batches_per_epoch, dtype=torch.bool, device=cfg.device)
    started = time.perf_counter()
    with tqdm(total=m.batches_per_epoch, desc=f"epoch {epoch}", unit="batch", leave=False,
              disable=not cfg.dist.is_main) as bar:
        for k in range(m.batches_per_epoch):
            batch = next(batches)
            assert (batch.epoch, batch.batch) == (epoch, k), (batch.epoch, batch.batch, epoch, k)
            try:
                bad[k] = ~torch.isfinite(train_step(s, batch, cfg, totals))
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                # torch reports a CPU allocation failure as a plain RuntimeError; only its text tells.
                if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
                    raise
                raise TrainingError(f"out of memory at epoch {epoch} batch {k}: a smaller micro-batch "
                                    f"(--gradient-accumulation-steps) or --amp bf16 needs less") from None
            bar.update(1)
            if bar.n % 10 == 0 or bar.n == m.batches_per_epoch:  # .item() waits for the device
                _check_finite_loss(bad, epoch, cfg)
                seen = totals.rows.item()
                bar.set_postfix(loss=f"{totals.loss.item() / max(seen, 1):.4f}",
                                img_s=f"{seen * cfg.dist.world_size / (time.perf_counter() - started):.0f}")
    _check_finite_loss(sum_across_ranks(bad.int(), cfg.dist).bool(), epoch, cfg)
    return totals, time.perf_counter() - started


def train_step(s: TrainState, batch: Batch, cfg: TrainConfig, totals: EpochTotals) -> torch.Tensor:
    """One loaded batch: zero_grad, micro-batches of B/(K*A) rows each with its own forward and
    loss/A backward, then one optimizer step. Returns the sum of the micro-batch losses (on the device).

    Every rank runs as many micro-steps as rank 0 (which holds the most rows); a rank whose part
    of the short last batch is empty runs empty forwards with a zero loss, so that collective calls
    (the gradient all-reduce on the last micro-step, SyncBatchNorm) match across ranks.
    """
    device, micro_rows, accumulation = cfg.device, cfg.micro_batch_rows, cfg.gradient_accumulation_steps
    x = batch.model_input(device, torch.channels_last if cfg.channels_last else torch.contiguous_format)
    soft = batch.soft_labels.to(device, non_blocking=True)
    targets = batch.targets.to(device, non_blocking=True)
    rank0_rows = min(micro_rows * accumulation, batch.batch_rows)
    micro_steps = max(1, math.ceil(rank0_rows / micro_rows))
    divisor = float(accumulation)  # the original's: the short last batch is divided by A too
    if cfg.last_batch_loss == "mean":
        # Divide by the micro-batches the batch really has (over all K ranks, whose gradients DDP
        # averages), so that the short last batch's update is a mean like every other one.
        divisor = math.ceil(batch.batch_rows / micro_rows) / cfg.dist.world_size
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16,
                              enabled=cfg.amp != "off")
    step_loss = torch.zeros((), device=device)
    s.optimizer.zero_grad()
    for k in range(micro_steps):
        part = slice(k * micro_rows, (k + 1) * micro_rows)
        last = k == micro_steps - 1
        with nullcontext() if last or not isinstance(s.model, DistributedDataParallel) else s.model.no_sync():
            with autocast:
                out = s.model(x[part])
            rows = out.shape[0]
            if rows:
                loss = kd_loss(out.float(), soft[part], cfg.temperature) / divisor
            else:
                loss = out.float().sum() * 0.0
            s.scaler.scale(loss).backward()
        step_loss += loss.detach()
        if rows:
            top1, top5 = topk_correct(out.detach(), targets[part], (1, 5))
            totals.loss += loss.detach().double() * rows
            totals.top1 += top1
            totals.top5 += top5
            totals.rows += rows
    s.scaler.step(s.optimizer)
    s.scaler.update()
    return step_loss


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


def build_state(cfg: TrainConfig, m: shards.Manifest) -> TrainState:
    """Student, optimizer, scheduler and scaler: fresh from ``--seed`` (and ``--init-weights``), or
    restored from ``--resume``'s checkpoint."""
    torch.manual_seed(cfg.seed)  # the student's init and every later draw (dropout) start here
    model = build_model(cfg.model, m.soft_label_width, m.input_size)
    check_micro_batches(model, cfg.model, m.input_size, single_row_micro_batch(
        m.batch_size, m.num_images, cfg.dist.world_size, cfg.gradient_accumulation_steps))
    if cfg.init_weights:
        load_into(model, load_state(cfg.init_weights), cfg.init_weights, f"--model {cfg.model}")
    model = model.to(cfg.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    plain = model
    if cfg.dist.active:
        if cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            plain = model
        # Buffers are not broadcast: batch-norm running statistics stay per rank (rank 0's are
        # saved), and forwards need no collective, so ranks may run different micro-batches.
        model = DistributedDataParallel(model, device_ids=[cfg.device] if cfg.device.startswith("cuda") else None,
                                        broadcast_buffers=False)
    optimizer = build_optimizer(cfg, plain)
    scaler = torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.amp == "fp16")
    s = TrainState(model, plain, optimizer, build_scheduler(cfg, optimizer, cfg.start_epoch), scaler,
                   cfg.start_epoch, 0.0)
    return checkpoint.restore(s, cfg.resume, cfg, m) if cfg.resume else s


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.sgd:
        return torch.optim.SGD(parameter_groups(model, cfg.weight_decay), lr=cfg.learning_rate, momentum=cfg.momentum)
    return torch.optim.AdamW(parameter_groups(model, cfg.adamw_weight_decay), lr=cfg.adamw_lr)


def _check_finite_loss(bad: torch.Tensor, epoch: int, cfg: TrainConfig) -> None:
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise TrainingError(f"the loss stopped being finite (NaN or inf) at epoch {epoch} batch {k}: no checkpoint "
                            f"was written for epoch {epoch} (too high a learning rate or temperature?)")


def _train_metrics(totals: EpochTotals, cfg: TrainConfig, epoch: int, lr: float, seconds: float) -> dict:
    """The original's wandb keys (``train/loss`` is the loss already divided by A), summed over ranks."""
    summed = sum_across_ranks(torch.stack([totals.loss, totals.top1, totals.top5, totals.rows]), cfg.dist)
    loss, top1, top5, rows = (v.item() for v in summed)
    return {"train/loss": loss / rows, "train/loss_unscaled": loss / rows * cfg.gradient_accumulation_steps,
            "train/Top1": 100 * top1 / rows, "train/Top5": 100 * top5 / rows, "train/lr": lr,
            "train/epoch": epoch, "train/images_per_s": rows / seconds, "train/rows": int(rows), "seed": cfg.seed}


def _interrupted(cfg: TrainConfig, last_saved: int | None) -> str:
    if last_saved is None:
        return "interrupted before the first checkpoint was written; nothing to resume"
    return (f"interrupted; {escape(os.path.join(cfg.output_dir, CHECKPOINT_NAME))} holds epochs 0..{last_saved}: "
            f"continue with --resume auto")


def _stream(cfg: TrainConfig, shard_set: shards.ShardSet, first_epoch: int, say) -> BatchStream:
    """The batch stream of epochs [first_epoch, E), with the decoded-cache choice made (and said) once."""
    env = cfg.dist
    crop_device = cfg.device if cfg.device_crops else None
    pixels = open_pixels(load_images(shard_set), mode=cfg.decode_cache, workers=cfg.workers, crop_device=crop_device,
                         local_ranks=env.local_world_size)
    stream = BatchStream(shard_set, first_epoch, cfg.epochs, workers=cfg.workers, rank=env.rank,
                         world_size=env.world_size, pixels=pixels, pin_memory=cfg.device.startswith("cuda"),
                         crop_device=crop_device)
    m = shard_set.manifest
    say(pixels.note)
    say(f"fkd-train: {escape(cfg.model)} (seed {cfg.seed}) on {cfg.device}, N={m.num_images}, C={m.soft_label_width}, "
        f"S={m.input_size}, B={m.batch_size} = {env.world_size} rank(s) x {cfg.gradient_accumulation_steps} "
        f"micro-batches x {cfg.micro_batch_rows} rows, epochs {first_epoch}..{cfg.epochs - 1}, mix={m.mix_type}, "
        f"T={cfg.temperature}, {'SGD' if cfg.sgd else 'AdamW'}, amp={cfg.amp}")
    return stream


def _metrics_log(cfg: TrainConfig, first_epoch: int, api_key: str | None) -> MetricsLog:
    run = start_wandb(cfg.wandb_project, os.path.basename(os.path.normpath(cfg.output_dir)), cfg.wandb_mode,
                      cfg.as_dict(), api_key, cfg.output_dir)
    return MetricsLog(cfg.output_dir, first_epoch, run)


def _finish(cfg: TrainConfig, m: shards.Manifest, s: TrainState, validated: bool, wall_s: float,
            say) -> RunSummary:
    """The final weights file, summary.json and the closing lines (rank 0)."""
    summary = summarize(cfg, m, wall_s)
    if not cfg.dist.is_main:
        return summary
    checkpoint.write_weights(s.plain, os.path.join(cfg.output_dir, FINAL_WEIGHTS_NAME))
    files = {"final weights (state dict)": FINAL_WEIGHTS_NAME, "checkpoint": CHECKPOINT_NAME,
             "best": BEST_NAME if validated else None, "metrics": METRICS_NAME, "summary": SUMMARY_NAME}
    try:
        write_summary(summary, cfg.output_dir)
    except FileWriteError as exc:
        files["summary"] = None
        say(f"fkd-train: warning: {exc}; the run itself is complete")
    say(summary.describe(files, cfg.output_dir))
    return summary
