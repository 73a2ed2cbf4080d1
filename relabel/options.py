"""What to label and how: the ``fkd-relabel`` options as given (:class:`RelabelOptions`), their
checks, and the :class:`Plan` derived from them and the inputs before any label is computed."""

from __future__ import annotations

from dataclasses import dataclass

from fkd_shards import shards
from fkd_shards.common.distributed import DEFAULT_TIMEOUT_MIN
from fkd_shards.common.ranges import check_range
from fkd_shards.convert.imagefolder import ImageFolderListing
from fkd_shards.convert.pipeline import infer_input_size, label_storage
from fkd_shards.convert.sre2l import RelabelBatch, RelabelLayout, read_sizes, scan_layout
from fkd_shards.shards import format as fmt
from fkd_shards.shards.provenance import MAX_TEACHERS

from .errors import RelabelError


@dataclass(frozen=True)
class RelabelOptions:
    """What to label and how; mirrors the ``fkd-relabel`` flags. None means "not given"."""

    train_dir: str
    output: str
    teachers: tuple[tuple[str, str], ...]
    teacher_mix: str = "mean"
    batch_size: int | None = None
    epochs: int | None = None
    input_size: int | None = None
    mix_type: str | None = None  # default cutmix
    crop_scale: tuple[float, float] | None = None  # default (0.08, 1.0)
    bn_mode: str = "eval"
    teacher_chunks: int = 1
    seed: int | None = None  # default 0
    fkd_seed: int = 42
    label_dtype: str = "float16"
    label_codec: str = fmt.CODEC_RAW
    codec_temperature: float = 20.0
    device: str | None = None  # --device; None: CUDA when available (relabel() resolves it)
    workers: int = 8
    threads: int | None = None  # --threads; None: decided by fkd_shards.common.threads
    amp: str = "off"
    tf32: bool = False  # --tf32: TF32 float32 matrix products and convolutions on CUDA
    cudnn_benchmark: bool = False  # --cudnn-benchmark
    dist_timeout: int = DEFAULT_TIMEOUT_MIN  # --dist-timeout: minutes a collective waits under torchrun
    resume: bool = False
    replay: str | None = None
    shard_bytes: int = 64 * 10**6
    overwrite: bool = False
    min_alignment: float | None = None  # for the new labels; None: the default threshold
    min_replay_alignment: float | None = None  # for --replay's own files; None: the default threshold
    progress: bool = True


@dataclass(frozen=True)
class Plan:
    """Everything derived before labelling starts: sizes, draws' settings, the source of the draws."""

    num_images: int
    batch_size: int
    epochs: int
    input_size: int
    mix_type: str
    crop_scale: tuple[float, float] | None  # None with --replay: the draws are the replayed files'
    seed: int | None
    layout: RelabelLayout | None  # the replayed relabel output, if any
    first: RelabelBatch | None = None  # its batch 0 of epoch 0

    @property
    def batches_per_epoch(self) -> int:
        return fmt.batches_per_epoch(self.num_images, self.batch_size)

    def batch_rows(self, batch: int) -> int:
        """Row count of ``batch`` in every epoch (only the last one is short)."""
        return fmt.batch_rows(self.num_images, self.batch_size, batch)


def check_options(o: RelabelOptions) -> shards.codecs.Codec:
    if not o.teachers:
        raise RelabelError("--teacher MODEL WEIGHTS is required (repeat it for an ensemble)")
    if len(o.teachers) > MAX_TEACHERS:  # what a manifest's provenance holds
        raise RelabelError(f"{len(o.teachers)} teachers given; an ensemble has at most {MAX_TEACHERS}")
    if o.replay is not None:
        given = [flag for flag, value in (("--seed", o.seed), ("--crop-scale", o.crop_scale),
                                          ("--mix-type", o.mix_type)) if value is not None]
        if given:
            raise RelabelError(f"{', '.join(given)} do(es) not apply with --replay: the draws come from {o.replay}")
    else:
        if o.batch_size is None or o.epochs is None:
            raise RelabelError("--batch-size and --epochs are required (or --replay FKD_PATH, which has both)")
    for key, value in (("--teacher-chunks", o.teacher_chunks), ("--batch-size", o.batch_size), ("--epochs", o.epochs),
                       ("--input-size", o.input_size), ("--seed", o.seed), ("--fkd-seed", o.fkd_seed),
                       ("--workers", o.workers), ("--min-replay-alignment", o.min_replay_alignment),
                       *(("--crop-scale", v) for v in o.crop_scale or ())):
        check_range(key, value, RelabelError)
    if o.crop_scale is not None and not o.crop_scale[0] <= o.crop_scale[1]:
        raise RelabelError(f"--crop-scale MIN MAX must have MIN <= MAX, got {list(o.crop_scale)}")
    if o.min_replay_alignment is not None and o.replay is None:
        raise RelabelError("--min-replay-alignment applies to --replay's files; without --replay use --min-alignment")
    return label_storage(o.label_codec, o.codec_temperature, o.min_alignment)


def make_plan(o: RelabelOptions, folder: ImageFolderListing, log) -> Plan:
    """Sizes and draws' settings from the flags, or from the replayed relabel output (whose B, E,
    N and mix type a contradicting flag may not override)."""
    input_size = o.input_size or infer_input_size(folder, log)
    if o.replay is None:
        return Plan(num_images=len(folder.samples), batch_size=o.batch_size, epochs=o.epochs, input_size=input_size,
                    mix_type=o.mix_type or fmt.MIX_CUTMIX, crop_scale=o.crop_scale or (0.08, 1.0),
                    seed=0 if o.seed is None else o.seed, layout=None)
    layout = scan_layout(o.replay)
    first, batch_size = read_sizes(layout, input_size, len(folder.samples), o.train_dir)
    num_images = len(folder.samples)
    for flag, given, found in (("--batch-size", o.batch_size, batch_size), ("--epochs", o.epochs, layout.epochs)):
        if given is not None and given != found:
            raise RelabelError(f"{flag} {given} contradicts {o.replay}, which has {found}")
    return Plan(num_images=num_images, batch_size=batch_size, epochs=layout.epochs, input_size=input_size,
                mix_type=first.mix_type, crop_scale=None, seed=None, layout=layout, first=first)
