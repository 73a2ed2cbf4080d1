"""``fkd-train`` flags: train_FKD.py's, with the same meaning and defaults, plus ours; parsed once
into a frozen :class:`TrainConfig` that is checked against the shard set's manifest."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch

from fkd_shards import shards


class ConfigError(ValueError):
    """Flags that contradict each other or the shard set."""


@dataclass(frozen=True)
class TrainConfig:
    shards: str
    batch_size: int
    gradient_accumulation_steps: int
    start_epoch: int
    epochs: int
    workers: int
    val_dir: str | None
    output_dir: str
    cos: bool
    sgd: bool
    learning_rate: float
    momentum: float
    weight_decay: float
    adamw_lr: float
    adamw_weight_decay: float
    model: str
    temperature: float
    mix_type: str
    fkd_seed: int
    device: str
    init_weights: str | None
    resume: str | None
    val_every: int
    wandb_project: str
    wandb_mode: str
    amp: str
    channels_last: bool
    sync_bn: bool
    decode_cache: str  # auto, on, off
    cache_dir: str | None
    cache_labels: bool
    last_batch_loss: str
    device_crops: bool

    def as_dict(self) -> dict:
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fkd-train", description="Knowledge-distillation training on an "
                                "fkd shard set, batch for batch as the teacher labelled it.")
    a = p.add_argument
    a("--shards", help="shard set written by fkd-convert (directory or URL)")
    a("--train-dir", help=argparse.SUPPRESS)
    a("--fkd-path", help=argparse.SUPPRESS)
    a("--batch-size", type=int, default=None, help="global batch B (default: the manifest's)")
    a("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step, A")
    a("--start-epoch", type=int, default=0, help="first epoch to train (without --resume: fresh weights)")
    a("--epochs", type=int, default=None, help="epochs E (default: all in the manifest)")
    a("-j", "--workers", type=int, default=16, help="crop worker processes (0: in the main process)")
    a("--val-dir", default=None, help="ImageFolder for validation (optional)")
    a("--output-dir", default="./save/1024", help="checkpoints and metrics.jsonl")
    a("--cos", action="store_true", help="cosine LR schedule (default: linear decay)")
    a("--sgd", action="store_true", help="SGD instead of AdamW")
    a("-lr", "--learning-rate", type=float, default=1.024, help="SGD learning rate")
    a("--momentum", type=float, default=0.875, help="SGD momentum")
    a("--weight-decay", type=float, default=3e-5, help="SGD weight decay")
    a("--adamw-lr", type=float, default=0.001, help="AdamW learning rate")
    a("--adamw-weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--model", default="resnet18", help="any torchvision.models name")
    a("--keep-topk", type=int, default=1000, help="accepted for compatibility; unused, as in the original")
    a("-T", "--temperature", type=float, default=3.0, help="KD temperature")
    a("--wandb-project", default="Temperature", help="wandb project")
    a("--wandb-api-key", default=None, help="wandb key (WANDB_API_KEY in the environment wins)")
    a("--mix-type", default=None, choices=["mixup", "cutmix", "none"],
      help="must match the manifest (default: the manifest's)")
    a("--fkd_seed", "--fkd-seed", dest="fkd_seed", type=int, default=None,
      help="must match the manifest (default: the manifest's)")
    a("--device", default=None, help="cuda when available, else cpu")
    a("--init-weights", default=None, help="start from this state_dict (or checkpoint)")
    a("--resume", default=None, help="checkpoint to continue from, or 'auto' (OUTPUT_DIR's, if any)")
    a("--val-every", type=int, default=10, help="validate every N epochs, and at the last")
    a("--wandb-mode", default=None, choices=["online", "offline", "disabled"],
      help="default: online with an API key, else disabled")
    a("--amp", default="off", choices=["bf16", "fp16", "off"], help="autocast (off: exact parity)")
    a("--channels-last", action="store_true", help="channels-last memory format (off: exact parity)")
    a("--sync-bn", action="store_true", help="SyncBatchNorm across ranks (torchrun)")
    a("--last-batch-loss", default="original", choices=["original", "mean"],
      help="original: the short last batch's micro-batch losses are divided by A, as train_FKD.py "
           "does; mean: by its real micro-batch count")
    a("--device-crops", action="store_true",
      help="crop, resize and flip on the training device from a decoded copy of the images there "
           "(bit-identical to PIL; no crop workers)")
    a("--cache-dir", default=None, help="keep verified remote image shards here and reuse them")
    a("--cache-labels", action="store_true", help="with --cache-dir: cache the label shards too")
    a("--decode-cache", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
      help="decode every image once, into memory the crop workers share (H*W*3 bytes each; same "
           "pixels, no JPEG decode per crop); auto (default): when that fits in half the available memory")
    return p


def resolve(args: argparse.Namespace, manifest: shards.Manifest, api_key: str | None) -> TrainConfig:
    """Check the flags against each other and the manifest, filling unset ones from it."""
    m = manifest
    batch_size = m.batch_size if args.batch_size is None else args.batch_size
    if batch_size != m.batch_size:
        raise ConfigError(f"--batch-size {batch_size} contradicts the shard set's B={m.batch_size}; "
                          f"use --gradient-accumulation-steps to change the forward batch")
    epochs = m.epochs if args.epochs is None else args.epochs
    if not 0 < epochs <= m.epochs:
        raise ConfigError(f"--epochs {epochs} asked, the shard set holds {m.epochs}")
    if not 0 <= args.start_epoch < epochs:
        raise ConfigError(f"--start-epoch {args.start_epoch} outside [0, {epochs})")
    mix_type = m.mix_type if args.mix_type is None else args.mix_type
    if mix_type != m.mix_type:
        raise ConfigError(f"--mix-type {mix_type} contradicts the shard set's {m.mix_type}")
    fkd_seed = m.fkd_seed if args.fkd_seed is None else args.fkd_seed
    if fkd_seed != m.fkd_seed:
        raise ConfigError(f"--fkd_seed {fkd_seed} contradicts the shard set's {m.fkd_seed}")
    steps = args.gradient_accumulation_steps
    if steps <= 0 or batch_size % steps:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by "
                          f"--gradient-accumulation-steps {steps}")
    for flag, value in (("--val-every", args.val_every), ("--temperature", args.temperature)):
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    if args.cache_labels and not args.cache_dir:
        raise ConfigError("--cache-labels needs --cache-dir")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked, but CUDA is not available")
    if args.amp == "fp16" and not device.startswith("cuda"):
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    wandb_mode = args.wandb_mode or ("online" if api_key else "disabled")
    return TrainConfig(
        shards=args.shards, batch_size=batch_size, gradient_accumulation_steps=steps,
        start_epoch=args.start_epoch, epochs=epochs, workers=args.workers, val_dir=args.val_dir,
        output_dir=args.output_dir, cos=args.cos, sgd=args.sgd, learning_rate=args.learning_rate,
        momentum=args.momentum, weight_decay=args.weight_decay, adamw_lr=args.adamw_lr,
        adamw_weight_decay=args.adamw_weight_decay, model=args.model, temperature=args.temperature,
        mix_type=mix_type, fkd_seed=fkd_seed, device=device, init_weights=args.init_weights,
        resume=args.resume, val_every=args.val_every, wandb_project=args.wandb_project,
        wandb_mode=wandb_mode, amp=args.amp, channels_last=args.channels_last, sync_bn=args.sync_bn,
        decode_cache=args.decode_cache, cache_dir=args.cache_dir, cache_labels=args.cache_labels,
        last_batch_loss=args.last_batch_loss, device_crops=args.device_crops,
    )
