"""Helpers shared by the benchmarks: fixtures in the original layout, process-tree memory, tables."""

from __future__ import annotations

import os
import threading
import time

from fkd_shards.demo.example import make_image_folder, make_relabel


def make_fixture(root: str, *, images: int, classes: int, size: int, batch_size: int, epochs: int,
                 width: int, mix_type: str = "cutmix"):
    """ImageFolder of ``size``x``size`` JPEGs plus a relabel directory in the original layout."""
    train_dir, fkd_path = os.path.join(root, "train"), os.path.join(root, "fkd")
    if os.path.exists(os.path.join(fkd_path, f"epoch_{epochs - 1}")):
        from fkd_shards.convert.imagefolder import list_image_folder

        samples = list_image_folder(train_dir).samples
    else:
        samples = make_image_folder(train_dir, classes, images // classes, kinds=[(size, size, "RGB", "jpg")])
        make_relabel(fkd_path, samples, epochs=epochs, batch_size=batch_size, width=width,
                     input_size=size, mix_type=mix_type)
    return train_dir, fkd_path, samples


def _tree_pss_bytes(pid: int) -> int:
    """Proportional resident memory (PSS) of ``pid`` and all its descendants: pages shared by
    several processes (a shared-memory cache, copy-on-write pages after fork) count once in total."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class PeakTreeMemory:
    """Samples this process tree's PSS every 20 ms; ``peak`` is the maximum seen.

    A sample costs about 15 ms of CPU (the kernel walks every mapping), which slows a CPU-bound run
    on a small machine by a third: time a run without it (``enabled=False``; ``peak`` is then NaN).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self):
        self.peak = _tree_pss_bytes(os.getpid()) if self.enabled else float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.enabled:
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _tree_pss_bytes(os.getpid()))

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")


def now() -> float:
    return time.perf_counter()
