"""Which device a process computes on: the one choice every tool makes the same way."""

from __future__ import annotations

from .distributed import DistEnv


class DeviceError(ValueError):
    """A ``--device`` that is not a device, or one this machine does not have."""


def resolve_device(flag: str | None, env: DistEnv) -> str:
    """This rank's device, always with an index for CUDA: the flag's, else CUDA when available;
    under torchrun, GPU LOCAL_RANK. A device that does not exist is a :class:`DeviceError`."""
    import torch

    name = flag or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} asked, but CUDA is not available")
        index = env.local_rank if env.active else (device.index or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: GPU {index} asked, {torch.cuda.device_count()} visible")
        return f"cuda:{index}"
    if device.type != "cpu" or device.index not in (None, 0):
        raise DeviceError(f"--device {name}: only cpu and cuda devices are supported")
    return "cpu"
