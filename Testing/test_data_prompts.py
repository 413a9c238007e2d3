"""Seeded prompt simulation."""

from __future__ import annotations

import numpy as np
import pytest

from uniultra.data.prompts import (
    clip_box,
    jitter_box,
    mask_box,
    negative_points,
    positive_points,
    simulate_prompt,
    simulate_prompts,
)


def _blob(h=60, w=80):
    m = np.zeros((h, w), bool)
    m[10:30, 20:60] = True  # box (20, 10, 59, 29)
    return m


def test_mask_box():
    assert mask_box(_blob()) == (20, 10, 59, 29)
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    assert mask_box(one) == (3, 2, 3, 2)
    assert mask_box(np.zeros((5, 5))) is None


def test_jitter_bounds_and_determinism():
    box, hw = (20, 10, 59, 29), (60, 80)
    assert jitter_box(box, hw, 0, jitter=0.0) == box
    outs = [jitter_box(box, hw, np.random.default_rng(s), jitter=0.1) for s in range(200)]
    arr = np.array(outs)
    # width 40, height 20: edges move at most 4 px in x and 2 px in y (after rounding)
    assert np.abs(arr - np.array(box)).max(axis=0).tolist() <= [4, 2, 4, 2]
    assert len(set(outs)) > 20
    assert jitter_box(box, hw, 5, jitter=0.1) == jitter_box(box, hw, 5, jitter=0.1)
    sh = np.array([jitter_box(box, hw, s, jitter=0.0, shift_px=5) for s in range(100)])
    assert np.abs(sh - np.array(box)).max() == 5


def test_jitter_clipped_never_empty():
    hw = (10, 10)
    for s in range(300):
        x0, y0, x1, y1 = jitter_box((0, 0, 0, 0), hw, s, jitter=3.0, shift_px=20)
        assert 0 <= x0 <= x1 <= 9 and 0 <= y0 <= y1 <= 9
    assert clip_box((12, -3, -4, 20), hw) == (0, 0, 9, 9)


def test_points():
    m = _blob()
    rng = np.random.default_rng(0)
    pos = positive_points(m, 50, rng)
    assert pos.shape == (50, 2) and m[pos[:, 1].astype(int), pos[:, 0].astype(int)].all()
    neg = negative_points(m, 50, rng)
    assert not m[neg[:, 1].astype(int), neg[:, 0].astype(int)].any()
    # near the object: within the box grown by 25%
    assert neg[:, 0].min() >= 20 - 10 and neg[:, 0].max() <= 59 + 10
    assert np.array_equal(positive_points(m, 1, None, "centroid"), [[40.0, 20.0]])
    ring = np.zeros((41, 41), bool)
    yy, xx = np.mgrid[:41, :41]
    r = np.hypot(yy - 20, xx - 20)
    ring[(r > 10) & (r < 18)] = True
    c = positive_points(ring, 1, None, "centroid")[0]  # centroid is in the hole -> interior point
    assert ring[int(c[1]), int(c[0])]
    i = positive_points(ring, 1, None, "interior")[0]
    assert ring[int(i[1]), int(i[0])]
    assert positive_points(np.zeros((3, 3)), 2, 0).shape == (0, 2)


def test_simulate_prompt_kinds_and_seed():
    m = _blob()
    p = simulate_prompt(m, 0, "box", jitter=0.1)
    assert p.box is not None and len(p.points) == 0
    p = simulate_prompt(m, 0, "point", n_pos=2, n_neg=1)
    assert p.box is None and p.points.shape == (3, 2) and p.labels.tolist() == [1, 1, 0]
    p = simulate_prompt(m, 0, "box+points", n_pos=1, n_neg=2)
    assert p.box is not None and p.labels.tolist() == [1, 0, 0]
    kinds = {simulate_prompt(m, s, "mixed").kind for s in range(30)}
    assert kinds == {"box", "point"}
    a = simulate_prompts([m, ~m], 7, "mixed", jitter=0.1, n_neg=1)
    b = simulate_prompts([m, ~m], np.random.default_rng(7), "mixed", jitter=0.1, n_neg=1)
    assert [(x.box, x.points.tolist(), x.kind) for x in a] == [(x.box, x.points.tolist(), x.kind) for x in b]
    with pytest.raises(ValueError):
        simulate_prompt(m, 0, "scribble")
    with pytest.raises(ValueError):
        simulate_prompt(np.zeros_like(m), 0, "box")
