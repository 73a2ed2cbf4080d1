"""What a finished run says about itself: ``summary.json`` and the closing lines, computed from its
``metrics.jsonl`` (so a resumed run's summary covers the epochs before the resume too)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from fkd_shards.common.files import FileMissingError, FileReadError, read_bounded, write_atomically
from fkd_shards.common.text import escape
from fkd_shards.common.typed import check_fields, integer, number, or_null, text
from fkd_shards.common.version import VERSION
from fkd_shards.shards.manifest import parse_json

from .metrics import read_metrics
from .rundir import METRICS_NAME, SUMMARY_NAME


@dataclass(frozen=True)
class RunSummary:
    model: str
    seed: int
    shards: str
    shard_set: str  # the set's content id
    epochs: int
    epochs_done: int
    final_top1: float | None  # the last validated epoch's top-1 (%)
    best_top1: float | None
    best_epoch: int | None
    images_per_s: float | None  # over every trained epoch
    wall_s: float  # this process's, start-up included
    config: dict
    written_by: str  # "fkd-train VERSION"

    def describe(self, files: dict[str, str | None], output_dir: str) -> str:
        lines = [f"done: {self.model} (seed {self.seed}), {self.epochs_done}/{self.epochs} epochs, "
                 f"{_duration(self.wall_s)} in this process"
                 + (f", {self.images_per_s:.0f} images/s" if self.images_per_s else "")]
        if self.final_top1 is None:
            lines.append("top-1: not measured (no --val-dir)")
        else:
            lines.append(f"top-1: final {self.final_top1:.2f}%, best {self.best_top1:.2f}% (epoch {self.best_epoch})")
        lines += [f"{what}: {escape(os.path.join(output_dir, name))}" for what, name in files.items() if name]
        return "\n".join(lines)


def summarize(cfg, manifest, wall_s: float) -> RunSummary:
    """The summary of the run in ``cfg.output_dir`` from its metrics log."""
    lines = [record for _, record in read_metrics(os.path.join(cfg.output_dir, METRICS_NAME))]
    validated = [x for x in lines if isinstance(x.get("val/top1"), (int, float))]
    best = max(validated, key=lambda x: x["val/top1"], default=None)
    images = seconds = 0.0
    for x in lines:
        rate = x.get("train/images_per_s")
        rows = x.get("train/rows")
        if isinstance(rate, (int, float)) and isinstance(rows, (int, float)) and rate > 0:
            images, seconds = images + rows, seconds + rows / rate
    return RunSummary(
        model=cfg.model, seed=cfg.seed, shards=cfg.shards, shard_set=manifest.content_id(), epochs=cfg.epochs,
        epochs_done=len(lines), final_top1=validated[-1]["val/top1"] if validated else None,
        best_top1=best["val/top1"] if best else None, best_epoch=best.get("val/epoch") if best else None,
        images_per_s=images / seconds if seconds else None, wall_s=wall_s, config=cfg.as_dict(),
        written_by=f"fkd-train {VERSION}",
    )


MAX_SUMMARY_BYTES = 1 << 20  # ours are about 2 KB


class SummaryError(ValueError):
    """A ``summary.json`` that is not a readable fkd-train summary; the message names the file and field."""


_SUMMARY = {
    "model": text(200), "seed": integer(0), "shards": text(), "shard_set": text(200), "epochs": integer(1),
    "epochs_done": integer(0), "final_top1": or_null(number(0, 100)), "best_top1": or_null(number(0, 100)),
    "best_epoch": or_null(integer(0)), "images_per_s": or_null(number(0, 1e12)), "wall_s": number(0, 1e12),
    "config": ((lambda v: isinstance(v, dict)), "an object"), "written_by": text(200),
}


def read_summary(path: str) -> dict:
    """``summary.json`` as written by :func:`write_summary`, every field typed and range-checked
    (:class:`SummaryError` in one line otherwise; fields a later version adds are let through);
    :class:`FileMissingError` when there is none."""
    try:
        data = read_bounded(path, MAX_SUMMARY_BYTES)
    except FileMissingError:
        raise
    except FileReadError as exc:
        raise SummaryError(str(exc)) from None
    body = parse_json(data.decode("utf-8", errors="replace"), path, SummaryError)

    def fail(message: str) -> None:
        raise SummaryError(f"{path}: {message} (not an fkd-train summary, or edited)")

    check_fields(body, _SUMMARY, "summary", fail, required=tuple(_SUMMARY), unknown_allowed=True)
    return body


def write_summary(summary: RunSummary, output_dir: str) -> None:
    """``OUTPUT_DIR/summary.json``, atomically (:class:`FileWriteError` when the disk refuses)."""
    text = json.dumps(asdict(summary), indent=1, sort_keys=True) + "\n"
    write_atomically(os.path.join(output_dir, SUMMARY_NAME), text.encode())


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {s:02d}s" if hours else f"{minutes}m {s:02d}s"
