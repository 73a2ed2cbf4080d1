"""Checkpoints: one dict written atomically (temp file, then rename), loaded with weights_only=True."""

from __future__ import annotations

import os
import shutil

import torch

from fkd_shards.shards.io import first_line

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


def save(state: dict, output_dir: str, is_best: bool) -> str:
    """Write ``OUTPUT_DIR/checkpoint.pth.tar`` atomically, and copy it to ``model_best`` when best."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    suffix = f".{os.getpid()}.partial"  # unique: a writer never renames another process's file
    torch.save(state, path + suffix)
    os.replace(path + suffix, path)
    if is_best:
        best = os.path.join(output_dir, BEST_NAME)
        shutil.copyfile(path, best + suffix)
        os.replace(best + suffix, best)
    return path


def load(path: str) -> dict:
    """Load a checkpoint or state dict safely (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # unpickling refusals, truncated zips, ...
        raise CheckpointError(f"{path}: cannot load safely ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    return state


def model_state(state: dict) -> dict:
    """The model's state dict from a checkpoint or a bare state dict, without ``module.`` prefixes."""
    weights = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in weights.items()}
