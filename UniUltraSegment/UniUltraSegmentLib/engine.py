"""Thin, Qt-free bridge to the `uniultra` engine: lazy imports, numpy in, numpy out.

Nothing here touches an MRML node or a Qt object.  `PredictorEngine` is the object the
interaction controller calls (controller.Engine).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence

import numpy as np


def _add_source_tree_engine() -> None:
    """Running from a source checkout: the engine package sits two folders up; make it importable."""
    if importlib.util.find_spec("uniultra") is None:
        from pathlib import Path

        root = Path(__file__).resolve().parents[2]
        if (root / "uniultra" / "__init__.py").exists() and str(root) not in sys.path:
            sys.path.append(str(root))


def _default_model() -> str:
    _add_source_tree_engine()
    try:
        from uniultra.registry import DEFAULT_MODEL as name  # torch-free
    except ImportError:  # the engine is not installed: the module panel says what to install
        return ""
    return name


DEFAULT_MODEL = _default_model()


def missing_dependencies() -> list[str]:
    """Python packages the engine needs that are not importable (checked without importing them)."""
    _add_source_tree_engine()
    needed = {"torch": "torch", "sam2": "sam2", "uniultra": "uniultra", "SimpleITK": "SimpleITK"}
    return [pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None]


def load_predictor(model: str = DEFAULT_MODEL, device: str = "cpu"):
    """A `uniultra.inference.Predictor` for a registry name or a checkpoint path."""
    _add_source_tree_engine()
    from uniultra.inference import Predictor

    if model.endswith((".pt", ".pth", ".ckpt")):
        from uniultra.models import build_model

        return Predictor(build_model(model, device=device), device)
    return Predictor.from_name(model, device=device)


def predict_mask(
    predictor,
    image: np.ndarray,
    boxes: Sequence[tuple[int, int, int, int]] = (),
    points: Sequence[tuple[int, int]] = (),
    labels: Sequence[int] = (),
    refine: bool = False,
) -> np.ndarray:
    """One (H, W) bool mask for the prompts on `image`: the union of the per-box masks."""
    predictor.set_image(image)
    result = predictor.predict(
        boxes=list(boxes) or None, points=list(points) or None, labels=list(labels) or None, refine=refine
    )
    masks = np.asarray(result.masks, bool)
    if masks.ndim == 2:
        return masks
    return masks.any(axis=0) if len(masks) else np.zeros(image.shape[:2], bool)


def make_propagate(predictor) -> Callable:
    """`propagate(frames, key_boxes, direction=, progress=, cancel=)` with the predictor bound.

    Adapts the engine to the logic layer: the engine reports progress as (done, total) and
    raises `Cancelled`; the logic layer takes a fraction in [0, 1] and checks `cancel()` itself
    after the call (nothing is written when it is true).
    """
    from uniultra.errors import Cancelled
    from uniultra.inference.propagation import propagate

    def run(frames, key_boxes, direction="both", progress=None, cancel=None):
        report = None if progress is None else (lambda done, total: progress(done / max(total, 1)))
        try:
            return propagate(predictor, frames, key_boxes, direction=direction, progress=report, cancel=cancel)
        except Cancelled:
            return [None] * len(frames)

    return run


class PredictorEngine:
    """The controller's Engine over a loaded `uniultra` Predictor."""

    def __init__(self, predictor):
        self.predictor = predictor
        self._propagate = make_propagate(predictor)

    def predict(self, image, boxes, points, labels) -> np.ndarray:
        return predict_mask(self.predictor, image, boxes, points, labels)

    def propagate(self, frames, key_boxes, direction="both", progress=None, cancel=None):
        return self._propagate(frames, key_boxes, direction=direction, progress=progress, cancel=cancel)
