"""Uniform layout reader, instances, mixing, the training dataset, COCO both ways, volume pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from uniultra.data.datasets import (
    SAM_UNET_MIN_AREA,
    PromptSegDataset,
    UniformDataset,
    VolumePairDataset,
    combine,
    mask_instances,
    read_coco,
    volume_pair_slices,
    write_coco,
)
from uniultra.errors import InputError


def test_uniform_dataset_real(dataset_root):
    ds = UniformDataset(dataset_root("busi"), "test")
    assert len(ds) == 129
    img, lab = ds.load(0)
    assert img.shape == lab.shape and set(np.unique(lab)) <= {0, 255}
    assert sum(len(ds.instances(i)) for i in range(len(ds))) == 133  # multi-lesion images
    all_ = UniformDataset(dataset_root("busi"), None)
    assert len(all_) == 453 + 65 + 129
    car = UniformDataset(dataset_root("carotid"), "test")
    clips = car.clips()
    assert len(clips) >= 1 and sum(len(v) for v in clips.values()) == len(car)
    for idx in clips.values():
        fr = [car.records[i].frame for i in idx]
        assert fr == sorted(fr)


def test_not_a_dataset(tmp_path):
    with pytest.raises(InputError, match="split.csv"):
        UniformDataset(tmp_path, "test")


def test_mask_instances_labels_and_min_area():
    lab = np.zeros((100, 100), np.uint8)
    lab[10:20, 10:20] = 255
    lab[20:30, 20:30] = 255  # touches diagonally: same 8-connected component
    lab[50:60, 50:60] = 255
    lab[70:90, 5:25] = 2
    lab[0, 99] = 1  # a 1-pixel speck (0.01% < 0.153%)
    inst = mask_instances(lab)
    assert sorted((t.label, t.area) for t in inst) == [(1, 1), (2, 400), (255, 100), (255, 200)]
    assert {t.box for t in inst if t.label == 255} == {(10, 10, 29, 29), (50, 50, 59, 59)}
    assert len(mask_instances(lab, SAM_UNET_MIN_AREA)) == 3
    assert len(mask_instances(lab, connectivity=4)) == 5


class _Src:
    def __init__(self, n, val):
        self.n, self.val = n, val

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.val


def test_combine_weights():
    c = combine([_Src(10, "a"), _Src(1000, "b")], [1, 1])
    assert len(c) == 1010
    idx = c.sample_indices(4000, 0)
    share_a = np.mean(idx < 10)
    assert 0.45 < share_a < 0.55
    s = list(c.sampler(200, seed=1))
    assert len(s) == 200 and s == list(c.sampler(200, seed=1))
    with pytest.raises(InputError):
        combine([_Src(1, "a")], [0])


def test_prompt_seg_dataset(dataset_root):
    src = UniformDataset(dataset_root("busi"), "test")
    ds = PromptSegDataset(src, size=128, max_instances=2, prompt="box+points", n_pos=1, n_neg=1, seed=3)
    a, b = ds[0], ds[0]
    assert a["image"].shape == (3, 128, 128) and a["masks"].shape == (2, 32, 32)
    assert a["point_coords"].shape == (2, 2, 2) and a["point_labels"].shape == (2, 2)
    assert a["valid"].tolist() == [True, False] and a["has_box"][0]
    assert all(torch.equal(a[k], b[k]) for k in ("image", "masks", "boxes", "point_coords"))
    assert a["point_labels"][0].tolist() == [1, 0]
    # the box prompt (model space) encloses most of the GT mask (GT at S/4: box / 4)
    bx = (a["boxes"][0] / 4).round().int().tolist()
    m = a["masks"][0]
    assert m.sum() > 0 and m[bx[1]:bx[3], bx[0]:bx[2]].sum() >= 0.9 * m.sum()
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 128, 128)
    aug = PromptSegDataset(src, size=128, augment=True, mask_div=1, seed=3)
    x1 = aug[0]
    aug.set_epoch(1)
    x2 = aug[0]
    assert x1["masks"].shape == (1, 128, 128)
    assert not torch.equal(x1["image"], x2["image"])  # augmentation varies by epoch
    aug.set_epoch(0)
    assert torch.equal(aug[0]["image"], x1["image"])  # ... and is seeded
    assert not torch.equal(PromptSegDataset(src, size=128, mask_div=1, seed=3)[0]["image"], x1["image"])


def test_coco_round_trip(tmp_path):
    lab = np.zeros((40, 50), np.uint8)
    lab[5:15, 5:20] = 255
    lab[25:35, 30:45] = 255
    lab[20:24, 2:6] = 3
    items = [("a.png", lab), ("b.png", np.zeros((40, 50), np.uint8))]
    p = write_coco(tmp_path / "rle.json", items)
    doc = json.loads(p.read_text())
    assert len(doc["annotations"]) == 3 and {c["id"] for c in doc["categories"]} == {3, 255}
    assert isinstance(doc["annotations"][0]["segmentation"]["counts"], str)
    back = read_coco(p)
    assert set(back) == {"a.png", "b.png"} and back["b.png"]["instances"] == []
    got = back["a.png"]["instances"]
    ref = mask_instances(lab)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert np.array_equal(g.mask, r.mask) and g.label == r.label and g.box == r.box
    pp = write_coco(tmp_path / "poly.json", items, polygons=True)
    assert isinstance(json.loads(pp.read_text())["annotations"][0]["segmentation"], list)
    for g, r in zip(read_coco(pp)["a.png"]["instances"], ref):
        inter = (g.mask & r.mask).sum()
        assert inter / (g.mask | r.mask).sum() > 0.75


def test_coco_from_dataset(dataset_root, tmp_path):
    ds = UniformDataset(dataset_root("ddti"), "test")
    ds.records = ds.records[:5]
    p = write_coco(tmp_path / "d.json", ds)
    back = read_coco(p)
    assert len(back) == 5
    name = str(ds.records[0].image.relative_to(ds.root))
    assert np.array_equal(np.any([t.mask for t in back[name]["instances"]], axis=0), ds.load(0)[1] != 0)
    assert json.loads(p.read_text())["categories"][0]["name"] == ds.meta["labels"]["255"]


def test_volume_pairs(tmp_path):
    vol = np.random.default_rng(0).integers(0, 1000, (6, 20, 30)).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.5, 0.5, 2.0))
    img.SetOrigin((10.0, 0.0, 0.0))
    sitk.WriteImage(img, str(tmp_path / "img.nrrd"))
    lab = np.zeros((6, 20, 30), np.uint8)
    lab[2, 5:10, 5:15] = 1
    lab[4, 12:18, 20:28] = 1
    # a Slicer-like .seg.nrrd cropped to the segment extent (different geometry)
    crop = sitk.GetImageFromArray(lab[2:5, 5:18, 5:28])
    crop.SetSpacing((0.5, 0.5, 2.0))
    crop.SetOrigin((10.0 + 5 * 0.5, 5 * 0.5, 2 * 2.0))
    sitk.WriteImage(crop, str(tmp_path / "lab.seg.nrrd"))
    sl = volume_pair_slices(tmp_path / "img.nrrd", tmp_path / "lab.seg.nrrd")
    assert [k for k, _, _ in sl] == [2, 4]
    for k, im, lb in sl:
        assert np.array_equal(im, vol[k]) and np.array_equal(lb != 0, lab[k] != 0)
    assert len(volume_pair_slices(tmp_path / "img.nrrd", tmp_path / "lab.seg.nrrd", skip_empty=False)) == 6
    assert len(volume_pair_slices(tmp_path / "img.nrrd", tmp_path / "lab.seg.nrrd", axis=2)) == 18  # labelled columns 5..14 and 20..27
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "lab.nii.gz"))
    vp = VolumePairDataset([(tmp_path / "img.nrrd", tmp_path / "img.nrrd")], skip_empty=True)
    assert len(vp) == 6
    ds = PromptSegDataset(VolumePairDataset([(tmp_path / "img.nrrd", tmp_path / "lab.seg.nrrd")]), size=32)
    assert ds[0]["valid"].all()
