"""A tiny synthetic dataset in the uniform layout (bright ellipses on noise), for fast training
and distillation tests."""

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
