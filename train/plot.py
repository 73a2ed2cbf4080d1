"""``fkd-train report --plot``: the report's table as a bar chart, mean top-1 per row with the
sample standard deviation over seeds as error bars (matplotlib, drawn without a display)."""

from __future__ import annotations

import io
import json

from fkd_shards.common.files import write_atomically


def row_label(row: dict) -> str:
    """A bar group's label: the model, and the settings that tell rows apart."""
    settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in row["settings"].items())
    return f"{row['model']}\n{settings}" if settings else str(row["model"])


def plot_table(rows: list[dict], path: str) -> None:
    """Final and best top-1 of every row (:func:`fkd_shards.train.report.table`) as grouped bars
    with error bars, each labelled with its mean and n; written to ``path`` as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 1.6 * len(rows) + 1.5), 4.2), layout="constrained")
    ax = figure.add_subplot()
    width = 0.38
    for offset, key, name in ((-width / 2, "final_top1", "final"), (width / 2, "best_top1", "best")):
        stats = [row[key] for row in rows]
        xs = [k + offset for k in range(len(rows))]
        means = [s["mean"] if s else 0.0 for s in stats]
        errors = [s["std"] or 0.0 if s else 0.0 for s in stats]
        bars = ax.bar(xs, means, width, yerr=errors, capsize=4, label=f"{name} top-1")
        ax.bar_label(bars, labels=[f"{s['mean']:.1f}\nn={s['n']}" if s else "-" for s in stats], fontsize=7,
                     padding=2)
    ax.set_xticks(range(len(rows)), [row_label(row) for row in rows], fontsize=8)
    ax.set_ylabel("top-1 %")
    ax.set_ylim(0, 100)
    ax.set_title("top-1 over seeds (mean ± sample std)")
    ax.legend(loc="upper right", fontsize=8)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=110)
    write_atomically(path, out.getvalue())
