"""Propagation of box prompts through an ordered stack of frames (a cine loop or the slices
of a volume), forward and backward from one or more key frames.

Two engines:
- ``box`` (every model): each next frame is prompted with the box of the previous frame's mask,
  expanded by a margin and moved by the object's motion between the two frames (normalized
  cross-correlation of the image around it, :mod:`uniultra.inference.motion`); an object whose
  mask vanishes or collapses is declared lost and is not followed further, so a lost object
  never leaks into later frames.
- ``memory`` (models whose memory modules are trained, e.g. Meta's SAM2 checkpoints): SAM2's
  own video predictor with memory attention, fed from numpy frames (no JPEG folder).

Frames are numpy arrays; results are one bool mask per frame (``None`` where nothing was
segmented), the union of all objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from uniultra.data.prompts import mask_box
from uniultra.errors import Cancelled, InputError
from uniultra.inference.motion import estimate_shift, shift_box, to_gray
from uniultra.inference.predictor import Predictor, check_box, check_image
from uniultra.models.prior import has_prior

Box = tuple[int, int, int, int]
ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

DIRECTIONS = ("both", "forward", "backward")
MOTIONS = ("ncc", "none")


def expand_box(box: Box, hw: tuple[int, int], margin: float) -> Box:
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0 + 1), margin * (y1 - y0 + 1)
    h, w = hw
    return (int(max(0, np.floor(x0 - dx))), int(max(0, np.floor(y0 - dy))),
            int(min(w - 1, np.ceil(x1 + dx))), int(min(h - 1, np.ceil(y1 + dy))))


@dataclass
class _Track:
    mask: np.ndarray
    area: float
    key_size: tuple[float, float]


def _size(box) -> tuple[float, float]:
    return (box[2] - box[0] + 1.0, box[3] - box[1] + 1.0)


def _next_box(t: _Track, hw: tuple[int, int], margin: float, anchor: float) -> Box:
    """The previous mask's box, its size pulled towards the key box's size by ``anchor``
    (0 = follow the mask freely, 1 = keep the key box's size), then expanded by ``margin``.
    Anchoring damps the feedback loop in which a slightly too large (or small) mask gives a
    larger (or smaller) box on the next frame, and so on."""
    x0, y0, x1, y1 = mask_box(t.mask)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = _size((x0, y0, x1, y1))
    w = (1 - anchor) * w + anchor * t.key_size[0]
    h = (1 - anchor) * h + anchor * t.key_size[1]
    box = (int(round(cx - (w - 1) / 2)), int(round(cy - (h - 1) / 2)),
           int(round(cx + (w - 1) / 2)), int(round(cy + (h - 1) / 2)))
    return expand_box(box, hw, margin)


def _check_inputs(frames: Sequence[np.ndarray], key_boxes: dict[int, list], direction: str,
                  motion: str = "none"):
    if motion not in MOTIONS:
        raise InputError(f"motion {motion!r} is not known: use ncc or none")
    if len(frames) == 0:
        raise InputError("the clip has no frames")
    if direction not in DIRECTIONS:
        raise InputError(f"direction {direction!r} is not known: use both, forward or backward")
    if not key_boxes:
        raise InputError("no key frame: give a box on at least one frame")
    hw = np.asarray(frames[0]).shape[:2]
    checked = {}
    for k, boxes in key_boxes.items():
        if not (0 <= int(k) < len(frames)):
            raise InputError(f"key frame {k} is outside the clip (frames 0..{len(frames) - 1})")
        if np.ndim(boxes) == 1:
            boxes = [boxes]
        if len(boxes) == 0:
            raise InputError(f"key frame {k} has no box")
        checked[int(k)] = [check_box(b, hw, f"box on frame {k}") for b in boxes]
    for i, f in enumerate(frames):
        if np.asarray(f).shape[:2] != hw:
            raise InputError(f"frame {i} is {np.asarray(f).shape[:2]}, frame 0 is {hw}: all frames must have one size")
    return checked, hw


def _order(n: int, keys: list[int], direction: str) -> list[tuple[int, list[int]]]:
    """For each key frame, the frames it is responsible for, in visiting order (up to the next
    key frame in each direction)."""
    keys = sorted(keys)
    plan = []
    for j, k in enumerate(keys):
        nxt = keys[j + 1] if j + 1 < len(keys) else n
        prv = keys[j - 1] if j > 0 else -1
        fwd = list(range(k + 1, nxt)) if direction in ("both", "forward") else []
        bwd = list(range(k - 1, prv, -1)) if direction in ("both", "backward") else []
        plan.append((k, [fwd, bwd]))
    return plan


def propagate(
    predictor: Predictor,
    frames: Sequence[np.ndarray],
    key_boxes: dict[int, list[Box]],
    direction: str = "both",
    margin: float = 0.05,
    anchor: float = 0.3,
    min_area_ratio: float = 0.2,
    min_score: float = 0.0,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    chain_prior: float = 0.5,
    motion: str = "ncc",
    motion_context: float = 0.1,
    motion_search: float = 2.0,
) -> list[np.ndarray | None]:
    """Box-chaining propagation (works for every model); see the module doc.

    For a model with a box-shape prior (:mod:`uniultra.models.prior`), the boxes propagation
    derives from the previous frame's mask get ``chain_prior`` times the model's prior (the key
    frames' boxes, drawn by the user, get all of it): a box made from the last mask is not
    evidence of the shape, and the full prior makes the chain follow its own boxes.  0.5 was
    chosen on the carotid train + val clips with ``uniultra-mini-us6p`` (mean clip Dice 0.593,
    0.611, 0.641, 0.631, 0.607, 0.573 for 0.25, 0.375, 0.5, 0.625, 0.75, 1).

    ``motion="ncc"`` moves each chained box by the object's shift between the previous and the
    current frame, found by normalized cross-correlation of the patch around the previous mask
    (its box plus ``motion_context`` of its size on each side) within ``motion_search`` times the
    box's size (:func:`uniultra.inference.motion.estimate_shift`); ``"none"`` chains boxes in
    place, as before.  Context 0.1 and search 2.0 were chosen on the 23 carotid train + val
    clips: from the expert masks, the estimate is within 0.3 box widths of the true centroid
    shift on 627 of 631 frame pairs (10 misses with search 1.0, 21 with context 0), where boxes
    left in place would be that far off on 127.  Propagated with ``uniultra-mini-us6p`` from
    10%-jittered first-frame boxes (seeds 0 and 1), frame / clip Dice 0.851 / 0.871 against
    0.661 / 0.638 without motion (search 1.0: 0.828 / 0.817; in a sweep of the first version,
    whose search stopped at the image's edges, context 0, 0.25, 0.5 and search 0.6, 1.5 gave
    0.73-0.85, and neither a distance penalty nor a fallback to the unmoved box when the model
    scored it higher helped).  The sweep is noisy: one lost track costs a long clip many frames.

    An object is lost when its mask is empty, or shrinks below ``min_area_ratio`` of the
    previous frame's area, or the model's score falls below ``min_score``.
    Defaults (margin 0.05, anchor 0.3) were chosen on the carotid train + val clips with the
    bundled model (frame Dice 0.69 there, against 0.63-0.67 for the other settings tried).
    Raises ``Cancelled`` if ``cancel()`` turns true; nothing partial is returned then.
    """
    key_boxes, hw = _check_inputs(frames, key_boxes, direction, motion)
    n = len(frames)
    out: list[np.ndarray | None] = [None] * n
    plan = _order(n, list(key_boxes), direction)
    chain_kw = ({"prior_scale": chain_prior}
                if has_prior(getattr(predictor, "model", None)) and chain_prior != 1.0 else {})
    total = len(key_boxes) + sum(len(f) + len(b) for _, (f, b) in plan)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
        if cancel is not None and cancel():
            raise Cancelled("propagation cancelled")

    for key, runs in plan:
        predictor.set_image(check_image(frames[key], f"frame {key}"))
        pred = predictor.predict(boxes=key_boxes[key])
        out[key] = pred.mask
        tick()
        key_gray = to_gray(frames[key]) if motion == "ncc" else None
        for run in runs:
            # one tracked object per key box: its last mask, area and the size of its key box
            objs = [_Track(m, float(m.sum()), _size(b)) for m, b in zip(pred.masks, key_boxes[key]) if m.any()]
            prev_gray = key_gray
            for idx in run:
                if not objs:  # every object lost: nothing more to follow in this run
                    tick()
                    continue
                predictor.set_image(check_image(frames[idx], f"frame {idx}"))
                boxes = [_next_box(t, hw, margin, anchor) for t in objs]
                if motion == "ncc":
                    cur_gray = to_gray(frames[idx])
                    for j, t in enumerate(objs):
                        dx, dy, _ = estimate_shift(prev_gray, cur_gray, mask_box(t.mask), motion_context, motion_search)
                        boxes[j] = shift_box(boxes[j], dx, dy, hw)
                    prev_gray = cur_gray
                p = predictor.predict(boxes=boxes, **chain_kw)
                kept = []
                for t, m_new, s in zip(objs, p.masks, p.scores):
                    area = float(m_new.sum())
                    if not (area == 0 or area < min_area_ratio * t.area or s < min_score):
                        kept.append(_Track(m_new, area, t.key_size))
                objs = kept
                if objs:
                    union = np.logical_or.reduce([t.mask for t in objs])
                    out[idx] = union if out[idx] is None else (out[idx] | union)
                tick()
    return out


@torch.inference_mode()
def propagate_memory(
    predictor: Predictor,
    frames: Sequence[np.ndarray],
    key_boxes: dict[int, list[Box]],
    direction: str = "both",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> list[np.ndarray | None]:
    """SAM2 memory-attention propagation through numpy frames: sam2's own video predictor API
    (``init_state`` on in-memory frames, ``add_new_points_or_box``, ``propagate_in_video``) on the
    model itself, which is built as one (:mod:`uniultra.models.video`)."""
    from uniultra.data.transforms import prepare_batch
    from uniultra.models.video import VideoPredictor

    key_boxes, hw = _check_inputs(frames, key_boxes, direction)
    model = predictor.model
    if not getattr(model, "memory_trained", False):
        raise InputError(
            f"model {model.name} has untrained memory modules: use --engine box (box propagation), "
            "or a SAM2 checkpoint / a model trained on video"
        )
    if has_prior(model):
        raise InputError(f"model {model.name} adds a box-shape prior that SAM2's video predictor does not apply: "
                         "use --engine box (box propagation)")
    sam = model.sam
    if not isinstance(sam, VideoPredictor):
        raise InputError(f"model {model.name} has no SAM2 memory path: use --engine box (box propagation)")
    dev = predictor.device
    images = prepare_batch([check_image(f, f"frame {i}") for i, f in enumerate(frames)], model.image_size)
    state = sam.init_state_from_arrays(images.to(dev), hw)
    obj = 0
    for k, boxes in sorted(key_boxes.items()):
        for b in boxes:
            x0, y0, x1, y1 = b
            sam.add_new_points_or_box(state, frame_idx=k, obj_id=obj,
                                      box=np.array([x0, y0, x1 + 1, y1 + 1], dtype=np.float32))
            obj += 1
    out: list[np.ndarray | None] = [None] * len(frames)
    runs = []
    if direction in ("both", "forward"):
        runs.append(False)
    if direction in ("both", "backward"):
        runs.append(True)
    first, last = min(key_boxes), max(key_boxes)
    total = sum(last + 1 if reverse else len(frames) - first for reverse in runs)
    done = 0
    for reverse in runs:
        for idx, _ids, logits in sam.propagate_in_video(state, reverse=reverse):
            m = (logits[:, 0] > 0).any(0).cpu().numpy()
            out[idx] = m if out[idx] is None else (out[idx] | m)
            done += 1
            if progress is not None:
                progress(done, total)
            if cancel is not None and cancel():
                raise Cancelled("propagation cancelled")
    return [m if m is not None and m.any() else None for m in out]
