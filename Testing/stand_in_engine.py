"""A deterministic stand-in for the engine, with its call shapes (numpy only): used by the
desktop controller tests (`test_mrml_logic.py`) and the web parity tests
(`UniUltraWeb/Testing/web_harness.py`), so both test the two front ends against one model."""

from __future__ import annotations

import numpy as np


class StandInEngine:
    """Mask = union of the boxes, a 3x3 square at each positive point, minus each negative
    point's pixel; propagation shifts the first key box one pixel right per frame, in the
    direction asked for (frames on the other side of the key frame get None)."""

    def __init__(self):
        self.calls = []  # (image, boxes, points, labels) of each predict

    @property
    def images(self) -> list[np.ndarray]:
        return [c[0] for c in self.calls]

    def predict(self, image, boxes, points, labels):
        self.calls.append((np.array(image), list(boxes), list(points), list(labels)))
        m = np.zeros(image.shape[:2], bool)
        for x0, y0, x1, y1 in boxes:
            m[y0 : y1 + 1, x0 : x1 + 1] = True
        for (x, y), lab in zip(points, labels):
            if lab:
                m[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = True
        for (x, y), lab in zip(points, labels):
            if not lab:
                m[y, x] = False
        return m

    def propagate(self, frames, key_boxes, direction="both", progress=None, cancel=None):
        (k, boxes), = sorted(key_boxes.items())[:1]
        x0, y0, x1, y1 = boxes[0]
        out = []
        for i, f in enumerate(frames):
            if cancel is not None and cancel():
                return [None] * len(frames)
            if (direction == "forward" and i < k) or (direction == "backward" and i > k):
                out.append(None)
            else:
                m = np.zeros(f.shape[:2], bool)
                d = i - k
                m[y0 : y1 + 1, max(x0 + d, 0) : max(x1 + d + 1, 0)] = True
                out.append(m)
            if progress is not None:
                progress((i + 1) / len(frames))
        return out
