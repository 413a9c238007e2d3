"""Model-independent evaluation on datasets in the uniform layout.

``segment_fn(image, boxes, points, labels) -> list of bool (H, W) masks`` (or ``(masks, scores)``):

* ``prompt="box"``: one call per image with every instance's (jittered) box, ``points=None``,
  ``labels=None``; one mask per box is expected.
* ``prompt="point"``: one call per instance with ``boxes=None`` and that instance's points
  (the positive point is the GT centroid, or the most interior pixel when the centroid falls
  outside; ``n_neg`` random negatives near the object); the first returned mask is used.
* ``prompt="box+points"``: one call per instance with ``boxes=[box]`` plus its points.

Per image, the prediction is the union of the instance masks and Dice / IoU / HD95 are computed
on the binary foreground (union of all labels), then averaged over images.  mAP / mAP@50 are COCO
segmentation metrics over instances (one prediction per prompted GT instance, scored by the
returned score or 1.0).  Baselines (ellipse inscribed in each box, box filled) use the very same
boxes (not defined for point prompts: reported as None).  Prompts are seeded per image by
``(seed, dataset name, image id)``, so results do not depend on order or on ``limit``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from uniultra.data import prompts as P
from uniultra.data.datasets import UniformDataset, find_datasets, mask_instances, stable_seed
from uniultra.data.io import atomic_write, overlay_png
from uniultra.errors import Cancelled, InputError
from uniultra.evaluation.metrics import baseline_mask, coco_map, dice, hd95, iou
from uniultra.fileio import atomic_write_csv

PROMPTS = ("box", "point", "box+points")


def _progress_fn(progress):
    if callable(progress):
        return progress
    if progress:
        def _p(done, total, msg):
            print(f"\r{msg} {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        return _p
    return lambda done, total, msg: None


def _check_cancel(cancel):
    if cancel is not None and cancel():
        raise Cancelled("evaluation cancelled")


def _as_masks(out, hw):
    """segment_fn output -> (list of bool masks, list of scores).  Accepts a list / ``[N, H, W]``
    array of masks, a single ``(H, W)`` mask, a ``(masks, scores)`` tuple, or an object with
    ``.masks`` (and ``.scores``) such as the Predictor's result."""
    scores = None
    if hasattr(out, "masks"):
        out, scores = out.masks, getattr(out, "scores", None)
    elif isinstance(out, tuple) and len(out) == 2 and np.ndim(out[1]) <= 1 and np.ndim(out[0]) >= 2:
        out, scores = out
    if out is None:
        items = []
    elif isinstance(out, np.ndarray) and out.ndim == 2:
        items = [out]
    else:
        items = list(out)
    masks = [np.zeros(hw, bool) if m is None else np.asarray(m).astype(bool).reshape(hw) for m in items]
    sc = [1.0] * len(masks) if scores is None else [float(v) for v in np.asarray(scores, np.float64).reshape(-1)]
    sc = (sc + [1.0] * len(masks))[: len(masks)]
    return masks, sc


def _write_csv(path, rows, fields):
    atomic_write_csv(path, rows, fields)


def _write_json(path, obj):
    data = json.dumps(obj, indent=2, default=float).encode()

    def _w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, _w)


def _mean(vals):
    v = np.asarray([x for x in vals if x is not None], np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _datasets(root, split: str, clips: bool, **kw) -> list[UniformDataset]:
    """The datasets under ``root`` that have images (``clips``: clips) with masks in ``split``;
    an error when none has, or when one lacks masks (scores against no mask mean nothing)."""
    found, empty = [], []
    for droot in find_datasets(root):
        ds = UniformDataset(droot, split, **kw)
        if not ds.records or (clips and not ds.clips()):
            empty.append(ds)
            continue
        no_mask = [r.id for r in ds.records if r.mask is None]
        if no_mask:
            raise InputError(f"dataset {ds.root}: no mask for {len(no_mask)} image(s) of split {split!r} "
                             f"(e.g. id {no_mask[0]!r} in {ds.root / 'masks'}); evaluation needs a mask per image")
        found.append(ds)
    if not found:
        ds = empty[0]
        what = "clips (split.csv columns clip,frame)" if clips and ds.records else "images"
        known = ", ".join(sorted(n for n in ds.split_names if n)) or "none"
        raise InputError(f"--split {split}: dataset {ds.root} has no {what} in that split "
                         f"(splits in its split.csv: {known})")
    return found


def prompted_cases(ds: UniformDataset, prompt: str = "box", jitter: float = 0.1, seed: int = 0, n_pos: int = 1,
                   n_neg: int = 0, min_area_frac: float = 0.0):
    """The images of ``ds`` with their simulated prompts, seeded per ``(seed, dataset, image id)``:
    the one place where prompts are drawn for scoring, used by :func:`evaluate_dataset` and by the
    trainer's validation (:func:`uniultra.training.data.val_set`), so validation Dice and
    ``uniultra evaluate`` Dice on the same split are the same numbers.

    Yields ``(index, record, image, label map, instances, prompts)``; prompts are one per instance."""
    for i in range(len(ds)):
        rec = ds.records[i]
        image, lab = ds.load(i)
        inst = mask_instances(lab, min_area_frac)
        rng = np.random.default_rng([seed, stable_seed(ds.name, rec.id)])
        prs = P.simulate_prompts([t.mask for t in inst], rng, prompt, jitter, 0, n_pos, n_neg, point_mode="centroid")
        yield i, rec, image, lab, inst, prs


def _structure_dice(inst, masks, boxes, lab) -> dict:
    """Images with several labelled structures (CAMUS: cavity, myocardium ring, atrium): Dice per
    label (the union of its instances' predictions against ``lab == label``), averaged over the
    labels present.  The union Dice hides a ring filled in by its neighbours; this does not."""
    labels = sorted({t.label for t in inst})
    d, e = [], []
    for v in labels:
        idx = [k for k, t in enumerate(inst) if t.label == v]
        gt = lab == v
        d.append(dice(np.any(np.stack([masks[k] for k in idx]), 0), gt))
        if boxes is not None:
            e.append(dice(baseline_mask([boxes[k] for k in idx], lab.shape, "ellipse"), gt))
    out = {"structure_dice": float(np.mean(d))}
    if e:
        out["ellipse_structure_dice"] = float(np.mean(e))
    return out


def evaluate_dataset(segment_fn: Callable, root, split: str = "test", jitter: float = 0.1, prompt: str = "box",
                     seed: int = 0, out_dir=None, progress=True, cancel: Callable[[], bool] | None = None,
                     n_pos: int = 1, n_neg: int = 0, min_area_frac: float = 0.0, limit: int | None = None,
                     spacing=None, n_cases: int = 3) -> dict:
    """Evaluate ``segment_fn`` on one dataset folder (holding split.csv) or on every dataset under
    ``root``.  Returns ``{"settings": {...}, "datasets": {name: summary}}`` where summary has
    ``n_images, n_instances, dice, dice_std, dice_p10 (10th percentile over images), iou, hd95, hd95_undefined, map, map50,
    ellipse_dice, ellipse_iou, boxfill_dice, boxfill_iou, seconds``.  With ``out_dir``: writes
    ``<out_dir>/<name>/per_image.csv``, overlays of the best and worst ``n_cases`` images
    (``best_1_<id>.png``, ``worst_1_<id>.png``; prediction red/blue, GT contour green) and
    ``<out_dir>/summary.json``.  ``cancel()`` returning True raises :class:`uniultra.errors.Cancelled`."""
    if prompt not in PROMPTS:
        raise InputError(f"unknown prompt '{prompt}'; use one of {', '.join(PROMPTS)}")
    report = _progress_fn(progress)
    result = {"settings": {"split": split, "jitter": jitter, "prompt": prompt, "seed": seed, "n_pos": n_pos,
                           "n_neg": n_neg, "min_area_frac": min_area_frac, "limit": limit},
              "datasets": {}}
    for ds in _datasets(root, split, clips=False, min_area_frac=min_area_frac, max_images=limit):
        n = len(ds)
        rows, gt_inst, pred_inst, cases = [], {}, {}, []
        t0 = time.perf_counter()
        for i, rec, image, lab, inst, prs in prompted_cases(ds, prompt, jitter, seed, n_pos, n_neg, min_area_frac):
            _check_cancel(cancel)
            hw = lab.shape
            gt = lab != 0
            masks, scores = [], []
            if inst:
                if prompt == "box":
                    boxes = [p.box for p in prs]
                    masks, scores = _as_masks(segment_fn(image, boxes, None, None), hw)
                else:
                    for p in prs:
                        m, s = _as_masks(segment_fn(image, None if p.box is None else [p.box], p.points, p.labels),
                                         hw)
                        masks.append(m[0] if m else np.zeros(hw, bool))
                        scores.append(s[0] if s else 0.0)
            pred = np.any(np.stack(masks), 0) if masks else np.zeros(hw, bool)
            boxes = [p.box for p in prs if p.box is not None]
            row = {"id": rec.id, "n_instances": len(inst), "dice": dice(pred, gt), "iou": iou(pred, gt),
                   "hd95": hd95(pred, gt, spacing)}
            if boxes:
                e = baseline_mask(boxes, hw, "ellipse")
                b = baseline_mask(boxes, hw, "boxfill")
                row.update(ellipse_dice=dice(e, gt), ellipse_iou=iou(e, gt), boxfill_dice=dice(b, gt),
                           boxfill_iou=iou(b, gt))
            if len(masks) == len(inst) and len({t.label for t in inst}) > 1:
                row.update(_structure_dice(inst, masks, boxes if len(boxes) == len(inst) else None, lab))
            rows.append(row)
            gt_inst[rec.id] = [t.mask for t in inst]
            pred_inst[rec.id] = list(zip(masks, scores))
            if out_dir is not None:
                cases.append((row["dice"], i, boxes, [p.points for p in prs], [p.labels for p in prs]))
            report(i + 1, n, f"evaluating {ds.name}")
        if rows and not any(r["n_instances"] for r in rows):  # every score would be 1.0 (empty vs empty)
            raise InputError(f"--split {split}: every mask of the {len(rows)} image(s) of dataset {ds.root} is empty"
                             f"{' (or smaller than min_area_frac)' if min_area_frac > 0 else ''}; "
                             "there is nothing to score (check masks/)")
        mp = coco_map(gt_inst, pred_inst)
        hd = [r["hd95"] for r in rows]
        summary = {
            "n_images": n, "n_instances": int(sum(r["n_instances"] for r in rows)),
            "dice": _mean(r["dice"] for r in rows),
            "dice_std": float(np.std([r["dice"] for r in rows])) if rows else None,
            "dice_p10": float(np.percentile([r["dice"] for r in rows], 10)) if rows else None,
            "ellipse_dice_p10": (float(np.percentile([r["ellipse_dice"] for r in rows if "ellipse_dice" in r], 10))
                                 if any("ellipse_dice" in r for r in rows) else None),
            "iou": _mean(r["iou"] for r in rows), "hd95": _mean(hd),
            "hd95_undefined": int(sum(1 for h in hd if not np.isfinite(h))),
            "map": mp["map"], "map50": mp["map50"],
            "ellipse_dice": _mean(r.get("ellipse_dice") for r in rows),
            "ellipse_iou": _mean(r.get("ellipse_iou") for r in rows),
            "boxfill_dice": _mean(r.get("boxfill_dice") for r in rows),
            "boxfill_iou": _mean(r.get("boxfill_iou") for r in rows),
            "seconds": time.perf_counter() - t0,
        }
        if any("structure_dice" in r for r in rows):  # several structures per image (e.g. CAMUS)
            sd = [r.get("structure_dice", r["dice"]) for r in rows]
            summary.update(structure_dice=_mean(sd), structure_dice_p10=float(np.percentile(sd, 10)),
                           ellipse_structure_dice=_mean(r.get("ellipse_structure_dice", r.get("ellipse_dice"))
                                                        for r in rows))
        result["datasets"][ds.name] = summary
        if out_dir is not None:
            od = Path(out_dir) / ds.name
            _write_csv(od / "per_image.csv", rows, ["id", "n_instances", "dice", "iou", "hd95", "ellipse_dice",
                                                    "ellipse_iou", "boxfill_dice", "boxfill_iou"])
            order = sorted(cases, key=lambda c: (c[0], c[1]))
            picks = [("worst", k + 1, c) for k, c in enumerate(order[:n_cases])]
            picks += [("best", k + 1, c) for k, c in enumerate(order[::-1][:n_cases])]
            for tag, k, (_, i, boxes, pts, labs) in picks:
                image, lab = ds.load(i)
                pm = pred_inst[ds.records[i].id]
                pred = np.any(np.stack([m for m, _ in pm]), 0) if pm else np.zeros(lab.shape, bool)
                gt = lab != 0
                gt_edge = gt & ~_erode(gt)
                allp = np.concatenate(pts) if pts else None
                alll = np.concatenate(labs) if labs else None
                overlay_png(od / f"{tag}_{k}_{ds.records[i].id}.png", image, [pred, gt_edge], boxes=boxes,
                            points=allp, labels=alll)
    if out_dir is not None:
        _write_json(Path(out_dir) / "summary.json", result)
    return result


def _erode(m):
    from scipy import ndimage as ndi
    return ndi.binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)


def evaluate_clips(propagate_fn: Callable, root, split: str = "test", jitter: float = 0.0, seed: int = 0,
                   progress=True, cancel: Callable[[], bool] | None = None, out_dir=None,
                   limit: int | None = None) -> dict:
    """Cine evaluation: one (jittered) box per instance on the first frame of each clip,
    ``propagate_fn(frames: list[np.ndarray], key_boxes: {0: [boxes]}) -> list[mask | None]``
    (the ``uniultra.inference.propagation.propagate`` signature minus the predictor), Dice over all
    later frames (the union of objects vs the binary GT).  Next to it the static baseline: the
    first-frame ellipse(s) held for the whole clip.  Returns ``{"settings", "datasets": {name:
    {n_clips, n_frames, dice, static_ellipse_dice, clip_dice, clip_static_ellipse_dice, clips: [...]}}}``:
    ``dice`` / ``static_ellipse_dice`` average over all evaluated frames, ``clip_*`` over clips."""
    report = _progress_fn(progress)
    result = {"settings": {"split": split, "jitter": jitter, "seed": seed}, "datasets": {}}
    for ds in _datasets(root, split, clips=True):
        clips = ds.clips()
        names = sorted(clips)[: limit if limit is not None else None]
        per_clip, fd, fs = [], [], []
        t0 = time.perf_counter()
        for ci, name in enumerate(names):
            _check_cancel(cancel)
            idx = clips[name]
            loaded = [ds.load(i) for i in idx]
            frames = [im for im, _ in loaded]
            gts = [lb != 0 for _, lb in loaded]
            hw = gts[0].shape
            inst = mask_instances(loaded[0][1])
            rng = np.random.default_rng([seed, stable_seed(ds.name, name)])
            boxes = [P.jitter_box(t.box, hw, rng, jitter) for t in inst]
            preds = propagate_fn(frames, {0: boxes}) if boxes else [None] * len(frames)
            static = baseline_mask(boxes, hw, "ellipse")
            d = [dice(preds[k] if preds[k] is not None else np.zeros(hw, bool), gts[k]) for k in range(1, len(idx))]
            s = [dice(static, gts[k]) for k in range(1, len(idx))]
            fd += d
            fs += s
            per_clip.append({"clip": name, "n_frames": len(idx), "dice": _mean(d), "static_ellipse_dice": _mean(s)})
            report(ci + 1, len(names), f"propagating {ds.name}")
        result["datasets"][ds.name] = {
            "n_clips": len(names), "n_frames": len(fd), "dice": _mean(fd), "static_ellipse_dice": _mean(fs),
            "clip_dice": _mean(c["dice"] for c in per_clip),
            "clip_static_ellipse_dice": _mean(c["static_ellipse_dice"] for c in per_clip),
            "clips": per_clip, "seconds": time.perf_counter() - t0,
        }
        if out_dir is not None:
            _write_csv(Path(out_dir) / ds.name / "per_clip.csv", per_clip,
                       ["clip", "n_frames", "dice", "static_ellipse_dice"])
    if out_dir is not None:
        _write_json(Path(out_dir) / "clips_summary.json", result)
    return result
