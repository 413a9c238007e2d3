"""The interaction controller the effect runs, driven by plain events on real MRML nodes.

The effect (SegmentEditorUniUltraLib/SegmentEditorEffect.py) turns PythonQt/VTK events into exactly
these calls (press/move/release/key, apply, undo_prompt, propagate); here the writer is the
`vtkSlicerSegmentEditorLogic` route, which is what `scriptedEffect.modifySegmentByLabelmap` calls
in Slicer >= 5.10.  The engine is a stand-in with the engine's call shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import AXIAL, CORONAL, SAGITTAL, make_volume, mrml_context, slice_to_ras
from stand_in_engine import StandInEngine
from UniUltraSegmentLib.controller import PREVIEW_NAME, InteractionController, ViewEvent
from UniUltraSegmentLib.geometry import slice_geometry
from UniUltraSegmentLib.logic import ViewTarget, validate_box
from UniUltraSegmentLib.segments import (
    SegmentEditor,
    create_segmentation_for,
    get_or_add_segment,
    segment_array,
)
from UniUltraSegmentLib.sequences import cine_frame_masks, create_cine, ensure_segmentation_sequence

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)
_controllers = []


@pytest.fixture(autouse=True)
def _close_controllers():
    yield
    while _controllers:
        _controllers.pop().close()  # what the effect's cleanup() does


def _setup(ctx, vol, segment="lesion"):
    seg = create_segmentation_for(ctx, vol)
    sid = get_or_add_segment(seg, segment)
    editor = SegmentEditor(ctx)
    editor.configure(seg, vol, sid)
    engine = StandInEngine()
    asked = []

    def confirm(question):
        asked.append(question)
        return True

    c = InteractionController(ctx, editor.node, editor, lambda: engine, confirm)
    c.asked = asked
    _controllers.append(c)
    c.engine = engine
    return seg, sid, editor, c


def _event(geom, s2r, col, row, view="Red", xy=None):
    return ViewEvent(view, s2r, None, tuple(geom.pixel_to_ras(col, row)), xy)


def drag(c, geom, s2r, a, b, view="Red"):
    """A left-button drag from pixel a to pixel b (display xy far apart)."""
    c.press(_event(geom, s2r, *a, view, (0, 0)))
    assert c.move(_event(geom, s2r, *b, view, (40, 30))).rubber_band == ((0, 0), (40, 30))
    return c.release(_event(geom, s2r, *b, view, (40, 30)))


def click(c, geom, s2r, p, view="Red"):
    c.press(_event(geom, s2r, *p, view, (10, 10)))
    return c.release(_event(geom, s2r, *p, view, (11, 10)))


def test_2d_grey_box_point_preview_apply_undo(ctx):
    img = np.arange(20 * 30, dtype=np.uint16).reshape(1, 20, 30) % 200
    vol = make_volume(ctx, img, np.diag([-0.25, -0.25, 1.0, 1.0]))
    seg, sid, editor, c = _setup(ctx, vol)
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(vol, s2r)
    r = drag(c, g, s2r, (20, 3), (4, 15))
    assert r.handled and not r.error and c.prompts()[0].value == (4, 3, 20, 15)
    assert np.array_equal(c.engine.images[-1], g.frame_from_array(img))
    box = c.preview_mask().copy()
    # a click is a positive point; 'n' makes the next click negative; 'x' removes the last prompt
    click(c, g, s2r, (25, 10))
    assert c.prompts()[-1].kind == "point" and c.prompts()[-1].label == 1
    assert c.preview_mask()[10, 25] and c.preview_mask().sum() > box.sum()
    assert c.key("n").handled and c.negative_mode
    click(c, g, s2r, (5, 5))
    assert c.prompts()[-1].label == 0 and not c.preview_mask()[5, 5]
    assert c.key("x").handled and len(c.prompts()) == 2
    assert c.key("x").handled and np.array_equal(c.preview_mask(), box)
    # modifier keys stay Slicer's (Shift+drag pans, Shift+move moves the crosshair)
    assert not c.press(_event(g, s2r, 1, 1), shift=True).handled
    # the preview exists, is hidden from editors, and is not saved with the scene
    preview = ctx.scene.GetFirstNodeByName(PREVIEW_NAME)
    assert preview is not None and not preview.GetSaveWithScene()
    ctx.scene.SetSaveToXMLString(1)
    ctx.scene.Commit()
    assert PREVIEW_NAME not in ctx.scene.GetSceneXMLString()
    # Enter applies: one undo step, the preview goes away
    r = c.key("Return")
    assert r.handled and not r.error
    assert np.array_equal(segment_array(seg, sid, vol)[0] > 0, box)
    assert ctx.scene.GetFirstNodeByName(PREVIEW_NAME) is None and not c.has_prompts
    editor.undo()
    assert segment_array(seg, sid, vol).sum() == 0


def test_rgb_image(ctx):
    rgb = np.random.default_rng(1).integers(0, 255, (1, 12, 16, 3), dtype=np.uint8)
    vol = make_volume(ctx, rgb, np.diag([-0.3, -0.3, 1.0, 1.0]), rgb=True)
    seg, sid, editor, c = _setup(ctx, vol)
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(vol, s2r)
    drag(c, g, s2r, (2, 2), (9, 7))
    assert c.engine.images[-1].shape == (12, 16, 3)
    assert np.array_equal(c.engine.images[-1], g.frame_from_array(rgb))
    c.apply()
    want = np.zeros((12, 16), bool)
    want[2:8, 2:10] = True
    assert np.array_equal(g.frame_from_array(segment_array(seg, sid, vol)) > 0, want)


M3D = np.array([[0, 0, 1.5, 0], [-0.7, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 1]], float)  # permuted axes


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, CORONAL], ids=["axial", "sagittal", "coronal"])
def test_3d_volume_every_orientation(ctx, orientation):
    arr = np.random.default_rng(0).integers(0, 100, (10, 8, 6)).astype(np.int16)
    vol = make_volume(ctx, arr, M3D)
    seg, sid, editor, c = _setup(ctx, vol)
    n = orientation[:, 2]
    axis = int(np.argmax(np.abs(M3D[:3, :3].T @ n)))
    ijk = np.array([0, 0, 0, 1.0])
    ijk[axis] = 2
    s2r = slice_to_ras(orientation, n @ (M3D @ ijk)[:3])
    g = slice_geometry(vol, s2r)
    assert g.index == 2
    h, w = g.shape
    drag(c, g, s2r, (0, 0), (w // 2, h // 2))
    assert np.array_equal(c.engine.images[-1], g.frame_from_array(arr, 2))
    c.apply()
    full = segment_array(seg, sid, vol)
    expected = np.zeros((h, w), bool)
    expected[: h // 2 + 1, : w // 2 + 1] = True
    assert np.array_equal(g.frame_from_array(full, 2) > 0, expected) and full.sum() == expected.sum()


def test_cine_prompt_then_scrub_then_apply_writes_the_prompts_frame(ctx):
    frames = [np.full((10, 12), 10 * i, np.uint8) for i in range(6)]
    cine = create_cine(ctx, frames)
    seg, sid, editor, c = _setup(ctx, cine.proxy)
    get_or_add_segment(seg, "existing")
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(cine.proxy, s2r)
    cine.select(2)
    drag(c, g, s2r, (2, 2), (5, 5))
    assert c.prompts()[0].frame == 2 and c.engine.images[-1][0, 0] == 20
    preview_pixels = lambda: segment_array(c.preview_node, "preview", cine.proxy).sum()  # noqa: E731
    assert preview_pixels() == 16
    cine.select(4)  # scrub away before applying: the preview shows frame 4's (none)
    assert preview_pixels() == 0
    cine.select(2)
    assert preview_pixels() == 16
    cine.select(4)
    target_now = ViewTarget.from_view(ctx, cine.proxy, s2r)
    assert target_now.current_index == 4  # a new target sees the new frame; the prompt keeps its own
    r = c.apply()
    assert not r.error, r.status
    assert len(c.asked) == 1 and "every existing segment" in c.asked[0]  # explicit, confirmed conversion
    assert cine.current_frame == 4  # the user's frame is shown again
    masks = cine_frame_masks(cine, seg, sid, g)
    want = np.zeros((10, 12), bool)
    want[2:6, 2:6] = True
    assert np.array_equal(masks[2], want) and sum(m.sum() for m in masks) == want.sum()
    # per-apply undo of a cine write
    assert c.undo_cine_write().handled
    assert sum(m.sum() for m in cine_frame_masks(cine, seg, sid, g)) == 0
    # the existing segment survived the conversion on every frame
    assert all(seg.GetSegmentation().GetSegmentIdBySegmentName("existing") for _ in range(1))
    seq = cine.browser.GetSequenceNode(seg)
    assert all(seq.GetNthDataNode(i).GetSegmentation().GetSegmentIdBySegmentName("existing")
               for i in range(seq.GetNumberOfDataNodes()))


def test_declined_conversion_writes_nothing(ctx):
    cine = create_cine(ctx, [np.zeros((8, 8), np.uint8)] * 3)
    seg, sid, editor, c = _setup(ctx, cine.proxy)
    c.confirm = lambda q: False
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(cine.proxy, s2r)
    drag(c, g, s2r, (1, 1), (4, 4))
    r = c.apply()
    assert r.error and cine.browser.GetSequenceNode(seg) is None
    assert segment_array(seg, sid, cine.proxy).sum() == 0


def test_masking_modes_apply_to_the_effects_writes(ctx):
    arr = (np.arange(12 * 16).reshape(1, 12, 16) % 40).astype(np.int16)
    vol = make_volume(ctx, arr)
    seg, sid, editor, c = _setup(ctx, vol)
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(vol, s2r)
    frame = g.frame_from_array(arr)
    editor.set_masking(intensity_range=(10, 30))
    drag(c, g, s2r, (0, 0), (15, 11))
    c.apply()
    assert np.array_equal(g.frame_from_array(segment_array(seg, sid, vol)) > 0, (frame >= 10) & (frame <= 30))
    editor.undo()
    roi = get_or_add_segment(seg, "roi")
    editor.node.SetSelectedSegmentID(roi)
    drag(c, g, s2r, (0, 0), (5, 5))
    c.apply()
    editor.node.SetSelectedSegmentID(sid)
    editor.set_masking("inside_segment", mask_segment_id=roi, overwrite="none")
    drag(c, g, s2r, (3, 3), (10, 10))
    c.apply()
    got = g.frame_from_array(segment_array(seg, sid, vol)) > 0
    want = np.zeros_like(got)
    want[3:6, 3:6] = True
    assert np.array_equal(got, want & (frame >= 10) & (frame <= 30))


def test_oversampled_segmentation_geometry(ctx):
    """Modifier labelmaps are resampled into the segmentation's own (here 2x finer) geometry:
    with the intensity range on, Slicer's ModifySegmentByLabelmap drops any other geometry."""
    arr = (np.arange(10 * 12).reshape(1, 10, 12) % 50).astype(np.int16)
    vol = make_volume(ctx, arr, np.diag([-1.0, -1.0, 1.0, 1.0]))
    seg, sid, editor, c = _setup(ctx, vol)
    fine = make_volume(ctx, np.zeros((1, 20, 24), np.int16), np.array(
        [[-0.5, 0, 0, 0.25], [0, -0.5, 0, 0.25], [0, 0, 1, 0], [0, 0, 0, 1.0]]), name="fine")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(fine)
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(vol, s2r)
    editor.set_masking(intensity_range=(0, 1000))
    drag(c, g, s2r, (2, 2), (6, 5))
    c.apply()
    got = g.frame_from_array(segment_array(seg, sid, vol)) > 0
    assert got[2:6, 2:7].all() and got.sum() == 4 * 5


def test_3d_propagation_replaces_covered_slices_one_undo_and_captured_target(ctx):
    arr = np.random.default_rng(0).integers(0, 100, (10, 8, 6)).astype(np.int16)
    vol = make_volume(ctx, arr, M3D)
    seg, sid, editor, c = _setup(ctx, vol)
    other = get_or_add_segment(seg, "other")
    s2r = slice_to_ras(CORONAL, -0.7 * 3)  # A = -0.7 i -> i = 3
    g = slice_geometry(vol, s2r)
    assert g.index == 3
    drag(c, g, s2r, (1, 1), (3, 4))
    seen, pumped = [], []

    def pump():  # the effect's slicer.app.processEvents(): the user picks another segment meanwhile
        pumped.append(1)
        editor.node.SetSelectedSegmentID(other)

    r = c.propagate("forward", seen.append, pump)
    assert not r.error, r.status
    assert seen[-1] == pytest.approx(1.0) and len(pumped) == g.dims[g.axis]
    assert segment_array(seg, other, vol).sum() == 0  # written to the segment captured at the first prompt
    full = segment_array(seg, sid, vol)
    frames = g.frames_from_array(full)
    expected = c.engine.propagate(frames, {3: [(1, 1, 3, 4)]}, "forward")
    for f, e in zip(frames, expected):
        assert np.array_equal(f > 0, e if e is not None else np.zeros_like(f, bool))
    editor.undo()
    assert segment_array(seg, sid, vol).sum() == 0


def test_cine_repropagation_replaces_only_covered_frames_and_cancel(ctx):
    frames = [np.full((10, 12), i, np.uint8) for i in range(6)]
    cine = create_cine(ctx, frames)
    seg, sid, editor, c = _setup(ctx, cine.proxy)
    seg, sid = ensure_segmentation_sequence(ctx, cine, seg, "lesion")
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(cine.proxy, s2r)
    cine.select(2)
    drag(c, g, s2r, (2, 2), (5, 5))
    # Stop pressed during the run: nothing written
    r = c.propagate(pump=c.cancel)
    assert "nothing was written" in r.status
    assert sum(m.sum() for m in cine_frame_masks(cine, seg, sid, g)) == 0
    r = c.propagate()
    assert not r.error, r.status
    first = cine_frame_masks(cine, seg, sid, g)
    assert all(m.any() for m in first)
    # a correction on frame 4, propagated forward: frames 0-3 keep the first run's masks
    cine.select(4)
    drag(c, g, s2r, (6, 1), (9, 3))
    r = c.propagate("forward")
    assert not r.error, r.status
    second = cine_frame_masks(cine, seg, sid, g)
    for i in range(4):
        assert np.array_equal(second[i], first[i])
    for i in (4, 5):
        want = np.zeros((10, 12), bool)
        want[1:4, 6 + i - 4 : 10 + i - 4] = True
        assert np.array_equal(second[i], want)
    assert c.undo_cine_write().handled
    assert all(np.array_equal(a, b) for a, b in zip(cine_frame_masks(cine, seg, sid, g), first))


def test_preview_removed_on_cancel_source_change_scene_close(ctx):
    vol = make_volume(ctx, np.zeros((1, 8, 8), np.uint8))
    seg, sid, editor, c = _setup(ctx, vol)
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(vol, s2r)
    drag(c, g, s2r, (1, 1), (4, 4))
    assert ctx.scene.GetFirstNodeByName(PREVIEW_NAME) is not None
    c.reset()
    assert ctx.scene.GetFirstNodeByName(PREVIEW_NAME) is None and not c.has_prompts
    drag(c, g, s2r, (1, 1), (4, 4))
    other = make_volume(ctx, np.zeros((1, 8, 8), np.uint8), name="other")
    editor.node.SetAndObserveSourceVolumeNode(other)
    c.source_changed()
    assert ctx.scene.GetFirstNodeByName(PREVIEW_NAME) is None and not c.has_prompts
    editor.node.SetAndObserveSourceVolumeNode(vol)
    drag(c, g, s2r, (1, 1), (4, 4))
    ctx.scene.Clear(0)
    assert c.session is None and c.preview_node is None
    c.close()


def test_errors_speak_to_the_user(ctx):
    with pytest.raises(ValueError, match="empty"):
        validate_box((400, 20, 380, 90), (100, 500))
    with pytest.raises(ValueError, match="outside"):
        validate_box((600, 20, 700, 90), (100, 500))
    assert validate_box((-5, -5, 10, 1000), (100, 500)) == (0, 0, 10, 99)
    with pytest.raises(ValueError, match="source volume"):
        ViewTarget.from_view(ctx, None, np.eye(4))
    vol = make_volume(ctx, np.zeros((1, 8, 8), np.uint8))
    seg, sid, editor, c = _setup(ctx, vol)
    c.get_engine = lambda: None
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(vol, s2r)
    r = drag(c, g, s2r, (1, 1), (4, 4))
    assert r.error and "not available" in r.status and not c.has_prompts


def test_transformed_volume_prompts_land_where_they_are_shown(ctx):
    """A volume under a linear transform is shown (and prompted) in world coordinates; the mask
    goes where the user drew it, in the untransformed segmentation's own grid."""
    import slicer
    from mrml_fixtures import np_to_vtk_matrix

    arr = (np.arange(10 * 12).reshape(1, 10, 12) % 50).astype(np.int16)
    vol = make_volume(ctx, arr, np.diag([-1.0, -1.0, 1.0, 1.0]))
    seg, sid, editor, c = _setup(ctx, vol)
    transform = slicer.vtkMRMLLinearTransformNode()
    ctx.scene.AddNode(transform)
    shift = np.eye(4)
    shift[0, 3] = -2.0  # 2 mm to the right (R = -i): the image is shown 2 columns further along i
    transform.SetMatrixTransformToParent(np_to_vtk_matrix(shift))
    vol.SetAndObserveTransformNodeID(transform.GetID())
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(vol, s2r)
    drag(c, g, s2r, (2, 3), (5, 6))
    assert np.array_equal(c.engine.images[-1], g.frame_from_array(arr))  # the shown pixels went to the model
    c.apply()
    got = segment_array(seg, sid, vol)[0] > 0  # on the untransformed grid
    want = np.zeros((10, 12), bool)
    want[3:7, 4:8] = True
    assert np.array_equal(got, want)


def test_rubber_band_draws_the_dragged_box():
    """The rectangle both effects (desktop and web) draw while a box is dragged."""
    from UniUltraSegmentLib.rubber_band import RubberBand

    band = RubberBand(line_width=3)
    assert not band.actor.GetVisibility() and band.hide() is False
    band.show((10, 20), (40, 5))
    pts = [band.poly.GetPoints().GetPoint(i)[:2] for i in range(5)]
    assert pts == [(10, 20), (40, 20), (40, 5), (10, 5), (10, 20)]
    assert band.poly.GetNumberOfLines() == 1 and band.poly.GetLines().GetNumberOfConnectivityIds() == 5
    assert band.actor.GetVisibility() and band.actor.GetProperty().GetLineWidth() == 3
    assert band.hide() is True and not band.actor.GetVisibility() and band.hide() is False
