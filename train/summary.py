"""What a finished run says about itself: ``summary.json`` and the closing lines, computed from its
``metrics.jsonl`` (so a resumed run's summary covers the epochs before the resume too)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from fkd_shards.common.files import write_atomically
from fkd_shards.common.text import escape
from fkd_shards.common.version import VERSION

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


def write_summary(summary: RunSummary, output_dir: str) -> None:
    """``OUTPUT_DIR/summary.json``, atomically (:class:`FileWriteError` when the disk refuses)."""
    text = json.dumps(asdict(summary), indent=1, sort_keys=True) + "\n"
    write_atomically(os.path.join(output_dir, SUMMARY_NAME), text.encode())


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {s:02d}s" if hours else f"{minutes}m {s:02d}s"
