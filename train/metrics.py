"""Per-epoch metrics: ``OUTPUT_DIR/metrics.jsonl`` (one flat dict a line) and, when enabled, wandb."""

from __future__ import annotations

import json
import os
import sys

from fkd_shards.common.files import FileWriteError, write_atomically
from fkd_shards.common.text import first_line

from .rundir import METRICS_NAME


class MetricsError(RuntimeError):
    """metrics.jsonl cannot be written (disk full, read-only), or wandb cannot start."""


class MetricsLog:
    """Appends one JSON line per epoch; on resume, drops the lines of epochs that will be trained again."""

    def __init__(self, output_dir: str, first_epoch: int, wandb_run=None):
        self.path = os.path.join(output_dir, METRICS_NAME)
        self.wandb_run = wandb_run
        if os.path.exists(self.path):
            kept = []
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        if json.loads(line)["train/epoch"] < first_epoch:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a crash, or not ours: not an epoch to keep
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
    login prompt times out after 30 s; the key is never in the config or the recorded command line."""
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
        return wandb.init(project=project, name=name, mode=mode, config=safe_config, dir=output_dir,
                          settings=wandb.Settings(login_timeout=30, silent=True))
    except wandb.errors.Error as exc:
        raise MetricsError(f"wandb ({mode}): {first_line(exc)} (set WANDB_API_KEY, or use --wandb-mode offline "
                           f"or disabled)") from None
    finally:
        sys.argv = argv
