"""Weights files a user hands us (teachers, ``--init-weights``, checkpoints): loaded safely, their
state dict found, checked to be finite and to fit a model, with one-line errors naming the file."""

from __future__ import annotations

import torch
from torch import nn

from fkd_shards.common.text import escape, first_line, shown
from fkd_shards.common.torchfiles import TorchFileError, load_weights_only

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")  # where checkpoints of common trainers keep it
# What a weights file may hold: dense CPU tensors of the dtypes models and optimizers use. Anything
# else (meta, sparse or quantized tensors, float8, complex) cannot be checked for finiteness, hashed
# or loaded into a model as it is, and is refused by name instead of failing later in a traceback.
PLAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                torch.int32, torch.int64, torch.bool)
MAX_DEPTH = 64  # of containers in a loaded file; ours nest four deep


class WeightsError(ValueError):
    """A weights or checkpoint file that cannot be used or written; the message names the file."""


def load_file(path: str) -> dict:
    """A checkpoint or state dict, loaded safely (``weights_only=True``); must be a dict."""
    try:
        state = load_weights_only(path, path)
    except TorchFileError as exc:
        raise WeightsError(str(exc)) from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict, found {escape(type(state).__name__)}")
    check_plain(state, path)
    return state


def check_plain(obj: object, where: str, key: str = "", depth: int = 0) -> None:
    """Every tensor inside ``obj`` (dicts, lists, tuples) dense, on the CPU, of a :data:`PLAIN_DTYPES`
    dtype; a :class:`WeightsError` names the first that is not, by its key."""
    if depth > MAX_DEPTH:
        raise WeightsError(f"{where}: nested more than {MAX_DEPTH} containers deep")
    if isinstance(obj, torch.Tensor):
        # Loaded with map_location="cpu": every tensor not on the meta device is on the CPU.
        kind = "meta" if obj.is_meta else "sparse" if obj.layout != torch.strided else "quantized" \
            if obj.is_quantized else None
        if kind is None and obj.dtype not in PLAIN_DTYPES:
            kind = str(obj.dtype).removeprefix("torch.")
        if kind is not None:
            raise WeightsError(f"{where}: {escape(key or 'a tensor')} is a {kind} tensor; only dense tensors of "
                               f"float, integer or bool dtypes are loaded")
    elif isinstance(obj, dict):
        for name, value in obj.items():
            check_plain(value, where, f"{key}.{name}" if key else str(name), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for k, value in enumerate(obj):
            check_plain(value, where, f"{key}[{k}]", depth + 1)


def model_state(state: dict, where: str) -> dict:
    """The model's state dict from a bare state dict, or from a checkpoint that keeps it under one of
    ``STATE_DICT_KEYS`` (this project's and SRe2L's ``state_dict``, timm's and others' ``model``),
    without ``module.`` prefixes."""
    weights = next((state[key] for key in STATE_DICT_KEYS if isinstance(state.get(key), dict)), state)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise WeightsError(f"{where}: holds no state dict of tensors (neither itself nor under "
                           f"{', '.join(repr(k) for k in STATE_DICT_KEYS)})")
    return {str(k).removeprefix("module."): v for k, v in weights.items()}


def check_finite(weights: dict, where: str) -> None:
    """Refuse weights holding NaN or inf: training on from them only spreads them."""
    for name, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise WeightsError(f"{where}: {escape(name)} holds NaN or inf values; refused")


def load_state(path: str) -> dict:
    """The finite model state dict of the weights file or checkpoint at ``path``."""
    weights = model_state(load_file(path), path)
    check_finite(weights, path)
    return weights


def misfit(model: nn.Module, weights: dict) -> str:
    """What keeps ``weights`` (tensors, from :func:`model_state`) from loading into ``model``,
    briefly (counts and a first example of missing keys, unexpected keys and tensors of another
    shape); empty when names and shapes fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {shown(missing[0])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {shown(unexpected[0])}")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape, e.g. {shown(k)} {list(weights[k].shape)} in the file, "
                     f"{list(expected[k].shape)} in the model")
    return "; ".join(parts)


def load_into(model: nn.Module, weights: dict, where: str, label: str) -> None:
    """``model.load_state_dict(weights)``; weights that do not fit are a one-line :class:`WeightsError`
    naming ``where`` (the file) and ``label`` (the flag and model, e.g. ``--model resnet18``)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        reason = misfit(model, weights) or first_line(exc, 200)
        raise WeightsError(f"{where}: does not fit {label} ({reason})") from None
