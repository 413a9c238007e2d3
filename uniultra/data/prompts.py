"""Seeded prompt simulation, shared by training and evaluation (so evaluations are reproducible).

Conventions: boxes are inclusive integer pixel boxes ``(x0, y0, x1, y1)``; points are ``(x, y)``
pixel coordinates (pixel centres at integers); labels 1 = positive, 0 = negative.

* :func:`mask_box` -- tight box of a mask.
* :func:`jitter_box` -- each edge moves by ``U[-j, +j] * box size`` (UltraSam style; width for x
  edges, height for y edges, size = ``x1 - x0 + 1``) plus an optional integer shift in
  ``[-shift_px, +shift_px]`` per edge (SAM-UNet style); rounded, clipped to the image, and never
  empty (swapped edges are re-ordered, a box is at least one pixel).  Training default j = 0.05,
  evaluation uses 0.1.
* :func:`positive_points` -- ``"uniform"`` over the mask, ``"interior"`` = the most interior pixel
  (maximum of the distance transform; deterministic), ``"centroid"`` = the centroid when it lies in
  the mask, else the most interior pixel (UltraSam's evaluation point).
* :func:`negative_points` -- uniform over background pixels inside the box grown by ``margin``
  (near the object), falling back to any background pixel.
* :func:`simulate_prompt` / :func:`simulate_prompts` -- a :class:`Prompt` per instance mask, kind
  ``"box" | "point" | "box+points" | "mixed"`` (mixed: box or point with equal probability).

All randomness comes from the ``rng`` argument (``np.random.Generator`` or an int seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

BoxI = tuple[int, int, int, int]
PROMPT_KINDS = ("box", "point", "box+points", "mixed")


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def mask_box(mask: np.ndarray) -> BoxI | None:
    """Tight inclusive box of the non-zero pixels, or None for an empty mask."""
    m = np.asarray(mask) != 0
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def clip_box(box, hw: tuple[int, int]) -> BoxI:
    """Round, order and clip a box to the image; the result always holds at least one pixel."""
    h, w = hw
    x0, y0, x1, y1 = (int(np.round(v)) for v in box)
    if x1 < x0:
        x0, x1 = x1, x0
    if y1 < y0:
        y0, y1 = y1, y0
    x0, x1 = min(max(x0, 0), w - 1), min(max(x1, 0), w - 1)
    y0, y1 = min(max(y0, 0), h - 1), min(max(y1, 0), h - 1)
    return x0, y0, x1, y1


def jitter_box(box, hw: tuple[int, int], rng=None, jitter: float = 0.05, shift_px: float = 0) -> BoxI:
    """Per-edge jitter (fraction of box size) + per-edge pixel shift; see the module doc."""
    rng = as_rng(rng)
    x0, y0, x1, y1 = (float(v) for v in box)
    b = np.array([x0, y0, x1, y1])
    if jitter > 0:
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        b = b + rng.uniform(-jitter, jitter, 4) * np.array([bw, bh, bw, bh])
    if shift_px > 0:
        b = b + rng.integers(-int(shift_px), int(shift_px) + 1, 4)
    return clip_box(b, hw)


def positive_points(mask: np.ndarray, n: int = 1, rng=None, mode: str = "uniform") -> np.ndarray:
    """``n`` points ``(x, y)`` inside the mask -> float array ``[n, 2]`` (empty mask -> ``[0, 2]``)."""
    m = np.asarray(mask) != 0
    if n <= 0 or not m.any():
        return np.zeros((0, 2), np.float64)
    if mode == "uniform":
        ys, xs = np.nonzero(m)
        idx = as_rng(rng).integers(0, len(xs), n)
        return np.stack([xs[idx], ys[idx]], 1).astype(np.float64)
    if mode not in ("interior", "centroid"):
        raise ValueError(f"unknown point mode {mode!r}; use 'uniform', 'interior' or 'centroid'")
    if mode == "centroid":
        cy, cx = ndi.center_of_mass(m)
        iy, ix = int(round(cy)), int(round(cx))
        if m[iy, ix]:
            return np.repeat(np.array([[float(ix), float(iy)]]), n, 0)
    dist = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    iy, ix = np.unravel_index(int(np.argmax(dist)), dist.shape)
    first = np.array([[float(ix), float(iy)]])
    if n == 1:
        return first
    ys, xs = np.nonzero(m)
    idx = as_rng(rng).integers(0, len(xs), n - 1)
    return np.concatenate([first, np.stack([xs[idx], ys[idx]], 1).astype(np.float64)])


def negative_points(mask: np.ndarray, n: int = 1, rng=None, box=None, margin: float = 0.25,
                    avoid: np.ndarray | None = None) -> np.ndarray:
    """``n`` background points near the object (inside ``box`` grown by ``margin`` of its size;
    ``box`` defaults to the mask's tight box).  ``avoid``: extra pixels never to pick (e.g. the union
    of all objects).  Returns ``[k, 2]`` with k = n unless there is no background at all (k = 0)."""
    m = np.asarray(mask) != 0
    bg = ~m if avoid is None else ~(m | (np.asarray(avoid) != 0))
    if n <= 0 or not bg.any():
        return np.zeros((0, 2), np.float64)
    rng = as_rng(rng)
    h, w = m.shape
    box = mask_box(m) if box is None else box
    cand = bg
    if box is not None:
        x0, y0, x1, y1 = box
        mx, my = margin * (x1 - x0 + 1), margin * (y1 - y0 + 1)
        near = np.zeros_like(bg)
        near[max(0, int(y0 - my)): min(h, int(np.ceil(y1 + my)) + 1),
             max(0, int(x0 - mx)): min(w, int(np.ceil(x1 + mx)) + 1)] = True
        if (bg & near).any():
            cand = bg & near
    ys, xs = np.nonzero(cand)
    idx = rng.integers(0, len(xs), n)
    return np.stack([xs[idx], ys[idx]], 1).astype(np.float64)


@dataclass
class Prompt:
    """One instance's prompt: ``box`` (inclusive pixel box or None), ``points`` ``[P, 2]`` (x, y)
    and ``labels`` ``[P]`` (1 positive / 0 negative), ``kind`` the kind actually drawn."""

    box: BoxI | None = None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float64))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    kind: str = "box"


def simulate_prompt(mask: np.ndarray, rng=None, kind: str = "box", jitter: float = 0.05, shift_px: float = 0,
                    n_pos: int = 1, n_neg: int = 0, point_mode: str = "uniform",
                    avoid: np.ndarray | None = None) -> Prompt:
    """Simulate a user prompt for one instance mask (see the module doc).

    ``kind="point"`` gives ``n_pos`` positive and ``n_neg`` negative points (no box); ``"box+points"``
    the jittered box plus those points; ``"mixed"`` draws box or point with equal probability."""
    rng = as_rng(rng)
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; use one of {PROMPT_KINDS}")
    m = np.asarray(mask) != 0
    if kind == "mixed":
        kind = "box" if rng.random() < 0.5 else "point"
    tight = mask_box(m)
    if tight is None:
        raise ValueError("cannot simulate a prompt for an empty mask")
    p = Prompt(kind=kind)
    if kind in ("box", "box+points"):
        p.box = jitter_box(tight, m.shape, rng, jitter, shift_px)
    if kind in ("point", "box+points"):
        pos = positive_points(m, max(1, n_pos) if kind == "point" else n_pos, rng, point_mode)
        neg = negative_points(m, n_neg, rng, avoid=avoid)
        p.points = np.concatenate([pos, neg]).astype(np.float64)
        p.labels = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    return p


def simulate_prompts(masks: Sequence[np.ndarray], rng=None, kind: str = "box", jitter: float = 0.05,
                     shift_px: float = 0, n_pos: int = 1, n_neg: int = 0, point_mode: str = "uniform") -> list[Prompt]:
    """One :class:`Prompt` per instance mask, drawn in order from one generator.  Negative points
    avoid every instance of the image."""
    rng = as_rng(rng)
    union = None
    if n_neg > 0 and len(masks):
        union = np.any(np.stack([np.asarray(m) != 0 for m in masks]), axis=0)
    return [simulate_prompt(m, rng, kind, jitter, shift_px, n_pos, n_neg, point_mode, avoid=union) for m in masks]
