"""Shared helpers for the MRML tests (real slicer-core, no fake slicer module).

Import with `from mrml_fixtures import ...`; `mrml_context` (a fixture generator) gives a fresh scene with the
application, Segmentations and Sequences logics registered.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "UniUltraSegment") not in sys.path:
    sys.path.insert(0, str(REPO / "UniUltraSegment"))

import slicer  # noqa: E402,F401  (slicer-core from PyPI: the real MRML core; a missing install must fail, not skip)
import vtk  # noqa: E402
from UniUltraSegmentLib.context import create_context  # noqa: E402
from UniUltraSegmentLib.geometry import numpy_to_vtk_matrix, volume_node  # noqa: E402

DATA = Path(os.environ["UNIULTRA_DATA"]) if os.environ.get("UNIULTRA_DATA") else REPO.parent / "shared" / "data"

# Slicer's slice orientation presets (SliceToRAS rotation part)
AXIAL = np.array([[-1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
SAGITTAL = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], float)
CORONAL = np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], float)


def mrml_context():
    """Generator for a `ctx` fixture: each test file defines
    `ctx = pytest.fixture(mrml_context)` (importing a fixture by name would trip ruff's F811)."""
    vtk.vtkObject.GlobalWarningDisplayOff()
    c = create_context()
    yield c
    c.scene.Clear(1)


np_to_vtk_matrix = numpy_to_vtk_matrix


def make_volume(ctx, arr: np.ndarray, ijk_to_ras: np.ndarray | None = None, name: str = "vol", rgb: bool = False):
    """Scalar (K, J, I) or RGB vector (K, J, I, 3) volume node from a numpy array, in the scene
    (built by the module's own ``volume_node``; default geometry: how Slicer loads a 2D image)."""
    node = volume_node(arr, ijk_to_ras, name, rgb=rgb)
    ctx.scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def slice_to_ras(rotation: np.ndarray, offset: float, in_plane=(0.0, 0.0)) -> np.ndarray:
    """A SliceToRAS matrix with the given orientation whose plane is at `offset` along the normal."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = rotation[:, 2] * offset + rotation[:, 0] * in_plane[0] + rotation[:, 1] * in_plane[1]
    return m


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def read_segment_labelmap(seg_node, index: int):
    """Segment ``index`` of a segmentation node as Slicer holds it: its ``vtkOrientedImageData``
    labelmap and that labelmap's voxels as a ``[k, j, i]`` array over the labelmap's extent."""
    from vtk.util import numpy_support

    lm = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        seg_node, seg_node.GetSegmentation().GetNthSegmentID(index), lm)
    e = lm.GetExtent()
    arr = numpy_support.vtk_to_numpy(lm.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    return lm, arr


def read_file_into(ctx, node, storage, path):
    """``node`` filled from ``path`` by ``storage`` (both added to the scene first, as Slicer's
    readers do); fails the test when the file does not read."""
    ctx.scene.AddNode(node)
    ctx.scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    return node
