"""Metrics, baselines (reproducing the data README's numbers), COCO mAP, evaluate_dataset/clips."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from uniultra.data.datasets import UniformDataset, mask_instances
from uniultra.data.prompts import jitter_box
from uniultra.errors import Cancelled, InputError
from uniultra.evaluation import (
    baseline_mask,
    box_fill,
    coco_map,
    dice,
    ellipse_in_box,
    evaluate_clips,
    evaluate_dataset,
    hd95,
    iou,
)


def test_dice_iou_basic_and_empty():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:5] = True  # 20
    b[2:6, 0:5] = True  # 20, overlap 10
    assert dice(a, b) == pytest.approx(0.5) and iou(a, b) == pytest.approx(10 / 30)
    e = np.zeros((10, 10), bool)
    assert dice(e, e) == 1.0 and iou(e, e) == 1.0
    assert dice(a, e) == 0.0 and iou(e, a) == 0.0


def test_hd95():
    a = np.zeros((50, 50), bool)
    a[10:20, 10:20] = True
    b = np.roll(a, 3, axis=1)
    assert hd95(a, a) == 0.0
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(0.5, 2.0)) == pytest.approx(6.0)  # (row, col) spacing: 3 columns x 2 mm
    e = np.zeros_like(a)
    assert hd95(e, e) == 0.0 and math.isnan(hd95(a, e)) and math.isnan(hd95(e, a))


def test_ellipse_and_box_fill():
    hw = (50, 60)
    assert box_fill((3, 4, 3, 4), hw).sum() == 1 and box_fill((0, 0, 59, 49), hw).all()
    e = ellipse_in_box((10, 10, 49, 29), hw)  # 40 x 20 box
    assert abs(e.sum() - math.pi * 20 * 10) < 20
    assert e[20, 30] and not e[10, 10] and e.sum() == ellipse_in_box((10.0, 10.0, 49.0, 29.0), hw).sum()
    assert ellipse_in_box((5, 5, 5, 5), hw).sum() == 1  # a one-pixel box is that pixel
    assert ellipse_in_box((-10, -10, 9, 9), hw)[0, 0]  # clipped at the border, still defined
    u = baseline_mask([(0, 0, 9, 9), (20, 20, 29, 29)], hw, "boxfill")
    assert u.sum() == 200 and baseline_mask([], hw).sum() == 0


# data README: ellipse inscribed in the tight GT box, test split
README_ELLIPSE = {"busi": 0.896, "ddti": 0.919, "hc18": 0.983, "carotid": 0.954}


def _ellipse_dice(root, jitter=0.0, seed=0):
    ds = UniformDataset(root, "test")
    rng = np.random.default_rng(seed)
    scores = []
    for i in range(len(ds)):
        _, lab = ds.load(i)
        boxes = [jitter_box(t.box, lab.shape, rng, jitter) for t in mask_instances(lab)]
        scores.append(dice(baseline_mask(boxes, lab.shape, "ellipse"), lab != 0))
    return float(np.mean(scores))


@pytest.mark.parametrize("name", sorted(README_ELLIPSE))
def test_readme_ellipse_baseline(dataset_root, name):
    """Convention: one tight box per 8-connected component, union of ellipses, Dice per image on
    the binary foreground, mean over test images."""
    assert _ellipse_dice(dataset_root(name)) == pytest.approx(README_ELLIPSE[name], abs=0.005)


def test_readme_ellipse_baseline_jitter(dataset_root):
    assert _ellipse_dice(dataset_root("busi"), jitter=0.1, seed=0) == pytest.approx(0.854, abs=0.005)


def test_coco_map():
    a = np.zeros((40, 40), bool)
    a[5:15, 5:15] = True
    b = np.zeros((40, 40), bool)
    b[20:35, 20:30] = True
    gt = {"x": [a, b]}
    assert coco_map(gt, {"x": [(a, 0.9), (b, 0.8)]}) == pytest.approx({"map": 1.0, "map50": 1.0})
    half = np.zeros_like(b)
    half[20:28, 20:30] = True  # IoU 80/150 ~ 0.53: counts at 0.5, not above
    r = coco_map(gt, {"x": [(a, 0.9), (half, 0.8)]})
    assert r["map50"] == pytest.approx(1.0) and 0.4 < r["map"] < 0.7
    assert coco_map(gt, {"x": []}) == {"map": 0.0, "map50": 0.0}
    assert coco_map(gt, {"x": [a, b]})["map"] == pytest.approx(1.0)  # bare masks: score 1


def _ellipse_segmenter(image, boxes, points, labels):
    return [ellipse_in_box(b, image.shape[:2]) for b in boxes]


def test_evaluate_dataset_outputs(dataset_root, tmp_path):
    root = dataset_root("busi")
    r = evaluate_dataset(_ellipse_segmenter, root, jitter=0.1, limit=12, out_dir=tmp_path, progress=False)
    s = r["datasets"]["busi"]
    assert s["n_images"] == 12 and s["dice"] == pytest.approx(s["ellipse_dice"])
    assert s["boxfill_dice"] < s["ellipse_dice"] and 0 < s["map"] <= s["map50"] <= 1 and s["hd95"] > 0
    files = sorted(p.name for p in (tmp_path / "busi").iterdir())
    assert "per_image.csv" in files and sum(f.startswith("best_") for f in files) == 3
    assert sum(f.startswith("worst_") for f in files) == 3 and (tmp_path / "summary.json").is_file()
    rows = list(csv.DictReader(open(tmp_path / "busi" / "per_image.csv")))
    assert len(rows) == 12
    # --limit spreads over the split; prompts are seeded per image, so an image scores the same
    # in any subset that contains it
    r2 = evaluate_dataset(_ellipse_segmenter, root, jitter=0.1, limit=5, out_dir=tmp_path / "b", progress=False)
    rows2 = {x["id"]: x["dice"] for x in csv.DictReader(open(tmp_path / "b" / "busi" / "per_image.csv"))}
    common = [x for x in rows if x["id"] in rows2]
    assert r2["datasets"]["busi"]["n_images"] == 5 and len(common) >= 2  # both subsets hold the first and last image
    assert all(float(x["dice"]) == pytest.approx(float(rows2[x["id"]])) for x in common)


def test_evaluate_dataset_points_and_cancel(dataset_root):
    calls = []

    def seg(image, boxes, points, labels):
        calls.append((boxes, np.asarray(points).shape, list(labels)))
        x, y = np.asarray(points)[0].astype(int)
        m = np.zeros(image.shape[:2], bool)
        m[max(0, y - 20): y + 20, max(0, x - 20): x + 20] = True
        return [m], [0.5]

    r = evaluate_dataset(seg, dataset_root("ddti"), prompt="point", n_neg=1, limit=3, progress=False)
    s = r["datasets"]["ddti"]
    assert s["ellipse_dice"] is None and 0 < s["dice"] < 1
    assert calls[0][0] is None and calls[0][1] == (2, 2) and calls[0][2] == [1, 0]
    with pytest.raises(Cancelled):
        evaluate_dataset(seg, dataset_root("ddti"), prompt="point", progress=False, cancel=lambda: True)
    with pytest.raises(InputError):
        evaluate_dataset(seg, dataset_root("ddti"), prompt="scribble")


def test_evaluate_clips_static_baseline(dataset_root):
    """README: the first-frame ellipse held for the whole clip scores ~0.40 on carotid (test)."""
    seen = []

    def hold(frames, key_boxes):
        seen.append(len(frames))
        m = baseline_mask(key_boxes[0], frames[0].shape[:2], "ellipse")
        return [m] + [m.copy() for _ in frames[1:]]

    r = evaluate_clips(hold, dataset_root("carotid"), progress=False)
    s = r["datasets"]["carotid"]
    assert s["static_ellipse_dice"] == pytest.approx(0.40, abs=0.01)
    assert s["dice"] == pytest.approx(s["static_ellipse_dice"])
    assert s["n_frames"] == sum(seen) - len(seen)


def test_structure_dice_sees_a_filled_ring(tmp_path):
    """Several labelled structures per image: the union Dice of a segmenter that fills every box is
    near perfect on a disk inside a ring (the disk covers the ring's hole), the per-structure Dice
    shows the ring is wrong; single-structure data reports no structure Dice."""
    from PIL import Image

    yy, xx = np.mgrid[:128, :128]
    r = np.hypot(yy - 64, xx - 64)
    lab = np.where(r < 25, 1, np.where(r < 40, 2, 0)).astype(np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray((lab * 60).astype(np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(lab).save(tmp_path / "masks" / "a.png")
    (tmp_path / "split.csv").write_text("id,split\na,test\n")

    def fill(image, boxes, points, labels):
        out = []
        for x0, y0, x1, y1 in boxes:
            m = np.zeros(image.shape[:2], bool)
            m[int(y0):int(y1) + 1, int(x0):int(x1) + 1] = True
            out.append(m)
        return out

    s = evaluate_dataset(fill, tmp_path, jitter=0.0, progress=False)["datasets"][tmp_path.name]
    assert s["dice"] > 0.85 and s["structure_dice"] < s["dice"] - 0.1  # ring: box 81x81 vs 3,063 px
    assert s["ellipse_structure_dice"] < s["ellipse_dice"]
    (tmp_path / "masks" / "a.png").unlink()
    Image.fromarray(((lab > 0) * 255).astype(np.uint8)).save(tmp_path / "masks" / "a.png")
    s1 = evaluate_dataset(fill, tmp_path, jitter=0.0, progress=False)["datasets"][tmp_path.name]
    assert "structure_dice" not in s1
