"""How many threads torch computes with, beside the crop worker processes: decided once and said at
start-up, with the CPUs they share.

The default is torch's own, one thread per CPU: measured on an idle 2-core machine (resnet18, 64 px
crops from the decoded cache, 2 crop workers), 2 threads trained at 120-124 images/s and 1 thread at
63-71, since cheap crops leave the workers idle most of the time. On a loaded machine the opposite
was seen (16 against 96 images/s); the start-up line says when threads and workers outnumber the
CPUs, and ``--threads`` (or OMP_NUM_THREADS) sets the count."""

from __future__ import annotations

import os

MAX_THREADS = 1024


class ThreadsError(ValueError):
    """A ``--threads`` or OMP_NUM_THREADS that is not a thread count."""


def available_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_threads(workers: int, flag: int | None, environ: dict | None = None) -> tuple[int, str]:
    """torch's intra-op threads and a line that says the split beside ``workers`` crop worker
    processes: ``--threads`` when given, else OMP_NUM_THREADS when set, else one per CPU."""
    environ = os.environ if environ is None else environ
    cpus = available_cpus()
    if flag is not None:
        threads, why = flag, "--threads"
    elif environ.get("OMP_NUM_THREADS"):
        try:
            threads = int(environ["OMP_NUM_THREADS"])
        except ValueError:
            raise ThreadsError(f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS'][:20]!r} is not a number of threads") \
                from None
        why = "OMP_NUM_THREADS"
    else:
        threads, why = cpus, "one per CPU; --threads sets it"
    if not 1 <= threads <= MAX_THREADS:
        raise ThreadsError(f"{why}: {threads} threads; give 1 to {MAX_THREADS}")
    crowded = (f"; {threads + workers} busy processes and threads on {cpus} CPU(s): on a loaded machine fewer "
               f"(--threads, -j) may run faster") if threads + workers > cpus else ""
    return threads, (f"threads: {threads} torch thread(s) beside {workers} crop worker process(es) on {cpus} CPU(s) "
                     f"({why}){crowded}")


def use_torch_threads(workers: int, flag: int | None) -> str:
    """Set torch's intra-op threads (:func:`torch_threads`); returns the line that says so."""
    import torch

    threads, note = torch_threads(workers, flag)
    torch.set_num_threads(threads)
    return note
