"""The README's pictures of a default change: test images with 10%-jittered boxes (seed 0, the
same boxes for every column), ground truth, then each model's mask with its Dice.

    .venv/bin/python scripts/figure_default.py [--out docs/images/default_us6.png]
    .venv/bin/python scripts/figure_default.py --models ellipse uniultra-mini-us6 uniultra-mini-us6p \
        --sets camus dltrack_apo busi --out docs/images/default_us6p.png

Rows: one test image per data set (image ``--index`` of each test split); columns: ground truth,
then ``--models`` (registry names or checkpoints; ``ellipse`` is the ellipse inscribed in each box).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("UNIULTRA_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    from PIL import Image, ImageDraw

    from uniultra.data.datasets import UniformDataset, mask_instances
    from uniultra.data.io import render_overlay
    from uniultra.data.prompts import jitter_box
    from uniultra.evaluation.metrics import baseline_mask, dice
    from uniultra.inference import Predictor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "docs" / "images" / "default_us6.png"))
    ap.add_argument("--sets", nargs="+", default=["dltrack_apo", "busi", "ctrus"])
    ap.add_argument("--index", type=int, default=3, help="which test image of each set (split order)")
    ap.add_argument("--size", type=int, default=256, help="panel size in pixels")
    ap.add_argument("--models", nargs="+", default=["uniultra-mini-us", "uniultra-mini-us6"],
                    help="registry names or checkpoints, or 'ellipse' (the ellipse inscribed in each box)")
    args = ap.parse_args()
    models = {m: None if m == "ellipse" else Predictor.from_name(m, "cpu") for m in args.models}
    rng = np.random.default_rng(0)
    rows = []
    for name in args.sets:
        ds = UniformDataset(DATA / name, "test")
        image, lab = ds.load(min(args.index, len(ds) - 1))
        inst = mask_instances(lab)
        boxes = [jitter_box(t.box, lab.shape, rng, jitter=0.1) for t in inst]
        gt = lab != 0
        panels = [(f"{name}: ground truth", render_overlay(image, [gt], boxes))]
        for label, p in models.items():
            if p is None:
                m = baseline_mask(boxes, lab.shape, "ellipse")
            else:
                p.set_image(image)
                m = np.any(p.predict(boxes=boxes).masks, axis=0)
            panels.append((f"{label}: Dice {dice(m, gt):.2f}", render_overlay(image, [m], boxes)))
        rows.append(panels)
    s, strip = args.size, 18
    sheet = Image.new("RGB", (s * (1 + len(models)), (s + strip) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, panels in enumerate(rows):
        for c, (title, rgb) in enumerate(panels):
            im = Image.fromarray(rgb).resize((s, s), Image.Resampling.BILINEAR)
            sheet.paste(im, (c * s, r * (s + strip) + strip))
            draw.text((c * s + 4, r * (s + strip) + 3), title, fill=(0, 0, 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
