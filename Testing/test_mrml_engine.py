"""The interaction controller driving the real engine (a small random model) on real MRML nodes."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import AXIAL, make_volume, mrml_context, slice_to_ras
from UniUltraSegmentLib.controller import InteractionController, ViewEvent
from UniUltraSegmentLib.engine import PredictorEngine, load_predictor
from UniUltraSegmentLib.geometry import slice_geometry
from UniUltraSegmentLib.segments import (
    SegmentEditor,
    create_segmentation_for,
    get_or_add_segment,
    segment_array,
)

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)


def test_effect_pipeline_with_the_engine(ctx, ckpt):
    """The controller the effect runs, with the real engine (a small random model) behind it."""
    rng = np.random.default_rng(0)
    vol = make_volume(ctx, rng.integers(0, 255, (5, 40, 48)).astype(np.uint8), np.diag([-0.3, -0.3, 2.0, 1.0]))
    seg = create_segmentation_for(ctx, vol)
    sid = get_or_add_segment(seg, "lesion")
    editor = SegmentEditor(ctx)
    editor.configure(seg, vol, sid)
    engine = PredictorEngine(load_predictor(ckpt, "cpu"))
    c = InteractionController(ctx, editor.node, editor, lambda: engine)
    s2r = slice_to_ras(AXIAL, 2 * 2.0)
    g = slice_geometry(vol, s2r)
    assert g.index == 2
    c.press(ViewEvent("Red", s2r, None, tuple(g.pixel_to_ras(5, 5)), (0, 0)))
    r = c.release(ViewEvent("Red", s2r, None, tuple(g.pixel_to_ras(30, 25)), (50, 40)))
    assert not r.error, r.status
    mask = c.preview_mask()
    assert mask.shape == (40, 48) and mask.dtype == bool
    assert 0 < mask.sum() < mask.size  # a real answer to check the writes against (fixed seed)
    c.apply()
    assert np.array_equal(segment_array(seg, sid, vol)[2] > 0, mask)
    editor.undo()
    assert segment_array(seg, sid, vol).sum() == 0
    c.press(ViewEvent("Red", s2r, None, tuple(g.pixel_to_ras(5, 5)), (0, 0)))
    c.release(ViewEvent("Red", s2r, None, tuple(g.pixel_to_ras(30, 25)), (50, 40)))
    seen = []
    r = c.propagate(progress=seen.append)
    assert not r.error, r.status
    assert seen and seen[-1] == pytest.approx(1.0) and all(0 <= x <= 1 for x in seen)
    written = segment_array(seg, sid, vol) > 0
    assert np.array_equal(written[2], mask)  # the prompt's slice gets the answer the preview showed
    assert [k for k in range(5) if written[k].any()] != [2]  # ... and propagation wrote other slices
    c.close()
