"""``OUTPUT_DIR/curves.png``: a run's curves, redrawn after every epoch from its metrics log: train
loss, train and validation top-1, and the learning rate, per epoch (matplotlib, without a display)."""

from __future__ import annotations

import io
import os

from fkd_shards.common.files import write_atomically

from .metrics import read_metrics
from .rundir import CURVES_NAME, METRICS_NAME


def _series(records: list[dict], key: str, epoch_key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the lines that hold both as plain numbers (a hand-edited log may hold anything)."""
    points = [(r[epoch_key], r[key]) for r in records if isinstance(r.get(epoch_key), int)
              and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [e for e, _ in points], [float(v) for _, v in points]


def draw_curves(output_dir: str, title: str) -> None:
    """Draw the run's metrics log into ``curves.png`` beside it, atomically; nothing without a line."""
    records = [record for _, record in read_metrics(os.path.join(output_dir, METRICS_NAME))]
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.2), layout="constrained")
    loss, top1, lr = figure.subplots(1, 3)
    loss.plot(*_series(records, "train/loss", "train/epoch"), marker=".")
    loss.set_title("train loss (KD, divided by A)")
    top1.plot(*_series(records, "train/Top1", "train/epoch"), marker=".", label="train (mixed crops)")
    epochs, values = _series(records, "val/top1", "val/epoch")
    if epochs:
        top1.plot(epochs, values, marker="o", label="validation")
    top1.set_title("top-1 %")
    top1.set_ylim(0, 100)
    top1.legend(fontsize=8)
    lr.plot(*_series(records, "train/lr", "train/epoch"), marker=".")
    lr.set_title("learning rate")
    for ax in (loss, top1, lr):
        ax.set_xlabel("epoch")
    figure.suptitle(title, fontsize=10)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=90)
    write_atomically(os.path.join(output_dir, CURVES_NAME), out.getvalue())
