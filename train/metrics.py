"""Per-epoch metrics: ``OUTPUT_DIR/metrics.jsonl`` (one flat dict a line) and, when enabled, wandb."""

from __future__ import annotations

import json
import os
import sys

from fkd_shards.shards.io import first_line

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON line per epoch; on resume, drops lines of epochs that will be trained again."""

    def __init__(self, output_dir: str, first_epoch: int, wandb_run=None):
        self.path = os.path.join(output_dir, METRICS_NAME)
        self.wandb_run = wandb_run
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["train/epoch"] < first_epoch]
            temp = self.path + ".partial"
            with open(temp, "w") as f:
                f.writelines(kept)
            os.replace(temp, self.path)

    def log(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


class WandbError(RuntimeError):
    """wandb could not start (no API key, no network, ...)."""


def start_wandb(project: str, name: str, mode: str, config: dict, api_key: str | None):
    """A wandb run, or None when disabled. Imported lazily; a login prompt times out after 30 s."""
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
        return wandb.init(project=project, name=name, mode=mode, config=safe_config,
                          settings=wandb.Settings(login_timeout=30, silent=True))
    except wandb.errors.Error as exc:
        raise WandbError(f"wandb ({mode}): {first_line(exc)} (set WANDB_API_KEY, or use --wandb-mode offline "
                         f"or disabled)") from None
    finally:
        sys.argv = argv
