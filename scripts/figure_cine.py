"""Figure: cine propagation with and without motion, on frames of one clip.

    python scripts/figure_cine.py --data ../shared/data/carotid --clip 202201121748100022VAS \
        --frames 0 26 27 28 29 30 47 --out docs/images/cine_motion.png

One row per setting of ``propagate(motion=...)``: the ground truth in red, the propagated mask in
green; each frame is labelled with its index in the clip and its Dice.  The key box (10%-jittered
from the first frame's ground truth, as in ``uniultra evaluate --clips``) is drawn in yellow on
frame 0.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from uniultra.data import prompts as P
from uniultra.data.datasets import UniformDataset, mask_instances, stable_seed
from uniultra.data.io import render_overlay
from uniultra.evaluation.metrics import dice
from uniultra.inference import Predictor, propagate
from uniultra.registry import DEFAULT_MODEL


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a cine dataset folder (split.csv with clip, frame)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--clip", required=True)
    ap.add_argument("--frames", type=int, nargs="+", required=True, help="frame indices to show")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--motions", nargs="+", default=["none", "ncc"])
    ap.add_argument("--jitter", type=float, default=0.1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    ds = UniformDataset(a.data, a.split)
    idx = ds.clips()[a.clip]
    loaded = [ds.load(i) for i in idx]
    frames, gts = [im for im, _ in loaded], [lb != 0 for _, lb in loaded]
    hw = gts[0].shape
    rng = np.random.default_rng([0, stable_seed(ds.name, a.clip)])
    boxes = [P.jitter_box(t.box, hw, rng, a.jitter) for t in mask_instances(loaded[0][1])]
    p = Predictor.from_name(a.model, device="cpu")
    rows = []
    for motion in a.motions:
        out = propagate(p, frames, {0: boxes}, motion=motion)
        tiles = []
        for k in a.frames:
            pred = out[k] if out[k] is not None else np.zeros(hw, bool)
            # contours only: the expert mask, then the propagated one with the key box (yellow)
            im = render_overlay(frames[k], [gts[k]], alpha=0.0, colors=[(255, 0, 0)])
            im = render_overlay(im, [pred], boxes if k == 0 else None, alpha=0.0, colors=[(0, 255, 0)])
            pim = Image.fromarray(im)
            d = ImageDraw.Draw(pim)
            d.text((6, 6), f"motion={motion}  frame {k}  Dice {dice(pred, gts[k]):.2f}", fill=(255, 255, 255))
            tiles.append(np.asarray(pim))
        rows.append(np.concatenate(tiles, 1))
    Image.fromarray(np.concatenate(rows, 0)).save(a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
