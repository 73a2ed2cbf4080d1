"""``fkd-train report``: one table over finished runs, seeds grouped, mean +- standard deviation.

Runs are grouped when they differ in nothing that defines a trajectory except ``--seed`` (same
model, shard set, optimizer, schedule, temperature, micro-batch size); each group is one row. The
standard deviation is the sample one (n - 1), as papers report it over seeds.
"""

from __future__ import annotations

import json
import math
import os

from fkd_shards.common.files import FileMissingError, FileReadError, read_bounded
from fkd_shards.common.text import escape
from fkd_shards.shards.manifest import parse_json

from .config import TRAJECTORY_FIELDS
from .rundir import SUMMARY_NAME

MAX_SUMMARY_BYTES = 1 << 20  # ours are about 2 KB


class ReportError(ValueError):
    """A run directory without a finished run's summary."""


def _load(run: str) -> dict:
    path = os.path.join(run, SUMMARY_NAME)
    try:
        data = read_bounded(path, MAX_SUMMARY_BYTES)
    except FileMissingError:
        raise ReportError(f"{run}: no {SUMMARY_NAME} (not a finished fkd-train run)") from None
    except FileReadError as exc:
        raise ReportError(str(exc)) from None
    summary = parse_json(data.decode("utf-8", errors="replace"), path, ReportError)
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise ReportError(f"{path}: not an fkd-train summary")
    return summary


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
    """The finite numbers under ``key`` (a summary edited by hand may hold anything)."""
    return [m[key] for m in members if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)
            and math.isfinite(m[key])]


def _cell(value: object) -> str:
    """A value from a summary as a table cell: escaped, and no ``|`` to break a Markdown row."""
    return escape(value).replace("|", "\\|")


def _mean_std(values: list[float], runs: int) -> str:
    """mean ± sample std; "(of k)" when only k of the group's runs have the number (no --val-dir)."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    of = f" (of {len(values)})" if len(values) < runs else ""
    if len(values) == 1:
        return f"{mean:.2f}{of}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {std:.2f}{of}"


def _seeds(members: list[dict]) -> str:
    seeds = [_cell(m.get("seed")) for m in members]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    return ",".join(seeds) + f" (n={len(members)}" + (f", seed {', '.join(repeated)} repeated)" if repeated else ")")


def report(runs: list[str], csv: bool = False) -> str:
    """The table, as Markdown (or CSV), one row per group of runs in the order first seen."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        summary = _load(run)
        groups.setdefault(_group_key(summary), []).append(summary)
    # Settings that differ between rows (other than the model) get a column, so that no two rows
    # look the same: e.g. "temperature=20, sgd=true".
    settings = [dict(_settings(members[0])) for members in groups.values()]
    varying = [name for name in settings[0] if name != "model" and len({s[name] for s in settings}) > 1]
    header = ["model", "shards", "epochs", *(["settings"] if varying else []), "seeds", "final top-1 %",
              "best top-1 %", "images/s"]
    rows = []
    for members, values in zip(groups.values(), settings):
        first = members[0]
        finals, bests = _numbers(members, "final_top1"), _numbers(members, "best_top1")
        rates = _numbers(members, "images_per_s")
        differs = [_cell(", ".join(f"{name}={values[name]}" for name in varying))] if varying else []
        rows.append([_cell(first.get("model")), _cell(first.get("shards")), _cell(first.get("epochs_done")),
                     *differs, _seeds(members), _mean_std(finals, len(members)), _mean_std(bests, len(members)),
                     f"{sum(rates) / len(rates):.0f}" if rates else "-"])
    if csv:
        return _csv([header, *rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


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
