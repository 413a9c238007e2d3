"""to_model_input intensity/dtype handling and the coordinate conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniultra.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    box_to_model,
    image_to_model_coords,
    prepare_batch,
    scale_intensity,
    to_model_input,
    upsample_logits,
)
from uniultra.errors import InputError


def _unnorm(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * s + m


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_to_model_input_dtypes(dtype):
    rng = np.random.default_rng(0)
    img = (rng.random((30, 50)) * 200 + 20).astype(dtype)
    x, scale = to_model_input(img, 64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    assert scale == (64 / 50, 64 / 30)
    v = _unnorm(x)
    assert v.min() >= -1e-5 and v.max() <= 1 + 1e-5
    assert torch.allclose(v[:, 0], v[:, 1]) and torch.allclose(v[:, 1], v[:, 2])  # grey repeated


def test_uint8_used_as_is_and_others_min_max():
    img8 = np.full((8, 8), 51, np.uint8)
    assert np.allclose(scale_intensity(img8), 0.2)
    img16 = np.zeros((100, 100), np.uint16)
    img16[:, 50:] = 4000
    s = scale_intensity(img16)
    assert s.min() == 0 and s.max() == 1 and s.shape == (100, 100, 3)
    f = np.linspace(-1000, 3000, 10000).reshape(100, 100)
    f[0, 0] = 1e9  # a hot pixel is clipped by the robust percentiles
    s = scale_intensity(f)
    assert s[50, 50, 0] == pytest.approx((f[50, 50] - np.percentile(f, 0.5)) / np.ptp(np.percentile(f, [0.5, 99.5])),
                                         abs=1e-4)


@pytest.mark.parametrize("value", [0, 7, 65535])
def test_constant_image_no_nan(value):
    for img in (np.full((10, 12), value, np.uint16), np.full((10, 12), float(value))):
        x, _ = to_model_input(img, 32)
        assert torch.isfinite(x).all()
    x, _ = to_model_input(np.full((4, 4), np.nan), 8)
    assert torch.isfinite(x).all()


def test_rgb_rgba_and_bad_shapes():
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[..., 0] = 255
    x, _ = to_model_input(rgb, 16)
    v = _unnorm(x)
    assert torch.allclose(v[0, 0], torch.ones(16, 16), atol=1e-5) and torch.allclose(v[0, 1], torch.zeros(16, 16), atol=1e-5)
    rgba = np.concatenate([rgb, np.full((10, 20, 1), 17, np.uint8)], axis=2)
    assert torch.allclose(to_model_input(rgba, 16)[0], x)
    assert to_model_input(np.zeros((10, 20, 1), np.uint8), 16)[0].shape == (1, 3, 16, 16)
    with pytest.raises(InputError, match="shape"):
        to_model_input(np.zeros((2, 3, 4, 5)), 16)
    with pytest.raises(InputError):
        to_model_input(np.zeros((0, 5)), 16)
    assert prepare_batch([rgb, np.zeros((5, 7), np.uint16)], 16).shape == (2, 3, 16, 16)


def test_coordinate_conventions():
    hw, S = (100, 200), 400  # H=100, W=200
    assert np.allclose(image_to_model_coords((10, 20), hw, S), (20, 80))
    # a box around a single pixel p covers exactly that pixel's footprint in model space
    assert np.allclose(box_to_model((10, 20, 10, 20), hw, S), (20, 80, 22, 84))
    b = np.array([[0, 0, 199, 99], [5, 6, 7, 8]])
    assert np.allclose(box_to_model(b, hw, S)[0], (0, 0, S, S))
    assert np.allclose(box_to_model(b, hw, S)[1], (10, 24, 16, 36))  # (x1 + 1, y1 + 1) scaled: inclusive corners


def test_box_matches_resized_pixels():
    """A model-space box computed from an image box encloses exactly the resized object."""
    img = np.zeros((60, 90), np.uint8)
    img[12:31, 30:61] = 255  # pixels x 30..60, y 12..30
    S = 180
    x, _ = to_model_input(img, S)
    v = _unnorm(x)[0, 0].numpy() > 0.5
    ys, xs = np.nonzero(v)
    mb = box_to_model((30, 12, 60, 30), img.shape, S)
    assert xs.min() == pytest.approx(mb[0], abs=1) and xs.max() + 1 == pytest.approx(mb[2], abs=1)
    assert ys.min() == pytest.approx(mb[1], abs=1) and ys.max() + 1 == pytest.approx(mb[3], abs=1)


def test_upsample_logits_threshold():
    """What the predictor, validation and the ONNX path do with logits: resize, threshold at 0."""
    S = 64
    logits = -torch.ones(1, 1, S // 4, S // 4) * 5
    logits[..., 4:8, 2:6] = 5  # model-space rows 16..32, cols 8..24 of S=64
    m = (upsample_logits(logits, (128, 256)) > 0).numpy()
    assert m.dtype == bool and m.shape == (1, 1, 128, 256)
    ys, xs = np.nonzero(m[0, 0])
    assert abs(ys.min() - 32) <= 2 and abs(ys.max() - 63) <= 2 and abs(xs.min() - 32) <= 4 and abs(xs.max() - 95) <= 4
    m2 = (upsample_logits(logits[0, 0], (128, 256), size=S) > 0).numpy()
    assert m2.shape == (128, 256) and (m2 != m[0, 0]).mean() < 0.01
    t = upsample_logits(torch.zeros(3, 2, 8, 8) + 1, (5, 6)) > 0
    assert t.shape == (3, 2, 5, 6) and t.all()
