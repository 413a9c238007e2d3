"""Writing 2D masks into segments through the real Segment Editor logic: slices, masking, undo."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import AXIAL, CORONAL, SAGITTAL, make_volume, mrml_context, slice_to_ras
from UniUltraSegmentLib.geometry import slice_geometry
from UniUltraSegmentLib.segments import (
    SegmentEditor,
    create_segmentation_for,
    get_or_add_segment,
    segment_array,
    segment_frame,
    write_masks,
)

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)

M = np.array([[0, 0, 2.5, 10], [-0.5, 0, 0, 3], [0, 0.8, 0, -7], [0, 0, 0, 1]], float)  # permuted, anisotropic


def _setup(ctx, orientation=CORONAL, index=3):
    arr = (np.arange(6 * 8 * 9).reshape(6, 8, 9) % 50).astype(np.int16)
    vol = make_volume(ctx, arr, M)
    n = orientation[:, 2]
    axis = int(np.argmax(np.abs(M[:3, :3].T @ n)))
    ijk = np.array([0, 0, 0, 1.0])
    ijk[axis] = index
    geom = slice_geometry(vol, slice_to_ras(orientation, n @ (M @ ijk)[:3]))
    seg = create_segmentation_for(ctx, vol)
    sid = get_or_add_segment(seg, "lesion")
    editor = SegmentEditor(ctx)
    editor.configure(seg, vol, sid)
    return arr, vol, geom, seg, sid, editor


def _box_mask(shape, box):
    m = np.zeros(shape, bool)
    x0, y0, x1, y1 = box
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, CORONAL], ids=["axial", "sagittal", "coronal"])
def test_mask_lands_on_the_shown_slice(ctx, orientation):
    arr, vol, geom, seg, sid, editor = _setup(ctx, orientation, index=2)
    h, w = geom.shape
    mask = _box_mask((h, w), (1, 0, w // 2, h - 2))
    write_masks(editor, seg, sid, geom, {geom.index: mask})
    full = segment_array(seg, sid, vol)
    assert full.sum() == mask.sum()  # nothing written elsewhere
    assert np.array_equal(geom.frame_from_array(full) > 0, mask)
    # the labelled voxels are exactly the ones whose RAS positions the mask pixels map to
    inv = np.linalg.inv(M)
    for r, c in zip(*np.nonzero(mask)):
        i, j, k = np.rint((inv @ np.array([*geom.pixel_to_ras(c, r), 1]))[:3]).astype(int)
        assert full[k, j, i] == 1


def test_boxes_union_and_each_apply_undoes(ctx):
    _, vol, geom, seg, sid, editor = _setup(ctx)
    a = _box_mask(geom.shape, (0, 0, 2, 2))
    b = _box_mask(geom.shape, (2, 2, 4, 4))
    write_masks(editor, seg, sid, geom, {geom.index: a})
    write_masks(editor, seg, sid, geom, {geom.index: b})
    assert np.array_equal(segment_frame(seg, sid, vol, geom), a | b)
    editor.undo()
    assert np.array_equal(segment_frame(seg, sid, vol, geom), a)
    editor.undo()
    assert not segment_frame(seg, sid, vol, geom).any()
    editor.redo()
    assert np.array_equal(segment_frame(seg, sid, vol, geom), a)


def test_editable_area_inside_segment_and_overwrite(ctx):
    _, vol, geom, seg, sid, editor = _setup(ctx)
    roi = get_or_add_segment(seg, "roi")
    assert get_or_add_segment(seg, "roi") == roi  # no stray duplicates
    roi_mask = _box_mask(geom.shape, (0, 0, 3, 3))
    write_masks(editor, seg, roi, geom, {geom.index: roi_mask})
    editor.set_masking("inside_segment", mask_segment_id=roi, overwrite="none")
    big = _box_mask(geom.shape, (2, 2, 6, 6))
    write_masks(editor, seg, sid, geom, {geom.index: big})
    assert np.array_equal(segment_frame(seg, sid, vol, geom), big & roi_mask)
    assert np.array_equal(segment_frame(seg, roi, vol, geom), roi_mask)  # overwrite none: roi kept
    # outside all segments: only the free pixels of `big` are taken
    editor.undo()
    editor.set_masking("outside_all", overwrite="all")
    write_masks(editor, seg, sid, geom, {geom.index: big})
    assert np.array_equal(segment_frame(seg, sid, vol, geom), big & ~roi_mask)


def test_overwrite_all_removes_from_other_segments(ctx):
    _, vol, geom, seg, sid, editor = _setup(ctx)
    other = get_or_add_segment(seg, "other")
    o = _box_mask(geom.shape, (0, 0, 3, 3))
    write_masks(editor, seg, other, geom, {geom.index: o})
    editor.set_masking("everywhere", overwrite="all")
    b = _box_mask(geom.shape, (2, 2, 5, 5))
    write_masks(editor, seg, sid, geom, {geom.index: b})
    assert np.array_equal(segment_frame(seg, other, vol, geom), o & ~b)


def test_editable_intensity_range(ctx):
    arr, vol, geom, seg, sid, editor = _setup(ctx)
    frame = geom.frame_from_array(arr)
    editor.set_masking(intensity_range=(10, 30))
    everything = np.ones(geom.shape, bool)
    write_masks(editor, seg, sid, geom, {geom.index: everything})
    assert np.array_equal(segment_frame(seg, sid, vol, geom), (frame >= 10) & (frame <= 30))


def test_replace_mode_replaces_one_slice_only(ctx):
    _, vol, geom, seg, sid, editor = _setup(ctx)
    h, w = geom.shape
    full = np.ones((h, w), bool)
    n = geom.dims[geom.axis]
    write_masks(editor, seg, sid, geom, {k: full for k in range(n)})
    small = _box_mask((h, w), (1, 1, 2, 2))
    write_masks(editor, seg, sid, geom, {geom.index: small}, "replace")
    vol_arr = segment_array(seg, sid, vol)
    for k in range(n):
        expected = small if k == geom.index else full
        assert np.array_equal(geom.frame_from_array(vol_arr, k) > 0, expected)


def test_slice_masks_are_one_undo_state(ctx):
    _, vol, geom, seg, sid, editor = _setup(ctx)
    masks = [None] * geom.dims[geom.axis]
    masks[1] = _box_mask(geom.shape, (0, 0, 1, 1))
    masks[4] = _box_mask(geom.shape, (3, 3, 5, 5))
    assert write_masks(editor, seg, sid, geom, masks) == [1, 4]
    arr = segment_array(seg, sid, vol)
    for k, m in enumerate(masks):
        assert np.array_equal(geom.frame_from_array(arr, k) > 0, m if m is not None else np.zeros(geom.shape, bool))
    editor.undo()
    assert segment_array(seg, sid, vol).sum() == 0


def test_rgb_source_volume(ctx):
    rgb = np.random.default_rng(0).integers(0, 255, (1, 12, 16, 3), dtype=np.uint8)
    vol = make_volume(ctx, rgb, np.diag([-0.3, -0.3, 1, 1.0]), rgb=True)
    geom = slice_geometry(vol, slice_to_ras(AXIAL, 0.0))
    seg = create_segmentation_for(ctx, vol)
    sid = get_or_add_segment(seg, "lesion")
    editor = SegmentEditor(ctx)
    editor.configure(seg, vol, sid)
    m = _box_mask(geom.shape, (3, 2, 10, 8))
    write_masks(editor, seg, sid, geom, {geom.index: m})
    assert np.array_equal(segment_frame(seg, sid, vol, geom), m)
