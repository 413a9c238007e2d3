"""Segmentation metrics and prompt-only baselines.

Empty-mask conventions (documented, tested):

* :func:`dice` / :func:`iou`: both empty -> 1.0 (perfect agreement), exactly one empty -> 0.0.
* :func:`hd95`: both empty -> 0.0; exactly one empty -> ``nan`` (undefined; aggregations use the
  mean over defined values and report how many were undefined).  HD95 is the symmetric 95th
  percentile Hausdorff distance between the mask *boundaries* (MONAI convention:
  ``max(P95(d(A->B)), P95(d(B->A)))``), in pixels, or in mm when ``spacing=(sy, sx)`` (row, column
  spacing, i.e. numpy axis order) is given.

Baselines (a trained model must beat them on the same prompts):

* :func:`ellipse_in_box` -- the filled ellipse inscribed in an inclusive pixel box: centre
  ``((x0+x1)/2, (y0+y1)/2)``, semi-axes ``((x1-x0+1)/2, (y1-y0+1)/2)``; pixel centres inside.
* :func:`box_fill` -- the whole box.
* :func:`baseline_mask` -- the union over the boxes of one image.

Convention that reproduces the data README's numbers: one tight box per 8-connected component,
the image's prediction is the union of the per-box baselines, Dice is computed per image on the
binary foreground and averaged over images (busi 0.895, ddti 0.919, hc18 0.983, carotid 0.954 on
test; 10% per-edge jitter, seed 0: busi 0.853).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi


def _b(m) -> np.ndarray:
    return np.asarray(m) != 0


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks (both empty -> 1.0)."""
    p, g = _b(pred), _b(gt)
    s = int(p.sum()) + int(g.sum())
    return 1.0 if s == 0 else 2.0 * int((p & g).sum()) / s


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two binary masks (both empty -> 1.0)."""
    p, g = _b(pred), _b(gt)
    u = int((p | g).sum())
    return 1.0 if u == 0 else int((p & g).sum()) / u


def _surface(m: np.ndarray) -> np.ndarray:
    return m & ~ndi.binary_erosion(m, structure=np.ones((3,) * m.ndim, bool), border_value=0)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance of the boundaries (pixels or mm); see module doc."""
    p, g = _b(pred), _b(gt)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return float("nan")
    sp, sg = _surface(p), _surface(g)
    samp = None if spacing is None else tuple(float(s) for s in spacing)
    dt_g = ndi.distance_transform_edt(~sg, sampling=samp)
    dt_p = ndi.distance_transform_edt(~sp, sampling=samp)
    return float(max(np.percentile(dt_g[sp], 95), np.percentile(dt_p[sg], 95)))


def ellipse_in_box(box, hw: tuple[int, int]) -> np.ndarray:
    """Filled ellipse inscribed in an inclusive pixel box -> bool ``(H, W)``."""
    h, w = hw
    x0, y0, x1, y1 = (float(v) for v in box)
    out = np.zeros((h, w), bool)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a, b = (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
    r0, r1 = max(0, int(np.floor(y0))), min(h, int(np.ceil(y1)) + 1)
    c0, c1 = max(0, int(np.floor(x0))), min(w, int(np.ceil(x1)) + 1)
    if r1 <= r0 or c1 <= c0:
        return out
    yy = np.arange(r0, r1)[:, None]
    xx = np.arange(c0, c1)[None, :]
    out[r0:r1, c0:c1] = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0
    return out


def box_fill(box, hw: tuple[int, int]) -> np.ndarray:
    """The inclusive pixel box filled -> bool ``(H, W)``."""
    h, w = hw
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    out = np.zeros((h, w), bool)
    out[max(0, y0): max(0, min(h, y1 + 1)), max(0, x0): max(0, min(w, x1 + 1))] = True
    return out


BASELINES = {"ellipse": ellipse_in_box, "boxfill": box_fill}


def baseline_mask(boxes, hw: tuple[int, int], kind: str = "ellipse") -> np.ndarray:
    """Union over ``boxes`` of the baseline ``kind`` (``"ellipse"`` or ``"boxfill"``)."""
    fn = BASELINES[kind]
    out = np.zeros(hw, bool)
    for b in boxes or []:
        if b is not None:
            out |= fn(b, hw)
    return out


# ---------------------------------------------------------------------------------------------
# COCO mAP (pycocotools), class-agnostic
def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(_b(mask).astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii") if isinstance(r["counts"], bytes) else r["counts"]
    return r


def _items(x):
    return x.items() if isinstance(x, Mapping) else enumerate(x)


def coco_map(gt_instances, pred_instances) -> dict:
    """COCO segmentation mAP (IoU 0.50:0.95) and mAP@50, class-agnostic (UltraSam protocol:
    one prediction per prompted GT instance, scored by the model's predicted IoU).

    ``gt_instances``: mapping (or sequence indexed by image) image key -> list of bool masks.
    ``pred_instances``: same keys -> list of ``(mask, score)`` pairs (or bare masks, score 1.0).
    Returns ``{"map": float, "map50": float}`` in [0, 1] (``nan`` when there is no GT at all).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    keys = {}
    images, anns, dets = [], [], []
    for k, masks in _items(gt_instances):
        iid = keys.setdefault(k, len(keys) + 1)
        hw = None
        for m in masks:
            m = _b(m)
            hw = m.shape
            r = _rle(m)
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": 1, "segmentation": r,
                         "area": float(m.sum()), "bbox": _bbox(m), "iscrowd": 0})
        images.append({"id": iid, "height": int(hw[0]) if hw else 1, "width": int(hw[1]) if hw else 1})
    if not anns:
        return {"map": float("nan"), "map50": float("nan")}
    for k, preds in _items(pred_instances):
        if k not in keys:
            continue
        for p in preds:
            m, s = (p if isinstance(p, tuple | list) and len(p) == 2 and np.ndim(p[1]) == 0 else (p, 1.0))
            m = _b(m)
            dets.append({"image_id": keys[k], "category_id": 1, "segmentation": _rle(m), "score": float(s),
                         "bbox": _bbox(m), "area": float(m.sum())})
    if not dets:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "segm")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": float(max(ev.stats[0], 0.0)), "map50": float(max(ev.stats[1], 0.0))}


def _bbox(m: np.ndarray) -> list[float]:
    rows = np.flatnonzero(m.any(1))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    cols = np.flatnonzero(m.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
