"""``fkd-train report``: one table over finished runs, seeds grouped, mean +- standard deviation.

Runs are grouped when they differ in nothing that defines a trajectory except ``--seed`` (same
model, shard set, optimizer, schedule, temperature, micro-batch size); each group is one row. The
standard deviation is the sample one (n - 1), as papers report it over seeds.
"""

from __future__ import annotations

import json
import math
import os
import sys

from fkd_shards.common.files import FileMissingError
from fkd_shards.common.text import escape

from .config import TRAJECTORY_FIELDS
from .rundir import STUDENTS_NAME, SUMMARY_NAME, RunDirError, read_students
from .summary import SummaryError, read_summary


class ReportError(ValueError):
    """A run directory without a finished run's summary."""


def _load(run: str) -> dict:
    path = os.path.join(run, SUMMARY_NAME)
    try:
        return read_summary(path)
    except FileMissingError:
        raise ReportError(f"{run}: no {SUMMARY_NAME} (not a finished fkd-train run)") from None
    except SummaryError as exc:
        raise ReportError(str(exc)) from None


# Besides the trajectory: what a row's numbers also depend on (the validation set, the arithmetic, the start).
MEASURE_FIELDS = ("val_dir", "amp", "init_weights")


def _settings(summary: dict) -> tuple[tuple[str, str], ...]:
    """(name, JSON value) of every setting that keeps runs apart, --seed excepted."""
    config = summary["config"]
    return tuple((name, json.dumps(config.get(name))) for name in TRAJECTORY_FIELDS + MEASURE_FIELDS
                 if name != "seed")


def _group_key(summary: dict) -> tuple:
    return (summary.get("shard_set"), summary.get("epochs_done")) + _settings(summary)


def _numbers(members: list[dict], key: str) -> list[float]:
    """The numbers under ``key`` (None where a run did not measure it: no --val-dir)."""
    return [m[key] for m in members if m[key] is not None]


def _cell(value: object) -> str:
    """A value from a summary as a table cell: escaped, and no ``|`` to break a Markdown row."""
    return escape(value).replace("|", "\\|")


def _stats(values: list[float]) -> dict | None:
    """Mean, sample standard deviation (None for one value) and count; None without values."""
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": len(values)}


def _mean_std(stats: dict | None, runs: int) -> str:
    """mean ± sample std; "(of k)" when only k of the group's runs have the number (no --val-dir)."""
    if stats is None:
        return "-"
    of = f" (of {stats['n']})" if stats["n"] < runs else ""
    if stats["std"] is None:
        return f"{stats['mean']:.2f}{of}"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}{of}"


def _seed_list(members: list[dict]) -> list[int]:
    """The group's seeds, in order, each as often as it was run."""
    return sorted(m["seed"] for m in members)


def _seeds(seeds: list) -> str:
    cells = [_cell(s) for s in seeds]
    repeated = sorted({c for c in cells if cells.count(c) > 1})
    return ",".join(cells) + f" (n={len(cells)}" + (f", seed {', '.join(repeated)} repeated)" if repeated else ")")


def find_runs(locations: list[str], note=lambda line: print(line, file=sys.stderr)) -> list[str]:
    """The finished runs behind ``locations``: a run (its ``summary.json``), the output directory of
    several students (its ``students.json``; students without a summary, stopped or unfinished, are
    left out with a ``note``), or a directory whose subdirectories are either."""
    runs = []
    for location in locations:
        found = _runs_in(location, note)
        if found is None:
            inside = [os.path.join(location, name) for name in sorted(_listdir(location))]
            found = [run for path in inside if os.path.isdir(path) for run in _runs_in(path, note) or []]
        if not found:
            raise ReportError(f"{location}: no {SUMMARY_NAME} (not a finished fkd-train run), no {STUDENTS_NAME}, and "
                              f"no run directory inside")
        runs += found
    return runs


def _runs_in(location: str, note) -> list[str] | None:
    """The finished runs at ``location`` when it is a run or a directory of students, else None."""
    if os.path.lexists(os.path.join(location, SUMMARY_NAME)):
        return [location]
    try:
        students = read_students(os.path.join(location, STUDENTS_NAME))
    except RunDirError as exc:
        raise ReportError(str(exc)) from None
    if students is None:
        return None
    runs = []
    for student in students:
        run = os.path.join(location, student["name"])
        if os.path.lexists(os.path.join(run, SUMMARY_NAME)):
            runs.append(run)
        else:
            note(f"fkd-train report: {escape(run)}: no {SUMMARY_NAME} (stopped or not finished); left out")
    return runs


def _listdir(location: str) -> list[str]:
    try:
        return os.listdir(location)
    except OSError as exc:
        raise ReportError(f"{location}: {exc.strerror or exc}") from None


def table(runs: list[str]) -> list[dict]:
    """One row per group of runs (in the order first seen): what tells the group apart, its seeds,
    and the statistics of its final and best top-1 and of its images/s."""
    groups: dict[tuple, list[dict]] = {}
    for run in find_runs(runs):
        summary = _load(run)
        groups.setdefault(_group_key(summary), []).append(summary)
    # Settings that differ between rows (other than the model) are shown, so that no two rows look
    # the same: e.g. "temperature=20, sgd=true".
    settings = [dict(_settings(members[0])) for members in groups.values()]
    varying = [name for name in settings[0] if name != "model" and len({s[name] for s in settings}) > 1] \
        if settings else []
    rows = []
    for members, values in zip(groups.values(), settings):
        first = members[0]
        rates = _numbers(members, "images_per_s")
        rows.append({"model": first.get("model"), "shards": first.get("shards"), "epochs": first.get("epochs_done"),
                     "settings": {name: json.loads(values[name]) for name in varying},
                     "seeds": _seed_list(members), "runs": len(members),
                     "final_top1": _stats(_numbers(members, "final_top1")),
                     "best_top1": _stats(_numbers(members, "best_top1")),
                     "images_per_s": sum(rates) / len(rates) if rates else None})
    return rows


FORMATS = ("markdown", "text", "csv", "json")


def report(runs: list[str], fmt: str = "markdown") -> str:
    """The table of the runs behind ``runs`` (:func:`table`), rendered (:func:`render`)."""
    return render(table(runs), fmt)


def render(rows: list[dict], fmt: str = "markdown") -> str:
    """Rows of :func:`table` as Markdown (pastes into a README as it is), aligned plain text, CSV
    (one number per cell) or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=1, default=str)
    varying = bool(rows and rows[0]["settings"])
    first = ["model", "shards", "epochs", *(["settings"] if varying else []), "seeds"]
    cells = [[_cell(r["model"]), _cell(r["shards"]), _cell(r["epochs"]),
              *([_cell(", ".join(f"{k}={json.dumps(v)}" for k, v in r["settings"].items()))] if varying else []),
              _seeds(r["seeds"]) if fmt != "csv" else " ".join(_cell(s) for s in r["seeds"])] for r in rows]
    rates = ["-" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}" for r in rows]
    if fmt == "csv":
        numbers = [[_number(r[key], part) for key in ("final_top1", "best_top1") for part in ("mean", "std", "n")]
                   for r in rows]
        header = [*first, "final top-1 mean", "final top-1 std", "final top-1 n", "best top-1 mean",
                  "best top-1 std", "best top-1 n", "images/s"]
        return _csv([header, *[c + n + [rate] for c, n, rate in zip(cells, numbers, rates)]])
    header = [*first, "final top-1 %", "best top-1 %", "images/s"]
    cells = [c + [_mean_std(r["final_top1"], r["runs"]), _mean_std(r["best_top1"], r["runs"]), rate]
             for c, r, rate in zip(cells, rows, rates)]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    if fmt == "text":
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *cells])
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in [header, *cells]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _number(stats: dict | None, part: str) -> str:
    value = None if stats is None else stats[part]
    return "" if value is None else f"{value:.4f}" if part != "n" else str(value)


def _csv(rows: list[list[str]]) -> str:
    """RFC 4180 rows; a cell a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@`` first)
    gets a leading ``'``: run names come from data."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        writer.writerow(["'" + cell if cell[:1] in ("=", "+", "-", "@") else cell for cell in row])
    return out.getvalue().rstrip("\n")
