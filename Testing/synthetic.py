"""Synthetic data for fast tests: a tiny dataset in the uniform layout (bright ellipses on noise)
for training and distillation, and short cine clips (a disc drifting over speckle) for batch
labelling."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def make_dataset(root: Path, n_train: int = 12, n_val: int = 3, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n_train + n_val):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.12, 0.25, 2) * size
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img = rng.normal(60, 20, (size, size)) + 110 * m
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray((m * 255).astype(np.uint8)).save(root / "masks" / f"im{i:02d}.png")
        rows.append((f"im{i:02d}", "train" if i < n_train else "val"))
    with open(root / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split"])
        w.writerows(rows)
    return root


def drifting_disc_frames(n: int, seed: int, h: int = 40, w: int = 48, rgb: bool = False) -> list[np.ndarray]:
    """``n`` frames of a bright disc (radius about 9 px, centre row 20) moving one pixel right per
    frame from column 15, over uniform speckle; uint8 (H, W), or (H, W, 3) colour with ``rgb``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = []
    for i in range(n):
        a = rng.random((h, w)) * 60
        a[(yy - 20) ** 2 + (xx - 15 - i) ** 2 < 80] += 150
        a = a.astype(np.uint8)
        out.append(np.stack([a, a // 2, 255 - a], -1) if rgb else a)
    return out
