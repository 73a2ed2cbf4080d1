"""Building classifiers, students and teachers alike: a torchvision classification model, or a timm
one (``timm:NAME``, optional extra), randomly initialised (nothing is downloaded), sized to the set's
classes, and checked to take the set's crop size before any work starts."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fkd_shards.common.text import first_line

TIMM_PREFIX = "timm:"
# torchvision models with auxiliary classifiers: in train mode they return a tuple of logits, which
# a KD student has no use for. Their init_weights=True is torchvision's current default, made
# explicit so that it stops warning that the default will change.
AUX_HEAD_MODELS = ("googlenet", "inception_v3")


class ModelError(ValueError):
    """A model name that cannot be built, or a model that cannot take the set's crops or batches."""


def build_classifier(name: str, num_classes: int, input_size: int | None = None,
                     aux_heads: bool = True) -> nn.Module:
    """A randomly initialised classifier (nothing is downloaded): a torchvision.models name, or
    ``timm:NAME`` with the timm extra, which models with a fixed grid (ViT, DeiT, Swin) build for
    ``input_size``. ``aux_heads=False`` builds GoogLeNet and Inception v3 without their auxiliary
    classifiers. An unknown name is a :class:`ModelError`."""
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name.removeprefix(TIMM_PREFIX), num_classes, input_size)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"{name} is not a torchvision.models classification model (e.g. resnet18, mobilenet_v2, "
                          f"efficientnet_b0; timm models as timm:NAME)")
    extra = {"aux_logits": aux_heads, "init_weights": True} if name in AUX_HEAD_MODELS else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)


def build_model(name: str, num_classes: int, input_size: int) -> nn.Module:
    """The student, checked to take the set's crops (its init draws from torch's global
    generator: seed it first)."""
    try:
        model = build_classifier(name, num_classes, input_size, aux_heads=False)
    except ModelError as exc:
        raise ModelError(f"--model {exc}") from None
    check_input_size(model, f"--model {name}", input_size)
    check_training_output(model, f"--model {name}", input_size)
    return model


def _timm_model(name: str, num_classes: int, input_size: int | None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError(f"timm:{name} needs timm: pip install 'fkd-shards[timm]'") from None
    if not timm.is_model(name):
        raise ModelError(f"timm:{name} is not a timm model (see timm.list_models())")
    if input_size is None:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=input_size)
    except TypeError:  # the model takes any size and has no img_size argument
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    except Exception as exc:  # timm raises assorted errors for sizes a model cannot be built for
        raise ModelError(f"timm:{name} cannot be built for {input_size}x{input_size} crops "
                          f"({first_line(exc, 150)})") from None


@torch.no_grad()
def check_input_size(model: nn.Module, label: str, input_size: int) -> None:
    """One forward of a blank image in eval mode (which draws nothing and updates no statistic):
    a model that cannot take the set's crops fails here, in one line, not after an epoch of setup.
    ``label`` names it in the message (``--model resnet18``, ``--teacher vit_b_16``)."""
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:  # shape assertions and errors differ per architecture
        raise ModelError(f"{label} cannot take this set's {input_size}x{input_size} crops "
                          f"({first_line(exc, 150)})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ModelError(f"{label} does not return (batch, classes) logits")


@torch.no_grad()
def check_training_output(model: nn.Module, label: str, input_size: int) -> None:
    """Two blank images in train mode, on a copy with the RNG put back (changing nothing): some
    models return more than the logits there (auxiliary or distillation heads)."""
    rng = torch.get_rng_state()
    try:
        out = copy.deepcopy(model).train()(torch.zeros(2, 3, input_size, input_size))
    except Exception:  # errors of training mode itself (a single value per channel) are check_micro_batches'
        return
    finally:
        torch.set_rng_state(rng)
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{label} returns {type(out).__name__}, not a tensor of logits, in training "
                          "mode (a model with auxiliary or distillation heads)")


def check_micro_batches(model: nn.Module, name: str, input_size: int, single_row: str | None) -> None:
    """Batch norm in train mode cannot normalise one value per channel. Where a forward pass of a
    single row occurs (``single_row`` says where, from :func:`fkd_shards.batches.plan.single_row_micro_batch`) and the
    model's feature maps shrink to 1x1, say so before training, not as a traceback in the last batch
    of the first epoch. Tried on a copy, with the RNG put back, so that the check changes nothing."""
    if single_row is None or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    probe = copy.deepcopy(model).train()
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            probe(torch.zeros(1, 3, input_size, input_size))
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"--model {name} cannot batch-normalise a single image at {input_size}x{input_size} "
                          f"({first_line(exc, 100)}), and {single_row}") from None
    finally:
        torch.set_rng_state(rng)
