"""The students of one run: each with its own config, state, randomness, metrics log and output
directory, stepping one after another on the same batches.

Each student's random stream is its own: its state is put into the global generators (torch's CPU
one and, on CUDA, the device's) before anything the student does and taken back after, so that its
draws (dropout, drop-path) are those of a run that trains it alone, whatever the other students draw.
Nothing else in a run draws from the global generators (the stream and the validation loader have
their own).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fkd_shards.common.text import escape

from .checkpoint import TrainState, rng_state, set_rng_state
from .config import TrainConfig
from .metrics import MetricsLog


@dataclass(eq=False)
class Student:
    """One student of the run and everything the loop keeps for it."""

    cfg: TrainConfig
    several: bool  # the run trains several students: each keeps its own random stream and directory
    state: TrainState | None = None  # built (or restored) before the first batch
    metrics_log: MetricsLog | None = None  # rank 0 only
    failed: str | None = None  # why it was stopped (its loss stopped being finite), or None
    last_saved: int | None = None  # the last epoch whose checkpoint is on disk
    totals: object = None  # the current epoch's loop.EpochTotals (loop imports this module)
    bad: torch.Tensor | None = None  # the current epoch's non-finite losses, per batch
    _rng: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cfg.student

    @property
    def short(self) -> str:
        """For the progress bar: the model's name and the seed."""
        return f"{self.cfg.model}/{self.cfg.seed}"

    def trains(self, epoch: int) -> bool:
        """Whether it takes its steps in ``epoch``: not stopped, and not ahead of it (resumed later)."""
        return self.failed is None and self.state.first_epoch <= epoch

    def keep_rng(self) -> None:
        """Take the global generators' current states as this student's (after it is built)."""
        if self.several:
            self._rng = rng_state(self.cfg.device)

    @contextmanager
    def own_rng(self):
        """This student's random stream, in place of the global one while the block runs."""
        if not self.several:
            yield
            return
        set_rng_state(self._rng, self.cfg.device)
        try:
            yield
        finally:
            self._rng = rng_state(self.cfg.device)


def students_table(students: list[Student], summaries: dict[str, object]) -> str:
    """The end-of-run table: one row per student, its epochs, top-1 and directory."""
    header = ["student", "epochs", "final top-1 %", "best top-1 %", "images/s", "status"]
    rows = []
    for st in students:
        summary = summaries.get(st.name)
        top1 = getattr(summary, "final_top1", None)
        best = getattr(summary, "best_top1", None)
        rate = getattr(summary, "images_per_s", None)
        done = getattr(summary, "epochs_done", None)
        status = "stopped: loss not finite" if st.failed else "trained" if summary else "trained before"
        rows.append([escape(st.name), "-" if done is None else str(done), "-" if top1 is None else f"{top1:.2f}",
                     "-" if best is None else f"{best:.2f}", "-" if rate is None else f"{rate:.0f}", status])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])
