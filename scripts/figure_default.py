"""The README's picture of the default change: test images with 10%-jittered boxes (seed 0, the
same boxes for both models), ground truth, the previous default and the new one.

    .venv/bin/python scripts/figure_default.py [--out docs/images/default_us6.png]

Rows: one test image per data set (image ``--index`` of each test split); columns: ground
truth, ``uniultra-mini-us``, ``uniultra-mini-us6``, each with its Dice in the panel's title strip.
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
    from uniultra.evaluation.metrics import dice
    from uniultra.inference import Predictor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "docs" / "images" / "default_us6.png"))
    ap.add_argument("--sets", nargs="+", default=["dltrack_apo", "busi", "ctrus"])
    ap.add_argument("--index", type=int, default=3, help="which test image of each set (split order)")
    ap.add_argument("--size", type=int, default=256, help="panel size in pixels")
    args = ap.parse_args()
    models = {"uniultra-mini-us (previous)": Predictor.from_name("uniultra-mini-us", "cpu"),
              "uniultra-mini-us6 (default)": Predictor.from_name("uniultra-mini-us6", "cpu")}
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
            p.set_image(image)
            m = np.any(p.predict(boxes=boxes).masks, axis=0)
            panels.append((f"{label}: Dice {dice(m, gt):.2f}", render_overlay(image, [m], boxes)))
        rows.append(panels)
    s, strip = args.size, 18
    sheet = Image.new("RGB", (s * 3, (s + strip) * len(rows)), "white")
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
