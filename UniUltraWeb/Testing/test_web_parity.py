"""Without a browser: the web event path and the desktop controller path write identical segments.

Web: synthetic interactor events on trame-slicer's real slice view (display pixels -> XYToRAS ->
UniUltraEffect pipeline -> InteractionController -> WebWriter on trame-slicer's editor logic).
Desktop: the same controller driven as the desktop effect drives it, written through
`segments.SegmentEditor`.  Same files, same loaders, same prompts (frame pixels), same engine;
the segments must match voxel for voxel, and the web undo/redo must restore them.
"""

from __future__ import annotations

import numpy as np
import pytest
from web_harness import DesktopPath, StandInEngine, WebHarness

BOX = ((192, 86), (237, 114))  # around the BUSI benign_001 lesion (mask bbox 197,92 - 231,108)


def _nrrd_volume(tmp_path):
    """A 7-slice volume written as NRRD with spacing (0.8, 0.6, 2), an origin and flipped axes."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    arr = (rng.random((7, 40, 50)) * 200).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.6, 2.0))
    img.SetOrigin((12.0, -7.5, 30.0))
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = tmp_path / "vol.nrrd"
    sitk.WriteImage(img, str(path))
    return path


def test_2d_box_point_apply_undo_redo_identical(busi_image):
    engine = StandInEngine()
    web = WebHarness(engine)
    web.open(busi_image)
    desk = DesktopPath(busi_image, engine, web.slice_to_ras())
    web.drag(*BOX)
    desk.drag(*BOX)
    assert web.session.controller.prompts() == desk.controller.prompts()
    assert web.session.controller.prompts()[0].value == (192, 86, 237, 114)
    web.click((250, 100))
    desk.click((250, 100))
    assert web.session.controller.prompts() == desk.controller.prompts()
    assert np.array_equal(web.session.controller.preview_mask(), desk.controller.preview_mask())
    assert not web.segment().any()  # a preview, not a write
    web.session.apply()
    desk.controller.apply()
    a, b = web.segment(), desk.segment()
    assert a.sum() == (237 - 192 + 1) * (114 - 86 + 1) + 9 and np.array_equal(a, b)
    # undo / redo of the apply (web: py-undo-stack; desktop: the editor logic's history)
    web.session.undo()
    desk.editor.undo()
    assert not web.segment().any() and not desk.segment().any()
    web.session.redo()
    desk.editor.redo()
    assert np.array_equal(web.segment(), a) and np.array_equal(desk.segment(), b)


def test_prompt_undo_redo_and_negative_points(busi_image):
    engine = StandInEngine()
    web = WebHarness(engine)
    web.open(busi_image)
    web.drag(*BOX)
    box_only = web.session.controller.preview_mask().copy()
    web.session.set_negative(True)
    web.click((200, 90))
    assert web.session.controller.prompts()[-1].label == 0
    assert not web.session.controller.preview_mask()[90, 200]
    web.session.undo_prompt()
    assert np.array_equal(web.session.controller.preview_mask(), box_only)
    web.session.redo_prompt()
    assert len(web.session.controller.prompts()) == 2 and not web.session.controller.preview_mask()[90, 200]
    # a click is not a box: under 3 display pixels of movement
    assert web.session.controller.prompts()[0].kind == "box"


def test_3d_volume_slice_identical(tmp_path):
    path = _nrrd_volume(tmp_path)
    engine = StandInEngine()
    web = WebHarness(engine)
    loaded = web.open(path)
    assert loaded.kind == "volume" and web.session.frame_count() == 7
    web.session.set_frame(4)
    assert web.session.current_frame() == 4
    desk = DesktopPath(path, engine, web.slice_to_ras())
    assert desk.geometry().index == 4
    web.drag((5, 6), (30, 25))
    desk.drag((5, 6), (30, 25))
    assert web.session.controller.prompts() == desk.controller.prompts()
    assert np.array_equal(engine.calls[0][0], engine.calls[1][0])  # the same slice went to the engine
    web.session.apply()
    desk.controller.apply()
    a, b = web.segment(), desk.segment()
    per_slice = a.reshape(a.shape[0], -1).sum(1)
    assert per_slice[4] == 26 * 20 and per_slice.sum() == per_slice[4]
    assert np.array_equal(a, b)
    web.session.undo()
    assert not web.segment().any()


def test_cine_frame_and_propagation_identical(echo_dicom):
    engine = StandInEngine()
    web = WebHarness(engine)
    loaded = web.open(echo_dicom)
    assert loaded.kind == "cine" and web.session.frame_count() == 10
    web.session.set_frame(3)
    desk = DesktopPath(echo_dicom, engine, web.slice_to_ras())
    desk.loaded.cine.select(3)
    web.drag((60, 50), (120, 110))
    desk.drag((60, 50), (120, 110))
    assert web.session.controller.prompts() == desk.controller.prompts()
    assert web.session.controller.prompts()[0].frame == 3
    web.session.apply()
    desk.controller.apply()
    wa, da = web.cine_masks(), desk.cine_masks()
    assert [int(m.sum()) for m in wa] == [0, 0, 0, 61 * 61, 0, 0, 0, 0, 0, 0]
    assert all(np.array_equal(x, y) for x, y in zip(wa, da))
    # correct: a new box on frame 3, propagate through all frames
    web.drag((62, 52), (118, 108))
    desk.drag((62, 52), (118, 108))
    fractions = []
    reply = web.session.propagate("both", fractions.append)
    desk.controller.propagate("both")
    assert not reply.error and fractions[-1] == 1.0
    wp, dp = web.cine_masks(), desk.cine_masks()
    assert all(m.any() for m in wp)
    assert all(np.array_equal(x, y) for x, y in zip(wp, dp))
    # one undo step takes the propagation back to the state after the first apply; redo again
    web.session.undo()
    assert all(np.array_equal(x, y) for x, y in zip(web.cine_masks(), wa))
    web.session.redo()
    assert all(np.array_equal(x, y) for x, y in zip(web.cine_masks(), wp))


@pytest.mark.parametrize("area,overwrite", [("outside_all", "all"), ("everywhere", "none"), ("inside_all", "all")])
def test_masking_modes_identical(busi_image, area, overwrite):
    engine = StandInEngine()
    web = WebHarness(engine)
    web.open(busi_image)
    desk = DesktopPath(busi_image, engine, web.slice_to_ras())
    # segment "lesion" gets a first box; then "other" is written with the masking under test
    web.drag((180, 80), (220, 110))
    desk.drag((180, 80), (220, 110))
    web.session.apply()
    desk.controller.apply()
    web.session.add_segment("other")
    desk.select("other")
    web.session.set_masking(area, overwrite)
    desk.editor.set_masking(area, overwrite=overwrite)
    web.drag((200, 90), (260, 120))
    desk.drag((200, 90), (260, 120))
    web.session.apply()
    desk.controller.apply()
    for name in ("lesion", "other"):
        assert np.array_equal(web.segment(name), desk.segment(name)), name
    other = web.segment("other")
    if area == "outside_all":
        assert other.any() and not (other & web.segment("lesion")).any()
    if area == "inside_all":
        assert other.any() and other.sum() < (61 * 31)


def test_bundled_model_through_the_web_path(busi_image):
    """The real bundled model: the web path's mask equals the desktop path's and covers the lesion."""
    pytest.importorskip("torch")
    from PIL import Image
    from UniUltraSegmentLib.engine import PredictorEngine, load_predictor

    engine = PredictorEngine(load_predictor("uniultra-mini-us", "cpu"))
    web = WebHarness(engine)
    web.open(busi_image)
    desk = DesktopPath(busi_image, engine, web.slice_to_ras())
    web.drag(*BOX)
    desk.drag(*BOX)
    web.session.apply()
    desk.controller.apply()
    a, b = web.segment()[0] > 0, desk.segment()[0] > 0
    assert np.array_equal(a, b)
    truth = np.array(Image.open(str(busi_image).replace("images", "masks"))) > 0
    mask = web.geometry().frame_from_array(web.segment(), 0) > 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.6, dice


def test_propagation_on_a_worker_thread_stops_and_writes_nothing(echo_dicom):
    """The app's propagation: begin on the loop's thread, run on a worker, Stop, finish: nothing written."""
    import threading

    class SlowEngine(StandInEngine):
        def propagate(self, frames, key_boxes, direction="both", progress=None, cancel=None):
            for i in range(len(frames)):
                if cancel():
                    return [None] * len(frames)
                progress((i + 1) / len(frames))
                stepped.set()
                go.wait(5)
            return super().propagate(frames, key_boxes, direction, None, cancel)

    stepped, go = threading.Event(), threading.Event()
    web = WebHarness(SlowEngine())
    web.open(echo_dicom)
    web.drag((60, 50), (120, 110))
    job = web.session.begin_propagation("both")
    assert web.session.controller.busy
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("masks", job.run(lambda f: None)))
    worker.start()
    assert stepped.wait(10)
    web.drag((10, 10), (40, 40))  # events are refused while it runs
    assert len(web.session.controller.prompts()) == 1
    web.session.controller.cancel()  # the Stop button
    go.set()
    worker.join(10)
    reply = web.session.finish_propagation(job, result["masks"])
    assert "nothing was written" in reply.status
    assert not any(m.any() for m in web.cine_masks())
    assert not web.session.undo_stack.can_undo() and not web.session.controller.busy


def test_export_png_and_seg_nrrd_round_trip(busi_image, tmp_path):
    """Export: the PNG mask is the segment; the saved .seg.nrrd loads back with the same voxels."""
    from PIL import Image
    from UniUltraSegmentLib.context import create_context
    from UniUltraSegmentLib.segments import segment_array
    from UniUltraSegmentLib.sequences import load_segmentation

    web = WebHarness(StandInEngine())
    web.open(busi_image)
    web.drag(*BOX)
    web.session.apply()
    seg = web.segment()
    (png,) = web.session.export_masks(tmp_path / "png")
    assert np.array_equal(np.asarray(Image.open(png)) > 0, web.geometry().frame_from_array(seg, 0) > 0)
    (nrrd,) = web.session.save_segmentation(tmp_path / "seg")
    assert nrrd.name.endswith(".seg.nrrd")
    ctx = create_context()
    back = load_segmentation(ctx, nrrd)
    sid = back.GetSegmentation().GetSegmentIdBySegmentName("lesion")
    assert np.array_equal(segment_array(back, sid, web.session.loaded.volume), seg)
