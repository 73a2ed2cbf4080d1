"""The teachers: models built from a name and a weights file (or a torchvision weights name), run
together on one batch tensor, their logits mixed into one soft label per row.

``--teacher MODEL WEIGHTS`` (repeatable). MODEL is a torchvision classification name, or
``timm:NAME`` with the timm extra. WEIGHTS is a file (a state dict, or a checkpoint holding one under
``state_dict``; ``module.`` prefixes are stripped), loaded with ``weights_only=True``, or a torchvision
weights name such as ``ResNet18_Weights.IMAGENET1K_V1`` (torchvision loads it, downloading it on
first use where a network is reachable). The class count comes from the weights.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from fkd_shards.common.files import FileReadError, open_regular
from fkd_shards.common.text import escape, first_line

from .build import TIMM_PREFIX, ModelError, build_classifier, check_input_size
from .weights import WeightsError, load_into, load_state


class TeacherError(ValueError):
    """A teacher that cannot be built, loaded or run; the message names it."""


@dataclass
class Teacher:
    name: str
    weights: str
    sha256: str
    classes: int
    model: nn.Module


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        fd, _ = open_regular(path)
    except FileReadError as exc:
        raise TeacherError(str(exc)) from None
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _build(name: str, num_classes: int, input_size: int | None = None) -> nn.Module:
    try:
        return build_classifier(name, num_classes, input_size)
    except ModelError as exc:
        raise TeacherError(f"--teacher {exc}") from None


def _class_count(name: str, weights: dict, where: str) -> int:
    """The output size the weights were trained for: the first dimension of the tensors whose
    first dimension follows the class count (found by building the model for 1 and 2 classes, so
    that a ViT's class token or position embedding, also of first dimension 1, is not taken)."""
    one, two = _build(name, 1).state_dict(), _build(name, 2).state_dict()
    head = [key for key, value in one.items() if value.ndim and value.shape[0] == 1 and key in two
            and two[key].shape[0] == 2]
    counts = {int(weights[key].shape[0]) for key in head if key in weights and weights[key].ndim == one[key].ndim
              and weights[key].shape[1:] == one[key].shape[1:]}
    if len(counts) != 1:
        raise TeacherError(f"{where}: cannot tell the class count of --teacher {name} from these weights (do they "
                           f"belong to this model?)")
    return counts.pop()


def load_teacher(name: str, weights: str, input_size: int) -> Teacher:
    """A teacher in eval mode on the CPU, its weights checked to fit and to be finite, and the
    model checked to take ``input_size`` crops (timm models with a fixed grid are built for them)."""
    teacher = _load_teacher(name, weights, input_size)
    try:
        check_input_size(teacher.model, f"--teacher {name}", input_size)
    except ModelError as exc:
        raise TeacherError(str(exc)) from None
    return teacher


def _load_teacher(name: str, weights: str, input_size: int) -> Teacher:
    if os.path.exists(weights) or os.sep in weights or weights.endswith((".pth", ".pt", ".tar", ".bin")):
        try:
            state = load_state(weights)
            classes = _class_count(name, state, weights)
            model = _build(name, classes, input_size)
            load_into(model, state, weights, f"--teacher {name}")
        except WeightsError as exc:
            raise TeacherError(str(exc)) from None
        return Teacher(name, weights, _sha256(weights), classes, model.eval())
    return _torchvision_weights(name, weights)


def _torchvision_weights(name: str, weights: str) -> Teacher:
    import torchvision

    if name.startswith(TIMM_PREFIX):
        raise TeacherError(f"--teacher {name} {weights}: no such file (timm teachers need a weights file)")
    try:
        enum = torchvision.models.get_weight(weights)
    except (ValueError, AttributeError, KeyError):
        raise TeacherError(f"--teacher {name} {escape(weights)}: neither a file nor a torchvision weights name "
                           f"(e.g. ResNet18_Weights.IMAGENET1K_V1)") from None
    try:
        model = torchvision.models.get_model(name, weights=enum)
    except Exception as exc:  # a download that fails (no network), weights of another model, ...
        raise TeacherError(f"--teacher {name} {weights}: cannot load ({first_line(exc, 150)})") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
    classes = len(enum.meta.get("categories") or []) or model.state_dict()[list(model.state_dict())[-1]].shape[0]
    return Teacher(name, weights, _sha256(path), classes, model.eval())


def parse_mix(spec: str, count: int) -> list[float]:
    """``mean`` (1/n each) or explicit weights ``W1,W2,...``, used as given (not normalised)."""
    if spec == "mean":
        return [1.0 / count] * count
    try:
        if "_" in spec:  # float() reads "1_0" as 10
            raise ValueError(spec)
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise TeacherError(f"--teacher-mix {escape(spec)}: expected 'mean' or comma-separated numbers") from None
    if len(weights) != count:
        raise TeacherError(f"--teacher-mix has {len(weights)} weights for {count} teachers")
    if not all(math.isfinite(w) for w in weights):
        raise TeacherError(f"--teacher-mix {escape(spec)}: weights must be finite")
    if not any(weights):
        raise TeacherError(f"--teacher-mix {escape(spec)}: every weight is 0, so every soft label would be 0")
    return weights


def check_single_row_chunks(teachers: list[Teacher], bn_mode: str, chunks: int, batch_rows: set[int],
                            input_size: int) -> None:
    """``--bn-mode train`` normalises each chunk with its own statistics, which a chunk of one image
    cannot give a batch-norm layer whose feature maps have shrunk to 1x1. Where the batches of
    ``batch_rows`` rows (the full and the last one) split into a chunk of one row, try each teacher
    on one blank image, on a copy, and refuse before any batch rather than at the last one."""
    sizes = {len(part) for rows in batch_rows for part in torch.chunk(torch.empty(rows), chunks)}
    if bn_mode != "train" or 1 not in sizes:
        return
    for teacher in teachers:
        probe = copy.deepcopy(teacher.model)
        batchnorm_on_batch_statistics(probe)
        try:
            with torch.no_grad():
                probe(torch.zeros(1, 3, input_size, input_size))
        except (RuntimeError, ValueError) as exc:
            raise TeacherError(f"--teacher {teacher.name} --bn-mode train cannot normalise a chunk of one image at "
                               f"{input_size}x{input_size} ({first_line(exc, 100)}), and batches of "
                               f"{sorted(batch_rows)} rows in {chunks} chunk(s) make one: choose another "
                               f"--teacher-chunks or --batch-size") from None


def batchnorm_on_batch_statistics(model: nn.Module) -> None:
    """``--bn-mode train``: batch-norm layers normalise with the statistics of the batch they see;
    their running statistics are neither used nor updated; every other layer stays in eval mode."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            # Without tracking, a training-mode batch norm passes no running buffers to the kernel:
            # it uses the batch's statistics and leaves the buffers (and their counter) as they are.
            module.track_running_stats = False


class Ensemble:
    """The teachers' mixed logits for a batch: ``sum_i w_i * z_i``, accumulated in float32 in the
    order the teachers were given (the first term is not added to zero, so that one teacher with
    weight 1 gives its own logits bit for bit, signed zeros included)."""

    def __init__(self, teachers: list[Teacher], weights: list[float], *, device: str, bn_mode: str, chunks: int,
                 amp: str):
        self.teachers, self.weights, self.device, self.chunks, self.amp = teachers, weights, device, chunks, amp
        for t in teachers:
            t.model.to(device)
            if bn_mode == "train":
                batchnorm_on_batch_statistics(t.model)
            else:
                t.model.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (n, C) logits of the batch ``x`` (n, 3, S, S), forwarded in ``chunks`` consecutive
        parts (``torch.chunk``: equal sizes, the last one smaller when n does not divide)."""
        total = None
        autocast = torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.amp == "bf16")
        for teacher, weight in zip(self.teachers, self.weights):
            try:
                with autocast:
                    logits = torch.cat([teacher.model(part) for part in torch.chunk(x, self.chunks)])
            except (RuntimeError, ValueError) as exc:  # e.g. batch norm on a chunk of one image
                raise TeacherError(f"--teacher {teacher.name}: cannot run on a batch of {len(x)} images in "
                                   f"{min(self.chunks, len(x))} chunk(s) ({first_line(exc, 150)})") from None
            term = weight * logits.float()
            total = term if total is None else total + term
        return total
