#!/usr/bin/env python
"""Train the bundled default model ``uniultra-mini-us``: stage 1 of ``recipes/uniultra-mini-us.yaml``
adapted to this machine, then the fp16 checkpoint with the model's name and provenance.

The recipe (``recipes/uniultra-mini-us/stage1.yaml``) holds every training setting; this script
only changes what depends on the machine or the budget: the batch size and DataLoader workers
on a CPU (8 and 0), the number of steps (``--steps``, ``--epochs``, or ``--minutes``: an 80-step
calibration picks the steps that fit a wall-clock budget; 6.5 minutes by default on CUDA when
no ``--steps``/``--epochs`` is given), and with it the warm-up (3%%) and validation interval (6
validations).  The whole two-stage model is ``uniultra recipe run recipes/uniultra-mini-us.yaml``.

Full scale (one H100, ~8 min)::

    python scripts/train_default.py --data-root ../shared/data --out Resources/models/uniultra-mini-us.pt

Small CPU check::

    python scripts/train_default.py --steps 20 --batch-size 8 --image-size 128 --out /tmp/mini.pt --work /tmp/mini
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASETS = ("busi", "ddti", "hc18", "carotid")
NAME = "uniultra-mini-us"
RECIPE = REPO / "recipes" / "uniultra-mini-us" / "stage1.yaml"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--out", required=True, help="where to write the fp16 checkpoint (.pt)")
    ap.add_argument("--work", default=None, help="run folder (metrics, resume state); default: <out>.run/")
    ap.add_argument("--recipe", default=str(RECIPE), help="train recipe (default: stage 1 of uniultra-mini-us)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs instead of steps")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock budget: an 80-step calibration sets --steps to fit (and a time limit stops the "
                         "run, keeping the best, if it is slower) (default 6.5 on CUDA when neither --steps nor "
                         "--epochs is given)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's on CUDA, 8 on CPU")
    ap.add_argument("--num-workers", type=int, default=None, help="default: min(12, CPU cores - 2) on CUDA, 0 on CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--eval-test", action=argparse.BooleanOptionalAction, default=False,
                    help="after training, report test-split Dice with 10%%-jittered boxes vs the ellipse baseline")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any other recipe key, e.g. lr=1e-3")
    return ap.parse_args(argv)


def config(args, data: list[str], work: Path, **given):
    from uniultra.training.config import TrainConfig, load_config

    opts = {"data": data, "out": str(work), "device": args.device, "resume": args.resume,
            "overwrite": not args.resume, **given}
    for key in ("image_size", "seed"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    return load_config(TrainConfig, args.recipe, opts, args.overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from uniultra.data.datasets import UniformDataset
    from uniultra.models.checkpoint import atomic_torch_save
    from uniultra.training.cli_commands import setup_logging
    from uniultra.training.engine import resolve_device
    from uniultra.training.trainer import train

    setup_logging()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    data = [str(Path(args.data_root) / d) for d in args.datasets]
    for d in data:
        if not (Path(d) / "split.csv").is_file():
            print(f"error: dataset {d} not found (no split.csv); pass --data-root", file=sys.stderr)
            return 2
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.stem + ".run")
    machine = {}
    if args.batch_size or not cuda:
        machine["batch_size"] = args.batch_size or 8
    if args.num_workers is not None or not cuda:
        machine["num_workers"] = args.num_workers if args.num_workers is not None else 0
    elif cuda:
        machine["num_workers"] = min(12, max(2, (os.cpu_count() or 4) - 2))
    cfg = config(args, data, work, **machine)
    n_train = sum(len(UniformDataset(d, "train")) for d in data)
    minutes = args.minutes
    if minutes is None and cuda and args.steps is None and args.epochs is None:
        minutes = 6.5
    t_begin = time.perf_counter()
    steps = args.steps or (args.epochs * max(1, n_train // cfg.batch_size) if args.epochs else None)
    if not steps and minutes:
        steps = calibrate(args, data, work, machine, minutes, t_begin)
    if steps:
        cfg = config(args, data, work, **machine, steps=steps, warmup_steps=max(1, int(0.03 * steps)),
                     val_every=max(1, steps // 6), log_every=max(1, min(50, steps // 50)))
    if minutes:  # hard guard: whatever the calibration said, stop (keeping the best) in time
        cfg.time_limit_s = max(30.0, minutes * 60 - (time.perf_counter() - t_begin) - 40)
    print(f"training {NAME}: {n_train} train images, {cfg.steps} steps of batch {cfg.batch_size} "
          f"({cfg.steps * cfg.batch_size / max(1, n_train):.1f} epochs) at {cfg.image_size}px on {device}, "
          f"{cfg.num_workers} workers", flush=True)
    res = train(cfg)
    wall = time.perf_counter() - t_begin
    if res["status"] not in ("finished", "early-stopped"):
        print(f"training {res['status']} at step {res['step']}; rerun with --resume", file=sys.stderr)
        return 1
    ck = torch.load(res["model_full"], map_location="cpu", weights_only=True)
    ck["uniultra"].update({"name": NAME, "datasets": list(args.datasets), "val_dice": res["best_val_dice"],
                           "val_dice_per_dataset": res["best_val"], "train_steps": res["step"],
                           "train_wall_s": round(wall, 1), "recipe": "recipes/uniultra-mini-us.yaml (stage1)"})
    atomic_torch_save(ck, out)
    for f in ("metrics.csv", "curves.png"):
        if (work / f).is_file():
            shutil.copyfile(work / f, out.with_name(f"{out.stem}.{f}"))
    print(f"\nsaved {out} ({out.stat().st_size / 1e6:.1f} MB) after {wall:.0f} s; best val step {res['best_step']}")
    print("val Dice (10% jittered boxes):")
    for k, v in sorted(res["best_val"].items()):
        print(f"  {k:10s} {v:.4f}")
    if args.eval_test:
        summary = eval_test(out, data, device)
        (out.with_name(f"{out.stem}.test.json")).write_text(json.dumps(summary, indent=2))
    return 0


def calibrate(args, data, work: Path, machine: dict, minutes: float, t_begin: float) -> int:
    """Time 80 steps (and one validation) of the real configuration; return the number of steps
    that fits the remaining budget with 6 validations."""
    from uniultra.training.trainer import train

    stamps = []
    cfg = config(args, data, work / "calibration", **machine, steps=80, schedule="constant", val_every=10**9,
                 progress_bar=False)
    cfg.resume, cfg.overwrite = False, True
    train(cfg, progress=lambda done, total, msg: stamps.append(time.perf_counter()), log=lambda m: None)
    t_end = time.perf_counter()
    shutil.rmtree(work / "calibration", ignore_errors=True)
    # steady state only: the first steps are served from the workers' prefetch buffer
    per_step = (stamps[-2] - stamps[40]) / (len(stamps) - 2 - 40)
    val_s = max(0.0, stamps[-1] - stamps[-2] - per_step)
    left = minutes * 60 - (t_end - t_begin) - 7 * val_s - 30  # 30 s: start-up and final saves
    steps = max(50, int(left / per_step))
    print(f"calibration: {per_step * 1000:.0f} ms/step ({machine.get('batch_size', 64) / per_step:.0f} img/s), "
          f"validation {val_s:.1f} s -> {steps} steps for {minutes:g} min", flush=True)
    return steps


def eval_test(ckpt: Path, data, device) -> dict:
    """Test-split Dice with 10%-jittered boxes (seed 0), next to the inscribed-ellipse baseline."""
    import numpy as np
    import torch

    from uniultra.data.transforms import box_to_model, to_model_input, upsample_logits
    from uniultra.evaluation import evaluate_dataset
    from uniultra.models import build_model

    model = build_model(str(ckpt), device="cpu").float().to(device).eval()
    S = model.image_size

    @torch.no_grad()
    def seg(image, boxes, points, labels):
        x, _ = to_model_input(image, S)
        hw = image.shape[:2]
        emb = model.encode(x.to(device))
        b = torch.as_tensor(np.asarray([box_to_model(bx, hw, S) for bx in boxes]), dtype=torch.float32,
                            device=device)
        logits, iou = model.decode(emb, b)
        return [(upsample_logits(lg[0].float().cpu(), hw, S) > 0).numpy() for lg in logits], iou[:, 0].float().cpu()

    out = {}
    print("test Dice (10% jittered boxes, seed 0)   model   ellipse")
    for d in data:
        r = evaluate_dataset(seg, d, split="test", jitter=0.1, prompt="box", seed=0, progress=False)
        for name, s in r["datasets"].items():
            out[name] = {"dice": s["dice"], "ellipse_dice": s["ellipse_dice"], "hd95": s["hd95"], "map": s["map"]}
            print(f"  {name:10s}                            {s['dice']:.4f}  {s['ellipse_dice']:.4f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
