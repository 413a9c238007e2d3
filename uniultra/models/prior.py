"""The box-shape prior: the ellipse inscribed in a box prompt, added to the decoder's logits.

A box alone already says a lot about the object in it: filling the inscribed ellipse scores
0.85-0.91 Dice on blob-like anatomy (README, "Baselines").  A model with ``box_prior = w > 0``
adds ``w * (1 - r)`` (clipped to ``[-w, w]``) to its low-resolution logits for every box row,
where ``r`` is the ellipse radius of each logit pixel (``r = 1`` on the inscribed ellipse,
0 at the box centre).  The decoder's own logits then act as a correction of the ellipse: where
the image speaks clearly they outweigh it; where the model is unsure (an anatomy it never saw)
the answer falls back towards the ellipse instead of a guess.

The weight belongs to the model (saved in its checkpoint, ``uniultra info`` shows it): a model
is trained with the prior it is used with (``uniultra train --box-prior W``).  Everything below is
plain tensor arithmetic, so it traces into the ONNX decoder too.
"""

from __future__ import annotations

import torch


def ellipse_prior(boxes: torch.Tensor, hw: tuple[int, int], size: int) -> torch.Tensor:
    """``[N, 1, h, w]`` map in ``[-1, 1]``: ``1 - r`` for model-space boxes ``[N, 4]``
    ``(x0, y0, x1, y1)`` (exclusive right/bottom edge, as :func:`box_to_model` gives), sampled at
    the centres of an ``h x w`` grid covering the ``size x size`` model input."""
    h, w = int(hw[0]), int(hw[1])
    b = boxes.reshape(-1, 4).to(torch.float32)
    xs = (torch.arange(w, device=b.device, dtype=torch.float32) + 0.5) * (float(size) / w)
    ys = (torch.arange(h, device=b.device, dtype=torch.float32) + 0.5) * (float(size) / h)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    ax = ((b[:, 2] - b[:, 0]) / 2).clamp_min(1e-3)
    ay = ((b[:, 3] - b[:, 1]) / 2).clamp_min(1e-3)
    dx = (xs[None, None, :] - cx[:, None, None]) / ax[:, None, None]
    dy = (ys[None, :, None] - cy[:, None, None]) / ay[:, None, None]
    r = torch.sqrt(dx * dx + dy * dy)
    return (1.0 - r).clamp(-1.0, 1.0)[:, None]


def add_box_prior(logits: torch.Tensor, boxes: torch.Tensor | None, weight: float, size: int,
                  has_box: torch.Tensor | None = None) -> torch.Tensor:
    """``logits [N, M, h, w]`` plus ``weight`` times each row's ellipse prior (every one of the
    M masks).  No box or a zero weight: ``logits`` unchanged.  ``has_box [N]`` (0/1) switches the
    prior off for rows without a box (the ONNX decoder, where a row's box is optional)."""
    if boxes is None or not weight:
        return logits
    p = ellipse_prior(boxes, logits.shape[-2:], size).to(logits.dtype) * float(weight)
    if has_box is not None:
        p = p * has_box.to(logits.dtype).reshape(-1, 1, 1, 1)
    return logits + p


def box_from_points(coords: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's point layout (box corners as labels 2 and 3) -> ``(boxes [N, 4], has_box [N])``,
    traceable; rows without both corners get a zero box and ``has_box = 0``."""
    tl = (labels == 2).to(coords.dtype).unsqueeze(-1)
    br = (labels == 3).to(coords.dtype).unsqueeze(-1)
    n_tl, n_br = tl.sum(1), br.sum(1)
    p0 = (coords * tl).sum(1) / n_tl.clamp_min(1)
    p1 = (coords * br).sum(1) / n_br.clamp_min(1)
    has = ((n_tl > 0) & (n_br > 0)).to(coords.dtype).reshape(-1)
    return torch.cat([p0, p1], dim=1), has


def check_weight(weight, source: str = "--box-prior") -> float:
    """A usable prior weight, or a one-line error naming ``source``."""
    from uniultra.errors import InputError

    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise InputError(f"{source} {weight!r} must be a number (0 switches the box prior off)") from None
    if not (w >= 0) or w == float("inf"):
        raise InputError(f"{source} {weight!r} must be a finite number >= 0 (0 switches the box prior off)")
    return w
