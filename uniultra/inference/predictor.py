"""Promptable predictor: an image of any kind in, one mask per object out.

The image embedding is cached by ``set_image``; every ``predict`` on the same image only runs
the prompt encoder and mask decoder (milliseconds), which is what makes interactive editing
in Slicer feel immediate.

Coordinates are image pixels: x right, y down, box corners inclusive.

``tta=True`` (test-time augmentation) also encodes the left-right mirror of the image, asks the
same prompts mirrored, and averages the two logit maps: about twice the encoder and decoder
time for a small, consistent gain in Dice (see the README's results).  Mirroring is exact in
model space, so the mirrored logits are flipped back without resampling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from uniultra.checks import image_array
from uniultra.data.transforms import box_to_model, image_to_model_coords, to_model_input, upsample_logits
from uniultra.device import pick_device  # noqa: F401  (re-exported: uniultra.inference.pick_device)
from uniultra.errors import InputError
from uniultra.registry import DEFAULT_MODEL  # noqa: F401  (re-exported: uniultra.inference.DEFAULT_MODEL)


def check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Accept (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) arrays of any numeric dtype, at least 2x2,
    finite (:func:`uniultra.checks.image_array`; ``name`` goes into the message)."""
    return image_array(image, name)


def check_box(box, hw: tuple[int, int], name: str = "box") -> tuple[int, int, int, int]:
    """Validate an inclusive pixel box, corners in either order; a box that reaches past the border
    is clipped to it, one wholly outside refused."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"{name} {box!r} must be four numbers x0 y0 x1 y1") from None
    h, w = hw
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    shown = f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
    if not np.isfinite([x0, y0, x1, y1]).all():
        raise InputError(f"{name} {shown}: give finite numbers (not NaN or infinity)")
    x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))  # pixels: 127.4 is in the last of 128
    if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
        raise InputError(f"{name} {shown} lies outside the {w}x{h} image: coordinates are pixels, x right, y down")
    return max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)


def check_points(points, labels, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if labels is None:
        labels = np.ones(len(pts), dtype=np.int64)
    lab = np.asarray(labels).reshape(-1)
    if len(lab) != len(pts):
        raise InputError(f"{len(pts)} points but {len(lab)} labels: give one label (1 positive, 0 negative) per point")
    if not np.isin(lab, (0, 1)).all():
        raise InputError(f"point labels {lab.tolist()} must be 1 (positive) or 0 (negative)")
    h, w = hw
    for (x, y) in pts:
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise InputError(f"point ({x:g}, {y:g}) lies outside the {w}x{h} image")
    return pts, lab.astype(np.int64)


@dataclass
class Prediction:
    masks: np.ndarray        # bool [N, H, W]
    scores: np.ndarray       # float [N], the model's predicted IoU
    low_res_logits: torch.Tensor  # [N, 1, S/4, S/4], for mask-prompt refinement

    @property
    def mask(self) -> np.ndarray:
        """Union of all objects' masks."""
        return self.masks.any(axis=0)


class Predictor:
    """Caches one image's embedding and answers prompts on it."""

    def __init__(self, model, device: str | torch.device | None = "auto", tta: bool = False):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.size = model.image_size
        self.tta = bool(tta)
        self._emb: dict | None = None
        self._emb_mirror: dict | None = None
        self._hw: tuple[int, int] | None = None

    @classmethod
    def from_name(cls, name: str | None = None, device: str | torch.device | None = "auto",
                  tta: bool = False) -> Predictor:
        from uniultra.models import build_model

        name = name or os.environ.get("UNIULTRA_MODEL", DEFAULT_MODEL)
        return cls(build_model(name), device, tta=tta)

    # -------------------------------------------------------------- image
    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        a = check_image(image)
        x, _ = to_model_input(a, self.size)
        x = x.to(self.device)
        if self.tta:  # one batch of two: the image and its mirror
            both = self.model.encode(torch.cat([x, x.flip(-1)], 0))
            rows = self.model.embedding_rows
            self._emb, self._emb_mirror = rows(both, slice(0, 1)), rows(both, slice(1, 2))
        else:
            self._emb, self._emb_mirror = self.model.encode(x), None
        self._hw = a.shape[:2]

    @property
    def image_hw(self) -> tuple[int, int]:
        if self._hw is None:
            raise RuntimeError("call set_image() before predict()")
        return self._hw

    # -------------------------------------------------------------- prompts
    @torch.no_grad()
    def predict(
        self,
        boxes: Sequence[Sequence[float]] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        refine: bool = False,
        mask_input: torch.Tensor | None = None,
        prior_scale: float = 1.0,
    ) -> Prediction:
        """One mask per box (or one for points alone).  With several boxes, each point goes to
        the box that contains it (else the nearest box).  ``refine`` runs a second pass with the
        first mask's logits as a mask prompt.  ``prior_scale`` multiplies the model's box-shape
        prior (:mod:`uniultra.models.prior`; propagation weakens it for boxes it derived itself)."""
        hw = self.image_hw
        if boxes is not None and len(boxes) and np.ndim(boxes) == 1:
            boxes = [boxes]
        boxes = [check_box(b, hw, f"box {i + 1}" if len(boxes) > 1 else "box")
                 for i, b in enumerate(boxes or [])]
        pts, lab = (check_points(points, labels, hw) if points is not None and len(points)
                    else (np.zeros((0, 2)), np.zeros(0, np.int64)))
        if not boxes and not len(pts):
            raise InputError("no prompt given: draw a box or add at least one point")
        n = max(1, len(boxes))
        owner = _assign_points(pts, boxes) if boxes else np.zeros(len(pts), np.int64)
        logits_all, scores = [], []
        for i in range(n):
            sel = owner == i
            box_t = None
            if boxes:
                box_t = torch.as_tensor(box_to_model(boxes[i], hw, self.size), dtype=torch.float32,
                                        device=self.device)[None]
            pc = pl = None
            if sel.any():
                pc = torch.as_tensor(image_to_model_coords(pts[sel], hw, self.size), dtype=torch.float32,
                                     device=self.device)[None]
                pl = torch.as_tensor(lab[sel], device=self.device)[None]
            mi = None if mask_input is None else mask_input[i:i + 1].to(self.device)
            logits, iou = self._decode(box_t, pc, pl, mi, prior_scale)
            if refine:
                logits, iou = self._decode(box_t, pc, pl, logits, prior_scale)
            logits_all.append(logits)
            scores.append(float(iou[0, 0]))
        low = torch.cat(logits_all, 0)
        masks = (upsample_logits(low[:, 0].float().cpu(), hw, self.size) > 0).numpy()
        return Prediction(masks, np.asarray(scores, dtype=np.float32), low)

    def _decode(self, box_t, pc, pl, mi, prior_scale: float = 1.0):
        """Decode one object's prompts; with ``tta`` average with the mirrored image's answer."""
        logits, iou = self.model.decode(self._emb, box_t, pc, pl, mi, prior_scale=prior_scale)
        if self._emb_mirror is None:
            return logits, iou
        S = float(self.size)
        # pixel x mirrors to w - 1 - x: for a box (x1 + 1 is its right edge) that is S - x in model
        # space; a point maps to x * S / w (not its centre), so its mirror is S - x - S / w
        mbox = None if box_t is None else torch.stack([S - box_t[:, 2], box_t[:, 1], S - box_t[:, 0], box_t[:, 3]], 1)
        mpc = None if pc is None else torch.stack([S - pc[..., 0] - S / self._hw[1], pc[..., 1]], -1)
        mmi = None if mi is None else mi.flip(-1)
        logits2, iou2 = self.model.decode(self._emb_mirror, mbox, mpc, pl, mmi, prior_scale=prior_scale)
        return (logits + logits2.flip(-1)) / 2, (iou + iou2) / 2

    def segment(self, image: np.ndarray, boxes=None, points=None, labels=None, refine: bool = False) -> list[np.ndarray]:
        """Convenience: set the image and return a list of bool masks."""
        self.set_image(image)
        return list(self.predict(boxes, points, labels, refine).masks)


def _assign_points(pts: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    owner = np.zeros(len(pts), np.int64)
    b = np.asarray(boxes, dtype=np.float64)
    centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
    for k, (x, y) in enumerate(pts):
        inside = np.flatnonzero((b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3]))
        if len(inside):
            areas = (b[inside, 2] - b[inside, 0] + 1) * (b[inside, 3] - b[inside, 1] + 1)
            owner[k] = inside[np.argmin(areas)]
        else:
            owner[k] = int(np.argmin(((centres - (x, y)) ** 2).sum(1)))
    return owner
