"""Predictor (every prompt kind, embedding cache, any image type), propagation, ONNX parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniultra.data.io import read_image
from uniultra.errors import Cancelled, InputError
from uniultra.inference import Predictor, propagate
from uniultra.inference.onnx_export import PARITY_TOLERANCE, OnnxPredictor, export_onnx
from uniultra.inference.propagation import expand_box
from uniultra.models import build_model

SIZE = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("uniultra-student-e8", image_size=SIZE)


@pytest.fixture(scope="module")
def busi_image(data_root):
    return read_image(data_root / "busi" / "images" / "benign_001.png")


def test_every_prompt_kind_on_a_real_image(model, busi_image):
    p = Predictor(model, "cpu")
    p.set_image(busi_image)
    h, w = busi_image.shape[:2]
    one = p.predict(boxes=[(118, 58, 272, 171)])
    assert one.masks.shape == (1, h, w) and one.masks.dtype == bool and one.scores.shape == (1,)
    two = p.predict(boxes=[(10, 10, 100, 100), (150, 60, 300, 200)])
    assert two.masks.shape == (2, h, w) and two.mask.shape == (h, w)
    pts = p.predict(points=[(190, 110), (20, 20)], labels=[1, 0])
    assert pts.masks.shape == (1, h, w)
    both = p.predict(boxes=[(118, 58, 272, 171)], points=[(190, 110)], labels=[0])
    refined = p.predict(boxes=[(118, 58, 272, 171)], refine=True)
    assert both.masks.shape == refined.masks.shape == (1, h, w)
    # points go to the box that holds them: a negative click in box 2 leaves box 1 unchanged
    moved = p.predict(boxes=[(10, 10, 100, 100), (150, 60, 300, 200)], points=[(200, 100)], labels=[0])
    assert np.array_equal(moved.masks[0], two.masks[0])


def test_embedding_is_cached(model, busi_image, monkeypatch):
    p = Predictor(model, "cpu")
    p.set_image(busi_image)
    calls = []
    monkeypatch.setattr(model, "encode", lambda *a, **k: calls.append(1))
    p.predict(boxes=[(118, 58, 272, 171)])
    p.predict(points=[(190, 110)], labels=[1])
    assert calls == []


@pytest.mark.parametrize("kind", ["uint8", "uint16", "float", "rgb", "rgba", "negative"])
def test_any_image_type(model, busi_image, kind):
    """Every dtype reaches the model as the same picture: grey-as-colour is the uint8 image itself;
    16-bit, float and negative data (linear maps of the image with offsets, so a dtype-range or
    clip-to-[0, 1] scaling would change the contrast) scale like the image's own percentile window."""
    g = busi_image.astype(np.float64)
    image = {
        "uint8": busi_image,
        "uint16": (g * 200 + 5000).astype(np.uint16),
        "float": (g / 255.0 * 0.5 + 0.25).astype(np.float32),
        "rgb": np.repeat(busi_image[..., None], 3, axis=2),
        "rgba": np.concatenate([np.repeat(busi_image[..., None], 3, 2), np.full((*g.shape, 1), 255, np.uint8)], 2),
        "negative": (g - 1000.0),
    }[kind]
    p = Predictor(model, "cpu")
    p.set_image(image)
    m = p.predict(boxes=[(118, 58, 272, 171)]).masks
    assert m.shape == (1, *busi_image.shape[:2])
    ref = Predictor(model, "cpu")
    ref.set_image(busi_image if kind in ("uint8", "rgb", "rgba") else g)  # g: float64, percentile-scaled
    assert torch.allclose(p._emb["image_embed"], ref._emb["image_embed"], atol=1e-4)  # the same model input
    assert np.mean(m == ref.predict(boxes=[(118, 58, 272, 171)]).masks) > 0.999


def test_mirror_tta_averages_the_image_and_its_mirror(model, busi_image):
    """TTA logits = mean of the plain answer and the flipped-back answer on the mirrored image
    with mirrored prompts; and TTA is exactly equivariant to mirroring the input."""
    h, w = busi_image.shape[:2]
    box, pt = (118, 58, 272, 171), (190, 110)
    mbox, mpt = (w - 1 - box[2], box[1], w - 1 - box[0], box[3]), (w - 1 - pt[0], pt[1])
    mirror = np.ascontiguousarray(busi_image[:, ::-1])
    plain, tta = Predictor(model, "cpu"), Predictor(model, "cpu", tta=True)
    plain.set_image(busi_image)
    a = plain.predict(boxes=[box], points=[pt], labels=[0])
    plain.set_image(mirror)
    b = plain.predict(boxes=[mbox], points=[mpt], labels=[0])
    tta.set_image(busi_image)
    t = tta.predict(boxes=[box], points=[pt], labels=[0])
    expected = (a.low_res_logits + b.low_res_logits.flip(-1)) / 2
    assert torch.allclose(t.low_res_logits, expected, atol=1e-4)
    assert not torch.allclose(t.low_res_logits, a.low_res_logits, atol=1e-3)  # the mirror did contribute
    tta.set_image(mirror)
    tm = tta.predict(boxes=[mbox], points=[mpt], labels=[0])
    assert torch.allclose(tm.low_res_logits.flip(-1), t.low_res_logits, atol=1e-4)
    assert t.masks.shape == (1, h, w)
    refined = tta.predict(boxes=[mbox], refine=True)  # the mask prompt is mirrored too
    assert refined.masks.shape == (1, h, w)


def test_bad_prompts_are_clear(model, busi_image):
    p = Predictor(model, "cpu")
    p.set_image(busi_image)
    # corners in either order are one box
    assert (p.predict(boxes=[(400, 90, 380, 20)]).masks == p.predict(boxes=[(380, 20, 400, 90)]).masks).all()
    with pytest.raises(InputError, match="outside"):
        p.predict(boxes=[(1000, 1000, 1100, 1100)])
    with pytest.raises(InputError, match="point"):
        p.predict(points=[(5000, 3)], labels=[1])
    with pytest.raises(InputError, match="label"):
        p.predict(points=[(5, 3)], labels=[2])
    with pytest.raises(InputError, match="no prompt"):
        p.predict()
    with pytest.raises(InputError, match="shape"):
        p.set_image(np.zeros((4, 4, 4, 4)))
    with pytest.raises(InputError, match="NaN"):
        p.set_image(np.full((8, 8), np.nan))
    # a box that only reaches past the border is clipped, not refused
    assert p.predict(boxes=[(-20, -20, 50, 50)]).masks.shape[0] == 1


def test_propagation_on_a_carotid_clip(model, data_root):
    import csv

    rows = [r for r in csv.DictReader(open(data_root / "carotid" / "split.csv")) if r["split"] == "test"]
    clip = rows[0]["clip"]
    ids = [r["id"] for r in rows if r["clip"] == clip][:6]
    frames = [read_image(data_root / "carotid" / "images" / f"{i}.png") for i in ids]
    gt = read_image(data_root / "carotid" / "masks" / f"{ids[2]}.png") > 0
    ys, xs = np.nonzero(gt)
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    p = Predictor(model, "cpu")
    seen = []
    masks = propagate(p, frames, {2: [box]}, progress=lambda d, t: seen.append((d, t)),
                      min_area_ratio=0.0)
    assert len(masks) == len(frames) and masks[2] is not None
    assert seen[-1][0] == seen[-1][1] == len(frames)
    fwd = propagate(p, frames, {2: [box]}, direction="forward", min_area_ratio=0.0)
    assert fwd[0] is None and fwd[1] is None
    with pytest.raises(Cancelled):
        propagate(p, frames, {2: [box]}, cancel=lambda: True)
    with pytest.raises(InputError, match="key frame 9"):
        propagate(p, frames, {9: [box]})


def test_propagation_stops_when_the_object_is_lost():
    """A stand-in predictor whose object vanishes on frame 3: later frames stay empty."""

    class Vanishing:
        def __init__(self):
            self.i = 0

        def set_image(self, image):
            self.frame = int(image[0, 0])

        def predict(self, boxes):
            from uniultra.inference.predictor import Prediction

            m = np.zeros((1, 20, 20), bool)
            if self.frame < 3:
                m[0, 5:10, 5:10] = True
            return Prediction(m.repeat(len(boxes), 0), np.ones(len(boxes)), None)

    frames = [np.full((20, 20), i, np.uint8) for i in range(6)]
    out = propagate(Vanishing(), frames, {0: [(5, 5, 9, 9)]}, direction="forward")
    assert [m is not None for m in out] == [True, True, True, False, False, False]


def test_expand_box_stays_inside():
    assert expand_box((0, 0, 9, 9), (20, 20), 0.5) == (0, 0, 14, 14)  # 5 px each side, clipped at 0
    assert expand_box((10, 10, 19, 19), (22, 30), 0.5) == (5, 5, 24, 21)


def test_onnx_parity(model, busi_image, tmp_path):
    enc, dec = export_onnx(model, tmp_path / "m.onnx")
    assert enc.is_file() and dec.is_file() and not list(tmp_path.glob(".*tmp"))
    o = OnnxPredictor(enc, SIZE)
    o.set_image(busi_image)
    p = Predictor(model, "cpu")
    p.set_image(busi_image)
    for kw in ({"box": (118, 58, 272, 171)}, {"box": (118, 58, 272, 171), "points": [(190, 110)], "labels": [0]},
               {"points": [(190, 110), (30, 30)], "labels": [1, 0]}):
        logits, score = o.predict_logits(**kw)
        ref = p.predict(boxes=[kw["box"]] if "box" in kw else None, points=kw.get("points"), labels=kw.get("labels"))
        assert np.abs(logits - ref.low_res_logits.numpy()).max() < PARITY_TOLERANCE
        assert abs(score - float(ref.scores[0])) < PARITY_TOLERANCE


def test_onnx_export_leaves_the_model_as_it_was(tmp_path):
    """A model with BatchNorm (the cnn-branch's ResNet) in eval mode: the export left it in
    training mode (torch.onnx.export restored its wrapper's mode), so its embeddings changed by
    about 7 after an export; now the mode is kept and the ONNX encoder matches the model."""
    import onnxruntime as ort

    torch.manual_seed(0)
    m = build_model("sam2.1-hiera-tiny", image_size=64, random_init=True, peft="cnn-branch",
                    peft_options={"depth": 18}).eval()
    with torch.no_grad():
        for conv in m.sam.image_encoder.trunk.cnn_branch.proj.values():
            conv.weight.normal_(0, 0.05)
        x = torch.randn(1, 3, 64, 64)
        before = m.encode(x)["image_embed"]
        enc, _ = export_onnx(m, tmp_path / "m.onnx")
        assert not m.training and not any(mod.training for mod in m.modules())
        assert torch.equal(m.encode(x)["image_embed"], before)
    onnx = ort.InferenceSession(str(enc)).run(None, {"image": x.numpy()})[0]
    assert np.abs(onnx - before.numpy()).max() < PARITY_TOLERANCE
    m.train()
    export_onnx(m, tmp_path / "again.onnx")
    assert m.training  # a model in training mode stays in it


def test_memory_propagation_runs_from_numpy_frames():
    """SAM2's video predictor path on in-memory frames (random weights: mechanics only)."""
    from uniultra.inference import propagate_memory

    torch.manual_seed(0)
    m = build_model("sam2.1-hiera-tiny", image_size=64, random_init=True)
    p = Predictor(m, "cpu")
    frames = [np.random.default_rng(i).integers(0, 255, (40, 56), dtype=np.uint8) for i in range(4)]
    with pytest.raises(InputError, match="untrained memory"):
        propagate_memory(p, frames, {1: [(5, 5, 30, 30)]})
    m.memory_trained = True
    seen = []
    out = propagate_memory(p, frames, {1: [(5, 5, 30, 30)]}, progress=lambda d, t: seen.append((d, t)))
    assert len(out) == 4 and all(o is not None and o.shape == (40, 56) and o.any() for o in out)
    assert seen[-1] == (5, 5)  # frames 1..3 forward, then 1..0 backward
    p.set_image(frames[1])
    assert np.mean(out[1] == p.predict(boxes=[(5, 5, 30, 30)]).masks[0]) > 0.95  # the box lands where it was drawn
    from uniultra.models.video import VideoPredictor

    assert type(m.sam) is VideoPredictor  # built as sam2's video predictor (Hydra _target_), never swapped
