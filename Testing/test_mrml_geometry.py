"""Slice geometry against real MRML volume nodes: every orientation, flips, anisotropy, 2D, RGB."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from mrml_fixtures import AXIAL, CORONAL, SAGITTAL, make_volume, mrml_context, rotation, slice_to_ras
from UniUltraSegmentLib.geometry import extract_frame, slice_geometry

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)

DIMS = (7, 5, 4)  # I, J, K: all different so that a wrong axis shows


def _unique_volume(ctx, ijk_to_ras, rgb=False):
    i, j, k = DIMS
    arr = np.arange(i * j * k, dtype=np.int32).reshape(k, j, i)
    if rgb:
        arr = np.stack([arr, arr + 1000, arr + 2000], -1).astype(np.int32)
    return arr, make_volume(ctx, arr, ijk_to_ras, rgb=rgb)


def _check_pixel_exact(vol_arr, geom, frame, s2r, ijk_to_ras):
    """Every frame pixel is the voxel whose centre lies at pixel_to_ras, on the view plane, on-screen oriented."""
    inv = np.linalg.inv(ijk_to_ras)
    h, w = frame.shape[:2]
    n = s2r[:3, 2] / np.linalg.norm(s2r[:3, 2])
    offset = n @ s2r[:3, 3]
    step_k = abs(n @ ijk_to_ras[:3, geom.axis])
    for r, c in itertools.product(range(h), range(w)):
        ras = geom.pixel_to_ras(c, r)
        ijk = np.rint((inv @ np.array([*ras, 1]))[:3]).astype(int)
        assert np.array_equal(frame[r, c], vol_arr[ijk[2], ijk[1], ijk[0]])
        assert abs(n @ ras - offset) <= step_k / 2 + 1e-6  # the voxel is the one the plane cuts
        assert np.allclose(geom.ras_to_pixel(ras), (c, r))
    if w > 1:
        dx = geom.pixel_to_ras(1, 0) - geom.pixel_to_ras(0, 0)
        assert dx @ s2r[:3, 0] > 0  # columns run left to right on screen
    if h > 1:
        dy = geom.pixel_to_ras(0, 1) - geom.pixel_to_ras(0, 0)
        assert dy @ s2r[:3, 1] < 0  # rows run top to bottom on screen


def _direction_matrices():
    """Permutations with flips, and anisotropic spacing and an offset origin."""
    spacing = np.array([0.3, 0.7, 2.5])
    for perm in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]:
        for signs in [(1, 1, 1), (-1, -1, 1), (1, -1, -1)]:
            d = np.zeros((3, 3))
            for col, row in enumerate(perm):
                d[row, col] = signs[col]
            m = np.eye(4)
            m[:3, :3] = d * spacing
            m[:3, 3] = (12.5, -3.0, 40.25)
            yield m


@pytest.mark.parametrize("ijk_to_ras", list(_direction_matrices()))
@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal"])
def test_every_orientation_pixel_exact(ctx, ijk_to_ras, orientation):
    rot = {"axial": AXIAL, "sagittal": SAGITTAL, "coronal": CORONAL}[orientation]
    arr, vol = _unique_volume(ctx, ijk_to_ras)
    n = rot[:, 2]
    # put the plane through voxel centres of each slice along the aligned axis (plus a small drift)
    axis = int(np.argmax(np.abs(ijk_to_ras[:3, :3].T @ n)))
    for k in range(DIMS[axis]):
        ijk = np.array([0.0, 0.0, 0.0, 1.0])
        ijk[axis] = k
        centre = ijk_to_ras @ ijk
        drift = 0.3 * abs(n @ ijk_to_ras[:3, axis])
        s2r = slice_to_ras(rot, n @ centre[:3] + drift, in_plane=(3.0, -2.0))
        geom = slice_geometry(vol, s2r)
        assert geom.axis == axis and geom.index == k
        frame = extract_frame(vol, geom)
        assert frame.shape == geom.shape
        _check_pixel_exact(arr, geom, frame, s2r, ijk_to_ras)
        # the slice offset argument overrides the matrix translation
        assert slice_geometry(vol, slice_to_ras(rot, 0.0), n @ centre[:3]).index == k


def test_oblique_volume_and_view(ctx):
    r = rotation((1, 2, 0.5), 27.0)
    m = np.eye(4)
    m[:3, :3] = r @ np.diag([0.4, 0.9, 1.7])
    m[:3, 3] = (5, 6, 7)
    arr, vol = _unique_volume(ctx, m)
    with pytest.raises(ValueError, match="oblique"):
        slice_geometry(vol, slice_to_ras(AXIAL, 0.0))
    # a view rotated to the volume plane (Slicer's "Rotate to volume plane") is fine
    view = np.column_stack([r[:, 0], -r[:, 1], r[:, 2]])
    view = view if np.linalg.det(view) > 0 else np.column_stack([r[:, 0], -r[:, 1], -r[:, 2]])
    centre = m @ np.array([0, 0, 2, 1.0])
    s2r = slice_to_ras(view, view[:, 2] @ centre[:3])
    geom = slice_geometry(vol, s2r)
    assert geom.axis == 2 and geom.index == 2
    _check_pixel_exact(arr, geom, extract_frame(vol, geom), s2r, m)


def test_rgb_vector_volume(ctx):
    m = np.diag([-0.2, -0.2, 1.0, 1.0])
    arr, vol = _unique_volume(ctx, m, rgb=True)
    s2r = slice_to_ras(AXIAL, (m @ np.array([0, 0, 1, 1.0]))[2])
    geom = slice_geometry(vol, s2r)
    frame = extract_frame(vol, geom)
    assert frame.shape == (DIMS[1], DIMS[0], 3)
    _check_pixel_exact(arr, geom, frame, s2r, m)


def test_2d_image_upright_in_axial_view(ctx):
    """A PNG loaded by Slicer (LPS, single slice) reads back exactly as the original image."""
    img = np.arange(6 * 9, dtype=np.uint8).reshape(1, 6, 9)
    vol = make_volume(ctx, img)
    geom = slice_geometry(vol, slice_to_ras(AXIAL, 0.2))
    assert geom.index == 0 and not geom.col_flip and not geom.row_flip
    assert np.array_equal(extract_frame(vol, geom), img[0])
    # clicks: RAS of pixel (4, 2) maps back to (4, 2); a drag gives an inclusive box
    a, b = geom.pixel_to_ras(4, 2), geom.pixel_to_ras(1, 5)
    assert geom.ras_to_pixel_int(a) == (4, 2)
    assert geom.ras_box_to_pixel_box(a, b) == (1, 2, 4, 5)
    with pytest.raises(ValueError, match="edge-on"):
        slice_geometry(vol, slice_to_ras(SAGITTAL, 0.0))


def test_slice_outside_volume(ctx):
    _, vol = _unique_volume(ctx, np.eye(4))
    with pytest.raises(ValueError, match="outside"):
        slice_geometry(vol, slice_to_ras(AXIAL, 50.0))


def test_real_slice_node_presets(ctx):
    """Matrices from real vtkMRMLSliceNode presets, offset set with SetSliceOffset."""
    import slicer

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(ctx.scene)
    sn = ctx.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    m = np.diag([0.5, 0.8, 1.5, 1.0])
    arr, vol = _unique_volume(ctx, m)
    for name, axis in [("Axial", 2), ("Sagittal", 0), ("Coronal", 1)]:
        assert sn.SetOrientation(name)
        sn.SetSliceOffset(1.5 if axis == 2 else 0.8 if axis == 1 else -1.0)  # sagittal normal is -R
        geom = slice_geometry(vol, sn.GetSliceToRAS(), sn.GetSliceOffset())
        assert geom.axis == axis
        assert geom.index == {2: 1, 1: 1, 0: 2}[axis]
        s2r = np.array([[sn.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
        _check_pixel_exact(arr, geom, extract_frame(vol, geom), s2r, m)
