"""Bundle the default made by ``recipes/uniultra-mini-us6.yaml`` into the repository.

    .venv/bin/python scripts/bundle_default.py [--run runs/uniultra-mini-us6]

Writes ``Resources/models/uniultra-mini-us6.pt`` (fp16, the single-image path only: the video
memory modules were never trained, and loading rebuilds them as they were) with the run's
provenance, test results when the recipe's test stage has run, and its registry entry (with the
file's SHA-256) in ``Resources/models/registry.json``.  Check the result with
``uniultra models`` and ``uniultra info --model uniultra-mini-us6``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAME = "uniultra-mini-us6"
ENTRY = {
    "description": "Bundled default: UniUltra-mini (0.86M-parameter encoder) fine-tuned from uniultra-mini-us on "
                   "BUSI, DDTI, HC18, carotid, C-TRUS and DL_Track train splits (CAMUS left out: licence). "
                   "Model card: docs/models/uniultra-mini-us6.md",
    "license": "Apache-2.0 (weights trained on public research datasets; see the model card)",
}


def main() -> int:
    from uniultra.fileio import atomic_write_text
    from uniultra.models import build_model, save_checkpoint
    from uniultra.models.checkpoint import read_checkpoint, sha256_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "runs" / NAME))
    args = ap.parse_args()
    src = Path(args.run) / "train" / "model_full.pt"
    if not src.is_file():
        print(f"bundle_default: {src} not found; run `uniultra recipe run recipes/{NAME}.yaml` first",
              file=sys.stderr)
        return 2
    info = read_checkpoint(src)["uniultra"]
    summary = json.loads((Path(args.run) / "train" / "summary.json").read_text())
    model = build_model(str(src))
    model.name = NAME
    meta = {k: info[k] for k in ("datasets", "train_images", "seed", "val_jitter") if k in info}
    meta.update(name=NAME, base=None, base_sha256=None, method="full", recipe=f"recipes/{NAME}.yaml",
                initialised_from="uniultra-mini-us", val_dice=summary.get("best_val_dice"),
                val_dice_per_dataset=summary.get("best_val"), step=summary.get("best_step"),
                train_wall_s=round(float(summary.get("elapsed_s") or 0.0), 1), train_device="2-core CPU")
    test = Path(args.run) / "test" / "evaluation.json"
    if test.is_file():
        ds = json.loads(test.read_text())["datasets"]
        meta["test_dice_jitter10"] = {k: v.get("dice") for k, v in ds.items()}
    dst = REPO / "Resources" / "models" / f"{NAME}.pt"
    save_checkpoint(model, dst, meta, half=True, image_only=True)
    reg_path = REPO / "Resources" / "models" / "registry.json"
    reg = json.loads(reg_path.read_text())
    entry = {"name": NAME, "arch": model.arch.name, "image_size": model.image_size, **ENTRY, "url": None,
             "sha256": sha256_file(dst), "file": f"models/{NAME}.pt", "source": "bundled", "peft": "ch-adapter",
             "params": sum(p.numel() for p in model.sam.parameters())}
    reg["models"] = [m for m in reg["models"] if m["name"] != NAME]
    at = next((i for i, m in enumerate(reg["models"]) if m["name"] == "uniultra-mini-us"), 0)
    reg["models"].insert(at, entry)
    atomic_write_text(reg_path, json.dumps(reg, indent=2) + "\n")
    print(f"{dst} ({dst.stat().st_size / 1e6:.1f} MB), registry entry {NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
