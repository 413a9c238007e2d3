"""The box-shape prior (uniultra/models/prior.py): the ellipse inscribed in each box, weighted by
the model's ``box_prior``, added to the decoder's logits wherever the model is used.

Checked here: the prior is the evaluation's ellipse baseline (a prior that dominates gives that
baseline's mask through the Predictor, on a non-square image); it is added to box rows only and
exactly; it travels with the checkpoint; the ONNX decoder applies it too; training with
``--box-prior`` stores it and resume refuses another weight; bad weights get one-line errors.
A second weight for round boxes (``--box-prior W,R``) ramps from R at 2:1 to W at 3:1, in the
PyTorch decoder, the ONNX decoder, checkpoints, training and ``uniultra info``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import make_dataset

from uniultra.errors import InputError
from uniultra.evaluation.metrics import baseline_mask, dice
from uniultra.inference import Predictor
from uniultra.models import build_model, save_checkpoint
from uniultra.models.prior import (
    box_from_points,
    box_weights,
    check_weight,
    ellipse_prior,
    parse_prior,
    prior_spec,
)
from uniultra.training.trainer import TrainConfig, train

SIZE = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("uniultra-student-e8", image_size=SIZE).eval()


def test_a_dominant_prior_gives_the_ellipse_baseline(model):
    """With a weight far above the decoder's logits, the Predictor's mask is the ellipse that the
    evaluation's baseline draws in the same box, on a non-square image (x and y scale apart)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 160), dtype=np.uint8)
    model.box_prior = 1e4
    try:
        p = Predictor(model, "cpu")
        p.set_image(image)
        for box in [(20, 10, 140, 60), (100, 40, 130, 85), (5, 5, 40, 80)]:
            m = p.predict(boxes=[box]).masks[0]
            assert dice(m, baseline_mask([box], image.shape, "ellipse")) > 0.93, box
        model.box_prior = 0.0
        free = p.predict(boxes=[(20, 10, 140, 60)]).masks[0]
        assert dice(free, baseline_mask([(20, 10, 140, 60)], image.shape, "ellipse")) < 0.9
    finally:
        model.box_prior = 0.0


def test_prior_is_added_exactly_to_box_rows_only(model):
    emb = model.encode(torch.randn(1, 3, SIZE, SIZE))
    boxes = torch.tensor([[4.0, 8.0, 40.0, 30.0], [10.0, 10.0, 60.0, 62.0]])
    pts, lab = torch.tensor([[[20.0, 20.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        base, iou0 = model.decode(emb, boxes)
        pbase, _ = model.decode(emb, None, pts, lab)
        model.box_prior = 3.0
        try:
            withp, iou1 = model.decode(emb, boxes)
            pwith, _ = model.decode(emb, None, pts, lab)
        finally:
            model.box_prior = 0.0
    prior = ellipse_prior(boxes, base.shape[-2:], SIZE)
    assert torch.allclose(withp - base, 3.0 * prior, atol=1e-5)
    assert torch.equal(iou0, iou1)
    assert torch.equal(pbase, pwith)  # points alone: no box, no prior
    # the map: 1 - r, centre high, outside the box at -1, zero on the inscribed ellipse
    p = ellipse_prior(torch.tensor([[0.0, 0.0, 64.0, 32.0]]), (16, 16), 64)[0, 0]
    assert p[3:5, 7:9].min() > 0.8 and p[12:, :].max() == -1.0 and (p > 0).sum() == pytest.approx(np.pi * 8 * 4, rel=0.2)


def test_checkpoint_keeps_the_prior(model, tmp_path):
    model.box_prior = 2.5
    try:
        save_checkpoint(model, tmp_path / "p.pt")
    finally:
        model.box_prior = 0.0
    save_checkpoint(model, tmp_path / "none.pt")
    assert build_model(str(tmp_path / "p.pt")).box_prior == 2.5
    assert build_model(str(tmp_path / "none.pt")).box_prior == 0.0
    ck = torch.load(tmp_path / "none.pt", map_location="cpu", weights_only=False)
    assert "box_prior" not in ck["uniultra"]
    ck["uniultra"]["box_prior"] = -1
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="box_prior"):
        build_model(str(tmp_path / "bad.pt"))


def test_round_boxes_get_the_round_weight_long_ones_the_plain_one(model):
    # aspect 1, 2 (either way round), 2.5, 3 and 10 in model space
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 40.0, 20.0], [5.0, 5.0, 25.0, 45.0],
                          [0.0, 0.0, 50.0, 20.0], [0.0, 0.0, 60.0, 20.0], [0.0, 0.0, 60.0, 6.0]])
    assert box_weights(boxes, 8.0, 16.0).tolist() == pytest.approx([16, 16, 16, 12, 8, 8])
    assert box_weights(boxes, 8.0, 8.0).tolist() == pytest.approx([8] * 6)
    emb = model.encode(torch.randn(1, 3, SIZE, SIZE))
    two = torch.tensor([[4.0, 8.0, 40.0, 30.0], [2.0, 20.0, 62.0, 30.0]])  # 1.6:1 and 6:1
    with torch.no_grad():
        base, _ = model.decode(emb, two)
        model.box_prior, model.box_prior_round = 3.0, 5.0
        try:
            withp, _ = model.decode(emb, two)
            half, _ = model.decode(emb, two, prior_scale=0.5)
        finally:
            model.box_prior, model.box_prior_round = 0.0, None
    prior = ellipse_prior(two, base.shape[-2:], SIZE)
    assert torch.allclose(withp[0] - base[0], 5.0 * prior[0], atol=1e-5)
    assert torch.allclose(withp[1] - base[1], 3.0 * prior[1], atol=1e-5)
    assert torch.allclose(half - base, (withp - base) / 2, atol=1e-5)


@pytest.mark.parametrize("spec, want", [(8, (8.0, None)), ("8", (8.0, None)), ("8,16", (8.0, 16.0)),
                                        (" 8 , 16 ", (8.0, 16.0)), ([8, 0], (8.0, 0.0)), ("0", (0.0, None))])
def test_prior_specs_parse(spec, want):
    assert parse_prior(spec) == want


@pytest.mark.parametrize("bad", ["8,16,3", "8,", "a,b", "8,-1", "", [], "8;16"])
def test_bad_prior_specs_are_refused(bad):
    with pytest.raises(InputError, match="--box-prior"):
        parse_prior(bad)


def test_round_weight_travels_with_the_checkpoint_and_info(model, tmp_path, capsys):
    from uniultra.cli import main

    model.box_prior, model.box_prior_round = 8.0, 16.0
    try:
        save_checkpoint(model, tmp_path / "r.pt")
    finally:
        model.box_prior, model.box_prior_round = 0.0, None
    m = build_model(str(tmp_path / "r.pt"))
    assert (m.box_prior, m.box_prior_round, prior_spec(m)) == (8.0, 16.0, "8,16")
    assert main(["info", str(tmp_path / "r.pt")]) == 0
    assert "16 for boxes up to 2:1, ramping to 8 at 3:1" in capsys.readouterr().out
    save_checkpoint(model, tmp_path / "plain.pt")
    assert build_model(str(tmp_path / "plain.pt")).box_prior_round is None
    assert main(["info", str(tmp_path / "plain.pt")]) == 0
    assert "box prior" not in capsys.readouterr().out


def test_onnx_decoder_applies_the_prior(tmp_path, data_root):
    from uniultra.data.io import read_image
    from uniultra.inference.onnx_export import PARITY_TOLERANCE, OnnxPredictor, export_onnx

    torch.manual_seed(0)
    m = build_model("uniultra-student-e8", image_size=128).eval()
    m.box_prior, m.box_prior_round = 4.0, 9.0  # the round weight too: the boxes below are 1.4:1 and 3.9:1
    image = read_image(data_root / "busi" / "images" / "benign_001.png")
    enc, _ = export_onnx(m, tmp_path / "m.onnx")
    o = OnnxPredictor(enc, 128)
    o.set_image(image)
    p = Predictor(m, "cpu")
    p.set_image(image)
    for kw in ({"box": (118, 58, 272, 171)}, {"box": (118, 58, 272, 171), "points": [(190, 110)], "labels": [0]},
               {"points": [(190, 110)], "labels": [1]}, {"box": (40, 100, 300, 160)}):
        logits, _ = o.predict_logits(**kw)
        ref = p.predict(boxes=[kw["box"]] if "box" in kw else None, points=kw.get("points"), labels=kw.get("labels"))
        assert np.abs(logits - ref.low_res_logits.numpy()).max() < PARITY_TOLERANCE


def test_box_from_points_reads_sam_corner_labels():
    c = torch.tensor([[[3.0, 4.0], [30.0, 40.0], [9.0, 9.0]], [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    lab = torch.tensor([[2, 3, 1], [1, -1, -1]])
    boxes, has = box_from_points(c, lab)
    assert boxes[0].tolist() == [3.0, 4.0, 30.0, 40.0] and has.tolist() == [1.0, 0.0]


def test_memory_propagation_refuses_a_prior_model():
    from uniultra.inference import propagate_memory

    m = build_model("sam2.1-hiera-tiny", image_size=64, random_init=True)
    m.memory_trained, m.box_prior = True, 2.0
    frames = [np.zeros((64, 64), np.uint8)] * 2
    with pytest.raises(InputError, match="box-shape prior.*--engine box"):
        propagate_memory(Predictor(m, "cpu"), frames, {0: [(10, 10, 40, 40)]})


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "x"])
def test_bad_weights_are_refused(bad):
    with pytest.raises(InputError, match="--box-prior"):
        check_weight(bad)
    with pytest.raises(InputError, match="--box-prior"):
        TrainConfig(data=["d"], out="o", box_prior=bad)


def test_training_stores_the_prior_and_resume_refuses_another(tmp_path):
    data = make_dataset(tmp_path / "syn", n_train=4, n_val=2, seed=1)
    base = dict(data=[str(data)], out=str(tmp_path / "run"), model="uniultra-student-e8", image_size=SIZE,
                peft="full", steps=4, batch_size=2, lr=1e-3, val_every=4, progress_bar=False, threads=1,
                augment=False, loss_weights="dice=1,bce=1,iou=1", adapter_only=False)
    r = train(TrainConfig(**base, box_prior=6.0), progress=False)
    assert r["status"] == "finished"
    assert build_model(r["model"]).box_prior == 6.0
    # trained on from that model without --box-prior: the model's own prior is kept
    r2 = train(TrainConfig(**{**base, "out": str(tmp_path / "run2"), "model": r["model"], "peft": None}), progress=False)
    assert build_model(r2["model"]).box_prior == 6.0
    r3 = train(TrainConfig(**{**base, "out": str(tmp_path / "run3"), "model": r["model"], "peft": None},
                           box_prior="6,12"), progress=False)
    assert prior_spec(build_model(r3["model"])) == "6,12"
    with pytest.raises(InputError, match="box_prior"):
        train(TrainConfig(**{**base, "steps": 6}, box_prior=2.0, resume=True), progress=False)


def test_propagation_weakens_the_prior_for_chained_boxes_only(model):
    """Key-frame boxes (the user's) get the model's whole prior, the boxes that propagation makes
    from the previous mask ``chain_prior`` of it; a model without a prior is called as before."""
    from uniultra.inference import propagate

    calls = []
    p = Predictor(model, "cpu")
    real = p.predict

    def spy(*a, **kw):
        calls.append(kw.get("prior_scale", 1.0))
        return real(*a, **kw)

    p.predict = spy
    frames = [np.full((64, 64), 40 * i, np.uint8) for i in range(4)]
    model.box_prior = 1e4  # masks = the ellipses: the chain never loses the object
    try:
        propagate(p, frames, {1: [(10, 10, 50, 40)]}, chain_prior=0.25)
    finally:
        model.box_prior = 0.0
    assert calls == [1.0, 0.25, 0.25, 0.25]  # key frame 1, then 2, 3 forward and 0 backward
    calls.clear()
    propagate(p, frames, {1: [(10, 10, 50, 40)]}, chain_prior=0.25)
    assert len(calls) >= 1 and set(calls) == {1.0}


def test_a_registry_entry_can_use_weights_with_its_own_prior(tmp_path, monkeypatch, capsys):
    """The bundled default is uniultra-mini-us6p's file used with a round-box weight: the same
    weights, its own prior; a user record with a bad prior is skipped with a warning."""
    import json

    from uniultra.registry import DEFAULT_MODEL, load_registry

    a, b = build_model("uniultra-mini-us6p"), build_model(DEFAULT_MODEL)
    assert (a.box_prior, a.box_prior_round) == (8.0, None)
    assert prior_spec(b) == load_registry()[DEFAULT_MODEL].extra["box_prior"] == "8,16"
    from uniultra.models.checkpoint import IMAGE_PATH_PREFIXES  # the rest (video memory) is rebuilt untrained

    sa, sb = a.sam.state_dict(), b.sam.state_dict()
    kept = [k for k in sa if k.startswith(IMAGE_PATH_PREFIXES)]
    assert len(kept) > 100 and all(torch.equal(sa[k], sb[k]) for k in kept)
    monkeypatch.setenv("UNIULTRA_CACHE", str(tmp_path))
    rec = {"name": "mine", "arch": "uniultra-student-e8", "image_size": 64, "file": "mine.pt",
           "source": "user", "extra": {"box_prior": "8,-2"}}
    (tmp_path / "mine.json").write_text(json.dumps(rec))
    assert "mine" not in load_registry()
    assert "skipping the model record" in capsys.readouterr().err
