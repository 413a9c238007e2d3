"""Training augmentation: the one pipeline (``uniultra train``/``distill`` and
``PromptSegDataset(augment=True)`` both use :class:`AugmentedSource`).

Torch-free (numpy + Pillow): geometry on the uint8 image and the label map with the same PIL
affine (bilinear for the image, nearest for labels), intensity through a 256-entry look-up
table, ~1 ms per image.
"""

from __future__ import annotations

import numpy as np

from uniultra.data.intensity import to_uint8_rgb


class AugmentedSource:
    """Wraps a source (``load(i) -> (image, label_map)``) and augments what it returns.

    Horizontal flip; rotation ``+-rot_deg``, isotropic scale ``exp(+-scale)``, translation
    ``+-shift`` of the size (bilinear for the image, nearest for labels, zero fill); gain, contrast
    and gamma through a 256-entry look-up table; multiplicative speckle-like noise of up to
    ``speckle``.  Deterministic given ``(seed, salt, i)``; ``salt`` is set by :class:`SaltedConcat`."""

    def __init__(self, source, seed: int = 0, flip_p: float = 0.5, rot_deg: float = 10.0, scale: float = 0.15,
                 shift: float = 0.05, gain: float = 0.2, contrast: float = 0.25, gamma: float = 0.3,
                 speckle: float = 0.1, size: int | None = None):
        self.source, self.seed, self.salt, self.size = source, int(seed), 0, size
        self.flip_p, self.rot_deg, self.scale, self.shift = flip_p, rot_deg, scale, shift
        self.gain, self.contrast, self.gamma, self.speckle = gain, contrast, gamma, speckle

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int):
        from PIL import Image

        image, lab = self.source.load(i)
        rng = np.random.default_rng([self.seed, int(self.salt), int(i), 7])
        img = np.asarray(image)
        if img.dtype != np.uint8:
            img = to_uint8_rgb(img)
        lab = np.asarray(lab)
        if self.size and lab.max(initial=0) < 256 and img.shape[:2] != (self.size, self.size):
            # resize to the model's S x S first (SAM2's convention, no aspect preservation): every
            # later step then runs on S x S, and the dataset's own resize becomes a no-op
            s2 = (self.size, self.size)
            img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(s2, Image.Resampling.BILINEAR))
            lab = np.asarray(Image.fromarray(lab.astype(np.uint8)).resize(s2, Image.Resampling.NEAREST)).astype(lab.dtype)
        lab_dtype = lab.dtype
        lab8 = lab.astype(np.uint8) if lab.max(initial=0) < 256 else None
        if rng.random() < self.flip_p:
            img, lab = img[:, ::-1], lab[:, ::-1]
        h, w = lab.shape
        th = np.deg2rad(rng.uniform(-self.rot_deg, self.rot_deg))
        s = float(np.exp(rng.uniform(-self.scale, self.scale)))
        tx, ty = rng.uniform(-self.shift, self.shift, 2) * np.array([w, h])
        if lab8 is not None and (abs(th) > 1e-6 or abs(s - 1) > 1e-6 or abs(tx) + abs(ty) > 1e-6):
            # output (x, y) -> input: rotate/scale about the centre, then translate
            c, sn = np.cos(th) / s, np.sin(th) / s
            cx, cy = (w - 1) / 2, (h - 1) / 2
            a, b = c, -sn
            d, e = sn, c
            x0 = cx - a * (cx + tx) - b * (cy + ty)
            y0 = cy - d * (cx + tx) - e * (cy + ty)
            coeffs = (a, b, x0, d, e, y0)
            img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).transform(
                (w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR))
            lab = np.asarray(Image.fromarray(np.ascontiguousarray(lab).astype(np.uint8)).transform(
                (w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.NEAREST)).astype(lab_dtype)
        g = np.exp(rng.uniform(-self.gain, self.gain))
        cst = np.exp(rng.uniform(-self.contrast, self.contrast))
        gam = np.exp(rng.uniform(-self.gamma, self.gamma))
        mean = float(img.mean()) / 255.0
        v = np.arange(256, dtype=np.float32) / 255.0
        v = np.clip(np.clip((v - mean) * cst + mean, 0, 1) * g, 0, 1) ** gam
        out = v[img]
        if self.speckle > 0:
            sigma = rng.uniform(0, self.speckle)
            noise = rng.standard_normal(out.shape[:2]).astype(np.float32)
            out = out * (1.0 + sigma * noise)[(...,) + (None,) * (out.ndim - 2)]
        img = np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)
        return np.ascontiguousarray(img), np.ascontiguousarray(lab)
