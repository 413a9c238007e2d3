"""The one exception the Slicer logic raises for bad input: :class:`InputError` (the engine's
``uniultra.errors.InputError``, a ``ValueError``), with one line a dialog can show as it is.

The module widgets and the effect catch it (``slicer.util.tryWithErrorDisplay`` shows the text);
anything else escaping the logic is a bug.  The helpers check what a caller hands over: MRML
node types, non-empty volumes, finite numbers, output folders.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from uniultra.errors import InputError

__all__ = ["InputError", "require_node", "require_image", "finite_numbers", "output_folder"]

_FRIENDLY = {
    "vtkMRMLVolumeNode": "a volume",
    "vtkMRMLScalarVolumeNode": "an image volume",
    "vtkMRMLSegmentationNode": "a segmentation",
    "vtkMRMLSequenceNode": "a sequence",
}


def require_node(node, class_name: str, what: str):
    """``node`` when it is a ``class_name`` (or a subclass); otherwise InputError naming ``what``."""
    if node is None:
        raise InputError(f"no {what}: select {_FRIENDLY.get(class_name, class_name)} first")
    if not (hasattr(node, "IsA") and node.IsA(class_name)):
        kind = node.GetClassName() if hasattr(node, "GetClassName") else type(node).__name__
        name = node.GetName() if hasattr(node, "GetName") else str(node)
        raise InputError(f"{what}: '{name}' is a {kind}, not {_FRIENDLY.get(class_name, class_name)}")
    return node


def require_image(node, what: str = "the image to segment"):
    """An image volume node that holds voxels."""
    require_node(node, "vtkMRMLScalarVolumeNode", what)
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None or 0 in image.GetDimensions():
        raise InputError(f"{what}: volume '{node.GetName()}' has no image data; load an image first")
    return node


def finite_numbers(values, count: int, what: str) -> list[float]:
    """``count`` finite numbers, or one line saying what is wrong with ``what``."""
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"{what} {values!r}: give {count} numbers") from None
    if len(vals) != count:
        raise InputError(f"{what} {tuple(values)}: give {count} numbers, not {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise InputError(f"{what} {tuple(values)}: give finite numbers (not NaN or infinity)")
    return vals


def output_folder(folder, what: str = "export folder") -> Path:
    """A folder files can be written into (made when missing)."""
    if folder is None or str(folder) == "":
        raise InputError(f"no {what}: choose a folder")
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {p} is a file, not a folder; choose a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{what} {p} cannot be made ({e.strerror or e}); choose another folder") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f"{what} {p}: no permission to write there; choose another folder")
    return p
