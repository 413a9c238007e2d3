"""UniUltraSegment logic (no Qt): prompts from clicks to pixels, inference results into segments.

The engine is reached only through plain callables that take and return numpy, so this
module can be tested with the real Slicer core and a stand-in predictor:

* `predict(image, boxes, points, labels) -> (H, W) mask` for one frame;
* `propagate(frames, key_boxes, direction=..., progress=..., cancel=...) -> list[mask | None]`,
  the shape of `uniultra.inference.propagation.propagate` with a predictor bound
  (`functools.partial(propagate, predictor)`).

The Qt effect splits the same steps across threads: `ViewTarget` and `frames_for_propagation`
on the main thread, the callable on a worker thread, `write_propagation` back on the main thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .context import MRMLContext, create_context, slicer_app_context  # noqa: F401  (re-exported)
from .geometry import SliceGeometry, extract_frame, slice_geometry, volume_array
from .segments import SegmentEditor
from .sequences import Cine, CineEdit, find_cine, write_cine_masks

Box = tuple[int, int, int, int]


@dataclass
class Prompts:
    """Prompts on one frame, in frame pixels: boxes (x0, y0, x1, y1) inclusive, points with 1/0 labels."""

    boxes: list[Box] = field(default_factory=list)
    points: list[tuple[int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def empty(self) -> bool:
        return not self.boxes and not self.points

    def add_box_ras(self, geometry: SliceGeometry, ras_a, ras_b) -> Box:
        box = geometry.ras_box_to_pixel_box(ras_a, ras_b)
        self.boxes.append(box)
        return box

    def add_point_ras(self, geometry: SliceGeometry, ras, positive: bool = True) -> tuple[int, int]:
        p = geometry.ras_to_pixel_int(ras)
        self.points.append(p)
        self.labels.append(1 if positive else 0)
        return p

    def clear(self) -> None:
        self.boxes.clear()
        self.points.clear()
        self.labels.clear()


@dataclass
class ViewTarget:
    """What a slice view shows of the source volume: geometry, frame and, for cine, the browser."""

    volume: object
    geometry: SliceGeometry
    cine: Cine | None

    @classmethod
    def from_view(cls, ctx: MRMLContext, volume_node, slice_to_ras, slice_offset: float | None = None):
        if volume_node is None:
            raise ValueError("no source volume: select the image to segment in the Segment Editor")
        geometry = slice_geometry(volume_node, slice_to_ras, slice_offset)
        return cls(volume_node, geometry, find_cine(ctx, volume_node))

    @property
    def is_cine(self) -> bool:
        return self.cine is not None and self.cine.num_frames > 1

    @property
    def current_index(self) -> int:
        """Frame index (cine) or slice index (3D) shown."""
        return self.cine.current_frame if self.is_cine else self.geometry.index

    def frame(self) -> np.ndarray:
        return extract_frame(self.volume, self.geometry)


def frames_for_propagation(target: ViewTarget) -> list[np.ndarray]:
    """All frames (cine) or all slices along the view axis (3D), as numpy copies for a worker."""
    if target.is_cine:
        return target.cine.frames(target.geometry)
    return target.geometry.frames_from_array(np.array(volume_array(target.volume)))


def validate_box(box, shape) -> Box:
    """A box inside the frame with x1 >= x0, y1 >= y0, or a ValueError that says what is wrong."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    h, w = shape[:2]
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {tuple(box)} is empty: x1 must be >= x0 and y1 >= y0")
    if x1 < 0 or y1 < 0 or x0 >= w or y0 >= h:
        raise ValueError(f"box {tuple(box)} is outside the {w}x{h} image: draw it on the image")
    return (max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1))


def write_propagation(
    ctx: MRMLContext,
    editor: SegmentEditor,
    target: ViewTarget,
    seg_node,
    segment_id: str,
    masks: Sequence[np.ndarray | None],
    mode: str = "add",
) -> CineEdit | int:
    """Write propagation results: 3D -> every slice in one undo state (returns slices written);
    cine -> each frame's segmentation (returns the CineEdit undo record)."""
    if target.is_cine:
        return write_cine_masks(ctx, editor, target.cine, seg_node, segment_id, target.geometry, masks, mode)
    n = target.geometry.dims[target.geometry.axis]
    if len(masks) != n:
        raise ValueError(f"{len(masks)} masks for {n} slices")
    return editor.write_slice_masks(seg_node, segment_id, target.geometry, list(masks), mode)


def run_propagation(
    ctx: MRMLContext,
    editor: SegmentEditor,
    target: ViewTarget,
    seg_node,
    segment_id: str,
    key_boxes: dict[int, list[Box]],
    propagate: Callable,
    direction: str = "both",
    progress: Callable[[float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    mode: str = "add",
):
    """Frames out, propagate, masks back in: the whole pipeline on one thread (scripts, tests).

    key_boxes: {frame or slice index: [boxes in frame pixels]}.  Returns what
    write_propagation returns, or None when cancelled (nothing is written then).
    """
    if direction not in ("both", "forward", "backward"):
        raise ValueError(f"direction '{direction}' must be 'both', 'forward' or 'backward'")
    frames = frames_for_propagation(target)
    if not key_boxes:
        raise ValueError("no key frame: draw a box on at least one frame first")
    checked = {}
    for k, boxes in key_boxes.items():
        if not 0 <= int(k) < len(frames):
            raise ValueError(f"key frame {k} is outside 0..{len(frames) - 1}")
        checked[int(k)] = [validate_box(b, frames[int(k)].shape) for b in boxes]
    masks = propagate(frames, checked, direction=direction, progress=progress, cancel=cancel)
    if cancel is not None and cancel():
        return None
    if len(masks) != len(frames):
        raise ValueError(f"propagation returned {len(masks)} masks for {len(frames)} frames")
    return write_propagation(ctx, editor, target, seg_node, segment_id, masks, mode)


def apply_frame_mask(
    editor: SegmentEditor, target: ViewTarget, seg_node, segment_id: str, mask: np.ndarray, mode: str = "add"
) -> None:
    """Write one predicted mask into the shown slice/frame (undo state saved first)."""
    index = 0 if target.is_cine else target.geometry.index
    editor.write_frame_mask(seg_node, segment_id, target.geometry, mask, index=index, mode=mode)
