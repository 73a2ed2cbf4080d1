"""Per-epoch metrics: ``OUTPUT_DIR/metrics.jsonl`` (one flat dict a line) and, when enabled, wandb."""

from __future__ import annotations

import json
import os
import sys

from fkd_shards.common.files import FileMissingError, FileReadError, FileWriteError, read_bounded, write_atomically
from fkd_shards.common.text import first_line

from .rundir import METRICS_NAME

WANDB_TIMEOUT_S = 30  # wandb's own default waits 90 s for a server that does not answer
MAX_METRICS_BYTES = 64 << 20  # about 100,000 epochs of lines; a bigger file is not one we wrote


class MetricsError(RuntimeError):
    """metrics.jsonl cannot be read or written (disk full, read-only), or wandb cannot start."""


def read_metrics(path: str) -> list[tuple[str, dict]]:
    """The lines of a metrics log that are JSON objects, with their text; lines cut short by a crash
    or not ours are skipped. A missing file has none; one that is not a regular file, or too big,
    is a :class:`MetricsError`."""
    try:
        data = read_bounded(path, MAX_METRICS_BYTES)
    except FileMissingError:
        return []
    except FileReadError as exc:
        raise MetricsError(str(exc)) from None
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append((line, record))
    return records


class MetricsLog:
    """Appends one JSON line per epoch; on resume, drops the lines of epochs that will be trained again."""

    def __init__(self, output_dir: str, first_epoch: int, wandb_run=None):
        self.path = os.path.join(output_dir, METRICS_NAME)
        self.wandb_run = wandb_run
        if os.path.exists(self.path):
            kept = [line + "\n" for line, record in read_metrics(self.path)
                    if isinstance(record.get("train/epoch"), int) and record["train/epoch"] < first_epoch]
            try:
                write_atomically(self.path, "".join(kept).encode())
            except FileWriteError as exc:
                raise MetricsError(str(exc)) from None

    def log(self, metrics: dict) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics, sort_keys=True, allow_nan=True) + "\n")
        except OSError as exc:
            raise MetricsError(f"{self.path}: cannot append ({exc.strerror or exc})") from None
        if self.wandb_run is not None:
            self.wandb_run.log(metrics)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def start_wandb(project: str, name: str, mode: str, config: dict, api_key: str | None, output_dir: str):
    """A wandb run writing under ``OUTPUT_DIR/wandb``, or None when disabled. Imported lazily; a
    login prompt or an unreachable server gives up after 30 s; the key is never in the config or the
    recorded command line."""
    if mode == "disabled":
        return None
    import wandb

    if api_key and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_API_KEY"] = api_key  # handed to wandb, never printed or logged
    safe_config = {k: v for k, v in config.items() if "key" not in k}
    argv = sys.argv
    if api_key:  # wandb records the command line: never with the key in it
        sys.argv = [arg.replace(api_key, "***") for arg in argv]
    try:
        # dir: wandb writes into its "wandb" folder there (rundir.WANDB_DIR), not the current directory.
        # reinit="create_new": each student of a run has a run of its own, side by side in this process.
        return wandb.init(project=project, name=name, mode=mode, config=safe_config, dir=output_dir,
                          reinit="create_new",
                          settings=wandb.Settings(login_timeout=WANDB_TIMEOUT_S, init_timeout=WANDB_TIMEOUT_S,
                                                  silent=True))
    except wandb.errors.Error as exc:
        fix = "check the network and the key" if os.environ.get("WANDB_API_KEY") else "set WANDB_API_KEY"
        raise MetricsError(f"wandb ({mode}): {first_line(exc)} ({fix}, or use --wandb-mode offline or disabled)") \
            from None
    finally:
        sys.argv = argv
