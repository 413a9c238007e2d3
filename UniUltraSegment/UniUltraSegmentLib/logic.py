"""UniUltraSegment logic (no Qt): what a slice view shows, frames for the engine, box checks.

The interaction itself (prompts, preview, apply, undo, propagation) is
`UniUltraSegmentLib.controller.InteractionController`, which the Segment Editor effect and the
tests drive alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .context import MRMLContext, create_context, slicer_app_context  # noqa: F401  (re-exported)
from .errors import InputError, finite_numbers, require_image
from .geometry import SliceGeometry, extract_frame, slice_geometry, volume_array
from .sequences import Cine, find_cine

Box = tuple[int, int, int, int]


@dataclass
class ViewTarget:
    """What a slice view shows of the source volume: geometry, and for a cine the browser and
    the frame shown *when the target was made* (scrubbing later does not change it)."""

    volume: object
    geometry: SliceGeometry
    cine: Cine | None
    frame_index: int = 0

    @classmethod
    def from_view(cls, ctx: MRMLContext, volume_node, slice_to_ras, slice_offset: float | None = None):
        if volume_node is None:
            raise InputError("no source volume: select the image to segment in the Segment Editor")
        require_image(volume_node, "source volume")
        geometry = slice_geometry(volume_node, slice_to_ras, slice_offset)
        cine = find_cine(ctx, volume_node)
        frame = cine.current_frame if cine is not None and cine.num_frames > 1 else 0
        return cls(volume_node, geometry, cine, frame)

    @property
    def is_cine(self) -> bool:
        return self.cine is not None and self.cine.num_frames > 1

    @property
    def current_index(self) -> int:
        """Frame index (cine, as recorded) or slice index (3D) this target is about."""
        return self.frame_index if self.is_cine else self.geometry.index

    def frame(self, index: int | None = None) -> np.ndarray:
        """The image of frame/slice `index` (default: this target's), as a numpy copy."""
        index = self.current_index if index is None else int(index)
        if self.is_cine:
            return self.geometry.frame_from_array(volume_array(self.cine.sequence.GetNthDataNode(index)), 0)
        return extract_frame(self.volume, self.geometry, index)

    @property
    def count(self) -> int:
        """Frames (cine) or slices along the view axis (3D)."""
        return self.cine.num_frames if self.is_cine else self.geometry.dims[self.geometry.axis]


def validate_box(box, shape) -> Box:
    """A box inside the frame with x1 >= x0, y1 >= y0, or an InputError that says what is wrong."""
    x0, y0, x1, y1 = (int(round(v)) for v in finite_numbers(box, 4, "box"))
    h, w = shape[:2]
    if x1 < x0 or y1 < y0:
        raise InputError(f"box {tuple(box)} is empty: x1 must be >= x0 and y1 >= y0")
    if x1 < 0 or y1 < 0 or x0 >= w or y0 >= h:
        raise InputError(f"box {tuple(box)} is outside the {w}x{h} image: draw it on the image")
    return (max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1))
