"""Intensity scaling, torch-free (numpy only): the one implementation of "any image -> what the
model sees" and "any frame -> 8 bit", shared by the engine (:mod:`uniultra.data.transforms`
re-exports it), the CLI's overlays and the Slicer Train module's dataset export.

* ``uint8`` is used as is; ``bool`` is 0/1; every other dtype is scaled linearly between a window
  ``(lo, hi)`` and clipped.  The default window is the data's robust 0.5 and 99.5 percentiles
  (:func:`intensity_window`; the full range when those are equal; non-finite values count as the
  median of the finite ones).  A constant image maps to zeros.
* The model sees one image's own window; the Slicer export passes one window per volume/clip so
  that every slice of a case maps alike (:func:`to_uint8` with ``window``).
"""

from __future__ import annotations

import numpy as np

from uniultra.errors import InputError


def _as_hwc(image: np.ndarray) -> np.ndarray:
    """Return ``(H, W, C)`` with C in {1, 3}; drop alpha."""
    a = np.asarray(image)
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim == 3:
        c = a.shape[2]
        if c == 1 or c == 3:
            return a
        if c == 2:
            return a[:, :, :1]
        if c == 4:
            return a[:, :, :3]
    raise InputError(
        f"image of shape {tuple(a.shape)} is not a 2D grey or RGB image; pass an (H, W) or (H, W, 3) array"
    )


def _finite(a: np.ndarray) -> np.ndarray:
    """Float data as float64 with non-finite values replaced by the median of the finite ones;
    integer data as it is (no copy: a whole volume may be large)."""
    a = np.asarray(a)
    if a.dtype.kind not in "fc":
        return a
    f = a.astype(np.float64)
    finite = np.isfinite(f)
    if not finite.all():
        fill = float(np.median(f[finite])) if finite.any() else 0.0
        f = np.where(finite, f, fill)
    return f


def intensity_window(arr: np.ndarray) -> tuple[float, float]:
    """The default window of an image or a whole volume: (0, 255) for uint8, (0, 1) for bool,
    otherwise the robust 0.5 and 99.5 percentiles (the full range when they are equal)."""
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        return (0.0, 255.0)
    if a.dtype == np.bool_:
        return (0.0, 1.0)
    f = _finite(a)
    lo, hi = np.percentile(f, [0.5, 99.5])
    if not hi > lo:  # nearly constant: fall back to the full range
        lo, hi = f.min(), f.max()
    return float(lo), float(hi)


def _unit(a: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """float32 in [0, 1]: uint8 / 255, bool as 0/1, otherwise linear in ``window`` and clipped."""
    if window is None and a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if window is None and a.dtype == np.bool_:
        return a.astype(np.float32)
    lo, hi = window if window is not None else intensity_window(a)
    if hi > lo:
        return np.clip((_finite(a) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return np.zeros(a.shape, np.float32)


def scale_intensity(image: np.ndarray) -> np.ndarray:
    """Image of any dtype/range -> float32 ``(H, W, 3)`` in [0, 1] (rules in the module doc)."""
    a = _as_hwc(image)
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"image of shape {tuple(np.shape(image))} is empty; pass a non-empty image")
    out = _unit(a, None)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out)


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Image of any dtype/range -> uint8 ``(H, W, 3)`` for display (same scaling as the model)."""
    return np.round(scale_intensity(image) * 255.0).astype(np.uint8)


def to_uint8(frame: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """8-bit copy of a frame, grey kept grey: uint8 unchanged; otherwise scaled as the model scales
    it, between ``window`` when one is given (e.g. a whole volume's :func:`intensity_window`)."""
    f = np.asarray(frame)
    if f.ndim == 3 and f.shape[2] == 4:
        f = f[..., :3]
    if f.ndim == 3 and f.shape[2] == 1:
        f = f[..., 0]
    if f.dtype == np.uint8:
        return np.ascontiguousarray(f)
    return np.round(_unit(f, window) * 255.0).astype(np.uint8)
