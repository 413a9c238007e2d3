"""Leave one anatomy out: does a model trained without an anatomy segment it?

For each anatomy A of the shared data, a fold recipe (the format of ``recipes/``, run by
``uniultra recipe run``, so every fold resumes where it stopped) trains on the other anatomies
and scores on A's test split with 10%-jittered boxes, next to the ellipse inscribed in the same
boxes and LiteMedSAM zero-shot on the same images.  Settings are the same for every fold:

    .venv/bin/python benchmarks/generalization.py                     # teacher folds (decoder on
                                                                      # cached LiteMedSAM embeddings)
    .venv/bin/python benchmarks/generalization.py --student           # also distil a student per fold
    .venv/bin/python benchmarks/generalization.py --folds camus ctrus --teacher-steps 50   # a quick look
    .venv/bin/python benchmarks/generalization.py --hint-student --folds camus ctrus dltrack_apo
                                                  # the shipped default's recipe per fold (see below)
    .venv/bin/python benchmarks/generalization.py --student --box-prior 8           # students with
                                                  # the box-shape prior trained in (fine-tuning stage)
    .venv/bin/python benchmarks/generalization.py --hint-student --hint-weight 0 --box-prior 8 \
        --folds camus ctrus dltrack_apo           # default-recipe folds with the box-shape prior trained in
    .venv/bin/python benchmarks/generalization.py --inference-prior --student      # the students
                                                  # with the prior added at use (weight chosen on val)
    .venv/bin/python benchmarks/generalization.py --inference-prior --round-boxes --student   # the same with
                                                  # a pair of weights, for long and for round boxes (printed)
    .venv/bin/python benchmarks/generalization.py --student --level-terms        # students with DSKD's
                                                  # level terms (TinyViT's three attention stages)

``--hint-student``: the recipe of ``recipes/uniultra-mini-us6.yaml`` per fold:
``--hint-init`` (default ``uniultra-mini-us``) trained on the other anatomies' masks with feature
hints from LiteMedSAM's frozen encoder.  A fold whose left-out anatomy the initial model was
trained on is refused (it would not be leave-one-out): the model's checkpoint names its data.

The embedding cache (``--cache``, the one the default recipe fills) makes each fold cheap on a
CPU: only the decoder trains on the frozen encoder's stored embeddings.  Results: a table with
mean Dice and its 10th percentile over images (so that failures show) in
``benchmarks/results/generalization.md`` and ``.json``; each fold's runs in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANATOMIES = ["busi", "ddti", "hc18", "carotid", "camus", "ctrus", "dltrack_apo"]


def fold_recipe(args, left_out: str) -> dict:
    train_sets = [a for a in args.anatomies if a != left_out]
    data = [str(Path(args.data) / a) for a in train_sets]
    test = [str(Path(args.data) / left_out)]
    stages = {} if not args.teacher else {
        "teacher": {"command": "train", "options": {
            "model": "litemedsam", "peft": "decoder", "data": data, "max_images": args.train_images,
            "augment": False, "embed_cache": args.cache, "steps": args.teacher_steps, "batch_size": 8,
            "lr": 1.5e-4, "schedule": "cosine", "warmup_steps": 20, "loss_weights": "dice=1,bce=1,iou=1",
            "jitter": 0.1, "val_every": args.teacher_steps, "val_limit": args.val_images, "seed": 0,
            "device": args.device, "progress_bar": False}},
        "test-teacher": {"command": "evaluate", "options": {
            "model": "${stages.teacher.out}/model.pt", "data": test, "split": "test", "jitter": 0.1,
            "limit": args.test_images, "embed_cache": args.cache, "out_dir": "${out}/test-teacher/cases"}},
    }
    sfx = prior_suffix(args)
    if args.student:
        stages[f"student{sfx}"] = {"command": "distill", "options": {
            "teacher": "${stages.teacher.out}/model.pt", "student": "uniultra-mini-lm", "data": data,
            "max_images": args.train_images, "embed_cache": args.cache, "augment": False,
            "steps": args.student_steps, "batch_size": 8, "lr": 1e-3, "schedule": "cosine", "warmup_steps": 20,
            "val_every": args.student_steps, "val_limit": args.val_images,
            "finetune_steps": args.finetune_steps, "finetune_lr": 1e-4, "seed": 0, "device": args.device,
            "progress_bar": False, "threads": args.threads, "level_terms": args.level_terms,
            # the level terms need the teacher's encoder to run: once per image, shared by every fold
            # (the folds' decoder-only teachers share LiteMedSAM's frozen encoder; the cache is keyed by it)
            **({"cache_dir": str(Path(args.out) / "student-targets"), "level_weight": args.level_weight}
               if args.level_terms else {}),
            **({"box_prior": args.box_prior} if args.box_prior else {})}}
        stages[f"test-student{sfx}"] = {"command": "evaluate", "options": {
            "model": f"${{stages.student{sfx}.out}}/finetune/model.pt" if args.finetune_steps else
                     f"${{stages.student{sfx}.out}}/model.pt",
            "data": test, "split": "test", "jitter": 0.1, "limit": args.test_images,
            "out_dir": f"${{out}}/test-student{sfx}/cases"}}
    if args.hint_student:
        weights = [2.0 if a in ("busi", "ddti") else 1.0 for a in train_sets]
        stage = hint_stage(args)
        opts = {"model": args.hint_init, "peft": "full", "data": data, "max_images": args.train_images,
                "augment": False, "data_weights": weights, "steps": args.hint_steps, "batch_size": 8, "lr": 1e-4,
                "schedule": "cosine", "warmup_steps": 20, "loss_weights": "dice=1,bce=1,iou=1", "jitter": 0.15,
                "val_every": max(1, args.hint_steps // 4), "val_limit": args.val_images, "seed": 0,
                "device": args.device, "adapter_only": False, "progress_bar": False, "threads": args.threads}
        if args.hint_weight > 0:
            opts.update(teacher="litemedsam", teacher_cache=args.cache, hint_weight=args.hint_weight)
        if args.box_prior:
            opts.update(box_prior=args.box_prior)
        stages[stage] = {"command": "train", "options": opts}
        stages[f"test-{stage}"] = {"command": "evaluate", "options": {
            "model": f"${{stages.{stage}.out}}/model.pt", "data": test, "split": "test", "jitter": 0.1,
            "limit": args.test_images, "out_dir": f"${{out}}/test-{stage}/cases"}}
    return {"name": f"loo-{left_out}", "out": str(Path(args.out) / left_out), "stages": stages}


def hint_stage(args) -> str:
    """The stage name of the default recipe's fold run: ``hint`` (with LiteMedSAM feature hints)
    or ``masks`` (``--hint-weight 0``: the masks alone, the control)."""
    return ("hint" if args.hint_weight > 0 else "masks") + prior_suffix(args)


def prior_suffix(args) -> str:
    """``-prior`` for the runs trained with the box-shape prior (``--box-prior W``), ``-lv`` for the
    students distilled with DSKD's level terms (``--level-terms``)."""
    return ("-prior" if args.box_prior else "") + ("-lv" if getattr(args, "level_terms", False) else "")


def init_datasets(model: str) -> list[str]:
    """The data sets the model ``model`` was trained on (its checkpoint's record)."""
    from uniultra.models import resolve_model
    from uniultra.models.checkpoint import read_checkpoint

    _entry, path = resolve_model(model)
    if path is None or not Path(path).is_file():
        return []
    return list((read_checkpoint(path).get("uniultra") or {}).get("datasets") or [])


def zero_shot_recipe(args) -> dict:
    data = [str(Path(args.data) / a) for a in args.anatomies]
    return {"name": "loo-zeroshot", "out": str(Path(args.out) / "zeroshot"), "stages": {
        "test-zeroshot": {"command": "evaluate", "options": {
            "model": "litemedsam", "data": data, "split": "test", "jitter": 0.1, "limit": args.test_images,
            "embed_cache": args.cache}}}}


PRIOR_WEIGHTS = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0)
# (W, R) pairs: W for long boxes, R for round ones (uniultra/models/prior.py); R = W is one weight for all
PRIOR_PAIRS = tuple((w, r) for w in PRIOR_WEIGHTS for r in PRIOR_WEIGHTS if r >= w)


def inference_prior(args, left_out: str, round_boxes: bool = False) -> dict | None:
    """The fold's finished student (trained without a prior) with the box-shape prior added at use, its
    weight chosen from PRIOR_WEIGHTS (``round_boxes``: the pair (W, R) from PRIOR_PAIRS) on the val
    splits of the fold's *training* anatomies (``--val-images`` each), then scored on the left-out
    test split.  Writes ``<fold>/test-student-iprior/evaluation.json`` (``-rprior`` for pairs; with
    the choice and the val curve); skipped when the model is missing, reused when written."""
    from uniultra.evaluation.evaluate import evaluate_dataset
    from uniultra.inference import Predictor
    from uniultra.models import build_model

    fold = Path(args.out) / left_out
    src = fold / "student" / "finetune" / "model.pt"
    out = fold / f"test-student-{'rprior' if round_boxes else 'iprior'}" / "evaluation.json"
    if out.is_file():
        return json.loads(out.read_text())
    if not src.is_file():
        return None
    import hashlib

    import numpy as np
    import torch

    from uniultra.data.transforms import box_to_model, upsample_logits

    model = build_model(str(src))
    own = model.box_prior
    p = Predictor(model, "cpu")
    raw = {}  # the decoder's logits without a prior, once per image and boxes: each pair only adds its prior

    def seg(image, boxes, points, labels):
        key = (hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest(),
               tuple(tuple(b) for b in boxes))
        if key not in raw:
            kept = model.box_prior, model.box_prior_round
            model.box_prior, model.box_prior_round = 0.0, None
            p.set_image(image)
            raw[key] = p.predict(boxes=boxes).low_res_logits
            model.box_prior, model.box_prior_round = kept
        hw = image.shape[:2]
        mb = torch.as_tensor(box_to_model(np.asarray(boxes, np.float64), hw, p.size), dtype=torch.float32)
        low = model.with_box_prior(raw[key], mb)  # as Predictor.predict does (no refinement, no TTA)
        return list((upsample_logits(low[:, 0].float(), hw, p.size) > 0).numpy())

    def use(pair):
        model.box_prior, model.box_prior_round = own + pair[0], own + pair[1]

    pairs = PRIOR_PAIRS if round_boxes else tuple((w, w) for w in PRIOR_WEIGHTS)
    curve = {}
    for pair in pairs:
        use(pair)
        dice = [evaluate_dataset(seg, Path(args.data) / a, split="val", jitter=0.1, limit=args.val_images,
                                 progress=False)["datasets"][a]["dice"]
                for a in args.anatomies if a != left_out]
        curve[pair] = sum(dice) / len(dice)
    best = max(pairs, key=lambda wr: (round(curve[wr], 4), -sum(wr)))
    use(best)
    res = evaluate_dataset(seg, Path(args.data) / left_out, split="test", jitter=0.1, limit=args.test_images,
                           progress=False)
    if round_boxes:
        res.update(model=str(src), added_prior=list(best), val_curve={f"{w:g},{r:g}": v for (w, r), v in curve.items()})
    else:
        res.update(model=str(src), added_prior=best[0], val_curve={f"{w:g}": v for (w, _), v in curve.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"{left_out} student: + prior {best[0]:g},{best[1]:g} chosen on val (best {curve[best]:.3f}, one weight "
          f"for all: {max(v for (w, r), v in curve.items() if w == r):.3f}); "
          f"test Dice {res['datasets'][left_out]['dice']:.3f}", flush=True)
    return res


def run_recipe(recipe: dict, path: Path) -> None:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(recipe), path)
    cmd = [sys.executable, "-m", "uniultra.cli", "recipe", "run", str(path)]
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc:
        raise SystemExit(f"generalization: {' '.join(cmd)} failed with status {rc}; rerun to continue")


def read_eval(path: Path, name: str) -> dict | None:
    try:
        return json.loads(path.read_text())["datasets"].get(name)
    except (OSError, ValueError, KeyError):
        return None


def table(args) -> tuple[str, dict]:
    zs_path = Path(args.out) / "zeroshot" / "test-zeroshot" / "evaluation.json"
    rows, res = [], {}
    lv_col = any((Path(args.out) / a / "test-student-lv" / "evaluation.json").is_file() for a in args.anatomies)
    for a in args.anatomies:
        z = read_eval(zs_path, a) or {}
        t = read_eval(Path(args.out) / a / "test-teacher" / "evaluation.json", a) or {}
        s = read_eval(Path(args.out) / a / "test-student" / "evaluation.json", a) or {}
        h = read_eval(Path(args.out) / a / "test-hint" / "evaluation.json", a) or {}
        m = read_eval(Path(args.out) / a / "test-masks" / "evaluation.json", a) or {}
        sp = read_eval(Path(args.out) / a / "test-student-prior" / "evaluation.json", a) or {}
        mp = read_eval(Path(args.out) / a / "test-masks-prior" / "evaluation.json", a) or {}
        si = read_eval(Path(args.out) / a / "test-student-iprior" / "evaluation.json", a) or {}
        lv = read_eval(Path(args.out) / a / "test-student-lv" / "evaluation.json", a) or {}
        res[a] = {"images": z.get("n_images") or t.get("n_images"), "ellipse": z.get("ellipse_dice"),
                  "ellipse_p10": z.get("ellipse_dice_p10"), "zeroshot": z.get("dice"), "zeroshot_p10": z.get("dice_p10"),
                  "teacher": t.get("dice"), "teacher_p10": t.get("dice_p10"),
                  "student": s.get("dice"), "student_p10": s.get("dice_p10"),
                  "hint": h.get("dice"), "hint_p10": h.get("dice_p10"),
                  "masks": m.get("dice"), "masks_p10": m.get("dice_p10"),
                  "student_prior": sp.get("dice"), "student_prior_p10": sp.get("dice_p10"),
                  "masks_prior": mp.get("dice"), "masks_prior_p10": mp.get("dice_p10"),
                  "student_iprior": si.get("dice"), "student_iprior_p10": si.get("dice_p10"),
                  "student_lv": lv.get("dice"), "student_lv_p10": lv.get("dice_p10"),
                  "structure": {"ellipse": z.get("ellipse_structure_dice"), "zeroshot": z.get("structure_dice"),
                                "teacher": t.get("structure_dice"), "student": s.get("structure_dice"),
                                "hint": h.get("structure_dice"), "masks": m.get("structure_dice"),
                                "student_prior": sp.get("structure_dice"), "masks_prior": mp.get("structure_dice"),
                                "student_iprior": si.get("structure_dice"), "student_lv": lv.get("structure_dice")}}

        def f(k, r=res[a]):
            v, p = r.get(k), r.get(f"{k}_p10")
            return "-" if v is None else f"{v:.3f} ({p:.2f})" if p is not None else f"{v:.3f}"

        rows.append(f"| {a} | {res[a]['images'] or '-'} | {f('ellipse')} | {f('zeroshot')} | {f('teacher')} | "
                    f"{f('student')} | {f('student_prior')} | {f('student_iprior')} | {f('masks')} | {f('hint')} | "
                    f"{f('masks_prior')} |" + (f" {f('student_lv')} |" if lv_col else ""))
    head = [f"Leave one anatomy out (test splits, at most {args.test_images} images per anatomy, evenly spread; "
            f"10%-jittered boxes, the same seeded boxes for every column). Mean Dice (10th percentile).",
            f"Fold settings: teacher = LiteMedSAM decoder trained {args.teacher_steps} steps (batch 8) on cached "
            f"embeddings of at most {args.train_images} train images per other anatomy"
            + (f"; student = uniultra-mini-lm, {args.student_steps} DSKD + {args.finetune_steps} fine-tuning steps."
               if args.student else "; no student folds in this run.")
            + (f" Default-recipe columns: {args.hint_init} trained {args.hint_steps} steps (batch 8) on the other "
               "anatomies' masks alone, and with LiteMedSAM feature hints (weight 0.2); '-' where that fold was not "
               f"run or would not be leave-one-out ({args.hint_init} was trained on it)." if args.hint_student else "")
            + (f" Box-prior columns (uniultra/models/prior.py): the same runs with the prior of weight {args.box_prior:g} "
               "trained in (student: in its fine-tuning stage)." if args.box_prior else "")
            + " 'Student + prior at use': the student without a prior, the prior added when it is used, its weight "
              f"chosen from {', '.join(f'{w:g}' for w in PRIOR_WEIGHTS)} on the val splits of the fold's training "
              f"anatomies ({args.val_images} images each)."
            + (f" 'Student, DSKD level terms': the same student with the block terms of LiteMedSAM's three TinyViT "
               f"attention stages added to its DSKD loss (weight {args.level_weight:g} each)." if lv_col else ""),
            "", "| left-out anatomy | images | ellipse | LiteMedSAM zero-shot | teacher without it | student without it "
                "| student + box prior | student + prior at use | default recipe, masks | default recipe + hints "
                "| default recipe, masks + box prior |" + (" student, DSKD level terms |" if lv_col else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if lv_col else "")]
    multi = [a for a in args.anatomies if any(v is not None for v in res[a]["structure"].values())]
    if multi:
        rows += ["", "Anatomies with several labelled structures per image: mean Dice per structure (the union "
                 "Dice above hides a ring filled in by its neighbours).", "",
                 "| left-out anatomy | ellipse | LiteMedSAM zero-shot | teacher without it | student without it "
                 "| student + box prior | student + prior at use | default recipe, masks | default recipe + hints "
                 "| default recipe, masks + box prior |" + (" student, DSKD level terms |" if lv_col else ""),
                 "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if lv_col else "")]
        keys = ("ellipse", "zeroshot", "teacher", "student", "student_prior", "student_iprior", "masks", "hint",
                "masks_prior") + (("student_lv",) if lv_col else ())
        for a in multi:
            st = res[a]["structure"]
            rows.append(f"| {a} | " + " | ".join("-" if st[k] is None else f"{st[k]:.3f}" for k in keys) + " |")
    return "\n".join(head + rows), res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("UNIULTRA_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--anatomies", nargs="+", default=ANATOMIES)
    ap.add_argument("--folds", nargs="+", default=None, help="left-out anatomies to run (default: all)")
    ap.add_argument("--cache", default=str(REPO / "runs" / "lm" / "embed"))
    ap.add_argument("--out", default=str(REPO / "runs" / "generalization"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--train-images", type=int, default=120)
    ap.add_argument("--val-images", type=int, default=20)
    ap.add_argument("--test-images", type=int, default=60)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student", action="store_true", help="also distil a student per fold")
    ap.add_argument("--student-steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--hint-student", action="store_true",
                    help="also train the shipped default's recipe per fold (refused where --hint-init saw the fold)")
    ap.add_argument("--hint-init", default="uniultra-mini-us")
    ap.add_argument("--hint-steps", type=int, default=600)
    ap.add_argument("--hint-weight", type=float, default=0.2, help="0: the masks alone (the control run)")
    ap.add_argument("--box-prior", dest="box_prior", type=float, default=0.0,
                    help="train the student / default-recipe runs with this box-prior weight (stages *-prior)")
    ap.add_argument("--inference-prior", dest="inference_prior", action="store_true",
                    help="score each fold's finished student with the box-shape prior added at use, its weights chosen "
                         "on the fold's training anatomies' val splits (test-student-iprior)")
    ap.add_argument("--round-boxes", dest="round_boxes", action="store_true",
                    help="with --inference-prior: choose a pair (W for long boxes, R for round ones) instead of "
                         "one weight (test-student-rprior; printed, not a table column)")
    ap.add_argument("--level-terms", dest="level_terms", action="store_true",
                    help="students with DSKD's level terms from LiteMedSAM's TinyViT (stages *-lv; the teacher's "
                         "features are cached once per image in OUT/student-targets)")
    ap.add_argument("--level-weight", dest="level_weight", type=float, default=0.1,
                    help="with --level-terms: the weight of each level term (the embedding term has 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per training run")
    ap.add_argument("--no-teacher", dest="teacher", action="store_false",
                    help="skip the teacher (and student) stages (e.g. to run only --hint-student folds)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from finished folds")
    args = ap.parse_args()
    unknown = [a for a in (args.folds or []) if a not in args.anatomies]
    if unknown:
        print(f"generalization: --folds {unknown[0]}: not one of {', '.join(args.anatomies)}", file=sys.stderr)
        return 2
    if args.hint_student and not args.table_only:
        seen = set(init_datasets(args.hint_init))
        leak = [a for a in (args.folds or args.anatomies) if a in seen]
        if leak:
            print(f"generalization: --hint-student --folds {' '.join(leak)}: {args.hint_init} was trained on "
                  f"{', '.join(sorted(seen))}, so those folds would not be leave-one-out; choose other --folds "
                  "or another --hint-init", file=sys.stderr)
            return 2
    if args.inference_prior and not args.table_only:
        import torch

        torch.set_num_threads(args.threads or torch.get_num_threads())
        for a in args.folds or args.anatomies:
            inference_prior(args, a, args.round_boxes)
    elif not args.table_only:
        run_recipe(zero_shot_recipe(args), Path(args.out) / "zeroshot.yaml")
        for a in args.folds or args.anatomies:
            name = f"{a}{prior_suffix(args)}.yaml" if args.teacher else f"{a}-{hint_stage(args)}.yaml"
            run_recipe(fold_recipe(args, a), Path(args.out) / name)
    text, res = table(args)
    print(text)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generalization.md").write_text(text + "\n")
    (out / "generalization.json").write_text(json.dumps({"settings": vars(args), "anatomies": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
