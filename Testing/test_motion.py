"""Motion between frames (uniultra.inference.motion) and the propagation that uses it."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import ndimage as ndi

from uniultra.data.io import read_image
from uniultra.errors import InputError
from uniultra.inference import propagate
from uniultra.inference.motion import estimate_shift, shift_box, to_gray
from uniultra.inference.predictor import Prediction


def _texture(h=240, w=260, seed=0):
    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.random((h, w)), 2.5) * 255).astype(np.float32)


@pytest.mark.parametrize("dx,dy", [(0, 0), (17, -9), (-45, 30), (3, 52)])
def test_shift_of_a_moved_texture_is_found(dx, dy):
    img = _texture()
    cur = np.roll(img, (dy, dx), axis=(0, 1))
    ex, ey, score = estimate_shift(img, cur, (90, 80, 149, 139))  # 60 px box: searched +-120 px
    assert abs(ex - dx) <= 2 and abs(ey - dy) <= 2 and score > 0.8, (ex, ey, score)


def test_shift_near_the_border_and_of_a_small_box():
    img = _texture()
    cur = np.roll(img, (4, 6), axis=(0, 1))
    assert estimate_shift(img, cur, (0, 0, 30, 25))[:2] == (6, 4)  # search window clipped at the corner
    cur = np.roll(img, (4, -6), axis=(0, 1))
    assert estimate_shift(img, cur, (120, 120, 127, 126))[:2] == (-6, 4)


def test_a_structure_leaving_the_image_is_followed_to_the_edge():
    """A patch at the image's edge whose content moves out of the field of view: it is matched on
    the part still inside (masked NCC), not on some look-alike across the image."""
    wide = _texture(240, 400, seed=3)
    prev, cur = wide[:, 50:310], wide[:, 62:322]  # the view slides right: content moves 12 px left
    assert estimate_shift(prev, cur, (0, 100, 40, 150))[:2] == (-12, 0)
    prev, cur = wide[:, 100:360], wide[:, 85:345]  # and 15 px right, out at the right edge
    dx, dy, _ = estimate_shift(prev, cur, (220, 100, 259, 150))
    assert abs(dx - 15) <= 2 and dy == 0  # 2 px: the 61 px tall patch is matched on a 2 px grid
    # 20 of the patch's 48 columns gone (less than half): still found on the rest
    assert estimate_shift(wide[:, 50:310], wide[:, 70:330], (0, 100, 40, 150))[:2] == (-20, 0)


def test_flat_patch_or_tiny_box_does_not_move():
    flat = np.full((50, 60), 7.0, np.float32)
    assert estimate_shift(flat, flat, (10, 10, 30, 30)) == (0, 0, 0.0)
    img = _texture(50, 60)
    assert estimate_shift(img, img, (10, 10, 10, 10), context=0.0) == (0, 0, 0.0)
    with pytest.raises(ValueError, match="differ in size"):
        estimate_shift(img, img[:40], (10, 10, 20, 20))


def test_shift_box_stays_inside():
    assert shift_box((10, 10, 19, 19), -30, 5, (40, 50)) == (0, 15, 9, 24)
    assert shift_box((10, 10, 19, 19), 100, 100, (40, 50)) == (40, 30, 49, 39)


def test_gray_of_any_frame_type():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 30
    assert to_gray(rgb).shape == (4, 5) and np.allclose(to_gray(rgb), 10)
    assert to_gray(np.ones((4, 5), np.uint16) * 4000).dtype == np.float32


def test_shift_matches_the_vessel_motion_in_a_real_carotid_clip(data_root):
    """In the carotid test clips the artery moves by up to about its own width between stored
    frames (frames were thinned); the estimated shift of the patch around the first mask follows
    the ground-truth centroid to within a few pixels wherever it moved far."""
    root = data_root / "carotid"
    rows = [r for r in csv.DictReader(open(root / "split.csv")) if r["split"] == "test"]
    clips: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: int(r["frame"])):
        clips.setdefault(r["clip"], []).append(r["id"])
    errors, big = [], 0
    for ids in clips.values():
        for a, b in zip(ids, ids[1:]):
            ga = read_image(root / "masks" / f"{a}.png") > 0
            gb = read_image(root / "masks" / f"{b}.png") > 0
            ya, xa = np.nonzero(ga)
            yb, xb = np.nonzero(gb)
            true = (xb.mean() - xa.mean(), yb.mean() - ya.mean())
            if np.hypot(*true) < 0.5 * (xa.max() - xa.min()):
                continue  # small motions: box chaining already follows them
            big += 1
            ia, ib = (to_gray(read_image(root / "images" / f"{i}.png")) for i in (a, b))
            dx, dy, _ = estimate_shift(ia, ib, (xa.min(), ya.min(), xa.max(), ya.max()))
            errors.append(np.hypot(dx - true[0], dy - true[1]))
    assert big >= 3, "the test clips should hold some large jumps"
    assert np.median(errors) < 6 and np.mean(np.asarray(errors) < 12) >= 0.8, errors


class _DarkDiskPredictor:
    """A stand-in model: inside the box, the dark pixels (a clean geometric answer, so the test
    is about the boxes propagation gives, not about a network)."""

    def set_image(self, image):
        self.image = np.asarray(image)

    def predict(self, boxes, **_):
        masks = []
        for x0, y0, x1, y1 in boxes:
            m = np.zeros(self.image.shape[:2], bool)
            m[y0:y1 + 1, x0:x1 + 1] = self.image[y0:y1 + 1, x0:x1 + 1] < 60
            masks.append(m)
        return Prediction(np.asarray(masks), np.ones(len(boxes), np.float32), None)


def _jumping_disk_clip(n=6, r=16, step=30):
    """A dark disk on bright texture that moves ``step`` px per frame (more than its diameter)."""
    base = _texture(120, 320, seed=1) * 0.5 + 120
    yy, xx = np.mgrid[:120, :320]
    frames, gts = [], []
    for k in range(n):
        cx = 40 + step * k
        disk = (xx - cx) ** 2 + (yy - 60) ** 2 <= r * r
        f = base.copy()
        f[disk] = 20 + 10 * np.sin(xx[disk] / 3.0)  # a little texture inside too
        # the background moves with the disk, as tissue does when the probe slides
        f[~disk] = np.roll(base, step * k, axis=1)[~disk]
        frames.append(f.astype(np.uint8))
        gts.append(disk)
    return frames, gts


def test_propagation_follows_a_structure_that_jumps_further_than_its_size():
    frames, gts = _jumping_disk_clip()
    key = (24, 44, 56, 76)
    moved = propagate(_DarkDiskPredictor(), frames, {0: [key]}, direction="forward")
    still = propagate(_DarkDiskPredictor(), frames, {0: [key]}, direction="forward", motion="none")

    def dice(m, g):
        return 0.0 if m is None else 2 * (m & g).sum() / (m.sum() + g.sum())

    assert all(dice(m, g) > 0.9 for m, g in zip(moved, gts)), [dice(m, g) for m, g in zip(moved, gts)]
    assert all(m is None for m in still[1:])  # in place, the box finds nothing dark: the object is lost


def test_unknown_motion_is_refused():
    frames, _ = _jumping_disk_clip(n=2)
    with pytest.raises(InputError, match="motion 'optical-flow' is not known"):
        propagate(_DarkDiskPredictor(), frames, {0: [(24, 44, 56, 76)]}, motion="optical-flow")
