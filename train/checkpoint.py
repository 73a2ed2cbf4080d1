"""Checkpoints: what the loop's state is, how it is saved and restored, and the checks that make a
resume trustworthy.

One dict, train_FKD.py's keys (``epoch`` = epochs completed, ``state_dict`` without ``module.``
prefixes, ``best_acc1``, ``optimizer``, ``scheduler``) plus what an exact resume needs (position,
RNG states, AMP scaler, seed, config, the shard set's content id) and an integrity hash over all of
it. Written to a temporary file and renamed; loaded with ``weights_only=True``; on resume the hash,
the weights' finiteness, the shard set and the run-defining flags are checked before anything is used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from fkd_shards import shards
from fkd_shards.common.distributed import collective_device
from fkd_shards.common.files import FileWriteError, write_atomically
from fkd_shards.common.text import escape, first_line
from fkd_shards.models.weights import WeightsError, check_finite, load_file, load_into, model_state

from .config import TRAJECTORY_FIELDS, TrainConfig
from .kd import lr_factor
from .rundir import BEST_NAME, CHECKPOINT_NAME

INTEGRITY = "sha256-tensors-v1"
REQUIRED = ("epoch", "state_dict", "optimizer", "scheduler", "rng")


class CheckpointError(WeightsError):
    """A checkpoint that cannot be used or written; the message names the file."""


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


def digest(obj: object) -> str:
    """sha256 over a checkpoint's content: every tensor's dtype, shape and bytes, every container's
    structure, every other value's type and repr, in a fixed order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: object) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())


def _to_cpu(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def write(state: dict, path: str) -> None:
    """``torch.save`` through a temporary file and a rename; a full or read-only disk is a
    :class:`CheckpointError` and the file at ``path`` stays as it was."""
    try:
        write_atomically(path, lambda f: _torch_save(state, f))
    except FileWriteError as exc:
        kept = "the previous file there is intact" if os.path.exists(path) else "nothing was written"
        raise CheckpointError(f"{exc}; {kept}") from None


def _torch_save(state: dict, f) -> None:
    try:
        torch.save(state, f)
    except RuntimeError as exc:
        # torch's zip writer, closing after a failed write (a full disk), raises its own RuntimeError
        # ("unexpected pos ..."), which would hide the OSError that says what happened.
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise


def write_weights(model: nn.Module, path: str) -> None:
    """A plain state dict (CPU tensors) that ``model.load_state_dict(torch.load(path))`` takes."""
    write(_to_cpu(model.state_dict()), path)


# ---- save and restore --------------------------------------------------------------------------

def save(s: TrainState, epoch: int, cfg: TrainConfig, manifest: shards.Manifest, is_best: bool, *,
         ranks_rng: list[dict] | None = None) -> str:
    """Write ``OUTPUT_DIR/checkpoint.pth.tar`` after ``epoch``, and ``model_best.pth.tar`` when best.
    ``ranks_rng``: every rank's random state under torchrun (:func:`ranks_rng_state`); ``rng`` is rank 0's."""
    state = _to_cpu({
        "epoch": epoch + 1, "state_dict": s.plain.state_dict(), "best_acc1": s.best_acc1,
        "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
        "scaler": s.scaler.state_dict(), "position": {"epoch": epoch + 1, "batch": 0},
        "rng": rng_state(cfg.device), "seed": cfg.seed, "shard_set": manifest.content_id(),
        "config": cfg.as_dict(), **({"ranks_rng": ranks_rng} if ranks_rng and len(ranks_rng) > 1 else {}),
    })
    check_finite(state["state_dict"], f"the model after epoch {epoch}")
    state["integrity"] = {"algorithm": INTEGRITY, "sha256": digest(state)}
    path = os.path.join(cfg.output_dir, CHECKPOINT_NAME)
    write(state, path)
    if is_best:
        best = os.path.join(cfg.output_dir, BEST_NAME)
        try:
            with open(path, "rb") as source:
                write_atomically(best, lambda f: shutil.copyfileobj(source, f))
        except (OSError, FileWriteError) as exc:
            raise CheckpointError(f"{best}: cannot write ({first_line(exc)}); {path} is complete") from None
    return path


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by :func:`save`, its integrity hash and weights checked."""
    state = load_file(path)
    missing = [k for k in REQUIRED if k not in state]
    if missing or ("shard_set" not in state and "manifest" not in state):
        raise CheckpointError(f"{path}: not an fkd-train checkpoint (no {', '.join(missing or ['shard_set'])})")
    integrity = state.pop("integrity", None)
    if integrity is not None:  # checkpoints written before the hash existed have none
        if not isinstance(integrity, dict) or integrity.get("sha256") != digest(state):
            raise CheckpointError(f"{path}: integrity hash mismatch (the file changed or is corrupt); refused")
    epoch = state["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(f"{path}: epoch is {escape(repr(epoch))[:40]}")
    check_finite(model_state(state, path), path)
    return state


def restore(s: TrainState, path: str, cfg: TrainConfig, manifest: shards.Manifest) -> TrainState:
    """Continue from the checkpoint at ``path``: refused, naming what differs, when it belongs to
    another shard set, another model, optimizer or schedule; otherwise every state is restored."""
    state = load_checkpoint(path)
    _check_compatible(state, cfg, manifest, path)
    load_into(s.plain, model_state(state, path), path, f"--model {cfg.model}")
    try:
        s.optimizer.load_state_dict(state["optimizer"])
        s.scaler.load_state_dict(state.get("scaler") or {})
        scheduler = build_scheduler(cfg, s.optimizer, state["epoch"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rank_rng(state, cfg)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimizer, schedule or RNG state does not fit this run "
                              f"({first_line(exc, 150)})") from None
    best = state.get("best_acc1", 0.0)
    return TrainState(s.model, s.plain, s.optimizer, scheduler, s.scaler, state["epoch"],
                      float(best) if isinstance(best, (int, float)) else 0.0)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, first_epoch: int) -> LambdaLR:
    """LambdaLR stepped once per epoch, positioned at ``first_epoch``."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, lambda e: lr_factor(e, cfg.epochs, cfg.cos), last_epoch=first_epoch - 1)


def _check_compatible(state: dict, cfg: TrainConfig, manifest: shards.Manifest, path: str) -> None:
    if "shard_set" in state:
        if state["shard_set"] != manifest.content_id():
            raise CheckpointError(f"{path}: written for another shard set (its shards' hashes differ from "
                                  f"{cfg.shards}'s)")
    elif state["manifest"] != _legacy_identity(manifest):
        raise CheckpointError(f"{path}: written for another shard set")
    before = state.get("config") or {}
    differing = [f"{_DESCRIBED.get(name, '--' + name.replace('_', '-'))} {getattr(cfg, name)!r} differs from the "
                 f"checkpoint's {escape(repr(before[name]))[:60]}"
                 for name in TRAJECTORY_FIELDS if name in before and before[name] != getattr(cfg, name)]
    if differing:  # every one, so that one corrected rerun is enough
        raise CheckpointError(f"{path}: {'; '.join(differing)}; resume with the same values, or start a new run")


# Trajectory fields that are not flags of their own.
_DESCRIBED = {"micro_batch_rows": "the micro-batch, B / (ranks x --gradient-accumulation-steps) rows:"}


def _legacy_identity(m: shards.Manifest) -> dict:
    """What checkpoints written before content ids recorded about their shard set."""
    return {"num_images": m.num_images, "batch_size": m.batch_size, "soft_label_width": m.soft_label_width,
            "mix_type": m.mix_type, "fkd_seed": m.fkd_seed, "input_size": m.input_size, "classes": list(m.classes)}


def rng_state(device: str) -> dict:
    """The global generators' states: torch's CPU one, and the device's on CUDA."""
    state = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """The seed of rank ``rank``'s own random stream (dropout, drop-path masks) under torchrun:
    distinct per rank and from every ``--seed``'s own stream, which rank 0 keeps."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1, np.uint64)[0])


def ranks_rng_state(device: str, env) -> list[dict] | None:
    """Every rank's :func:`rng_state`, on rank 0 (None elsewhere); a collective under torchrun,
    gathered as byte tensors (nothing pickled between ranks)."""
    own = rng_state(device)
    if not env.active:
        return [own]
    import torch.distributed as dist

    on = collective_device(device)
    gathered = {}
    for key, value in own.items():
        parts = [torch.empty_like(value, device=on) for _ in range(env.world_size)]
        dist.all_gather(parts, value.to(on))
        gathered[key] = [part.cpu() for part in parts]
    if not env.is_main:
        return None
    return [{key: gathered[key][rank] for key in own} for rank in range(env.world_size)]


def _restore_rank_rng(state: dict, cfg: TrainConfig) -> None:
    """This rank's random state from the checkpoint: rank 0's ``rng``, another rank's own from
    ``ranks_rng``; a rank the checkpoint has none for (it was written by fewer ranks) starts a
    stream of its own from the seed, the rank and the epoch."""
    rank = cfg.dist.rank
    kept = state.get("ranks_rng")
    if rank == 0:
        set_rng_state(state["rng"], cfg.device)
    elif isinstance(kept, list) and rank < len(kept):
        set_rng_state(kept[rank], cfg.device)
    else:
        torch.manual_seed(rank_seed(cfg.seed, rank, state["epoch"]))


def set_rng_state(state: dict, device: str) -> None:
    torch.set_rng_state(state["torch"])
    if device.startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def export_weights(path: str, out: str) -> str:
    """``fkd-train export``: the model weights of a checkpoint (or any state dict), or of a run
    directory's best checkpoint (its last when it has none), as a plain state dict at ``out``;
    returns what was written, in words (tensors, and the checkpoint's epoch and top-1)."""
    if os.path.isdir(path):
        best, last = os.path.join(path, BEST_NAME), os.path.join(path, CHECKPOINT_NAME)
        if not os.path.lexists(best) and not os.path.lexists(last):
            raise CheckpointError(f"{path}: holds neither {BEST_NAME} nor {CHECKPOINT_NAME} (not a run directory)")
        path = best if os.path.lexists(best) else last
    state = load_file(path)
    if "integrity" in state:
        state = load_checkpoint(path)
    weights = model_state(state, path)
    check_finite(weights, path)
    write(_to_cpu(weights), out)
    said = f"{len(weights)} tensors from {escape(path)}"
    if isinstance(state.get("epoch"), int) and "optimizer" in state:  # one of our checkpoints: say which
        best = state.get("best_acc1")
        top1 = f", best top-1 so far {best:.2f}%" if isinstance(best, float) and best > 0 else ""
        said += f" (after epoch {state['epoch'] - 1}{top1})"
    return said
