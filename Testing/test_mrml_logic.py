"""The propagation driver and prompt handling on real MRML nodes, with a stand-in engine."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import AXIAL, CORONAL, make_volume, mrml_context, slice_to_ras
from UniUltraSegmentLib.logic import Prompts, ViewTarget, apply_frame_mask, run_propagation, validate_box
from UniUltraSegmentLib.segments import (
    SegmentEditor,
    create_segmentation_for,
    get_or_add_segment,
    segment_array,
)
from UniUltraSegmentLib.sequences import cine_frame_masks, create_cine, ensure_segmentation_sequence

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)


def fake_propagate(frames, key_boxes, direction="both", progress=None, cancel=None):
    """Same call shape as uniultra.inference.propagation.propagate with a predictor bound:
    each frame gets the key box (shifted by one pixel per frame) as its mask."""
    (k, boxes), = key_boxes.items()
    x0, y0, x1, y1 = boxes[0]
    out = []
    for i, f in enumerate(frames):
        if cancel is not None and cancel():
            break
        if (direction == "forward" and i < k) or (direction == "backward" and i > k):
            out.append(None)
        else:
            m = np.zeros(f.shape[:2], bool)
            d = i - k
            m[y0 : y1 + 1, max(x0 + d, 0) : max(x1 + d + 1, 0)] = True
            out.append(m)
        if progress is not None:
            progress((i + 1) / len(frames))
    return out + [None] * (len(frames) - len(out))


def test_3d_propagation_writes_each_slice_one_undo(ctx):
    m = np.array([[0, 0, 1.5, 0], [-0.7, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 1]], float)
    vol = make_volume(ctx, np.random.default_rng(0).integers(0, 100, (10, 8, 6)).astype(np.int16), m)
    seg = create_segmentation_for(ctx, vol)
    sid = get_or_add_segment(seg, "lesion")
    editor = SegmentEditor(ctx)
    editor.configure(seg, vol, sid)
    target = ViewTarget.from_view(ctx, vol, slice_to_ras(CORONAL, 0.0 - 0.7 * 3))  # A = -0.7 i -> i = 3
    assert not target.is_cine and target.current_index == 3
    seen = []
    n = run_propagation(ctx, editor, target, seg, sid, {3: [(1, 1, 3, 4)]}, fake_propagate, "forward", seen.append)
    assert n == target.geometry.dims[target.geometry.axis] - 3
    assert seen and seen[-1] == pytest.approx(1.0)
    arr = segment_array(seg, sid, vol)
    frames = target.geometry.frames_from_array(arr)
    expected = fake_propagate(frames, {3: [(1, 1, 3, 4)]}, "forward")
    for f, e in zip(frames, expected):
        assert np.array_equal(f > 0, e if e is not None else np.zeros_like(f, bool))
    editor.undo()
    assert segment_array(seg, sid, vol).sum() == 0


def test_cine_propagation_and_cancel(ctx):
    frames = [np.full((10, 12), i, np.uint8) for i in range(6)]
    cine = create_cine(ctx, frames)
    seg, sid = ensure_segmentation_sequence(ctx, cine)
    editor = SegmentEditor(ctx)
    editor.configure(seg, cine.proxy, sid)
    cine.select(2)
    target = ViewTarget.from_view(ctx, cine.proxy, slice_to_ras(AXIAL, 0.0))
    assert target.is_cine and target.current_index == 2
    assert np.array_equal(target.frame(), frames[2])
    assert run_propagation(ctx, editor, target, seg, sid, {2: [(2, 2, 5, 5)]}, fake_propagate, cancel=lambda: True) is None
    assert sum(m.sum() for m in cine_frame_masks(cine, seg, sid, target.geometry)) == 0
    edit = run_propagation(ctx, editor, target, seg, sid, {2: [(2, 2, 5, 5)]}, fake_propagate)
    assert edit.frames_written == list(range(6))
    got = cine_frame_masks(cine, seg, sid, target.geometry)
    want = fake_propagate(frames, {2: [(2, 2, 5, 5)]})
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    edit.undo(ctx)
    assert sum(m.sum() for m in cine_frame_masks(cine, seg, sid, target.geometry)) == 0


def test_prompts_from_clicks_and_single_apply(ctx):
    img = np.zeros((1, 20, 30), np.uint8)
    vol = make_volume(ctx, img, np.diag([-0.25, -0.25, 1.0, 1.0]))
    target = ViewTarget.from_view(ctx, vol, slice_to_ras(AXIAL, 0.0))
    g = target.geometry
    pr = Prompts()
    assert pr.add_box_ras(g, g.pixel_to_ras(20, 3), g.pixel_to_ras(4, 15)) == (4, 3, 20, 15)
    pr.add_point_ras(g, g.pixel_to_ras(7, 8) + 0.05, positive=False)
    assert pr.points == [(7, 8)] and pr.labels == [0]
    seg = create_segmentation_for(ctx, vol)
    sid = get_or_add_segment(seg, "lesion")
    editor = SegmentEditor(ctx)
    editor.configure(seg, vol, sid)
    mask = np.zeros((20, 30), bool)
    mask[3:16, 4:21] = True
    apply_frame_mask(editor, target, seg, sid, mask)
    assert np.array_equal(segment_array(seg, sid, vol)[0] > 0, mask)


def test_errors_speak_to_the_user(ctx):
    with pytest.raises(ValueError, match="empty"):
        validate_box((400, 20, 380, 90), (100, 500))
    with pytest.raises(ValueError, match="outside"):
        validate_box((600, 20, 700, 90), (100, 500))
    assert validate_box((-5, -5, 10, 1000), (100, 500)) == (0, 0, 10, 99)
    with pytest.raises(ValueError, match="source volume"):
        ViewTarget.from_view(ctx, None, np.eye(4))
