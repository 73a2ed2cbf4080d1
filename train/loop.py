"""The KD loop of train_FKD.py, reading top to bottom: :func:`train`, then the epoch and the step,
then the helpers they use."""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fkd_shards import shards
from fkd_shards.batches.batch import Batch, to_device
from fkd_shards.batches.images import load_images, open_pixels, upscale_note
from fkd_shards.batches.plan import single_row_micro_batch
from fkd_shards.batches.stream import BatchStream
from fkd_shards.common.distributed import RankFailed, agreed, collective_device, mark_agreed, sum_across_ranks
from fkd_shards.common.files import FileWriteError, interrupts_deferred
from fkd_shards.common.precision import set_precision
from fkd_shards.common.text import escape
from fkd_shards.common.threads import use_torch_threads
from fkd_shards.models.build import build_model, check_micro_batches
from fkd_shards.models.weights import load_into, load_state

from . import checkpoint
from .checkpoint import TrainState, build_scheduler
from .config import TrainConfig
from .curves import draw_curves
from .kd import kd_loss, parameter_groups, topk_correct
from .metrics import MetricsError, MetricsLog, start_wandb
from .rundir import (
    BEST_NAME,
    CHECKPOINT_NAME,
    FINAL_WEIGHTS_NAME,
    METRICS_NAME,
    STUDENTS_NAME,
    SUMMARY_NAME,
    claim,
    claim_students,
)
from .students import Student, students_table
from .summary import RunSummary, summarize, write_summary
from .validate import ValidationError, evaluate_many, rank0_buffers, val_loader


class TrainingError(RuntimeError):
    """Training cannot go on (the loss stopped being finite); the message says where and what is kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what is on disk: the message says which checkpoint a resume continues from."""


def train(configs: TrainConfig | list[TrainConfig], shard_set: shards.ShardSet, api_key: str | None = None,
          log=print) -> list[RunSummary]:
    """Train every student of ``configs`` (one per model and seed, identical in everything else) on one
    pass over the batches of epochs [first, E): from ``--start-epoch``, or each after the epoch its
    ``--resume`` checkpoint completed. Each batch is made once and every student steps on it, in the
    order given. Rank 0 prints, writes and logs; every rank trains its slice of each batch for every
    student. A student whose loss stops being finite is stopped, the others go on; the run then ends
    with a :class:`TrainingError` naming it (with one student, at once)."""
    configs = [configs] if isinstance(configs, TrainConfig) else list(configs)
    cfg, m = configs[0], shard_set.manifest
    env, several = cfg.dist, len(configs) > 1
    say = log if env.is_main else (lambda *_: None)
    students = [Student(c, several=several) for c in configs]
    root = cfg.run_dir
    say(use_torch_threads(0 if cfg.device_crops else cfg.workers, cfg.threads))
    set_precision(tf32=cfg.tf32, cudnn_benchmark=cfg.cudnn_benchmark)
    locks = []
    started = time.perf_counter()
    try:
        # Every student is built and checked, and the validation folder read, before any directory is
        # touched: a refused run leaves nothing behind, and a refused --restart moves nothing.
        for st in students:
            st.state = build_state(st.cfg, m, restore=False)
            st.keep_rng()
        with agreed(env, cfg.device):  # each rank checks its share of the validation files' headers
            val = val_loader(cfg.val_dir, m.classes, m.input_size, m.batch_size, min(cfg.workers, 4), env) \
                if cfg.val_dir else None
        later = []  # what claiming decided to move and write, done once every claim and restore succeeded
        # Rank 0 alone claims the directories: every rank agrees that it could, and that each could
        # restore its checkpoint, before any collective of training (none waits for a refused rank).
        with agreed(env, cfg.device):
            if env.is_main:  # every directory is claimed before any student trains
                if several:
                    locks.append(claim_students(root, [_listed(st.cfg) for st in students], cfg.restart, later))
                for st in students:
                    locks.append(claim(st.cfg.output_dir, st.cfg.resume_asked, st.cfg.resume, st.cfg.restart,
                                       later=later))
            for st in students:
                if st.cfg.resume:
                    with st.own_rng():  # the checkpoint's random state becomes the student's
                        st.state = checkpoint.restore(st.state, st.cfg.resume, st.cfg, m)
                elif several and st.cfg.resume_asked:
                    say(f"fkd-train: {_who(st)}no checkpoint in {escape(st.cfg.output_dir)} yet; it starts from "
                        f"epoch {cfg.start_epoch}")
                _announce_resume(st, say)
        with agreed(env, cfg.device):  # moved and written only once every rank restored: a refused run moves nothing
            for action in later:
                action()
        todo = [st for st in students if st.state.first_epoch < cfg.epochs]
        for st in students:
            if st not in todo:
                say(f"fkd-train: {_who(st)}already trained {st.state.first_epoch} of {cfg.epochs} epochs; "
                    f"nothing to do")
                if env.is_main and not os.path.exists(os.path.join(st.cfg.output_dir, SUMMARY_NAME)):
                    _finish(st, m, val is not None, time.perf_counter() - started, say=None)  # an interrupted end
        if not todo:
            return []
        first_epoch = min(st.state.first_epoch for st in todo)
        try:
            # Device memory for --device-crops differs by rank, and rank 0 alone starts wandb.
            with agreed(env, cfg.device):
                stream = _stream(cfg, shard_set, first_epoch, [st.cfg for st in todo], say)
                for st in todo:
                    st.metrics_log = _metrics_log(st.cfg, st.state.first_epoch, api_key) if env.is_main else None
            batches = iter(stream)
            for epoch in range(first_epoch, cfg.epochs):
                if all(st.failed for st in todo):
                    break
                run_epoch(todo, batches, epoch, manifest=m, val=val, say=say)
                if env.is_main and env.active:
                    say(f"rank 0 cropped {stream.cropped_fraction:.1%} of the rows of the batches it trained on "
                        f"(its rows plus their mix partners; 1/K = {1 / env.world_size:.1%})")
        finally:
            for st in todo:
                if st.metrics_log is not None:
                    st.metrics_log.close()
        wall_s = time.perf_counter() - started
        summaries = {st.name: _finish(st, m, val is not None, wall_s, say=None if several else say)
                     for st in todo if st.failed is None}
        if several:
            say(students_table(students, summaries))
            say(f"students: {escape(os.path.join(root, STUDENTS_NAME))}; the table over seeds: fkd-train report "
                f"{escape(root)}")
        failed = [st for st in students if st.failed]
        if failed:
            others = "; the others finished" if len(failed) < len(students) else ""
            raise TrainingError(f"{len(failed)} of {len(students)} students stopped (their loss stopped being "
                                f"finite): {', '.join(st.name for st in failed)}{others}")
        return list(summaries.values())
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(students)) from None
    finally:
        for lock in locks:
            lock.release()


def run_epoch(students: list[Student], batches, epoch: int, *, manifest: shards.Manifest, val,
              say) -> None:
    """Train one epoch for every student that trains in it, validate when due, then save each one's
    checkpoint and metrics line; an unreadable validation image is raised after the epoch's
    training is saved."""
    m = manifest
    active = [st for st in students if st.trains(epoch)]
    seconds = train_epoch(active, batches, epoch, m)
    cfg = active[0].cfg if active else students[0].cfg
    active = [st for st in active if st.failed is None]
    metrics = {}
    for st in active:
        line = metrics[st.name] = _train_metrics(st.totals, st.cfg, epoch, st.state.scheduler.get_last_lr()[0],
                                                 seconds)
        say(f"{_who(st)}TRAIN Iter {epoch}: lr = {line['train/lr']:.6f},\tloss = {line['train/loss']:.6f},\t"
            f"Top-1 err = {100 - line['train/Top1']:.6f},\tTop-5 err = {100 - line['train/Top5']:.6f},\t"
            f"train_time = {seconds:.6f}")
        st.state.scheduler.step()
    failed = None
    if active and val is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs - 1):
        plain = [st.state.plain for st in active]
        try:
            with rank0_buffers(plain, cfg.dist):  # every rank scores the model rank 0 saves
                results = evaluate_many(plain, val, cfg.device, cfg.dist)
        except ValidationError as exc:  # an unreadable image: raised once the epoch is saved
            failed = exc
        except RankFailed as exc:
            if exc.kind != ValidationError.__name__:  # anything else another rank met stops at once
                raise
            failed = exc
        else:
            for st, result in zip(active, results):
                metrics[st.name].update(result, **{"val/epoch": epoch})
                say(f"{_who(st)}TEST Iter {epoch}: loss = {result['val/loss']:.6f},\tTop-1 err = "
                    f"{100 - result['val/top1']:.6f},\tTop-5 err = {100 - result['val/top5']:.6f}")
    # Ctrl-C waits until every student's checkpoint, best copy and metrics line of the epoch are
    # written: a resume then finds them all, and the interruption's message says so.
    with interrupts_deferred():
        for st in active:
            # Agreed over ranks: batch-norm buffers are per rank, and every rank must take the same turn.
            # Alone, the checkpoint's own check says it.
            if st.several and not _weights_finite(st.state.plain, cfg.dist, cfg.device):
                _stop(st, f"its weights stopped being finite (NaN or inf) in epoch {epoch}: no checkpoint was written "
                          f"for epoch {epoch}")
                continue
            s, line = st.state, metrics[st.name]
            is_best = line.get("val/top1", -1.0) > s.best_acc1
            s.best_acc1 = max(s.best_acc1, line.get("val/top1", 0.0))
            with st.own_rng():  # the checkpoint keeps this student's random state, every rank's
                ranks_rng = checkpoint.ranks_rng_state(cfg.device, cfg.dist)
            with agreed(cfg.dist, cfg.device):  # rank 0's failed write (a full disk) stops every rank
                if cfg.dist.is_main:
                    with st.own_rng():
                        checkpoint.save(s, epoch, st.cfg, m, is_best, ranks_rng=ranks_rng)
                    st.metrics_log.log(line)
            st.last_saved = epoch
    if cfg.dist.is_main:
        for st in active:
            if st.failed is None:
                _redraw_curves(st)
    if failed is not None:
        raise failed


def train_epoch(students: list[Student], batches, epoch: int, m: shards.Manifest) -> float:
    """One epoch of loaded batches, every student stepping on each in turn; returns the seconds it
    took, and leaves each student's totals in ``totals``. A loss that is not finite stops its
    student before the epoch's checkpoint is written, naming the batch (checked where the progress
    bar reads the device anyway, and at the end: no sync per step); with one student, the run."""
    cfg = students[0].cfg if students else None
    for st in students:
        st.state.model.train()
        st.totals = EpochTotals.zeros(st.cfg.device)
        st.bad = torch.zeros(m.batches_per_epoch, dtype=torch.bool, device=st.cfg.device)
    started = time.perf_counter()
    with tqdm(total=m.batches_per_epoch, desc=f"epoch {epoch}", unit="batch", leave=False,
              disable=not (cfg and cfg.dist.is_main and cfg.progress)) as bar:
        for k in range(m.batches_per_epoch):
            batch = next(batches)
            assert (batch.epoch, batch.batch) == (epoch, k), (batch.epoch, batch.batch, epoch, k)
            inputs = None
            for st in students:
                if st.failed is not None:
                    continue
                if inputs is None:
                    inputs = step_inputs(batch, st.cfg)
                    version = inputs.x._version
                with st.own_rng():
                    st.bad[k] = ~torch.isfinite(_step_or_oom(st, batch, inputs, epoch, k))
                if inputs.x._version != version:  # a model wrote into its input: the next one gets a fresh one
                    inputs = None
            bar.update(1)
            # Every 10 batches (counted here: a disabled bar counts nothing), where .item() waits for the
            # device anyway. Under torchrun a student stops only at the epoch's end, on the flags of
            # every rank, so that all ranks stop it at the same step and their collectives stay paired.
            if (k + 1) % 10 == 0 or k + 1 == m.batches_per_epoch:
                if cfg is not None and not cfg.dist.active:
                    for st in students:
                        if st.failed is None:
                            _stop_if_not_finite(st, st.bad, epoch)
                if not bar.disable:
                    _show_progress(bar, students, started)
    for st in students:
        if st.failed is None:
            _stop_if_not_finite(st, sum_across_ranks(st.bad.int(), st.cfg.dist).bool(), epoch)
    return time.perf_counter() - started


def _redraw_curves(st: Student) -> None:
    """``curves.png`` from the metrics log; a picture that cannot be written is a warning, not a stop."""
    try:
        draw_curves(st.cfg.output_dir, f"{st.name}: {st.cfg.model}, seed {st.cfg.seed}")
    except (FileWriteError, MetricsError) as exc:
        tqdm.write(f"fkd-train: warning: {exc}; the run goes on", file=sys.stderr)


def _weights_finite(model: nn.Module, env, device: str) -> bool:
    """Whether every floating tensor of the model is finite on every rank."""
    finite = all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())
    flag = torch.tensor([0 if finite else 1], device=collective_device(device))
    return bool(sum_across_ranks(flag, env).item() == 0)


def _step_or_oom(st: Student, batch: Batch, inputs: StepInputs, epoch: int, k: int) -> torch.Tensor:
    try:
        return train_step(st.state, batch, st.cfg, st.totals, inputs=inputs)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        # torch reports a CPU allocation failure as a plain RuntimeError; only its text tells.
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        raise TrainingError(f"{_who(st)}out of memory at epoch {epoch} batch {k}: a smaller micro-batch "
                            f"(--gradient-accumulation-steps) or --amp bf16 needs less") from None


def _show_progress(bar, students: list[Student], started: float) -> None:
    if not students:  # none trains in this epoch (they resume later): the batches pass by
        return
    cfg = students[0].cfg
    rows = [st.totals.rows.item() for st in students]
    images = max(rows, default=0) * cfg.dist.world_size / max(time.perf_counter() - started, 1e-9)
    if len(students) == 1:
        st = students[0]
        bar.set_postfix(loss=f"{st.totals.loss.item() / max(rows[0], 1):.4f}", img_s=f"{images:.0f}")
        return
    losses = {st.short: ("stopped" if st.failed else f"{st.totals.loss.item() / max(seen, 1):.3f}")
              for st, seen in zip(students, rows)}
    bar.set_postfix(ordered_dict={**losses, "img_s": f"{images:.0f}"})  # in the students' order


@dataclass
class StepInputs:
    """A batch on the device, as every student's step takes it: model input, soft labels, targets."""

    x: torch.Tensor  # float32 (m, 3, S, S): normalised and mixed
    soft: torch.Tensor  # float32 (m, C)
    targets: torch.Tensor  # int64 (m,)


def step_inputs(batch: Batch, cfg: TrainConfig) -> StepInputs:
    """The batch's tensors on ``cfg.device``, in the memory format the students take."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return StepInputs(batch.model_input(cfg.device, memory_format), to_device(batch.soft_labels, cfg.device),
                      to_device(batch.targets, cfg.device))


def train_step(s: TrainState, batch: Batch, cfg: TrainConfig, totals: EpochTotals, *,
               inputs: StepInputs | None = None) -> torch.Tensor:
    """One loaded batch: zero_grad, micro-batches of B/(K*A) rows each with its own forward and
    loss/A backward, then one optimizer step. Returns the sum of the micro-batch losses (on the device).

    Every rank runs as many micro-steps as rank 0 (which holds the most rows); a rank whose part
    of the short last batch is empty runs empty forwards with a zero loss, so that collective calls
    (the gradient all-reduce on the last micro-step, SyncBatchNorm) match across ranks. ``inputs``:
    the batch's tensors on the device (:func:`step_inputs`), made once for every student.
    """
    device, micro_rows, accumulation = cfg.device, cfg.micro_batch_rows, cfg.gradient_accumulation_steps
    inputs = inputs or step_inputs(batch, cfg)
    x, soft, targets = inputs.x, inputs.soft, inputs.targets
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


def build_state(cfg: TrainConfig, m: shards.Manifest, *, restore: bool = True) -> TrainState:
    """Student, optimizer, scheduler and scaler: fresh from ``--seed`` (and ``--init-weights``), or
    restored from ``--resume``'s checkpoint (``restore``; else the caller restores it later)."""
    # Under torchrun, a rank that cannot build its student (device memory, a file it cannot read)
    # stops every rank here, before DDP's first broadcast would leave the others waiting in it.
    with agreed(cfg.dist, cfg.device):
        torch.manual_seed(cfg.seed)  # the student's init and every later draw (dropout) start here
        model = build_model(cfg.model, m.soft_label_width, m.input_size)
        check_micro_batches(model, cfg.model, m.input_size, single_row_micro_batch(
            m.batch_size, m.num_images, cfg.dist.world_size, cfg.gradient_accumulation_steps))
        if cfg.init_weights:
            load_into(model, load_state(cfg.init_weights), cfg.init_weights, f"--model {cfg.model}")
        try:
            model = model.to(cfg.device)
        except torch.OutOfMemoryError:
            raise TrainingError(f"out of memory putting --model {cfg.model} on {cfg.device}: other processes may hold "
                                f"its memory (nvidia-smi)") from None
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
    plain = model
    if cfg.dist.rank > 0:
        # Every rank draws its own dropout and drop-path masks (the same masks on every rank would
        # make K ranks one); rank 0 keeps --seed's stream, as a run of one process draws it.
        torch.manual_seed(checkpoint.rank_seed(cfg.seed, cfg.dist.rank))
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
    return checkpoint.restore(s, cfg.resume, cfg, m) if cfg.resume and restore else s


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.sgd:
        return torch.optim.SGD(parameter_groups(model, cfg.weight_decay), lr=cfg.learning_rate, momentum=cfg.momentum)
    return torch.optim.AdamW(parameter_groups(model, cfg.adamw_weight_decay), lr=cfg.adamw_lr)


def _stop_if_not_finite(st: Student, bad: torch.Tensor, epoch: int) -> None:
    """A student whose loss was not finite in a batch of ``epoch`` stops: with others beside it, it
    is marked failed and said so (they go on); alone, the run ends with a :class:`TrainingError`."""
    if not bool(bad.any()):
        return
    k = int(bad.nonzero()[0])
    _stop(st, f"the loss stopped being finite (NaN or inf) at epoch {epoch} batch {k}: no checkpoint was written for "
              f"epoch {epoch} (too high a learning rate or temperature?)")


def _stop(st: Student, reason: str) -> None:
    """Stop a student: marked failed and said so (the others go on); alone, the run ends."""
    if not st.several:
        # Under torchrun every rank stops here together (the flags were summed): rank 0 says it.
        raise mark_agreed(TrainingError(reason))
    st.failed = reason
    kept = "it has no checkpoint" if st.last_saved is None else f"its checkpoint holds epochs 0..{st.last_saved}"
    if st.cfg.dist.is_main:  # above the progress bar, not into it
        tqdm.write(f"fkd-train: student {escape(st.name)} stopped: {reason}; {kept}; the other students go on",
                   file=sys.stderr)


def _train_metrics(totals: EpochTotals, cfg: TrainConfig, epoch: int, lr: float, seconds: float) -> dict:
    """The original's wandb keys (``train/loss`` is the loss already divided by A), summed over ranks."""
    summed = sum_across_ranks(torch.stack([totals.loss, totals.top1, totals.top5, totals.rows]), cfg.dist)
    loss, top1, top5, rows = (v.item() for v in summed)
    return {"train/loss": loss / rows, "train/loss_unscaled": loss / rows * cfg.gradient_accumulation_steps,
            "train/Top1": 100 * top1 / rows, "train/Top5": 100 * top5 / rows, "train/lr": lr,
            "train/epoch": epoch, "train/images_per_s": rows / seconds, "train/rows": int(rows), "seed": cfg.seed}


def _interrupted(students: list[Student]) -> str:
    saved = [st for st in students if st.last_saved is not None]
    if not saved:
        return "interrupted before the first checkpoint was written; nothing to resume"
    if not saved[0].several:
        st = saved[0]
        return (f"interrupted; {escape(os.path.join(st.cfg.output_dir, CHECKPOINT_NAME))} holds epochs "
                f"0..{st.last_saved}: continue with --resume auto")
    held = ", ".join(f"{escape(st.name)} 0..{st.last_saved}" for st in saved)
    return f"interrupted; the students' checkpoints hold epochs {held}: continue with --resume auto"


def _stream(cfg: TrainConfig, shard_set: shards.ShardSet, first_epoch: int, configs: list[TrainConfig],
            say) -> BatchStream:
    """The batch stream of epochs [first_epoch, E), with the decoded-cache choice made (and said) once."""
    env = cfg.dist
    crop_device = cfg.device if cfg.device_crops else None
    pixels = open_pixels(load_images(shard_set), mode=cfg.decode_cache, workers=cfg.workers, crop_device=crop_device,
                         local_ranks=env.local_world_size)
    stream = BatchStream(shard_set, first_epoch, cfg.epochs, workers=cfg.workers, rank=env.rank,
                         world_size=env.world_size, pixels=pixels, pin_memory=cfg.device.startswith("cuda"))
    m = shard_set.manifest
    say(pixels.note)
    who = ", ".join(f"{escape(c.model)} (seed {c.seed})" for c in configs)
    say(f"fkd-train: {who} on {cfg.device}, N={m.num_images}, C={m.soft_label_width}, "
        f"S={m.input_size}, B={m.batch_size} = {env.world_size} rank(s) x {cfg.gradient_accumulation_steps} "
        f"micro-batches x {cfg.micro_batch_rows} rows, epochs {first_epoch}..{cfg.epochs - 1}, mix={m.mix_type}, "
        f"T={cfg.temperature}, {'SGD' if cfg.sgd else 'AdamW'}, amp={cfg.amp}")
    say(f"fkd-train: images proven {m.label_source()}")
    note = upscale_note(pixels.table.shapes, m.input_size)
    if note:
        say(f"fkd-train: {note}")
    return stream


def _metrics_log(cfg: TrainConfig, first_epoch: int, api_key: str | None) -> MetricsLog:
    run = start_wandb(cfg.wandb_project, os.path.basename(os.path.normpath(cfg.output_dir)), cfg.wandb_mode,
                      cfg.as_dict(), api_key, cfg.output_dir)
    return MetricsLog(cfg.output_dir, first_epoch, run)


def _finish(st: Student, m: shards.Manifest, validated: bool, wall_s: float, say) -> RunSummary:
    """A student's final weights file, summary.json and (``say``, when given) closing lines (rank 0)."""
    cfg = st.cfg
    summary = summarize(cfg, m, wall_s)
    if not cfg.dist.is_main:
        return summary
    checkpoint.write_weights(st.state.plain, os.path.join(cfg.output_dir, FINAL_WEIGHTS_NAME))
    files = {"final weights (state dict)": FINAL_WEIGHTS_NAME, "checkpoint": CHECKPOINT_NAME,
             "best": BEST_NAME if validated else None, "metrics": METRICS_NAME, "summary": SUMMARY_NAME}
    try:
        write_summary(summary, cfg.output_dir)
    except FileWriteError as exc:
        files["summary"] = None
        print(f"fkd-train: warning: {exc}; the run itself is complete", file=sys.stderr)
    if say is not None:
        say(summary.describe(files, cfg.output_dir))
    return summary


def _announce_resume(st: Student, say) -> None:
    if st.cfg.resume:
        s = st.state
        st.last_saved = s.first_epoch - 1
        best = f", best top-1 so far {s.best_acc1:.2f}%" if s.best_acc1 > 0 else ""
        say(f"fkd-train: {_who(st)}resumed from epoch {s.first_epoch} of {escape(st.cfg.resume)} (epochs "
            f"0..{s.first_epoch - 1} done{best})")


def _who(st: Student) -> str:
    """How a line names its student: not at all in a run of one."""
    return f"{escape(st.name)}: " if st.several else ""


def _listed(cfg: TrainConfig) -> dict:
    """A student as ``students.json`` lists it."""
    return {"name": cfg.student, "model": cfg.model, "seed": cfg.seed,
            "learning_rate": cfg.learning_rate if cfg.sgd else cfg.adamw_lr, "optimizer": "SGD" if cfg.sgd else "AdamW"}
