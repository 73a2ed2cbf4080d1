"""``fkd-train`` flags (train_FKD.py's, with the same meaning and defaults where they still apply,
plus ours) and :func:`resolve`, which turns flags, manifest and torchrun environment into one frozen
:class:`TrainConfig` holding everything derived from them. Nothing writes to it afterwards.

This module imports only the standard library at the top: ``--help`` must not wait for torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, replace

from fkd_shards.common.cli import add_cuda_flags
from fkd_shards.common.distributed import DistEnv
from fkd_shards.common.ranges import RANGES, add_ranged, check_range
from fkd_shards.common.version import VERSION

from .rundir import plain_name, resume_path

# What defines a run's trajectory: a resumed run must agree with its checkpoint on all of them.
TRAJECTORY_FIELDS = ("model", "seed", "sgd", "learning_rate", "momentum", "weight_decay", "adamw_lr",
                     "adamw_weight_decay", "cos", "epochs", "temperature", "micro_batch_rows", "last_batch_loss",
                     "tf32")


MAX_STUDENTS = 100  # of one run: a paper's table has a few architectures x three seeds


class ConfigError(ValueError):
    """Flags that contradict each other, the shard set or the environment."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one ``fkd-train`` run, flags and derived values alike (see :func:`resolve`)."""

    shards: str  # the shard set's directory or URL
    output_dir: str  # where this student's checkpoints, metrics and summary go
    run_dir: str  # --output-dir: output_dir itself, or the directory holding several students' directories
    model: str  # the student: a torchvision.models name or timm:NAME
    seed: int  # seed of the student's init and every later draw, in [0, 2**32)
    epochs: int  # train epochs [start_epoch, epochs) of the set's; the LR schedule spans [0, epochs)
    start_epoch: int  # the first epoch of a fresh run (a resume continues after its checkpoint)
    gradient_accumulation_steps: int  # A: micro-batches per optimizer step
    micro_batch_rows: int  # B / (world size x A): the rows of one forward pass
    dist: DistEnv  # this process's rank and world size under torchrun
    device: str  # this rank's device, e.g. "cpu" or "cuda:3"
    workers: int  # crop worker processes; 0 crops in the main process
    val_dir: str | None  # ImageFolder to validate on, or None
    val_every: int  # validate every this many epochs, and after the last
    cos: bool  # cosine LR schedule per epoch (else linear decay)
    sgd: bool  # SGD (else AdamW)
    learning_rate: float  # SGD learning rate
    momentum: float  # SGD momentum, in [0, 1]
    weight_decay: float  # SGD weight decay
    adamw_lr: float  # AdamW learning rate
    adamw_weight_decay: float  # AdamW weight decay
    temperature: float  # KD temperature T, > 0
    last_batch_loss: str  # "original": the short last batch is divided by A too; "mean": by its micro-batches
    amp: str  # autocast dtype: "off", "bf16" or "fp16"
    channels_last: bool  # channels-last memory format for the student and its input
    sync_bn: bool  # SyncBatchNorm across ranks
    init_weights: str | None  # weights file the student starts from, or None
    resume: str | None  # the checkpoint to continue from (resolved), or None for a fresh run
    resume_asked: bool  # --resume was given (auto finds nothing in a directory where no epoch finished)
    restart: bool  # move a previous run's files aside and start over
    allow_misaligned: bool  # train on a set whose replay alignment is near chance
    decode_cache: str  # "auto", "on", "off": decided once the images' size is known (batches.images.open_pixels)
    device_crops: bool  # crop and resize on the training device
    cache_dir: str | None  # local directory for verified remote shards, or None
    cache_labels: bool  # with cache_dir: cache the label shards too
    progress: bool  # progress bars on rank 0 (off: --no-progress)
    threads: int | None  # --threads: torch's intra-op threads; None: decided by common.threads
    tf32: bool  # TF32 for float32 matrix products and convolutions on CUDA (off: true float32)
    cudnn_benchmark: bool  # cuDNN's autotuner: per-shape algorithm choice by timing
    dist_timeout: int  # minutes a collective waits for the other ranks under torchrun
    wandb_project: str  # wandb project name
    wandb_mode: str  # "online", "offline" or "disabled"
    student: str  # the student's name, MODEL-seedS (its directory when a run trains several)

    def as_dict(self) -> dict:
        body = asdict(self)
        body["dist"] = {"world_size": self.dist.world_size}
        return body


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(110, max(80, _columns())))


def _columns() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fkd-train", formatter_class=_Formatter,
        description="Knowledge-distillation training on a shard set, batch for batch as the teacher "
                    "labelled it (train_FKD.py's loop and flags).\nOther commands: fkd-train inspect, "
                    "fkd-train report, fkd-train export (each with --help).",
        epilog="Example:\n  fkd-train --shards shards/ --output-dir runs/r18-s0 --model resnet18 -T 20 --cos "
               "--seed 0\nSeveral GPUs: torchrun --nproc-per-node=8 -m fkd_shards.train --shards ...")
    p.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    data = p.add_argument_group("data")
    data.add_argument("--shards", metavar="LOCATION", help="shard set written by fkd-convert or fkd-relabel "
                      "(directory or URL); required")
    add_ranged(data, "--epochs", default=None, metavar="E", help="train epochs [start, E) (default: all "
                      "the set holds; the LR schedule spans E)")
    add_ranged(data, "--start-epoch", default=0, metavar="S", help="first epoch, with that epoch's own "
                      "batches and LR; fresh weights unless --init-weights (default: 0)")
    add_ranged(data, "--batch-size", default=None, metavar="B", help="must equal the set's B (default: "
                      "the set's); change the forward batch with --gradient-accumulation-steps")
    data.add_argument("--mix-type", default=None, choices=["mixup", "cutmix", "none"],
                      help="must match the set (default: the set's)")
    add_ranged(data, "--fkd_seed", "--fkd-seed", dest="fkd_seed", default=None, metavar="SEED",
                      help="must match the set (default: the set's)")
    data.add_argument("--allow-misaligned", action="store_true", help="train on a set whose replay alignment is "
                      "near chance (its soft labels probably belong to other images)")
    data.add_argument("--val-dir", default=None, metavar="DIR", help="ImageFolder to validate on (optional; "
                      "same class folders as the set)")
    add_ranged(data, "--val-every", default=10, metavar="N", help="validate every N epochs and at the "
                      "last (default: 10)")
    data.add_argument("--train-dir", help=argparse.SUPPRESS)
    data.add_argument("--fkd-path", help=argparse.SUPPRESS)
    model = p.add_argument_group("model")
    model.add_argument("--model", action="append", default=None, metavar="NAME[@lr=LR]", help="torchvision.models "
                       "name, or timm:NAME with the timm extra (default: resnet18); random init, no download. Repeat "
                       "for several students trained on one data pass; @lr=LR gives a student its own learning "
                       "rate (SGD's --learning-rate, or AdamW's --adamw-lr)")
    add_ranged(model, "--seed", default=None, help="seed of everything random in training, the "
                       "student's init first (default: 0)")
    model.add_argument("--seeds", default=None, metavar="S1,S2,...", help="one student per model and seed, e.g. "
                       "0,1,2 (instead of --seed)")
    model.add_argument("--init-weights", default=None, metavar="FILE", help="start from these weights (a state "
                       "dict or checkpoint)")
    model.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on "
                       "GPUs; off: exact parity)")
    model.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks under torchrun")
    opt = p.add_argument_group("optimisation")
    add_ranged(opt, "--gradient-accumulation-steps", default=1, metavar="A", help="micro-batches "
                     "per step; B must be divisible by A x ranks (default: 1)")
    opt.add_argument("--sgd", action="store_true", help="SGD instead of AdamW")
    add_ranged(opt, "-lr", "--learning-rate", default=1.024, metavar="LR", help="SGD learning rate "
                     "(default: 1.024)")
    add_ranged(opt, "--momentum", default=0.875, help="SGD momentum (default: 0.875)")
    add_ranged(opt, "--weight-decay", default=3e-5, metavar="WD", help="SGD weight decay "
                     "(default: 3e-5)")
    add_ranged(opt, "--adamw-lr", default=0.001, metavar="LR", help="AdamW learning rate "
                     "(default: 0.001)")
    add_ranged(opt, "--adamw-weight-decay", default=0.01, metavar="WD", help="AdamW weight decay "
                     "(default: 0.01)")
    opt.add_argument("--cos", action="store_true", help="cosine LR schedule per epoch (default: linear decay)")
    opt.add_argument("--last-batch-loss", default="original", choices=["original", "mean"],
                     help="original (default): the short last batch's losses are divided by A, as train_FKD.py "
                          "does; mean: by its real micro-batch count")
    opt.add_argument("--amp", default="off", choices=["bf16", "fp16", "off"], help="autocast (default: off, "
                     "exact parity)")
    kd = p.add_argument_group("distillation")
    add_ranged(kd, "-T", "--temperature", default=3.0, help="KD temperature (default: 3.0; the "
                    "paper's runs use 20)")
    add_ranged(kd, "--keep-topk", default=1000, help="accepted for compatibility; unused, as in "
                    "train_FKD.py")
    out = p.add_argument_group("checkpoints and output")
    out.add_argument("--output-dir", default="./save/1024", metavar="DIR", help="checkpoints, metrics.jsonl, "
                     "final_weights.pth, summary.json (default: ./save/1024); with several students, one directory "
                     "per student inside it (MODEL-seedS) and students.json")
    out.add_argument("--resume", default=None, metavar="auto|FILE", help="continue a run: 'auto' takes "
                     "OUTPUT_DIR's checkpoint if there is one")
    out.add_argument("--restart", action="store_true", help="start over in an output directory that holds a "
                     "run; its files are moved to OUTPUT_DIR/previous-N/ first")
    log = p.add_argument_group("logging")
    log.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"],
                     help="default: online with an API key, else disabled; files go under OUTPUT_DIR/wandb")
    log.add_argument("--wandb-project", default="Temperature", help="wandb project (default: Temperature)")
    log.add_argument("--wandb-api-key", default=None, metavar="KEY", help="wandb key (WANDB_API_KEY in the "
                     "environment wins); never printed or logged")
    system = p.add_argument_group("system")
    system.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    add_ranged(system, "-j", "--workers", default=16, metavar="N", help="crop worker processes; 0 "
                        "crops in the main process (default: 16)")
    system.add_argument("--decode-cache", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                        help="keep each image's decoded pixels after first use, in memory the workers share "
                             "(H*W*3 bytes each); auto (default): when that fits half the available memory")
    system.add_argument("--device-crops", action="store_true", help="crop and resize on the training device "
                        "(bit-identical to PIL; no crop workers; for GPUs)")
    system.add_argument("--cache-dir", default=None, metavar="DIR", help="keep verified remote image shards "
                        "here and reuse them")
    system.add_argument("--cache-labels", action="store_true", help="with --cache-dir: cache the label shards too")
    add_ranged(system, "--threads", default=None, metavar="N", help="torch's compute threads (default: "
                        "OMP_NUM_THREADS if set, else the CPUs left after the crop workers, at least 1)")
    add_cuda_flags(system)
    log.add_argument("--no-progress", action="store_true", help="no progress bars (batch jobs' logs): the epoch "
                     "lines only")
    return p


def resolve_students(args: argparse.Namespace, manifest, env: DistEnv) -> list[TrainConfig]:
    """Check the flags against each other, the manifest and the environment; derive the rest: one
    config per student (models x seeds, :func:`parse_students`), identical but for the student's
    model, seed, learning rate, output directory and checkpoint to resume."""
    from fkd_shards.common.device import resolve_device

    m = manifest
    if args.batch_size is not None and args.batch_size != m.batch_size:
        raise ConfigError(f"--batch-size {args.batch_size} contradicts the shard set's B={m.batch_size}; "
                          f"use --gradient-accumulation-steps to change the forward batch")
    if args.mix_type is not None and args.mix_type != m.mix_type:
        raise ConfigError(f"--mix-type {args.mix_type} contradicts the shard set's {m.mix_type}")
    if args.fkd_seed is not None and args.fkd_seed != m.fkd_seed:
        raise ConfigError(f"--fkd_seed {args.fkd_seed} contradicts the shard set's {m.fkd_seed}")
    for key in ("--epochs", "--start-epoch", "--gradient-accumulation-steps", "--val-every", "--workers",
                "--temperature", "--learning-rate", "--adamw-lr", "--weight-decay", "--adamw-weight-decay",
                "--momentum", "--threads"):
        check_range(key, getattr(args, key[2:].replace("-", "_")), ConfigError)
    epochs = m.epochs if args.epochs is None else args.epochs
    if epochs > m.epochs:
        raise ConfigError(f"--epochs {epochs} asked, the shard set holds {m.epochs}")
    if not 0 <= args.start_epoch < epochs:
        raise ConfigError(f"--start-epoch {args.start_epoch} outside [0, {epochs})")
    steps = args.gradient_accumulation_steps
    if m.batch_size % steps:
        raise ConfigError(f"--batch-size {m.batch_size} is not divisible by --gradient-accumulation-steps {steps}")
    if m.batch_size % (env.world_size * steps):
        raise ConfigError(f"--batch-size {m.batch_size} is not divisible by world size {env.world_size} x "
                          f"--gradient-accumulation-steps {steps}")
    students = parse_students(args.model, args.seed, args.seeds)
    if args.cache_labels and not args.cache_dir:
        raise ConfigError("--cache-labels needs --cache-dir")
    if args.restart and args.resume:
        raise ConfigError("--restart and --resume contradict each other")
    if len(students) > 1 and args.resume not in (None, "auto"):
        raise ConfigError(f"--resume {args.resume} names one checkpoint, and there are {len(students)} students: "
                          f"continue them with --resume auto")
    from fkd_shards.common.files import within
    from fkd_shards.shards.io import is_local, local_path

    if is_local(args.shards) and within(args.output_dir, local_path(args.shards)):
        raise ConfigError(f"--output-dir {args.output_dir} is, or is inside, the shard set {args.shards}; choose "
                          f"another output directory")
    if m.misalignment() and not args.allow_misaligned:
        raise ConfigError(f"{args.shards}: {m.misalignment()}; --allow-misaligned trains on it anyway")
    device = resolve_device(args.device, env)
    if args.amp == "fp16" and not device.startswith("cuda"):
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    base = TrainConfig(
        shards=args.shards, output_dir=args.output_dir, run_dir=args.output_dir, model=students[0].model,
        seed=students[0].seed, epochs=epochs,
        start_epoch=args.start_epoch, gradient_accumulation_steps=steps,
        micro_batch_rows=m.batch_size // (env.world_size * steps), dist=env, device=device, workers=args.workers,
        val_dir=args.val_dir, val_every=args.val_every, cos=args.cos, sgd=args.sgd,
        learning_rate=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay,
        adamw_lr=args.adamw_lr, adamw_weight_decay=args.adamw_weight_decay, temperature=args.temperature,
        last_batch_loss=args.last_batch_loss, amp=args.amp, channels_last=args.channels_last,
        sync_bn=args.sync_bn, init_weights=args.init_weights, resume=None,
        resume_asked=args.resume is not None, restart=args.restart, allow_misaligned=args.allow_misaligned,
        decode_cache=args.decode_cache, device_crops=args.device_crops, cache_dir=args.cache_dir,
        cache_labels=args.cache_labels, progress=not args.no_progress, threads=args.threads, tf32=args.tf32,
        cudnn_benchmark=args.cudnn_benchmark, dist_timeout=args.dist_timeout, wandb_project=args.wandb_project,
        wandb_mode=args.wandb_mode or ("online" if wandb_api_key(args) else "disabled"), student=students[0].name,
    )
    configs = []
    for spec in students:
        output_dir = args.output_dir if len(students) == 1 else os.path.join(args.output_dir, spec.name)
        rate = {} if spec.lr is None else {"learning_rate" if args.sgd else "adamw_lr": spec.lr}
        configs.append(replace(base, model=spec.model, seed=spec.seed, output_dir=output_dir, student=spec.name,
                               resume=resume_path(args.resume, output_dir), **rate))
    return configs


def resolve(args: argparse.Namespace, manifest, env: DistEnv) -> TrainConfig:
    """:func:`resolve_students` for a run of one student (one ``--model``, one seed)."""
    configs = resolve_students(args, manifest, env)
    if len(configs) != 1:
        raise ConfigError(f"{len(configs)} students asked where one is expected")
    return configs[0]


@dataclass(frozen=True)
class StudentSpec:
    """One student of a run: a model, a seed and, when it has its own, a learning rate."""

    model: str  # a torchvision.models name or timm:NAME
    seed: int
    lr: float | None  # NAME@lr=LR: this student's learning rate; None: the optimizer's flag

    @property
    def name(self) -> str:
        """The student's directory name inside OUTPUT_DIR: MODEL-seedS (a timm: prefix as timm-)."""
        return f"{self.model.replace(':', '-').replace('/', '-')}-seed{self.seed}"


def parse_students(models: list[str] | None, seed: int | None, seeds: str | None) -> list[StudentSpec]:
    """Every (model, seed) pair of ``--model`` (repeatable, ``NAME@lr=LR``) and ``--seed`` or
    ``--seeds S1,S2,...``, models first; a pair given twice, a bad seed or rate is a :class:`ConfigError`."""
    if seed is not None and seeds is not None:
        raise ConfigError("--seed and --seeds contradict each other: give one")
    if seeds is None:
        seed_list = [0 if seed is None else seed]
    else:
        try:
            seed_list = [int(text) for text in seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    for value in seed_list:
        check_range("--seed", value, lambda message: ConfigError(f"--seeds: {message}" if seeds is not None else
                                                                 message))
    students = [StudentSpec(name, s, lr) for name, lr in map(_model_spec, models or ["resnet18"]) for s in seed_list]
    if len(students) > MAX_STUDENTS:
        raise ConfigError(f"{len(students)} students asked; at most {MAX_STUDENTS} train in one run (each holds its "
                          f"model, gradients and optimizer state in memory)")
    for k, spec in enumerate(students):
        same = next((other for other in students[:k] if other.name == spec.name), None)
        if same is not None and (same.model, same.seed) == (spec.model, spec.seed):
            raise ConfigError(f"--model {spec.model} with seed {spec.seed} is asked twice; each (model, seed) trains "
                              f"once")
        if same is not None:
            raise ConfigError(f"--model {same.model} and --model {spec.model} would share the directory {spec.name}")
        if not plain_name(spec.name):
            raise ConfigError(f"--model {spec.model!r} with seed {spec.seed}: too long a name for its directory")
    return students


def _model_spec(text: str) -> tuple[str, float | None]:
    """``NAME`` or ``NAME@lr=LR``."""
    name, at, option = text.partition("@")
    if not name:
        raise ConfigError(f"--model {text!r}: no model name")
    if not plain_name(StudentSpec(name, 0, None).name):  # it names the student's directory
        raise ConfigError(f"--model {name!r}: a model name is made of letters, digits and . _ + - : / (a "
                          f"torchvision.models name, or timm:NAME)")
    if not at:
        return name, None
    key, _, value = option.partition("=")
    if key != "lr" or "_" in value:  # float() reads 1_0 as 10
        raise ConfigError(f"--model {text!r}: expected NAME or NAME@lr=LR (e.g. mobilenet_v2@lr=0.05)")
    try:
        lr = float(value)
    except ValueError:
        raise ConfigError(f"--model {text!r}: {value!r} is not a learning rate") from None
    if not RANGES["--learning-rate"].holds(lr):  # a student's own rate, in the range of --learning-rate
        raise ConfigError(f"--model {name}@lr must be in {RANGES['--learning-rate'].words()}, got {lr}")
    return name, lr




def wandb_api_key(args: argparse.Namespace) -> str | None:
    """The wandb key: WANDB_API_KEY in the environment wins over ``--wandb-api-key``."""
    return os.environ.get("WANDB_API_KEY") or args.wandb_api_key
