"""Device choice: the one implementation for inference, evaluation, batch and training."""

from __future__ import annotations

import torch

from uniultra.errors import InputError


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (GPU ``local_rank``, one per DDP process), then Apple MPS, then the CPU;
    ``cuda`` means GPU ``local_rank``, ``cuda:N`` GPU N; ``cpu`` and ``mps`` as named.  A device
    that this machine lacks, or an unknown name, is an :class:`InputError` saying what to use."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"device {device!r} is not known: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} was asked for but no CUDA GPU is available: use --device cpu or auto")
        return torch.device("cuda", local_rank) if dev.index is None else dev
    if dev.type == "mps" and not _mps_available():
        raise InputError(f"device {device!r} was asked for but Apple MPS is not available: use --device cpu or auto")
    if dev.type not in ("cpu", "mps"):
        raise InputError(f"device {device!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return dev
