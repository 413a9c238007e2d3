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

**Round boxes may count more.**  The ellipse inscribed in a roundish box is a good guess at a
blob; in a long thin box (a muscle aponeurosis, a vessel along its length) it says little about
a band that crosses the box at a slant.  A model may therefore carry a second weight,
``box_prior_round`` (``--box-prior W,R``): R for boxes up to 2:1 (their longer side at most
twice the shorter, in the model's input space), W from 3:1 on, linear in between.  Without it
every box gets W.
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


ROUND_ASPECT, LONG_ASPECT = 2.0, 3.0  # the round weight up to 2:1, the plain one from 3:1


def box_weights(boxes: torch.Tensor, weight: float, round_weight: float) -> torch.Tensor:
    """``[N]`` prior weight per model-space box ``[N, 4]``: ``round_weight`` up to an aspect
    ratio of 2:1, ``weight`` from 3:1, linear in between."""
    b = boxes.reshape(-1, 4).to(torch.float32)
    bw, bh = (b[:, 2] - b[:, 0]).abs(), (b[:, 3] - b[:, 1]).abs()
    aspect = torch.maximum(bw, bh) / torch.minimum(bw, bh).clamp_min(1e-3)
    t = ((aspect - ROUND_ASPECT) / (LONG_ASPECT - ROUND_ASPECT)).clamp(0.0, 1.0)
    return float(round_weight) + (float(weight) - float(round_weight)) * t


def add_box_prior(logits: torch.Tensor, boxes: torch.Tensor | None, weight: float, size: int,
                  has_box: torch.Tensor | None = None, round_weight: float | None = None) -> torch.Tensor:
    """``logits [N, M, h, w]`` plus ``weight`` times each row's ellipse prior (every one of the
    M masks); with ``round_weight``, per box as :func:`box_weights` says.  No box or zero weights:
    ``logits`` unchanged.  ``has_box [N]`` (0/1) switches the prior off for rows without a box
    (the ONNX decoder, where a row's box is optional)."""
    if boxes is None or not (weight or round_weight):
        return logits
    p = ellipse_prior(boxes, logits.shape[-2:], size).to(logits.dtype)
    if round_weight is None or float(round_weight) == float(weight):
        p = p * float(weight)
    else:
        p = p * box_weights(boxes, weight, round_weight).to(logits.dtype).reshape(-1, 1, 1, 1)
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


def parse_prior(spec, source: str = "--box-prior") -> tuple[float, float | None]:
    """``W`` or ``W,R`` (a number, a string or a pair) -> ``(W, R or None)``, or a one-line error
    naming ``source``.  R is the weight of round boxes (module doc)."""
    from uniultra.errors import InputError

    parts = spec
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
    elif not isinstance(spec, (list, tuple)):
        parts = [spec]
    if not 1 <= len(parts) <= 2:
        raise InputError(f"{source} {spec!r}: give W, or W,R (W for long boxes, R for round ones)")
    w = check_weight(parts[0], source)
    return w, (check_weight(parts[1], source) if len(parts) == 2 else None)


def format_prior(weight: float, round_weight: float | None) -> str:
    """``(W, R)`` as ``--box-prior`` takes it: ``"W"`` without R, else ``"W,R"``."""
    return f"{weight:g}" if round_weight is None else f"{weight:g},{round_weight:g}"


def prior_spec(model) -> str:
    """The model's prior as ``--box-prior`` takes it (``"8"``, ``"8,16"``, ``"0"``)."""
    w, r = float(getattr(model, "box_prior", 0.0)), getattr(model, "box_prior_round", None)
    return format_prior(w, None if r is None or float(r) == w else float(r))


def checkpoint_prior(info: dict, path) -> tuple[float, float | None]:
    """``(W, R or None)`` saved in a UniUltra checkpoint's ``info`` (0 when it has none), each
    checked with an error naming the checkpoint and the key."""
    w = check_weight(info.get("box_prior", 0.0), f"checkpoint {path}: box_prior")
    r = info.get("box_prior_round")
    return w, (None if r is None else check_weight(r, f"checkpoint {path}: box_prior_round"))


def set_prior(model, spec, source: str = "--box-prior") -> None:
    """Give ``model`` the prior ``spec`` (``W`` or ``W,R``; see :func:`parse_prior`)."""
    model.box_prior, model.box_prior_round = parse_prior(spec, source)


def has_prior(model) -> bool:
    """Whether ``model`` adds a box-shape prior to any box."""
    return bool(getattr(model, "box_prior", 0.0) or getattr(model, "box_prior_round", None))
