"""The torch device a command runs on, checked before anything is loaded onto it."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(spec: str | torch.device, flag: str = "--device") -> torch.device:
    """``spec`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...) as a torch device that
    exists on this machine.

    Raises:
        ValueError: ``spec`` is not a device name, or names a CUDA/MPS device torch cannot see
            (the message names ``flag``, the value and what to pass instead).
    """
    if isinstance(spec, torch.device):
        device = spec
    else:
        try:
            device = torch.device(str(spec))
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(
                f"{flag} {spec!r} is not a torch device; pass cpu, cuda, cuda:N or mps"
            ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{flag} {spec} asked for, but torch sees no CUDA device; use {flag} cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {spec}: torch sees {torch.cuda.device_count()} CUDA devices "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {spec} asked for, but torch sees no MPS device; use {flag} cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {spec!r}: cspace runs on cpu, cuda or mps")
    return device
