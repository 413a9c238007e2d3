"""Image <-> model-space transforms (SAM2 conventions, see docs/ENGINE_API.md).

* Intensity (:mod:`uniultra.data.intensity`, torch-free, re-exported here): ``uint8`` images are
  used as is (``/255``); bool as 0/1; every other dtype is min-max scaled to [0, 1] between its
  robust 0.5 and 99.5 percentiles (values outside are clipped).  A constant image maps to all
  zeros (no division by zero).
* Channels: grey ``(H, W)`` / ``(H, W, 1)`` is repeated to 3 channels, ``(H, W, 2)`` (grey +
  alpha) keeps the grey channel, RGBA drops alpha.
* Geometry: the image is resized to ``S x S`` (bilinear, antialiased, no aspect preservation,
  SAM2's convention).  A point ``(x, y)`` maps to ``(x * S / W, y * S / H)``; an inclusive pixel
  box ``(x0, y0, x1, y1)`` maps to ``(x0 * S / W, y0 * S / H, (x1 + 1) * S / W, (y1 + 1) * S / H)``.
* Logits: bilinear resize to the image size (optionally first to ``S x S``), threshold at 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from uniultra.data.intensity import _as_hwc, intensity_window, scale_intensity, to_uint8, to_uint8_rgb  # noqa: F401

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[float, float, float, float]


def normalize_tensor(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise a ``[..., 3, H, W]`` tensor holding values in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def resize_chw(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of ``[C, H, W]`` or ``[B, C, H, W]`` to ``size``."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    squeeze = x.ndim == 3
    if squeeze:
        x = x[None]
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return x[0] if squeeze else x


def image_to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """Image -> ``[3, S, S]`` float32, intensity-scaled, resized and ImageNet-normalised."""
    x = torch.from_numpy(scale_intensity(image)).permute(2, 0, 1).contiguous()
    return normalize_tensor(resize_chw(x, size))


def to_model_input(image: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """Image -> (``[1, 3, S, S]`` float32 ImageNet-normalised tensor, ``(S / W, S / H)``)."""
    h, w = _as_hwc(image).shape[:2]
    return image_to_tensor(image, size)[None], (size / w, size / h)


def prepare_batch(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Several images (any sizes) -> ``[B, 3, S, S]`` model input."""
    return torch.stack([image_to_tensor(im, size) for im in images])


def image_to_model_coords(xy, hw: tuple[int, int], size: int) -> np.ndarray:
    """Points ``(x, y)`` (shape ``[..., 2]``) in image pixels -> model space: ``(x*S/W, y*S/H)``."""
    h, w = hw
    p = np.asarray(xy, dtype=np.float64)
    out = np.empty_like(p)
    out[..., 0] = p[..., 0] * size / w
    out[..., 1] = p[..., 1] * size / h
    return out


def box_to_model(box, hw: tuple[int, int], size: int) -> np.ndarray:
    """Inclusive pixel box(es) ``(x0, y0, x1, y1)`` (shape ``[..., 4]``) -> model-space box(es)
    ``(x0*S/W, y0*S/H, (x1+1)*S/W, (y1+1)*S/H)``."""
    h, w = hw
    b = np.asarray(box, dtype=np.float64)
    sx, sy = size / w, size / h
    out = np.empty_like(b)
    out[..., 0] = b[..., 0] * sx
    out[..., 1] = b[..., 1] * sy
    out[..., 2] = (b[..., 2] + 1) * sx
    out[..., 3] = (b[..., 3] + 1) * sy
    return out


def upsample_logits(logits: torch.Tensor, hw: tuple[int, int], size: int | None = None) -> torch.Tensor:
    """Bilinear resize of ``[..., h, w]`` logits to ``hw`` (via ``size x size`` first if given)."""
    lead = logits.shape[:-2]
    x = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *hw)


def resize_mask(mask: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Binary mask ``(H, W)`` -> float tensor (0/1) at ``size`` (area-weighted then threshold 0.5)."""
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(m.shape[-2:]) == hw:
        return (m > 0.5).float()
    lead = m.shape[:-2]
    x = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]), size=hw, mode="bilinear", align_corners=False,
                      antialias=True)
    return (x > 0.5).float().reshape(*lead, *hw)
