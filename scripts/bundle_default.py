"""Bundle a default made by its recipe (``recipes/<name>.yaml``) into the repository.

    .venv/bin/python scripts/bundle_default.py [--name uniultra-mini-us6p] [--run runs/<name>]

Writes ``Resources/models/<name>.pt`` (fp16, the single-image path only: the video memory
modules were never trained, and loading rebuilds them as they were) with the run's provenance,
test results when the recipe's test stage has run, and its registry entry (with the file's
SHA-256) in ``Resources/models/registry.json`` (``uniultra.models.checkpoint.bundle_model``, the
one bundling step shared with ``scripts/bundle_lm.py``).  Check the result with
``uniultra models`` and ``uniultra info --model <name>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LICENSE = "Apache-2.0 (weights trained on public research datasets; see the model card)"
MODELS = {
    "uniultra-mini-us6": {
        "init": "uniultra-mini-us",
        "description": "UniUltra-mini (0.86M-parameter encoder) fine-tuned from uniultra-mini-us on BUSI, DDTI, "
                       "HC18, carotid, C-TRUS and DL_Track train splits (CAMUS left out: licence). "
                       "Model card: docs/models/uniultra-mini-us6.md",
    },
    "uniultra-mini-us6p": {
        "init": "uniultra-mini-us6",
        "description": "Bundled default: uniultra-mini-us6 trained on with the box-shape prior (the ellipse "
                       "inscribed in each box, weight 8, added to its logits); same six anatomies (CAMUS left "
                       "out: licence). Model card: docs/models/uniultra-mini-us6p.md",
    },
}


def main() -> int:
    from uniultra.models import build_model
    from uniultra.models.checkpoint import bundle_model, read_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="uniultra-mini-us6p", choices=sorted(MODELS))
    ap.add_argument("--run", help="the recipe's output folder (default runs/<name>)")
    args = ap.parse_args()
    name, spec = args.name, MODELS[args.name]
    run = Path(args.run or REPO / "runs" / name)
    src = run / "train" / "model_full.pt"
    if not src.is_file():
        print(f"bundle_default: {src} not found; run `uniultra recipe run recipes/{name}.yaml` first",
              file=sys.stderr)
        return 2
    info = read_checkpoint(src)["uniultra"]
    summary = json.loads((run / "train" / "summary.json").read_text())
    model = build_model(str(src))
    model.name = name
    meta = {k: info[k] for k in ("datasets", "train_images", "seed", "val_jitter") if k in info}
    meta.update(base=None, base_sha256=None, method="full", recipe=f"recipes/{name}.yaml",
                initialised_from=spec["init"], val_dice=summary.get("best_val_dice"),
                val_dice_per_dataset=summary.get("best_val"), step=summary.get("best_step"),
                train_wall_s=round(float(summary.get("elapsed_s") or 0.0), 1), train_device="2-core CPU")
    test = run / "test" / "evaluation.json"
    if test.is_file():
        ds = json.loads(test.read_text())["datasets"]
        meta["test_dice_jitter10"] = {k: v.get("dice") for k, v in ds.items()}
    dst = REPO / "Resources" / "models" / f"{name}.pt"
    # the structure is uniultra-mini-us's (CH-Adapters in every block), trained in full since
    bundle_model(model, dst, meta, "ch-adapter", spec["description"], LICENSE, image_only=True,
                 before="uniultra-mini-us6" if name != "uniultra-mini-us6" else "uniultra-mini-us")
    print(f"{dst} ({dst.stat().st_size / 1e6:.1f} MB), registry entry {name}"
          + (f", box prior {model.box_prior:g}" if model.box_prior else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
