"""The Slicer logic driving the real engine (a small random model) on real MRML nodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mrml_fixtures import AXIAL, make_volume, mrml_context, slice_to_ras
from UniUltraSegmentLib.engine import load_predictor, make_propagate, predict_mask
from UniUltraSegmentLib.logic import ViewTarget, apply_frame_mask, run_propagation
from UniUltraSegmentLib.segments import (
    SegmentEditor,
    create_segmentation_for,
    get_or_add_segment,
    segment_array,
)

from uniultra.models import build_model, save_checkpoint

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "tiny.pt"
    save_checkpoint(build_model("uniultra-student-e8", image_size=64), path)
    return str(path)


def test_effect_pipeline_with_the_engine(ctx, ckpt):
    rng = np.random.default_rng(0)
    vol = make_volume(ctx, rng.integers(0, 255, (5, 40, 48)).astype(np.uint8), np.diag([-0.3, -0.3, 2.0, 1.0]))
    seg = create_segmentation_for(ctx, vol)
    sid = get_or_add_segment(seg, "lesion")
    editor = SegmentEditor(ctx)
    editor.configure(seg, vol, sid)
    target = ViewTarget.from_view(ctx, vol, slice_to_ras(AXIAL, 2 * 2.0))
    assert target.current_index == 2
    predictor = load_predictor(ckpt, "cpu")
    mask = predict_mask(predictor, target.frame(), boxes=[(5, 5, 30, 25)])
    assert mask.shape == (40, 48) and mask.dtype == bool
    apply_frame_mask(editor, target, seg, sid, mask)
    assert np.array_equal(segment_array(seg, sid, vol)[2] > 0, mask)
    editor.undo()
    assert segment_array(seg, sid, vol).sum() == 0
    seen = []
    run_propagation(ctx, editor, target, seg, sid, {2: [(5, 5, 30, 25)]}, make_propagate(predictor),
                    progress=seen.append)
    assert seen and seen[-1] == pytest.approx(1.0) and all(0 <= s <= 1 for s in seen)
    assert (segment_array(seg, sid, vol)[2] > 0).any() or not mask.any()
    assert run_propagation(ctx, editor, target, seg, sid, {2: [(5, 5, 30, 25)]}, make_propagate(predictor),
                           cancel=lambda: True) is None
