"""Uniform layout reader, instances, mixing, the training dataset and its augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniultra.data.augment import AugmentedSource
from uniultra.data.datasets import (
    SAM_UNET_MIN_AREA,
    PromptSegDataset,
    UniformDataset,
    combine,
    mask_instances,
)
from uniultra.errors import InputError


def test_uniform_dataset_real(dataset_root):
    ds = UniformDataset(dataset_root("busi"), "test")
    assert len(ds) == 129
    img, lab = ds.load(0)
    assert img.shape == lab.shape and set(np.unique(lab)) <= {0, 255}
    # multi-lesion images; malignant_019 also has a 6-px sliver beside its 22,262-px lesion: no prompt
    assert sum(len(ds.instances(i)) for i in range(len(ds))) == 132
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


def test_specks_of_a_label_get_no_prompt():
    """Resizing a multi-label mask leaves slivers of one label between two others (CAMUS: ~90 per
    image): a component under 1% of its label's largest and under 0.1% of the image is dropped;
    an isolated small object (the largest of its label) and anything above either bound stay."""
    lab = np.zeros((200, 200), np.uint8)
    lab[10:60, 10:60] = 2        # 2,500 px structure
    lab[100, 100:102] = 2        # 2 px sliver of the same label: dropped
    lab[150:155, 150:155] = 2    # 25 px = 1% of the largest: kept
    lab[190, 190] = 3            # 1 px, but the only object of label 3: kept
    got = sorted((t.label, t.area) for t in mask_instances(lab))
    assert got == [(2, 25), (2, 2500), (3, 1)]
    assert len(mask_instances(lab, drop_specks=False)) == 4


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
    w = c.sample_weights  # what the trainer's EpochSampler draws with
    assert w.sum() == pytest.approx(1.0) and w[:10].sum() == pytest.approx(0.5)  # 10 items weigh as 1000
    assert np.allclose(w[:10], 0.05) and np.allclose(w[10:], 0.0005)
    assert combine([_Src(10, "a"), _Src(30, "b")], [3, 1]).sample_weights[:10].sum() == pytest.approx(0.75)
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
    assert isinstance(aug.source, AugmentedSource)  # one augmentation pipeline: the trainer's
    x1 = aug[0]
    aug.set_epoch(1)
    x2 = aug[0]
    assert x1["masks"].shape == (1, 128, 128)
    assert not torch.equal(x1["image"], x2["image"])  # augmentation varies by epoch
    aug.set_epoch(0)
    assert torch.equal(aug[0]["image"], x1["image"])  # ... and is seeded
    assert not torch.equal(PromptSegDataset(src, size=128, mask_div=1, seed=3)[0]["image"], x1["image"])


class _Shape:
    """An asymmetric 'L' whose image is bright exactly where its label is set."""

    def __init__(self, h=96, w=128):
        lab = np.zeros((h, w), np.uint8)
        lab[20:70, 30:45] = 255
        lab[55:70, 45:100] = 255
        self.lab, self.img = lab, np.where(lab > 0, 230, 20).astype(np.uint8)

    def __len__(self):
        return 1

    def load(self, i):
        return self.img, self.lab


def test_augmentation_moves_label_with_image():
    """Flip, rotation, scale and shift move the label exactly as the image; intensity changes only
    the image.  A label left behind (or flipped alone) would break the overlap."""
    src = _Shape()
    moved = 0
    for salt in range(12):
        aug = AugmentedSource(src, seed=5, rot_deg=25, scale=0.3, shift=0.15, gain=0, contrast=0, gamma=0,
                              speckle=0)
        aug.salt = salt
        img, lab = aug.load(0)
        assert img.shape == src.img.shape and lab.shape == src.lab.shape and set(np.unique(lab)) <= {0, 255}
        bright, fg = img > 125, lab > 0
        assert fg.sum() > 0.4 * (src.lab > 0).sum()
        iou = (bright & fg).sum() / (bright | fg).sum()
        assert iou > 0.9, (salt, iou)
        moved += not np.array_equal(fg, src.lab > 0)
        again = AugmentedSource(src, seed=5, rot_deg=25, scale=0.3, shift=0.15, gain=0, contrast=0, gamma=0,
                                speckle=0)
        again.salt = salt
        assert all(np.array_equal(a, b) for a, b in zip(again.load(0), (img, lab)))  # seeded by (seed, salt, i)
    assert moved == 12
    # intensity augmentation leaves the label alone and changes the image
    aug = AugmentedSource(src, seed=5, flip_p=0, rot_deg=0, scale=0, shift=0)
    img, lab = aug.load(0)
    assert np.array_equal(lab, src.lab) and not np.array_equal(img, src.img)
